"""Tests of fedpeft.data.partition: coverage, determinism, label skew and errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.config import PartitionConfig
from fedpeft.data import label_histograms, partition
from fedpeft.errors import DataError

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """2000 samples over 10 classes, (2000,) int64."""
    return np.random.default_rng(123).integers(0, NUM_CLASSES, size=2000)


def _assert_exact_cover(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "each client's indices are sorted and unique"
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def _top_class_fraction(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over clients of the share of the client's most common class."""
    hist = np.array(label_histograms(labels, parts, NUM_CLASSES), dtype=float)
    return float(np.mean(hist.max(axis=1) / hist.sum(axis=1)))


def _total_variation(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over clients of the total variation distance to the global label distribution."""
    hist = np.array(label_histograms(labels, parts, NUM_CLASSES), dtype=float)
    local = hist / hist.sum(axis=1, keepdims=True)
    overall = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    return float(np.mean(0.5 * np.abs(local - overall).sum(axis=1)))


SCHEMES = [
    PartitionConfig(scheme="iid", num_clients=20),
    PartitionConfig(scheme="dirichlet", num_clients=20, alpha=0.5),
    PartitionConfig(scheme="shards", num_clients=20, shards_per_client=2),
    PartitionConfig(scheme="shards", num_clients=7, shards_per_client=3),  # 2000 % 21 != 0
]


@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: f"{c.scheme}-{c.num_clients}")
def test_every_sample_exactly_once(labels, cfg):
    parts = partition(labels, cfg, seed=0)
    _assert_exact_cover(parts, len(labels), cfg.num_clients)
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: f"{c.scheme}-{c.num_clients}")
def test_deterministic_for_a_seed_and_different_across_seeds(labels, cfg):
    first = partition(labels, cfg, seed=7)
    again = partition(labels, cfg, seed=7)
    other = partition(labels, cfg, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_iid_sizes_are_balanced_and_labels_mixed(labels):
    parts = partition(labels, PartitionConfig(scheme="iid", num_clients=7), seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _total_variation(labels, parts) < 0.15


def test_dirichlet_skew_grows_as_alpha_shrinks(labels):
    skewed = partition(labels, PartitionConfig(scheme="dirichlet", num_clients=20, alpha=0.1), seed=0)
    mild = partition(labels, PartitionConfig(scheme="dirichlet", num_clients=20, alpha=10.0), seed=0)
    assert _top_class_fraction(labels, skewed) > _top_class_fraction(labels, mild) + 0.2
    assert _total_variation(labels, skewed) > _total_variation(labels, mild) + 0.2


def test_shards_give_few_classes_per_client(labels):
    parts = partition(labels, PartitionConfig(scheme="shards", num_clients=20, shards_per_client=2), seed=0)
    hist = np.array(label_histograms(labels, parts, NUM_CLASSES))
    # 2 shards of 50 label-sorted samples each: at most 2 classes per shard
    assert np.mean((hist > 0).sum(axis=1)) <= 4
    iid = partition(labels, PartitionConfig(scheme="iid", num_clients=20), seed=0)
    assert np.mean((np.array(label_histograms(labels, iid, NUM_CLASSES)) > 0).sum(axis=1)) > 8


@pytest.mark.filterwarnings("ignore::FutureWarning")  # pyarrow deprecation inside Dataset.sort
def test_shards_leftovers_dropped_by_flwr_are_assigned():
    from datasets import Dataset
    from flwr_datasets.partitioner import ShardPartitioner

    labels = np.arange(99) % 10  # 99 samples, 40 shards of 2: flwr-datasets leaves 19 out
    flwr = ShardPartitioner(num_partitions=20, partition_by="label", num_shards_per_partition=2, seed=0)
    flwr.dataset = Dataset.from_dict({"label": labels})
    covered = sum(len(flwr.load_partition(i)) for i in range(20))
    assert covered < 99, "the setting must exercise the leftover assignment"
    parts = partition(labels, PartitionConfig(scheme="shards", num_clients=20, shards_per_client=2), seed=0)
    _assert_exact_cover(parts, 99, 20)


def test_label_histograms_match_parts(labels):
    parts = partition(labels, PartitionConfig(scheme="dirichlet", num_clients=10, alpha=0.3), seed=1)
    hist = label_histograms(labels, parts, NUM_CLASSES)
    assert len(hist) == 10 and all(len(h) == NUM_CLASSES for h in hist)
    assert [sum(h) for h in hist] == [len(p) for p in parts]
    np.testing.assert_array_equal(np.sum(hist, axis=0), np.bincount(labels, minlength=NUM_CLASSES))
    for h, part in zip(hist, parts):
        assert h[int(labels[part[0]])] > 0


def test_client_with_zero_samples_is_an_error():
    labels = np.array([0] * 50 + [1] * 50)
    cfg = PartitionConfig(scheme="dirichlet", num_clients=30, alpha=0.01, min_samples=0)
    with pytest.raises(DataError, match=r"clients? [0-9, ]+.*got 0 samples.*num_clients.*alpha.*min_samples"):
        partition(labels, cfg, seed=0)


def test_dirichlet_min_samples_unreachable_is_an_error():
    labels = np.array([0] * 50 + [1] * 50)
    cfg = PartitionConfig(scheme="dirichlet", num_clients=30, alpha=0.01, min_samples=1)
    with pytest.raises(DataError, match=r"10 attempts; use fewer partition.num_clients"):
        partition(labels, cfg, seed=0)


def test_dirichlet_min_samples_above_the_data_is_an_error():
    cfg = PartitionConfig(scheme="dirichlet", num_clients=10, min_samples=20)
    with pytest.raises(DataError, match=r"min_samples = 20 .* needs 200 samples but there are 100"):
        partition(np.zeros(100, dtype=np.int64), cfg, seed=0)


def test_more_clients_than_samples_is_an_error():
    with pytest.raises(DataError, match=r"num_clients = 11 exceeds the 10 training samples"):
        partition(np.zeros(10, dtype=np.int64), PartitionConfig(num_clients=11), seed=0)


def test_more_shards_than_samples_is_an_error():
    cfg = PartitionConfig(scheme="shards", num_clients=10, shards_per_client=3)
    with pytest.raises(DataError, match=r"30 shards but only 20 samples"):
        partition(np.arange(20) % 2, cfg, seed=0)


@pytest.mark.parametrize("scheme", ["iid", "shards"])
def test_as_many_clients_as_samples_leaves_no_client_empty(scheme):
    """The edge of the schemes that cannot refuse: one sample per client, none empty."""
    parts = partition(np.arange(12) % 3, PartitionConfig(scheme=scheme, num_clients=12, shards_per_client=1), seed=0)
    assert [len(p) for p in parts] == [1] * 12
