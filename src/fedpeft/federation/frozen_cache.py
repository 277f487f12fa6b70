"""Storage of the frozen-prefix outputs (:mod:`fedpeft.federation.frozen`), bounded in memory.

Entries are keyed by ``(client, cut)``: a client's rows under one cut (clients of different
``layers`` depths cut at different blocks). Each holds one ``(n_i, H)`` tensor per row, ``n_i`` the
row's own number of tokens (images: the patch tokens), and the digest of the frozen-but-exchanged
parameters below the cut it was computed with (:func:`~fedpeft.federation.frozen.state_digest`),
so a change of those drops the entry.

The bound is ``runtime.frozen_cache_mb`` over every entry of the process (in process: every
simulated client; in Flower: the one client of each SuperNode worker). Rows are stored first come
first served while they fit; a row that does not fit is recomputed every time a batch holds it
(the same computation, so results do not change), and the first such row logs one warning.
Nothing is evicted: which rows are cached is the same in every run. ``0`` stores nothing (every
row is recomputed: the prefix still runs the deterministic way, so results equal a cached run's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fedpeft.data import EncodedSplit
from fedpeft.federation.frozen import FrozenPrefix

log = logging.getLogger(__name__)

MIB = 2**20


@dataclass
class _Entry:
    digest: str
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # row id -> (n_i, H)
    nbytes: int = 0


class FrozenCache:
    """Prefix outputs per ``(client, cut)`` and row, at most ``budget_mb`` MiB in all.

    Parameters
    ----------
    budget_mb : float
        ``runtime.frozen_cache_mb``; 0 stores nothing.
    """

    def __init__(self, budget_mb: float) -> None:
        self.budget_mb = budget_mb
        self.budget = int(budget_mb * MIB)
        self.entries: dict[tuple[int, int], _Entry] = {}
        self.used = 0  # bytes held by every entry
        self.warned = False

    def bytes_of(self, key: tuple[int, int]) -> int:
        """Bytes held for ``key`` (a client's rows under one cut)."""
        entry = self.entries.get(key)
        return 0 if entry is None else entry.nbytes

    def hidden(self, key: tuple[int, int], digest: str, prefix: FrozenPrefix, split: EncodedSplit,
               rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[dict]]:
        """The prefix output of a batch: ``(B, L, H)`` for ``batch = split.batch(rows)``.

        Returns
        -------
        hidden : torch.Tensor
            Each row's output, text placed where its tokens are in the batch (zeros at padding).
        computed : list of dict
            The one-row batches whose prefix ran now (not from the cache), for FLOPs.
        """
        entry = self.entries.get(key)
        if entry is not None and entry.digest != digest:  # frozen weights below the cut changed
            self.used -= entry.nbytes
            entry = None
        if entry is None:
            entry = self.entries[key] = _Entry(digest)
        outs, computed = [], []
        for row in (int(r) for r in rows):
            out = entry.rows.get(row)
            if out is None:
                one = split.batch([row])
                out = prefix.compute({k: v for k, v in one.items() if k != "labels"})[0]
                computed.append(one)
                self._store(entry, row, out)
            outs.append(out)
        return _assemble(outs, batch, split.padding_side), computed

    def _store(self, entry: _Entry, row: int, out: torch.Tensor) -> None:
        nbytes = out.numel() * out.element_size()
        if self.used + nbytes > self.budget:
            if self.budget > 0 and not self.warned:
                self.warned = True
                log.warning(
                    "frozen-prefix cache full at %.2f MB (runtime.frozen_cache_mb = %g): rows beyond it "
                    "recompute the frozen blocks whenever they are trained on (same results, more compute)",
                    self.used / MIB, self.budget_mb,
                )
            return
        entry.rows[row] = out.contiguous()
        entry.nbytes += nbytes
        self.used += nbytes


def _assemble(outs: list[torch.Tensor], batch: dict[str, torch.Tensor], padding_side: str) -> torch.Tensor:
    """Stack per-row outputs into the batch's shape: text rows at the padding side's other end."""
    mask = batch.get("attention_mask")
    if mask is None:  # images: every row has the same tokens
        return torch.stack(outs)
    length = mask.shape[1]
    hidden = outs[0].new_zeros(len(outs), length, outs[0].shape[-1])
    for b, out in enumerate(outs):
        n = out.shape[0]
        if padding_side == "left":
            hidden[b, length - n :] = out
        else:
            hidden[b, :n] = out
    return hidden
