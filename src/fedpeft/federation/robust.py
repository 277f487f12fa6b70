"""Robust aggregation of client deltas: pure NumPy functions over named arrays.

A client's *delta* is its returned state minus the global state it started from. Every rule
takes ``k`` deltas with the same names and shapes, accumulates in float64 and returns its result
in each name's dtype (the first delta's).

Each rule computes what the Flower strategy of the same kind computes (flwr 1.42,
``flwr.serverapp.strategy``). Flower aggregates the clients' *parameters*, here *deltas*: every
rule below commutes with adding the global ``g`` to all inputs (a translation keeps the order of
the values per coordinate and the distances between clients), e.g.
``median(x_i) = g + median(x_i - g)``, so both give the same model up to rounding.

- ``median``: Flower's ``FedMedian``, unweighted ``np.median`` per coordinate.
- ``trimmed_mean``: Flower's ``FedTrimmedAvg``, unweighted, ``int(beta * k)`` values cut at each
  end. Flower's default ``beta`` is 0.2; :func:`trimmed_mean` has no default and
  :func:`robust_aggregate`'s ``trim_fraction`` defaults to 0 (the unweighted mean).
- ``krum`` / ``multikrum``: Flower's ``Krum`` / ``MultiKrum`` (``num_malicious_nodes`` is
  ``byzantine``, ``num_nodes_to_select`` is ``keep``). Flower averages the selected parameters
  weighted by their ``num-examples``; :func:`multikrum` does the same with ``weights``. Flower's
  ``MultiKrum`` selects 1 by default (Krum itself); here ``keep`` defaults to ``k - byzantine``
  as in El Mhamdi et al. 2018. Flower computes distances as ``|x|^2 + |y|^2 - 2 x.y`` in the
  arrays' dtype; here from exact float64 differences. Flower runs Krum with too few clients
  (neighbours clamped to 1); here :func:`check_rule` raises unless ``k > 2 * byzantine + 2``.
- ``bulyan``: Flower's ``Bulyan``, unweighted. Flower's default selection is one MultiKrum pass
  keeping the ``theta`` lowest scores (``selection="multikrum"`` here); the default here is the
  paper's repeated Krum, which is Flower's ``Bulyan`` with a repeated-Krum ``selection_rule``.
  Flower skips the round (returns ``None``) when ``k < 4 * byzantine + 3``; here it is an error.

Ties go to the earlier candidate here (equal Krum scores: the lower client index; equal
distances to Bulyan's median: the earlier selected); Flower's ``argsort``/``argpartition`` leave
them unspecified. Flower computes in each array's own dtype, here float64 throughout, so float32
results may differ from Flower's in the last bits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedpeft.federation.aggregate import NamedArrays, fedavg

AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan")
Deltas = Sequence[Mapping[str, np.ndarray]]


def flatten(deltas: Deltas) -> np.ndarray:
    """The deltas as rows of one float64 matrix of shape ``(k, d)``, ``d`` the total size.

    Names are laid out in the first delta's order (each array raveled in C order), the order
    :func:`unflatten` expects with ``like=deltas[0]``; the other deltas are read by name.
    """
    names = _common_form(deltas)
    return np.stack([np.concatenate([np.ravel(_f64(delta[n])) for n in names]) for delta in deltas])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> NamedArrays:
    """Undo :func:`flatten` for one row: named arrays with ``like``'s names, shapes and dtypes."""
    vector = np.asarray(vector)
    sizes = [np.size(value) for value in like.values()]
    if vector.ndim != 1 or vector.size != sum(sizes):
        raise ValueError(f"unflatten: expected a vector of {sum(sizes)} values, got shape {vector.shape}")
    out, start = {}, 0
    for (name, value), size in zip(like.items(), sizes):
        out[name] = vector[start : start + size].reshape(np.shape(value)).astype(np.asarray(value).dtype)
        start += size
    return out


def update_norms(deltas: Deltas) -> np.ndarray:
    """The L2 norm of each whole delta (over all its names), float64, shape ``(k,)``."""
    _common_form(deltas)
    return np.array([np.sqrt(sum(float(np.vdot(v, v)) for v in map(_f64, d.values()))) for d in deltas])


