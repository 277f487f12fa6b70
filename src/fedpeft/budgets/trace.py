"""What autograd keeps for backward, found by a shape-only trace (no real compute, no data).

The prepared model runs one forward and backward pass under
:class:`torch._subclasses.fake_tensor.FakeTensorMode` on a synthetic batch of the configured
shape: every tensor is a *fake* (shape, dtype, no storage contents), so a MiniLM trace at batch
32 x 64 tokens takes 1-2 s and allocates nothing of the batch's size. A dispatch mode
(:class:`_LiveBytes`) simulates the allocator: the peak bytes alive, temporaries included. :func:`torch.autograd.graph.saved_tensors_hooks` sees every tensor the graph
saves for backward; their *unique storages* (views of one buffer counted once) are the
activation memory, exactly as the real graph would hold it: the trace follows each method's own
graph (peft wrappers, LoRA, adapters, prompts that lengthen the sequence, dropout masks, frozen
parts that build no graph).

Parameters and buffers are swapped for fakes module by module (one fake per real tensor, so tied
weights stay tied) and restored afterwards; saved weights are then recognised by storage and
left out (they are counted as weights). The real parameters never see the trace: no gradient,
no changed value, and the random state is forked.

Each saved storage is attributed to the part of the model that saved it first: ``below`` (the
embeddings, prompts), block ``i`` of :func:`fedpeft.models.transformer_blocks`, or ``above``
(final norm, pooler, head, loss).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import weakref

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fedpeft.models import DECODER_FAMILIES, ModelInfo, structure_key, transformer_blocks

BELOW, ABOVE = "below", "above"


class _LiveBytes(TorchDispatchMode):
    """Simulates the allocator on fake tensors: every new storage an op returns is live until the
    last tensor on it dies (a weakref finalizer; autograd keeps saved tensors' Python objects
    alive). ``live`` and ``peak`` are bytes above where tracking started."""

    def __init__(self, current: list[str] | None = None) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = self.peak = self.largest = 0
        self.current = current  # the part now running (None: stop tracking parts)
        self.part, self.entry = None, 0
        self.part_peaks: dict[str, int] = {}  # part -> peak live bytes above those at its start
        self.part_entries: dict[str, int] = {}  # part -> live bytes when it started

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in self.refs:
                if key in inputs:  # in place on, or a view of, an untracked tensor (weights, batch)
                    continue
                self.refs[key], self.sizes[key] = 0, storage.nbytes()
                self.live += self.sizes[key]
                self.largest = max(self.largest, self.sizes[key])
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        if self.current is not None:
            if self.current[0] != self.part:
                self.part, self.entry = self.current[0], self.live - sum(
                    self.sizes.get(t.untyped_storage()._cdata, 0) for t in pytree.tree_leaves(out)
                    if isinstance(t, torch.Tensor))  # live before this op
                self.part_entries.setdefault(self.part, self.entry)
            self.part_peaks[self.part] = max(self.part_peaks.get(self.part, 0), self.live - self.entry)
        return out


@dataclass
class SavedTensors:
    """What one training pass keeps, by model part, from the shape-only trace.

    Attributes
    ----------
    by_part : dict[str, int]
        Saved-for-backward bytes per part, in forward order: ``"below"``, ``"0"`` ... ``"n-1"``
        (blocks), ``"above"``.
    largest : int
        Bytes of the largest single saved storage.
    largest_output : int
        Bytes of the largest tensor any op created, saved or not.
    forward_peak, backward_peak : int
        Peak bytes of the tensors the forward (then forward + backward) created and still held,
        temporaries and gradients included, from a simulated allocator (:class:`_LiveBytes`);
        the backward peak is over the whole pass, so at least the forward peak.
    forward_by_part : dict[str, int]
        Per part, the forward's peak live bytes above those alive when the part started (its
        working set, saved tensors included): what running the part adds at its worst moment.
    carried_by_part : dict[str, int]
        Per part, the unsaved bytes alive when it starts (the hidden states it gets, the
        attention mask): live at its start less what the parts before it saved.
    count : int
        Number of unique saved storages.
    """

    by_part: dict[str, int] = field(default_factory=dict)
    largest: int = 0
    largest_output: int = 0
    forward_peak: int = 0
    backward_peak: int = 0
    forward_by_part: dict[str, int] = field(default_factory=dict)
    carried_by_part: dict[str, int] = field(default_factory=dict)
    count: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_part.values())


def synthetic_batch(model: nn.Module, info: ModelInfo, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Model inputs + ``labels`` shaped like a real training batch of fedpeft (values arbitrary).

    Text: ``input_ids``, ``attention_mask`` ``(B, L)`` and, for left-padded decoders,
    ``position_ids`` (what :meth:`fedpeft.data.EncodedSplit.batch` gives); a causal LM's rows are
    right-padded and have ``(B, L)`` labels. Images:
    ``pixel_values`` ``(B, C, S, S)`` at the model's image size. Create it inside a
    ``FakeTensorMode`` to get fakes.
    """
    config = model.config
    labels = torch.zeros(batch_size, dtype=torch.long)  # (B,); causal-lm: (B, L), below
    if info.modality == "image":
        size = config.image_size
        return {"pixel_values": torch.zeros(batch_size, config.num_channels, size, size), "labels": labels}
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long)  # (B, L)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if info.task == "causal-lm":  # a label per token, right-padded rows: no position ids
        batch["labels"] = torch.zeros_like(ids)
    elif info.family in DECODER_FAMILIES:
        batch["position_ids"] = torch.zeros_like(ids)
    return batch


