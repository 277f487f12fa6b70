"""Measure what a real training step allocates, to check the cost model against.

:func:`measure_step` runs real training steps on a batch as :class:`~fedpeft.federation.client.ClientTrainer`
does (zero grads, forward, backward, clip, optimizer step) and records the steady-state step
(the second) with :func:`torch.profiler.profile` and ``profile_memory=True``: the profiler sees
every allocation and free of torch's CPU allocator, with the running total. Independent of the
cost model's trace (no fake tensors, no saved-tensor hooks): the peak is what was allocated at
the worst moment, temporaries included.

- ``peak``: the tensors alive when the step starts (weights, buffers, optimizer state, the
  batch: counted by storage) + the highest running total during the step.
- ``after_forward``: the running total when the forward returns: what the graph keeps (saved
  activations, the outputs), measured by the allocator.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Measured:
    peak: int  # bytes
    after_forward: int  # bytes allocated by the forward and still alive when it returns
    baseline: int  # bytes alive when the step starts


def make_optimizer(params: list[nn.Parameter], fed) -> torch.optim.Optimizer:
    """The optimizer :meth:`~fedpeft.federation.client.ClientTrainer.make_optimizer` builds."""
    if fed.optimizer == "sgd":
        return torch.optim.SGD(params, lr=fed.lr, momentum=fed.momentum, weight_decay=fed.weight_decay)
    return torch.optim.AdamW(params, lr=fed.lr, weight_decay=fed.weight_decay)


def _alive_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure_step(model: nn.Module, batch: dict[str, torch.Tensor], fed) -> Measured:
    """Peak bytes of a steady-state training step of ``model`` on ``batch``.

    Trains the model's trainable parameters for two steps (a throwaway copy of their values is
    restored afterwards, gradients cleared): use it on a model you may change, or accept that
    its values are restored but the random state advances.

    Parameters
    ----------
    model : nn.Module
        The prepared model.
    batch : dict
        Model inputs and ``labels``.
    fed : FederationConfig
        ``optimizer, lr, momentum, weight_decay, max_grad_norm``.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = make_optimizer(params, fed)
    was_training = model.training
    model.train()

    def step(mark: bool = False) -> None:
        with record_function("fedpeft_forward") if mark else _null():
            loss = model(**batch).loss
        loss.backward()
        del loss
        if fed.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, fed.max_grad_norm)
        optimizer.step()

    try:
        step()  # creates the optimizer state
        optimizer.zero_grad(set_to_none=True)  # before the profiler: it sees no frees of older blocks
        state = [t for s in optimizer.state.values() for t in s.values()]
        baseline = _alive_bytes([*model.parameters(), *model.buffers(), *state, *batch.values()])
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():  # kineto prints "USDT: ... profiler_start/stop" lines to fd 2
            prof.__enter__()
        try:
            step(mark=True)
        finally:
            with _quiet_stderr():
                prof.__exit__(None, None, None)
        allocs, forward_end = [], None
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
            elif node.name == "fedpeft_forward":
                forward_end = node.end_time_ns
            stack.extend(node.children)
        allocs.sort()
        total = peak = 0
        after_forward = None
        for t, size in allocs:
            if after_forward is None and forward_end is not None and t > forward_end:
                after_forward = total
            total += size
            peak = max(peak, total)
    finally:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, v in zip(params, before):
                p.copy_(v)
        model.train(was_training)
    return Measured(baseline + peak, after_forward if after_forward is not None else total, baseline)


def measure_client(model: nn.Module, info, cfg, names: list[str] | None = None) -> Measured:
    """:func:`measure_step` for a run's client: the cost model's batch (``federation.batch_size``
    rows of ``model.max_length`` real tokens, :func:`~fedpeft.budgets.costmodel.probe_batch`), only
    ``names`` trainable (default: the prepared flags), the flags, values and random state restored."""
    from fedpeft.budgets.costmodel import probe_batch

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        if names is not None:
            keep = set(names)
            for n, p in model.named_parameters():
                p.requires_grad_(n in keep)
        batch = probe_batch(model, info, cfg.federation.batch_size, cfg.model.max_length)
        with torch.random.fork_rng(devices=[]):
            return measure_step(model, batch, cfg.federation)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null inside (C++ code writes there, not to ``sys.stderr``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
