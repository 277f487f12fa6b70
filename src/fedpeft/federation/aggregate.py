"""Aggregation as pure functions over ``[(named_arrays, weight)]``, and update validation.

FedAvg (McMahan et al. 2017, https://arxiv.org/abs/1602.05629) over the exchanged part only, as
in FedPEFT (Sun et al. 2022, https://arxiv.org/abs/2210.01708). One-shot federated fine-tuning
(Wang et al. 2024, https://arxiv.org/abs/2412.04650) is the same function called once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedpeft.errors import UpdateRejected

NamedArrays = dict[str, np.ndarray]


def fedavg(results: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> NamedArrays:
    """Weighted average of named arrays: ``sum_k w_k * x_k / sum_k w_k`` for every name.

    Parameters
    ----------
    results
        ``(named_arrays, weight)`` pairs, e.g. a client's exchanged state and its sample count.
        Every entry must have the same names and shapes; weights must be positive.

    Returns
    -------
    dict
        The average, accumulated in float64 and returned in each input array's dtype.

    Examples
    --------
    >>> fedavg([({"w": np.array([0.0])}, 1), ({"w": np.array([3.0])}, 2)])["w"]
    array([2.])
    """
    running = RunningFedAvg()
    for state, weight in results:
        running.add(state, weight)
    return running.result()


class RunningFedAvg:
    """FedAvg folded in one result at a time: after ``add`` of results 1..k, ``result()`` equals
    ``fedavg`` of those k results (the same sums, in arrival order).

    Sequential aggregation as suggested for asynchronous one-shot settings by Wang et al. (2024,
    https://arxiv.org/abs/2412.04650): the server keeps one float64 running sum, never the list of
    client states, so its memory does not grow with the number of clients, and the aggregate of
    whoever has reported so far is available at any time.

    ``partial=True`` lets results carry different subsets of the names (clients assigned part of
    the exchanged state, :mod:`fedpeft.federation.assignment`): each name is then averaged over
    the results that carried it, ``sum_{k carries n} w_k x_k / sum_{k carries n} w_k``, and
    ``result()`` holds only the names some result carried. When every result carries every name
    this is the same sums in the same order, so bit-identical to ``partial=False``.
    """

    def __init__(self, partial: bool = False) -> None:
        self.partial = partial
        self._sums: dict[str, np.ndarray] = {}  # name -> sum_k w_k * x_k (float64)
        self._weights: dict[str, float] = {}  # name -> sum of the weights of the results carrying it
        self._dtypes: dict[str, np.dtype] = {}
        self.weight = 0.0  # sum_k w_k
        self.count = 0  # results folded in

    def add(self, state: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold one ``(named_arrays, weight)`` in; checks happen before anything is added."""
        w = float(weight)
        if not np.isfinite(w) or w <= 0:
            raise ValueError(f"fedavg weights must be positive and finite, got {weight!r}")
        if self.count and not self.partial and state.keys() != self._sums.keys():
            raise ValueError("fedavg: the named arrays do not all have the same names")
        arrays = {name: np.asarray(value) for name, value in state.items()}
        for name, value in arrays.items():
            if name in self._sums and value.shape != self._sums[name].shape:
                raise ValueError(f"fedavg: {name} has shape {value.shape}, expected {self._sums[name].shape}")
        for name, value in arrays.items():
            if name not in self._sums:
                self._sums[name] = np.zeros(value.shape, dtype=np.float64)
                self._dtypes[name] = value.dtype
                self._weights[name] = 0.0
            self._sums[name] += w * value.astype(np.float64, copy=False)
            self._weights[name] += w
        self.weight += w
        self.count += 1

    def result(self) -> NamedArrays:
        """The weighted average so far, in each input array's dtype (per name over the results
        that carried it)."""
        if not self.count:
            raise ValueError("fedavg needs at least one (named_arrays, weight) pair")
        return {name: (acc / self._weights[name]).astype(self._dtypes[name], copy=False)
                for name, acc in self._sums.items()}


def validate_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    max_bytes: int | None = None,
    assigned: Iterable[str] | None = None,
) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` matches ``reference`` exactly in form.

    Checks, in order: the same names (missing and unexpected ones are listed), each array's
    shape and dtype, finite values only, and (optionally) the total payload size. With
    ``assigned`` (the names the client was assigned, a subset of ``reference``'s) the update must
    carry exactly those: a missing one or any other name (``unassigned``, even if ``reference``
    has it) is rejected by name.
    """
    if assigned is not None:
        assigned = set(assigned)
        unknown = sorted(assigned - set(reference))
        if unknown:
            raise ValueError(f"validate_update: assigned names not in the reference: {_few(unknown)}")
        unassigned = sorted(n for n in update if n in reference and n not in assigned)
        if unassigned:
            raise UpdateRejected(f"wrong parameter names: unassigned {_few(unassigned)} "
                                 f"(this client was assigned {len(assigned)} of {len(reference)} names)")
        reference = {n: ref for n, ref in reference.items() if n in assigned}
    missing = sorted(set(reference) - set(update))
    unexpected = sorted(set(update) - set(reference))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise UpdateRejected("wrong parameter names: " + "; ".join(parts))
    total = 0
    for name, ref in reference.items():
        value = update[name]
        if not isinstance(value, np.ndarray):
            raise UpdateRejected(f"{name}: expected a numpy array, got {type(value).__name__}")
        if value.shape != ref.shape:
            raise UpdateRejected(f"{name}: shape {value.shape} != expected {ref.shape}")
        if value.dtype != ref.dtype:
            raise UpdateRejected(f"{name}: dtype {value.dtype} != expected {ref.dtype}")
        if not np.all(np.isfinite(value)):
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            raise UpdateRejected(f"{name}: {bad} non-finite value(s) (NaN or inf)")
        total += value.nbytes
    if max_bytes is not None and total > max_bytes:
        raise UpdateRejected(f"payload of {total} bytes exceeds the limit of {max_bytes}")


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
