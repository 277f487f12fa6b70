"""A client's SFPrompt round as a resumable state machine, one body-server exchange at a time.

SFPrompt (Cao, Zhu, Gong 2024, https://arxiv.org/abs/2407.17533). :meth:`SplitSession.begin` runs
the phases without the server (EL2N pruning, the local-loss update) and draws the batches of split
training; then every batch is three calls, between which the body server works::

    forward_request()   head forward                         -> {"hidden", "context.*"}  (up)
    on_body_output(m)   tail + loss + backward               -> {"grad"}                 (up)
    on_cut_grad(m)      head backward, clip, optimizer step  -> the next batch, or done

Nothing here knows a transport. The in-process trainer calls the three in a row on one live
session; a transport whose client cannot keep Python objects between messages (a Flower
ClientApp) stores :meth:`SplitSession.snapshot` (named tensors + JSON) and continues from
:meth:`SplitSession.restore` at the next message.

Why a restored session trains exactly like a live one
    The snapshot holds everything a step reads that a live session keeps in memory: the trainable
    parameters, the optimizer's state, the batches, the position and phase, the sums of the
    metrics, and between ``on_body_output`` and ``on_cut_grad`` the tail's gradients. The one
    thing it cannot hold is the head's autograd graph: a restored session runs the head forward
    again, from the same random state, since dropout in the head and in the tail is seeded per
    ``(seed, round, client, batch, pass)`` (:func:`pass_seed`) in every runtime. The same
    parameters and the same random draws give the same activations, bit for bit, so the same
    gradients. Those recomputed FLOPs go to ``recompute_flops``, not to ``flops`` (the client's
    cost in SFPrompt, which keeps the graph).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedpeft.federation.client import client_seed
from fedpeft.federation.strategy import ClientResult
from fedpeft.methods.base import NamedArrays, get_state, set_state
from fedpeft.split.model import HeadOutput
from fedpeft.split.protocol import Message, forward_message
from fedpeft.split.pruning import keep_highest

if TYPE_CHECKING:
    from fedpeft.split.trainer import SplitTrainer

HEAD_PASS, TAIL_PASS = 0, 1
PHASES = ("forward", "body", "cut", "done")  # what the session does next; "body": awaits the body output


def pass_seed(seed: int, rnd: int, client: int, batch: int, which: int) -> int:
    """The torch seed of one pass (``HEAD_PASS``, ``TAIL_PASS``) of split-training batch ``batch``."""
    return int(np.random.default_rng([seed, rnd, client, batch, which, 0x5B17]).integers(2**62))


def counted(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the FLOPs it ran (:class:`~torch.utils.flop_counter.FlopCounterMode`)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


@dataclass
class Progress:
    """Where a session is and what it has counted so far (JSON-able)."""

    client: int
    rnd: int
    num_samples: int  # the client's rows (the aggregation weight)
    kept_rows: int  # those pruning kept
    steps: int  # split-training batches
    local_steps: int
    position: int = 0  # the current batch
    phase: str = "forward"
    loss_sum: float = 0.0
    local_sum: float = 0.0
    samples: int = 0
    client_flops: int = 0  # head + tail, forward and backward, every phase
    full_flops: int = 0  # full fine-tuning's on the same training batches
    recompute_flops: int = 0  # head passes run again by a restored session
    compute_s: float = 0.0


class SplitSession:
    """One client's split-training round; see the module docstring. Made by :meth:`begin` or
    :meth:`restore`, never directly."""

    def __init__(self, trainer: SplitTrainer, progress: Progress, order: list[torch.Tensor],
                 optimizer: torch.optim.Optimizer) -> None:
        self.trainer, self.progress, self.order, self.optimizer = trainer, progress, order, optimizer
        self._head: HeadOutput | None = None  # the pending batch's head output, in this process only

    @classmethod
    def begin(cls, trainer: SplitTrainer, client: int, indices: np.ndarray, global_state: NamedArrays,
              rnd: int) -> SplitSession:
        """Load ``global_state``, prune (``method.prune``), run the local-loss update
        (``method.local_loss``) and draw the split-training batches."""
        start = time.perf_counter()
        opts = trainer.options
        seed = client_seed(trainer.seed, rnd, client)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        set_state(trainer.model, global_state)
        client_flops = full_flops = 0
        kept = np.asarray(indices)
        if opts.prune and len(kept):  # (a) EL2N through the shortcut
            scores, client_flops = counted(lambda: trainer.scores(kept))
            kept = keep_highest(kept, scores, opts.prune_keep)
        optimizer = trainer.make_optimizer()
        trainer.model.train()
        local_sum, local_steps = 0.0, opts.local_loss_steps if opts.local_loss else 0
        for rows in trainer.batch_order(kept, local_steps, generator) if local_steps else []:  # (b)
            batch = trainer.train.batch(rows)
            loss, flops = counted(lambda batch=batch: trainer.shortcut_step(batch, optimizer))
            local_sum, client_flops = local_sum + loss, client_flops + flops
            full_flops += trainer.full(batch)
        steps = trainer.num_steps(len(kept))
        order = trainer.batch_order(kept, steps, generator)  # (c) split training's batches
        progress = Progress(int(client), int(rnd), len(indices), len(kept), steps, local_steps, local_sum=local_sum,
                            client_flops=client_flops, full_flops=full_flops, compute_s=time.perf_counter() - start)
        return cls(trainer, progress, order, optimizer)

    @property
    def done(self) -> bool:
        return self.progress.phase == "done"

    @property
    def request(self) -> str:
        """The id of the current batch's exchange with the body server."""
        return f"{self.progress.rnd}/{self.progress.client}/{self.progress.position}"

    # ------------------------------------------------------------------ one batch, three calls

    def forward_request(self) -> Message:
        """The head's output on the current batch, for the body server's forward."""
        with self._step("forward", "body"):
            self.optimizer.zero_grad(set_to_none=True)
            head, flops = counted(self._head_forward)
            self._head, self.progress.client_flops = head, self.progress.client_flops + flops
            message = forward_message(head.hidden, head.context)
            message.meta["request"] = self.request
        return message

    def on_body_output(self, reply: Message) -> Message:
        """Tail, loss and backward on the body's output ``{"hidden": (B, L, H)}``; returns the
        gradient at the body's output ``{"grad": (B, L, H)}`` for the server's backward."""
        with self._step("body", "cut"):
            batch = self._batch()
            if self._head is not None:
                embedded = self._head.embedded
            else:  # restored: only the modules below the blocks run again, for what the tail replays
                embedded, flops = counted(lambda: self._seeded(HEAD_PASS, lambda: self.trainer.split.embedded(batch)))
                self.progress.recompute_flops += flops
            body_out = reply.tensors["hidden"].detach().requires_grad_(True)  # (B, L, H)

            def tail_backward() -> torch.Tensor:
                loss = self._seeded(TAIL_PASS, lambda: self.trainer.split.tail(body_out, batch, embedded).loss)
                loss.backward()
                return loss

            loss, flops = counted(tail_backward)
            self.progress.loss_sum += float(loss.detach())
            self.progress.client_flops += flops
        return Message({"grad": body_out.grad}, {"request": self.request})

    def on_cut_grad(self, reply: Message) -> None:
        """Head backward with the gradient at the cut ``{"grad": (B, L, H)}``, clipping, one
        optimizer step; then the next batch (or done)."""
        progress = self.progress
        with self._step("cut", "forward"):
            batch = self._batch()
            head = self._head
            if head is None:  # restored: the graph is gone, the head runs again (same draws)
                head, flops = counted(self._head_forward)
                progress.recompute_flops += flops
            grad = reply.tensors["grad"]
            _, flops = counted(lambda: head.hidden.backward(grad) if head.hidden.requires_grad else None)
            self.trainer.clip_and_step(self.optimizer)
            self._head = None
            progress.client_flops += flops
            progress.samples += len(self.order[progress.position])
            progress.full_flops += self.trainer.full(batch)
            progress.position += 1
        if progress.position >= progress.steps:
            progress.phase = "done"

    def result(self) -> ClientResult:
        """The client's new exchanged state and metrics (body-server counts are the caller's)."""
        if not self.done:
            raise RuntimeError(f"session {self.request}: not done ({self.progress.phase})")
        p, trainer = self.progress, self.trainer
        trainer.model.eval()
        metrics = {
            "train_loss": p.loss_sum / p.steps,
            "local_loss": p.local_sum / p.local_steps if p.local_steps else 0.0,
            "steps": float(p.steps),
            "local_loss_steps": float(p.local_steps),
            "kept_rows": float(p.kept_rows),
            "samples_processed": float(p.samples),
            "flops": float(p.client_flops),
            "recompute_flops": float(p.recompute_flops),
            "compute_s": p.compute_s,
        }
        if trainer.full_flops is not None and p.full_flops:
            metrics["client_flops_pct_of_full"] = 100.0 * p.client_flops / p.full_flops
        return ClientResult(p.client, get_state(trainer.model, trainer.names), p.num_samples, metrics)

    # ------------------------------------------------------------------ snapshot / restore

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything the next call needs, as named tensors and JSON-able metadata: ``param.<name>``
        (every trainable parameter), ``grad.<name>`` (the tail's gradients, phase ``cut``),
        ``optimizer.<i>.<key>``, ``order.rows`` / ``order.sizes`` (the batches)."""
        tensors = {f"param.{n}": p.detach().clone() for n, p in self.trainer.trainable}
        if self.progress.phase == "cut":
            tensors |= {f"grad.{n}": p.grad.detach().clone() for n, p in self.trainer.trainable if p.grad is not None}
        scalars: dict[str, dict[str, Any]] = {}
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().clone()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        tensors["order.rows"] = torch.cat(self.order) if self.order else torch.zeros(0, dtype=torch.long)
        tensors["order.sizes"] = torch.tensor([len(b) for b in self.order], dtype=torch.long)
        return tensors, {"progress": asdict(self.progress), "optimizer": scalars}

    @classmethod
    def restore(cls, trainer: SplitTrainer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> SplitSession:
        """The session of :meth:`snapshot`: parameters, gradients and optimizer state loaded into
        ``trainer``'s model (whatever another client left there). ``ValueError`` naming what is missing."""
        progress = Progress(**meta["progress"])
        if progress.phase not in PHASES:
            raise ValueError(f"unknown split session phase {progress.phase!r}")
        missing = [f"param.{n}" for n, _ in trainer.trainable if f"param.{n}" not in tensors]
        if missing or "order.rows" not in tensors or "order.sizes" not in tensors:
            raise ValueError(f"split session snapshot lacks {(missing or ['order.*'])[:3]}")
        with torch.no_grad():
            for name, param in trainer.trainable:
                param.copy_(tensors[f"param.{name}"])
                grad = tensors.get(f"grad.{name}")
                param.grad = None if grad is None else grad.to(param.dtype).clone()
        optimizer = trainer.make_optimizer()
        state: dict[int, dict[str, Any]] = {}
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value
        for index, values in meta.get("optimizer", {}).items():
            state.setdefault(int(index), {}).update(values)
        if state:
            optimizer.load_state_dict({**optimizer.state_dict(), "state": state})
        order = list(torch.split(tensors["order.rows"], tensors["order.sizes"].tolist())) if progress.steps else []
        return cls(trainer, progress, order, optimizer)

    # ------------------------------------------------------------------ helpers

    def _batch(self) -> dict[str, torch.Tensor]:
        return self.trainer.train.batch(self.order[self.progress.position])

    def _head_forward(self) -> HeadOutput:
        return self._seeded(HEAD_PASS, lambda: self.trainer.split.head(self._batch()))

    def _seeded(self, which: int, fn: Callable[[], Any]) -> Any:
        """``fn()`` in train mode from the random state of this batch's pass ``which`` (the global
        torch random state is restored after)."""
        p = self.progress
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(pass_seed(self.trainer.seed, p.rnd, p.client, p.position, which))
            self.trainer.model.train()
            return fn()

    @contextmanager
    def _step(self, expected: str, then: str) -> Iterator[None]:
        if self.progress.phase != expected:
            raise RuntimeError(f"split session {self.request}: expected phase {expected!r}, is {self.progress.phase!r}")
        start = time.perf_counter()
        yield
        self.progress.phase = then
        self.progress.compute_s += time.perf_counter() - start