def squared_distance(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 16) -> float:
    """``||a - b||^2`` accumulated in float64, ``chunk`` elements at a time: no full-size float64
    copy, so a round can take every update's norm on arrival (the round's hot path)."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    total = 0.0
    for start in range(0, a.size, chunk):
        d = a[start:start + chunk].astype(np.float64) - b[start:start + chunk]
        total += float(np.dot(d, d))
    return total


def clip_to_norm(delta: Mapping[str, np.ndarray], max_norm: float) -> tuple[NamedArrays, bool]:
    """Scale the whole delta by ``min(1, max_norm / |delta|)``: norm bounding (Sun et al. 2019,
    "Can you really backdoor federated learning?", https://arxiv.org/abs/1911.07963), Flower's
    ``clip_inputs_inplace`` without the in-place.

    Returns
    -------
    (dict, bool)
        The delta with L2 norm at most ``max_norm`` (up to rounding in its dtype), and whether it
        was scaled. An unscaled delta is returned as a new dict of the same arrays.
    """
    if not (np.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be positive and finite, got {max_norm!r}")
    norm = float(update_norms([delta])[0])
    if not np.isfinite(norm):
        raise ValueError(f"clip_to_norm: the delta's norm is {norm} (non-finite values)")
    if norm <= max_norm:
        return dict(delta), False
    scale = max_norm / norm
    return {name: (_f64(value) * scale).astype(np.asarray(value).dtype) for name, value in delta.items()}, True


def coordinate_median(deltas: Deltas) -> NamedArrays:
    """Unweighted coordinate-wise median (Yin et al. 2018, https://arxiv.org/abs/1803.01498),
    the mean of the two middle values when ``k`` is even, as Flower's ``FedMedian``."""
    return _per_name(deltas, lambda stack: np.median(stack, axis=0))


def trimmed_mean(deltas: Deltas, trim_fraction: float) -> NamedArrays:
    """Unweighted coordinate-wise trimmed mean (Yin et al. 2018, https://arxiv.org/abs/1803.01498):
    per coordinate, drop the ``int(trim_fraction * k)`` smallest and as many largest values and
    average the rest, as Flower's ``FedTrimmedAvg`` with ``beta = trim_fraction``."""
    check_rule("trimmed_mean", len(deltas), trim_fraction=trim_fraction)
    cut = int(trim_fraction * len(deltas))
    return _per_name(deltas, lambda stack: np.sort(stack, axis=0)[cut : len(deltas) - cut].mean(axis=0))


def krum_scores(deltas: Deltas, byzantine: int) -> np.ndarray:
    """Krum's score of each delta (Blanchard et al. 2017, https://papers.nips.cc/paper/6617): the
    sum of its squared L2 distances to its ``k - byzantine - 2`` nearest other deltas."""
    check_rule("krum", len(deltas), byzantine=byzantine)
    return _scores(_squared_distances(deltas), len(deltas) - byzantine - 2)


def krum(deltas: Deltas, byzantine: int) -> tuple[NamedArrays, list[int]]:
    """Krum (Blanchard et al. 2017, https://papers.nips.cc/paper/6617): the delta with the lowest
    :func:`krum_scores` (a copy), and ``[its index]``, as Flower's ``Krum``."""
    best = int(np.argsort(krum_scores(deltas, byzantine), kind="stable")[0])
    return {name: np.array(value, copy=True) for name, value in deltas[best].items()}, [best]


def multikrum(
    deltas: Deltas, byzantine: int, keep: int | None = None, weights: Sequence[float] | None = None
) -> tuple[NamedArrays, list[int]]:
    """Multi-Krum (Blanchard et al. 2017, https://papers.nips.cc/paper/6617; El Mhamdi et al. 2018,
    https://arxiv.org/abs/1802.07927): the mean of the ``keep`` deltas with the lowest
    :func:`krum_scores`, as Flower's ``MultiKrum`` with ``num_nodes_to_select = keep``.

    Parameters
    ----------
    keep
        How many deltas to average, default ``k - byzantine`` (El Mhamdi et al.; Flower's default
        is 1, which is :func:`krum`).
    weights
        Per-delta weights (sample counts) for the mean of the selected, as Flower weights them by
        ``num-examples``; ``None`` for an unweighted mean.

    Returns
    -------
    (dict, list of int)
        The mean and the selected indices, lowest score first.
    """
    check_rule("multikrum", len(deltas), byzantine=byzantine)
    k = len(deltas)
    keep = k - byzantine if keep is None else keep
    if not (isinstance(keep, (int, np.integer)) and 1 <= keep <= k):
        raise ValueError(f"multikrum: keep must be an integer from 1 to the {k} client updates, got {keep!r}")
    weights = [1.0] * k if weights is None else list(weights)
    if len(weights) != k:
        raise ValueError(f"multikrum: {len(weights)} weights for {k} client updates")
    selected = [int(i) for i in np.argsort(krum_scores(deltas, byzantine), kind="stable")[:keep]]
    return fedavg((deltas[i], weights[i]) for i in selected), selected


def bulyan(deltas: Deltas, byzantine: int, selection: str = "repeated_krum") -> tuple[NamedArrays, list[int]]:
    """Bulyan (El Mhamdi et al. 2018, https://arxiv.org/abs/1802.07927), unweighted as Flower's.

    Selects ``theta = k - 2f`` deltas, then per coordinate averages the ``beta = theta - 2f``
    selected values closest to the selected values' median. Needs ``k >= 4f + 3``.

    Parameters
    ----------
    selection
        ``"repeated_krum"`` (the paper): Krum picks one delta, it leaves the pool, repeat ``theta``
        times; Krum over the ``n`` left uses ``max(1, n - f - 2)`` neighbours (at most ``n - 1``),
        as Flower's ``select_multikrum(pool, f, 1)`` does. ``"multikrum"`` (Flower's default
        ``selection_rule``): the ``theta`` lowest Krum scores over all ``k`` in one pass.

    Returns
    -------
    (dict, list of int)
        The aggregate and the ``theta`` selected indices in selection order. A selected delta
        need not contribute to every coordinate.
    """
    check_rule("bulyan", len(deltas), byzantine=byzantine)
    k, f = len(deltas), byzantine
    theta, beta = k - 2 * f, k - 4 * f
    distances = _squared_distances(deltas)
    if selection == "multikrum":
        selected = [int(i) for i in np.argsort(_scores(distances, k - f - 2), kind="stable")[:theta]]
    elif selection == "repeated_krum":
        selected, pool = [], list(range(k))
        while len(selected) < theta:
            n = len(pool)
            scores = _scores(distances[np.ix_(pool, pool)], min(max(1, n - f - 2), n - 1))
            selected.append(pool.pop(int(np.argsort(scores, kind="stable")[0])))
    else:
        raise ValueError(f"bulyan: selection must be 'repeated_krum' or 'multikrum', got {selection!r}")

    def closest_to_median(stack: np.ndarray) -> np.ndarray:
        chosen = stack[selected]
        gap = np.abs(chosen - np.median(chosen, axis=0))
        order = np.argsort(gap, axis=0, kind="stable")[:beta]
        return np.take_along_axis(chosen, order, axis=0).mean(axis=0)

    return _per_name(deltas, closest_to_median), selected


def check_rule(aggregator: str, clients: int, trim_fraction: float = 0.0, byzantine: int = 0) -> None:
    """Raise ``ValueError`` unless ``aggregator`` can run on ``clients`` updates with these settings.

    Checked for every rule: a known name, ``clients >= 1``, ``byzantine`` a non-negative integer
    and ``0 <= trim_fraction < 0.5`` (which leaves ``k - 2 * int(trim_fraction * k) >= 1`` values
    per coordinate for any ``k``). Krum and Multi-Krum need ``k > 2f + 2``, Bulyan ``k >= 4f + 3``.
    Meant for config time (clients per round) and aggregation time (the updates received).
    """
    if aggregator not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {aggregator!r}; choose one of {', '.join(AGGREGATORS)}")
    if isinstance(clients, bool) or not isinstance(clients, (int, np.integer)) or clients < 1:
        raise ValueError(f"{aggregator} needs at least 1 client update, got {clients!r}")
    if isinstance(byzantine, bool) or not isinstance(byzantine, (int, np.integer)) or byzantine < 0:
        raise ValueError(f"byzantine must be a non-negative integer, got {byzantine!r}")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    f = int(byzantine)
    if aggregator in ("krum", "multikrum") and clients <= 2 * f + 2:
        raise ValueError(
            f"{aggregator} with byzantine={f} needs more than 2*{f} + 2 = {2 * f + 2} client updates, got {clients}"
        )
    if aggregator == "bulyan" and clients < 4 * f + 3:
        raise ValueError(
            f"bulyan with byzantine={f} needs at least 4*{f} + 3 = {4 * f + 3} client updates, got {clients}"
        )


def robust_aggregate(
    aggregator: str, deltas: Deltas, weights: Sequence[float], trim_fraction: float = 0.0, byzantine: int = 0
) -> tuple[NamedArrays, list[str]]:
    """Aggregate client deltas by one of :data:`AGGREGATORS`.

    ``mean`` is FedAvg weighted by ``weights``; ``median`` and ``trimmed_mean`` are unweighted and
    coordinate-wise, so they never exclude a whole client (every status is ``"kept"``);
    ``krum``, ``multikrum`` (``keep = k - byzantine``, weighted) and ``bulyan`` (repeated Krum,
    unweighted) mark their selected clients ``"kept"`` and the rest ``"excluded"``.

    Returns
    -------
    (dict, list of str)
        The aggregate delta, and per client in input order ``"kept"`` or ``"excluded"``.
    """
    check_rule(aggregator, len(deltas), trim_fraction=trim_fraction, byzantine=byzantine)
    if len(weights) != len(deltas):
        raise ValueError(f"{aggregator}: {len(weights)} weights for {len(deltas)} client updates")
    selected: Sequence[int] = range(len(deltas))
    if aggregator == "mean":
        _common_form(deltas)
        result = fedavg(zip(deltas, weights))
    elif aggregator == "median":
        result = coordinate_median(deltas)
    elif aggregator == "trimmed_mean":
        result = trimmed_mean(deltas, trim_fraction)
    elif aggregator == "krum":
        result, selected = krum(deltas, byzantine)
    elif aggregator == "multikrum":
        result, selected = multikrum(deltas, byzantine, weights=weights)
    else:
        result, selected = bulyan(deltas, byzantine)
    kept = set(selected)
    return result, ["kept" if i in kept else "excluded" for i in range(len(deltas))]


# ------------------------------------------------------------------ helpers


def _f64(value: np.ndarray) -> np.ndarray:
    return np.asarray(value).astype(np.float64, copy=False)


def _common_form(deltas: Deltas) -> list[str]:
    """The first delta's names, after checking every delta has the same names and shapes."""
    if not deltas:
        raise ValueError("robust aggregation needs at least one client delta")
    first = deltas[0]
    for i, delta in enumerate(deltas[1:], start=1):
        if delta.keys() != first.keys():
            raise ValueError(f"delta {i} has names {sorted(delta)}, delta 0 has {sorted(first)}")
        for name, value in delta.items():
            if np.shape(value) != np.shape(first[name]):
                raise ValueError(f"delta {i}: {name} has shape {np.shape(value)}, delta 0 has {np.shape(first[name])}")
    return list(first)


def _per_name(deltas: Deltas, reduce: Callable[[np.ndarray], np.ndarray]) -> NamedArrays:
    """``reduce`` (over axis 0 of a float64 ``(k, *shape)`` stack) applied name by name, cast back."""
    return {
        name: np.asarray(reduce(np.stack([_f64(d[name]) for d in deltas]))).astype(np.asarray(deltas[0][name]).dtype)
        for name in _common_form(deltas)
    }


def _squared_distances(deltas: Deltas) -> np.ndarray:
    """``(k, k)`` float64 squared L2 distances between whole deltas, from exact differences."""
    k = len(deltas)
    out = np.zeros((k, k))
    for name in _common_form(deltas):
        stack = np.stack([np.ravel(_f64(d[name])) for d in deltas])
        for i in range(k):
            diff = stack - stack[i]
            out[i] += np.einsum("kd,kd->k", diff, diff)
    return out


def _scores(distances: np.ndarray, neighbours: int) -> np.ndarray:
    """Each row's sum of its ``neighbours`` smallest distances to the other rows."""
    others = distances + np.diag(np.full(len(distances), np.inf))  # never one's own neighbour
    return np.sort(others, axis=1)[:, :neighbours].sum(axis=1)
