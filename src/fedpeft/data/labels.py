"""Turn raw label values (ints, strings, ClassLabel ids) into ids ``0..K-1`` and label names.

The label names come from, in order of precedence:

1. a :class:`datasets.ClassLabel` feature of the train split (hub datasets, image folders);
2. a ``labels.txt`` file with one name per line: string labels are looked up by name, int labels
   (or integer-like strings such as the ``0``/``1`` of SST-2) are 0-based indices into it;
3. the sorted unique train labels (ints sorted numerically), as strings.

Names that no train row uses are kept (the classifier still gets an output for them). With
inferred names (3) every test label must occur in train.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from fedpeft.data.tables import require_filled
from fedpeft.errors import DataError

MAX_SHOWN = 10  # labels listed in an error message


@dataclass
class LabelValues:
    """The raw labels of one split: ``values`` (N,) and the ClassLabel names if it has them."""

    values: np.ndarray
    class_names: list[str] | None
    where: str  # file path or hub split, for messages


def label_values(ds: datasets.Dataset, column: str, where: str) -> LabelValues:
    """Read column ``column`` of ``ds`` as a numpy array; empty cells raise :class:`DataError`."""
    require_filled(ds, column, where, "label")
    values = np.asarray(ds.select_columns([column]).with_format("numpy")[:][column])
    feature = ds.features[column]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if names is not None and len(values) and values.min() < 0:
        raise DataError(
            f"{where}: label column {column!r} has unlabelled rows (label -1); use a labelled split"
        )
    return LabelValues(values, names, where)


def encode_labels(
    train: LabelValues, test: LabelValues, labels_file: Path | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Map train and test labels to int64 ids (N,) over one list of label names.

    Returns
    -------
    train_ids, test_ids : np.ndarray
        int64 arrays of shapes (N_train,) and (N_test,), values in ``[0, len(names))``.
    names : list[str]
        The label names; ``names[i]`` is the name of id ``i``.
    """
    if train.class_names is not None:
        names = train.class_names
        if test.class_names == names:
            return train.values.astype(np.int64), test.values.astype(np.int64), names
        test_names = _as_names(test)
        test_ids = _lookup(test_names, names)
        _raise_if_mismatch(sorted(set(test_names[test_ids < 0].tolist())), train, test)
        return train.values.astype(np.int64), test_ids, names
    if labels_file is not None:
        names = read_label_names(labels_file)
        return _by_names(train, names, labels_file), _by_names(test, names, labels_file), names
    test_plain = LabelValues(_as_names(test), None, test.where) if test.class_names else test
    train_values, test_values = _ints_if_possible(train), _ints_if_possible(test_plain)
    classes = np.unique(train_values)  # sorted: ints numerically, strings lexically
    _raise_if_mismatch(sorted(set(test_values.tolist()) - set(classes.tolist()), key=str), train, test)
    names = [str(c) for c in classes.tolist()]
    return np.searchsorted(classes, train_values), np.searchsorted(classes, test_values), names


def read_label_names(path: Path) -> list[str]:
    """The non-empty lines of ``path``, stripped; duplicates raise :class:`DataError`."""
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no label names (expected one name per line)")
    duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
    if duplicates:
        raise DataError(f"{path}: duplicate label names: {_preview(duplicates)}")
    return names


# --------------------------------------------------------------------------- helpers


def _by_names(split: LabelValues, names: list[str], names_file: Path) -> np.ndarray:
    """Ids of ``split`` given label names: look strings up by name, take ints as indices."""
    values = _as_names(split) if split.class_names is not None else split.values
    if values.dtype.kind in "USO":
        strings = values.astype(str)
        ids = _lookup(strings, names)
        if (ids >= 0).all():
            return ids
        values = _ints_if_possible(LabelValues(strings, None, split.where))
        if values.dtype.kind not in "iu":  # neither all names nor all integer-like
            missing = sorted(set(strings[ids < 0].tolist()))
            raise DataError(f"{split.where}: labels not in {names_file}: {_preview(missing)}")
    else:
        values = _ints_if_possible(split)
    bad = values[(values < 0) | (values >= len(names))]
    if len(bad):
        raise DataError(
            f"{split.where}: int labels are 0-based indices into {names_file} ({len(names)} names) "
            f"but these are out of range: {_preview(sorted(set(bad.tolist())))}"
        )
    return values.astype(np.int64)


def _ints_if_possible(split: LabelValues) -> np.ndarray:
    """Labels as int64 if they are ints, integral floats or integer-like strings, else as str."""
    values = split.values
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values) & (values == np.round(values))):
            raise DataError(f"{split.where}: labels must be ints or strings, got non-integer numbers")
        return values.astype(np.int64)
    strings = values.astype(str)
    try:
        return strings.astype(np.int64)
    except ValueError:
        return strings


def _as_names(split: LabelValues) -> np.ndarray:
    """ClassLabel ids as their names; other values unchanged."""
    if split.class_names is None:
        return split.values.astype(str)
    return np.asarray(split.class_names, dtype=object)[split.values].astype(str)


def _lookup(values: np.ndarray, names: list[str]) -> np.ndarray:
    """Position of each value in ``names`` (N,) int64; -1 where absent."""
    return pd.Index(names).get_indexer(values).astype(np.int64)


def _raise_if_mismatch(missing: list, train: LabelValues, test: LabelValues) -> None:
    if missing:
        raise DataError(
            "label set mismatch between train and test: test has labels not in train: "
            f"{_preview(missing)} (train: {train.where}; test: {test.where})"
        )


def _preview(items: list) -> str:
    shown = ", ".join(repr(i) for i in items[:MAX_SHOWN])
    more = f" (+{len(items) - MAX_SHOWN} more)" if len(items) > MAX_SHOWN else ""
    return f"[{shown}]{more}"
