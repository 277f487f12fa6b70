"""The frozen-prefix cache: the output of a model's frozen bottom, computed once per row and reused.

When everything below transformer block ``j`` is frozen for a client (``head``: every block;
``layers``: the blocks below the client's last ``k_i``), its output for a row never changes while
those parameters do not: it is computed once and reused across local epochs and rounds.

The cut
    ``j`` is the lowest block holding a parameter that trains (``requires_grad``), or the number of
    blocks when none does (:func:`cut_index`): derived from the model, not from the method's name.
    ``j = 0`` (``bias``, ``lora``, ``adapter``, ``full``, ``layers`` with every block) means no
    prefix. A prefix is only used after a probe shows its output depends on no trainable parameter
    (a soft prompt enters in the embeddings: no prefix).
Running the model from block ``j``
    Generic over families: the model's own forward runs on the batch (embeddings, masks, position
    ids and rotary embeddings are computed as usual, and cost no matmuls), but blocks ``0..j-1``
    are replaced by stand-ins that return the given hidden states (:meth:`FrozenPrefix.feeding`),
    so block ``j`` receives them with exactly the attention mask and position inputs it would
    have had. Computing the prefix stops the forward at block ``j - 1``'s output
    (:meth:`FrozenPrefix.compute`).
Determinism
    The prefix runs in eval mode (no dropout), with or without the cache, and each row's prefix is
    the one it has computed alone (a batch of one row trimmed to its own tokens), so it is the same
    whatever batch the row is in. It is computed batched all the same: rows of one token length
    together, a batch without padding (:func:`~fedpeft.federation.frozen_cache.compute_rows`),
    which gives each row the bits it has alone because the CPU kernels are batch-size invariant at
    a fixed sequence length of 4 tokens or more (tested on every tiny family and MiniLM; rows of
    1-3 tokens alone take another kernel path and are computed one at a time, and
    :attr:`FrozenPrefix.batch_invariant` = False would do so for every row). A batch's hidden
    states are the rows' outputs placed on the padding side's other end, zeros at padding
    positions (masked in every attention above). With and without the cache the upper part
    therefore sees the same tensors bit for bit.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from fedpeft.federation.costs import TrainingFlops
from fedpeft.models import Blocks

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the capture hook: the forward pass is not needed above the cut."""


def cut_index(model: nn.Module, blocks: Blocks) -> int:
    """The lowest block with a trainable parameter; ``len(blocks)`` when no block trains."""
    trained = [blocks.index_of(n) for n, p in model.named_parameters() if p.requires_grad]
    return min((i for i in trained if i is not None), default=len(blocks))


def prefix_modules(model: nn.Module, blocks: Blocks, cut: int) -> list[nn.Module]:
    """The modules that run below the cut: those registered before the block stack that are not
    its ancestors (embeddings, embedding dropout), and blocks ``0..cut-1``."""
    ancestors = {blocks.prefix.rsplit(".", i)[0] for i in range(1, blocks.prefix.count(".") + 1)} | {""}
    before = []
    for name, module in model.named_modules():
        if name == blocks.prefix:
            break
        if name not in ancestors and not name.startswith(blocks.prefix + "."):
            before.append(module)
    return before + list(blocks.modules[:cut])


class FrozenPrefix:
    """The frozen bottom of a prepared model below block ``cut`` (under the current ``requires_grad``).

    Parameters
    ----------
    model : nn.Module
        The prepared model.
    blocks : Blocks
        Its block stack (:func:`fedpeft.models.transformer_blocks`).
    cut : int
        ``1..len(blocks)``: the prefix is the embeddings and blocks ``0..cut-1``.
    """

    def __init__(self, model: nn.Module, blocks: Blocks, cut: int) -> None:
        if not 1 <= cut <= len(blocks):
            raise ValueError(f"cut must be in 1..{len(blocks)}, got {cut}")
        self.model, self.blocks, self.cut = model, blocks, cut
        self.modules = prefix_modules(model, blocks, cut)
        self.flops = PrefixFlops(self)  # forward FLOPs of the prefix, from a batch's shape
        # rows of one length computed together give each row its bits alone (see Determinism),
        # from min_batched_tokens tokens on: shorter rows alone take another matmul kernel path
        self.batch_invariant = True
        self.min_batched_tokens = 4

    def eval_mode(self) -> None:
        """Put the prefix in eval mode (no dropout); the rest of the model keeps its mode."""
        for module in self.modules:
            module.eval()

    def compute(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Block ``cut - 1``'s output (the hidden states block ``cut`` takes) for model ``inputs``
        (no ``labels``), without gradients and without running anything above the cut."""
        with torch.no_grad():
            return self._forward_to_cut(inputs)

    def depends_on_training(self, inputs: Mapping[str, torch.Tensor]) -> bool:
        """True when the prefix's output needs a gradient (a trainable parameter lies below the cut,
        e.g. a soft prompt in the embeddings), or is not a plain tensor: then it cannot be cached."""
        with torch.enable_grad():
            out = self._forward_to_cut(inputs)
        return not isinstance(out, torch.Tensor) or out.requires_grad

    def _forward_to_cut(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        captured = []

        def capture(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured.append(output)
            raise _Stop

        handle = self.blocks.modules[self.cut - 1].register_forward_hook(capture)
        try:
            self.model(**inputs)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"block {self.cut - 1} did not run in the model's forward pass")
        return captured[0]

    @contextmanager
    def feeding(self, hidden: torch.Tensor) -> Iterator[None]:
        """Within the block, the model's forward skips blocks ``0..cut-1``: each returns ``hidden``
        (``(B, L, H)``, the batch's prefix output), so block ``cut`` starts from it."""
        saved = []
        for block in self.blocks.modules[: self.cut]:
            saved.append(block.__dict__.get("forward"))
            block.forward = lambda *args, **kwargs: hidden
        try:
            yield
        finally:
            for block, forward in zip(self.blocks.modules[: self.cut], saved):
                del block.forward
                if forward is not None:
                    block.forward = forward


class PrefixFlops(TrainingFlops):
    """Forward FLOPs of a :class:`FrozenPrefix` on a batch, exact from its shape (the form and
    measurement of :class:`~fedpeft.federation.costs.TrainingFlops`, forward to the cut only)."""

    def __init__(self, prefix: FrozenPrefix) -> None:
        super().__init__(prefix.model)
        self.prefix = prefix

    def measures(self) -> tuple:
        """The forward to this cut (memoised apart from the model's training-step FLOPs)."""
        return ("prefix", self.prefix.cut)

    def _measure(self, batch: dict[str, torch.Tensor]) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
            self.prefix.compute({k: v for k, v in batch.items() if k != "labels"})
        return int(counter.get_total_flops())


def state_digest(state: Mapping[str, np.ndarray], names: list[str]) -> str:
    """A hash of ``state``'s arrays named ``names``: the frozen but exchanged parameters below a cut
    (a ``layers`` client of depth ``k_i < k``: blocks other clients train), whose change
    invalidates a cache entry. Empty for no names."""
    if not names:
        return ""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(names):
        h.update(name.encode())
        h.update(np.ascontiguousarray(state[name]).tobytes())
    return h.hexdigest()
