"""Split training samples over federated clients: IID, Dirichlet label skew, or label shards.

The schemes reuse :mod:`flwr_datasets.partitioner` on a tiny dataset of ``label`` and ``row``
(the sample's index) columns; each client's indices are read back from the ``row`` column.

- ``iid``: a seeded permutation cut into ``num_clients`` contiguous, near-equal parts
  (:class:`IidPartitioner`).
- ``dirichlet``: per class, the fractions going to each client are drawn from
  Dirichlet(``alpha``); smaller ``alpha`` means more label skew. Redrawn (at most 10 times) until
  every client has ``min_samples`` samples (:class:`DirichletPartitioner`, no self-balancing).
- ``shards``: samples sorted by label are cut into ``num_clients * shards_per_client`` equal
  shards, and each client gets ``shards_per_client`` random shards (:class:`ShardPartitioner`).
  Equal shards can leave up to a shard's worth of samples over: these leftovers, in label order,
  are cut into ``num_clients`` contiguous near-equal chunks given to clients in a seeded random
  order, so every sample still belongs to exactly one client.

Every scheme is deterministic given ``seed``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import datasets
import numpy as np

from fedpeft.config import PartitionConfig
from fedpeft.errors import DataError

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

ADVICE = "use fewer partition.num_clients or a larger partition.alpha"


def partition(labels: np.ndarray, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Assign every sample to exactly one client.

    Parameters
    ----------
    labels : np.ndarray
        (N,) class id of each training sample.
    cfg : PartitionConfig
        Scheme, number of clients and the scheme's options.
    seed : int
        Seeds every random choice: the same seed gives the same partition.

    Returns
    -------
    list of np.ndarray
        ``cfg.num_clients`` sorted int64 index arrays into ``labels``, disjoint, covering ``0..N-1``.

    Raises
    ------
    DataError
        When there are more clients than samples, or some client would get no sample.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    n, k = len(labels), cfg.num_clients
    if k > n:
        raise DataError(f"partition.num_clients = {k} exceeds the {n} training samples; use fewer clients")
    order = np.random.default_rng(seed).permutation(n) if cfg.scheme == "iid" else np.arange(n)
    table = datasets.Dataset.from_dict({"label": labels[order], "row": order.astype(np.int64)})
    partitioner = _make_partitioner(cfg, n, seed)
    partitioner.dataset = table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Dirichlet warns on every redraw
        warnings.simplefilter("ignore", FutureWarning)  # pyarrow deprecations inside Dataset.sort
        try:
            parts = [_rows(partitioner.load_partition(i)) for i in range(k)]
        except ValueError as exc:
            if cfg.scheme != "dirichlet" or "attempts" not in str(exc):
                raise
            raise DataError(
                f"partition: Dirichlet sampling (alpha = {cfg.alpha}) gave some client fewer than "
                f"partition.min_samples = {cfg.min_samples} samples in 10 attempts; {ADVICE}, "
                "or lower partition.min_samples"
            ) from exc
    parts = _assign_leftovers(parts, labels, seed)
    _check_every_sample_once(parts, n)
    _check_no_empty_client(parts, cfg, n)
    return parts


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> list[list[int]]:
    """Per client, its number of samples of each class.

    Returns
    -------
    list of list of int
        ``len(parts)`` lists of ``num_classes`` counts; row ``i`` sums to ``len(parts[i])``.
    """
    labels = np.asarray(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return [np.bincount(labels[part], minlength=num_classes).tolist() for part in parts]


# --------------------------------------------------------------------------- helpers


def _make_partitioner(cfg: PartitionConfig, n: int, seed: int) -> Partitioner:
    # imported here: flwr_datasets pulls in its plotting helpers, which take seconds to import
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    k = cfg.num_clients
    if cfg.scheme == "iid":
        return IidPartitioner(num_partitions=k)
    if cfg.scheme == "dirichlet":
        if cfg.min_samples * k > n:
            raise DataError(
                f"partition.min_samples = {cfg.min_samples} for each of {k} clients needs "
                f"{cfg.min_samples * k} samples but there are {n}; {ADVICE}"
            )
        return DirichletPartitioner(
            num_partitions=k, partition_by="label", alpha=float(cfg.alpha),
            min_partition_size=cfg.min_samples, self_balancing=False, shuffle=False, seed=seed,
        )
    if cfg.scheme == "shards":
        shards = k * cfg.shards_per_client
        if shards > n:
            raise DataError(
                f"partition: {k} clients x {cfg.shards_per_client} shards_per_client = {shards} shards "
                f"but only {n} samples; use a smaller partition.shards_per_client or fewer clients"
            )
        return ShardPartitioner(
            num_partitions=k, partition_by="label", num_shards_per_partition=cfg.shards_per_client,
            shuffle=False, seed=seed,
        )
    raise DataError(f"partition.scheme: unknown scheme {cfg.scheme!r}; known schemes: iid, dirichlet, shards")


def _rows(part: datasets.Dataset) -> np.ndarray:
    """The original sample indices of one partition, sorted (M,) int64."""
    if len(part) == 0:
        return np.zeros(0, np.int64)
    return np.sort(np.asarray(part.with_format("numpy")[:]["row"], dtype=np.int64))


def _assign_leftovers(parts: list[np.ndarray], labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """Give samples that no client got (equal-size shards can drop some) to clients deterministically.

    The leftovers, sorted by (label, index), are cut into ``len(parts)`` contiguous near-equal
    chunks; chunk ``j`` goes to the ``j``-th client of a seeded random client order.
    """
    assigned = np.zeros(len(labels), dtype=bool)
    for part in parts:
        assigned[part] = True
    leftovers = np.flatnonzero(~assigned)
    if len(leftovers) == 0:
        return parts
    leftovers = leftovers[np.argsort(labels[leftovers], kind="stable")]
    client_order = np.random.default_rng([seed, 1]).permutation(len(parts))
    parts = list(parts)
    for client, chunk in zip(client_order, np.array_split(leftovers, len(parts))):
        parts[client] = np.sort(np.concatenate([parts[client], chunk]))
    return parts


def _check_every_sample_once(parts: list[np.ndarray], n: int) -> None:
    everything = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    if not np.array_equal(everything, np.arange(n)):
        raise RuntimeError("partition bug: the clients' samples are not each sample exactly once")


def _check_no_empty_client(parts: list[np.ndarray], cfg: PartitionConfig, n: int) -> None:
    empty = [i for i, part in enumerate(parts) if len(part) == 0]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (f" (+{len(empty) - 10} more)" if len(empty) > 10 else "")
        who = f"client {shown} got" if len(empty) == 1 else f"clients {shown} got"
        raise DataError(
            f"partition: {who} 0 samples ({cfg.scheme}, {cfg.num_clients} clients, {n} samples, "
            f"alpha = {cfg.alpha}); {ADVICE}, or set partition.min_samples >= 1"
        )