def batch_bytes(batch: dict[str, torch.Tensor]) -> int:
    """Bytes of a batch's tensors (they are alive during the whole step)."""
    return sum(t.numel() * t.element_size() for t in batch.values())


@contextmanager
def _fake_weights(model: nn.Module, mode: "torch._subclasses.fake_tensor.FakeTensorMode") -> Iterator[set[int]]:
    """Swap every parameter and buffer for a fake (same object -> same fake); yields the fakes'
    storage keys, restores the real tensors on exit."""
    fakes: dict[int, torch.Tensor] = {}
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for module in model.modules():  # each module once, also when shared (peft's word_embeddings)
            for table in (module._parameters, module._buffers):
                for name, real in list(table.items()):
                    if real is None:
                        continue
                    if id(real) not in fakes:
                        fakes[id(real)] = mode.from_tensor(real)  # keeps requires_grad
                    swapped.append((table, name, real))
                    table[name] = fakes[id(real)]
        yield {t.untyped_storage()._cdata for t in fakes.values()}
    finally:
        for table, name, real in reversed(swapped):
            table[name] = real


def _part_hooks(blocks: nn.ModuleList, current: list[str]) -> list:
    """Forward hooks that keep ``current[0]`` at the part of the model now running."""
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, str(i))))
        handles.append(block.register_forward_hook(
            lambda m, a, o, i=i: current.__setitem__(0, ABOVE if i == len(blocks) - 1 else str(i + 1))))
    return handles


_TRACED: dict[tuple, SavedTensors] = {}  # (structure_key, blocks, B, L) -> the trace


def trace_saved(model: nn.Module, info: ModelInfo, batch_size: int, seq_len: int) -> SavedTensors:
    """What one training pass of the prepared model keeps at ``(batch_size, seq_len)``.

    Parameters
    ----------
    model : nn.Module
        The prepared model (its ``requires_grad`` flags decide the graph); in train mode for
        the trace (dropout saves its masks), back in its previous mode after.
    info : ModelInfo
        The model's family, modality and number of blocks.
    batch_size, seq_len : int
        The batch shape; ``seq_len`` is ignored for images. Methods that add tokens (prompt)
        add them inside the model, and the trace sees them.

    Returns
    -------
    SavedTensors
        Traced once per process for each model structure (:func:`fedpeft.models.structure_key`)
        and batch shape; a copy is returned.
    """
    key = (structure_key(model), info.num_layers, batch_size, seq_len)
    if key not in _TRACED:
        blocks = transformer_blocks(model, info.num_layers).modules
        _TRACED[key] = trace_module(model, lambda: synthetic_batch(model, info, batch_size, seq_len), blocks)
    return copy.deepcopy(_TRACED[key])


def trace_module(model: nn.Module, make_batch: Callable[[], dict[str, torch.Tensor]],
                 blocks: nn.ModuleList | None = None) -> SavedTensors:
    """:func:`trace_saved` for any module whose ``model(**batch)`` returns an object with ``.loss``.

    Parameters
    ----------
    model : nn.Module
        Run in train mode on fakes of its parameters and buffers (restored after).
    make_batch : callable
        Returns the batch; called inside the fake mode, so its tensors are fakes. They are
        inputs, not activations: saved inputs are not counted.
    blocks : nn.ModuleList, optional
        The block stack to attribute saved bytes to; without it everything is ``"below"``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    n_blocks = len(blocks) if blocks is not None else 0
    out = SavedTensors(by_part={BELOW: 0, **{str(i): 0 for i in range(n_blocks)}, ABOVE: 0})
    current = [BELOW]
    seen: set[int] = set()
    weights: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in seen and key not in weights:
            seen.add(key)
            nbytes = storage.nbytes()
            out.by_part[current[0]] += nbytes
            out.largest = max(out.largest, nbytes)
            out.count += 1
        return t

    was_training = model.training
    handles = _part_hooks(blocks, current) if blocks is not None else []
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        model.train()
        with torch.random.fork_rng(devices=[]), _fake_weights(model, mode) as fake_storages:
            weights |= fake_storages
            live = _LiveBytes(current)
            with mode:
                batch = make_batch()
                weights |= {t.untyped_storage()._cdata for t in batch.values()}  # counted as inputs
                with live:
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        loss = model(**batch).loss
                    out.forward_peak = live.peak
                    live.current = None
                    out.forward_by_part = {p: live.part_peaks.get(p, 0) for p in out.by_part}
                    saved_before = 0
                    for p in out.by_part:  # forward order
                        out.carried_by_part[p] = max(0, live.part_entries.get(p, 0) - saved_before)
                        saved_before += out.by_part[p]
                    if loss.requires_grad:
                        loss.backward()  # fake gradients land on the fake parameters, dropped on exit
                    del loss
                out.backward_peak, out.largest_output = live.peak, live.largest
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return out
