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

Computing
    A round's rows are stored before its first step (:meth:`FrozenCache.fill`): the ones that fit,
    in the order the round's batches first use them (the rows a lazy fill would store), computed
    in batches of rows of one token length (:func:`compute_rows`, at most the training batch size
    each). Rows that do not fit are computed when a batch holds them (:meth:`FrozenCache.hidden`),
    that batch's rows of each length together. Either way a row gets the bits it has alone.
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
        self._unit_bytes: int | None = None  # bytes of a row's output per token (images: per row)

    def bytes_of(self, key: tuple[int, int]) -> int:
        """Bytes held for ``key`` (a client's rows under one cut)."""
        entry = self.entries.get(key)
        return 0 if entry is None else entry.nbytes

    def fill(self, key: tuple[int, int], digest: str, prefix: FrozenPrefix, split: EncodedSplit,
             rows: torch.Tensor, chunk: int) -> list[dict]:
        """Compute and store, ahead of training, the prefix of the rows of ``rows`` (the round's row
        ids in the order its batches use them) that the cache lacks and that fit in the bound.

        The rows stored are the ones a lazy first-come-first-served fill in that order would store
        (each row that fits, in first-use order), so which rows are cached does not change; rows
        that do not fit are left for :meth:`hidden` (recomputed whenever a batch holds them). Rows
        are computed in batches of equal length (:func:`compute_rows`), at most ``chunk`` rows.

        Returns
        -------
        list of dict
            The batches whose prefix ran (one length each), for FLOPs.
        """
        entry = self._entry(key, digest)
        if self.budget <= 0:
            return []
        pending = [r for r in dict.fromkeys(int(r) for r in rows) if r not in entry.rows]
        if not pending:
            return []
        lengths = row_lengths(split, pending)
        outs, computed = {}, []
        if self._unit_bytes is None:  # bytes per token (images: per row) not known yet: one row tells
            outs, computed = self._compute(prefix, split, pending[:1], lengths, chunk)
        selected, used = [], self.used
        for row in pending:
            nbytes = lengths[row] * self._unit_bytes
            if used + nbytes <= self.budget:
                selected.append(row)
                used += nbytes
        by_length: dict[int, list[int]] = {}
        for row in selected:
            by_length.setdefault(lengths[row], []).append(row)
        for row in [r for r in outs if r not in by_length.get(lengths[r], ())]:  # the first row, not fitting
            self._store(entry, row, outs.pop(row))  # (stores nothing; warns)
        for length in sorted(by_length):  # stored a length at a time: memory = the bound + one length's rows
            more, more_computed = self._compute(prefix, split, [r for r in by_length[length] if r not in outs],
                                                lengths, chunk)
            more.update((r, outs.pop(r)) for r in by_length[length] if r in outs)
            for row in by_length[length]:
                self._store(entry, row, more[row])
            computed += more_computed
        return computed

    def hidden(self, key: tuple[int, int], digest: str, prefix: FrozenPrefix, split: EncodedSplit,
               rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[dict]]:
        """The prefix output of a batch: ``(B, L, H)`` for ``batch = split.batch(rows)``.

        Rows not in the cache are computed now, the batch's rows of each length together
        (:func:`compute_rows`), and stored if they fit.

        Returns
        -------
        hidden : torch.Tensor
            Each row's output, text placed where its tokens are in the batch (zeros at padding).
        computed : list of dict
            The batches (one length each) whose prefix ran now (not from the cache), for FLOPs.
        """
        entry = self._entry(key, digest)
        ids = [int(r) for r in rows]
        missing = [r for r in dict.fromkeys(ids) if r not in entry.rows]
        fresh, computed = self._compute(prefix, split, missing, row_lengths(split, missing), len(missing))
        for row in missing:
            self._store(entry, row, fresh[row])
        outs = [entry.rows[r] if r in entry.rows else fresh[r] for r in ids]
        return _assemble(outs, batch, split.padding_side), computed

    def _entry(self, key: tuple[int, int], digest: str) -> _Entry:
        entry = self.entries.get(key)
        if entry is not None and entry.digest != digest:  # frozen weights below the cut changed
            self.used -= entry.nbytes
            entry = None
        if entry is None:
            entry = self.entries[key] = _Entry(digest)
        return entry

    def _compute(self, prefix: FrozenPrefix, split: EncodedSplit, rows: list[int], lengths: dict[int, int],
                 chunk: int) -> tuple[dict[int, torch.Tensor], list[dict]]:
        outs, computed = compute_rows(prefix, split, rows, lengths, chunk)
        if outs and self._unit_bytes is None:
            row = next(iter(outs))
            out = outs[row]
            self._unit_bytes = out.numel() * out.element_size() // lengths[row]
        return outs, computed

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
        entry.rows[row] = out.clone()  # not a view of its group's tensor: nbytes is what it holds
        entry.nbytes += nbytes
        self.used += nbytes


def row_lengths(split: EncodedSplit, rows: list[int]) -> dict[int, int]:
    """Each row's number of tokens (images: 1, every row has the same patch tokens)."""
    mask = split.features.get("attention_mask")
    if mask is None or not rows:
        return dict.fromkeys(rows, 1)
    counts = mask[torch.as_tensor(rows, dtype=torch.long)].sum(-1).tolist()
    return dict(zip(rows, (int(c) for c in counts)))


def compute_rows(prefix: FrozenPrefix, split: EncodedSplit, rows: list[int], lengths: dict[int, int],
                 chunk: int) -> tuple[dict[int, torch.Tensor], list[dict]]:
    """The prefix output of each of ``rows``, ``(n_i, H)``, computed in batches of rows of one
    token length (no padding: ``split.batch`` trims them to exactly that length, so the mask is
    all ones and GPT-2/LLaMA positions are ``0..n_i - 1``), at most ``chunk`` rows each.

    Each row's output is the one it has computed alone: at a fixed sequence length of at least
    ``prefix.min_batched_tokens`` (4) tokens the CPU kernels give a row the same bits whatever the
    batch size, while padding a row to another length would change them. Below 4 tokens they do not
    (measured: a row of 1-3 tokens alone differs from the same row in a batch by ~1e-8..1e-6,
    presumably a matmul of fewer than 4 rows takes another kernel path): such rows are computed
    one at a time, as is every row of a
    prefix with ``batch_invariant = False``. ``tests/test_frozen_cache.py`` checks both on every
    tiny family and on MiniLM.

    Returns
    -------
    outs : dict
        Row id -> output.
    computed : list of dict
        The batches run (with ``labels``: for :class:`~fedpeft.federation.frozen.PrefixFlops`,
        whose count of a batch is the sum of its rows').
    """
    text = "attention_mask" in split.features  # images: every row has the same (many) patch tokens
    groups: dict[int, list[int]] = {}
    for row in rows:
        groups.setdefault(lengths[row], []).append(row)
    outs, computed = {}, []
    for length in sorted(groups):
        group = groups[length]
        batched = prefix.batch_invariant and not (text and length < prefix.min_batched_tokens)
        size = max(1, chunk) if batched else 1
        for start in range(0, len(group), size):
            part = group[start : start + size]
            batch = split.batch(part)
            mask = batch.get("attention_mask")
            if mask is not None and (mask.shape[1] != length or not bool(mask.all())):
                raise RuntimeError(f"rows of {length} tokens did not make an unpadded batch: {tuple(mask.shape)}")
            out = prefix.compute({k: v for k, v in batch.items() if k != "labels"})
            outs.update(zip(part, out))
            computed.append(batch)
    return outs, computed


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
