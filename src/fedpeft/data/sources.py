"""Load a labelled classification dataset from local files, a known name, or the Hugging Face hub.

Where the data comes from, in order of precedence:

1. ``data.train`` / ``data.test``: local CSV, JSON/JSONL or Parquet files (chosen by extension),
   or folders of images in class subfolders (the ``imagefolder`` layout). A ``labels.txt`` next
   to the train file, if present, names the labels.
2. ``data.name`` in :data:`KNOWN_DATASETS`: the folder ``<data_dir>/<folder>/`` (``train.csv``
   and ``test.csv`` or ``train/`` and ``test/`` image folders, optional ``labels.txt``) when it
   exists, else the dataset's Hugging Face hub id.
3. Any other ``data.name`` containing ``/``: a Hugging Face hub id.

Whatever the origin, :func:`load_data` returns train and test splits with exactly two columns,
``"text"`` (str) or ``"image"`` (PIL image), and ``"label"`` (int64 in ``[0, num_labels)``), and
a fingerprint of them (:mod:`fedpeft.data.fingerprint`). A run records its data config with
absolute paths and that fingerprint (:func:`resolved_config`); loading it again checks both.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np

from fedpeft.config import DataConfig
from fedpeft.data.fingerprint import data_fingerprint, same_data
from fedpeft.data.labels import LabelValues, encode_labels, label_values
from fedpeft.data.tables import SUFFIXES, read_table, require_filled
from fedpeft.errors import DataError
from fedpeft.hub import failure_reason, hub_problem, single_library_logs

log = logging.getLogger(__name__)

Modality = Literal["text", "image"]


@dataclass
class ClassificationData:
    """Train and test splits of one classification task, normalized to ``text|image`` + ``label``."""

    train: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str]
    modality: Modality
    source: str  # human-readable origin, e.g. "/abs/data/banking77 (local)" or "hub:PolyAI/banking77"
    fingerprint: str  # "local:<sha256>" or "hub:<sha256>" of the splits and label names

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class KnownDataset:
    """A dataset known by name: its folder under ``data_dir`` and its Hugging Face hub location."""

    folder: str
    hub_id: str
    modality: Modality
    hub_input_column: str  # the hub's text or image column
    hub_label_column: str = "label"
    hub_config: str | None = None
    hub_train_split: str = "train"
    hub_test_split: str = "test"
    local_test_input_column: str | None = None  # when the local test file's text column differs


KNOWN_DATASETS: dict[str, KnownDataset] = {
    "banking77": KnownDataset("banking77", "PolyAI/banking77", "text", "text"),
    # the hub's test split is unlabelled (-1): use validation as test
    "sst2": KnownDataset("sst2", "stanfordnlp/sst2", "text", "sentence", hub_test_split="validation"),
    # the local test.csv's "text" is title + description; train's text is the description only
    "ag_news": KnownDataset(
        "ag_news", "fancyzhx/ag_news", "text", "text", local_test_input_column="description"
    ),
    "cifar10": KnownDataset("cifar10", "uoft-cs/cifar10", "image", "img"),
    "beans": KnownDataset("beans", "AI-Lab-Makerere/beans", "image", "image", hub_label_column="labels"),
}


@dataclass
class _Split:
    """One raw split before normalization, with where it came from (for error messages)."""

    ds: datasets.Dataset
    where: str  # a file path or "hub:<id>[<split>]"
    input_column: str | None = None  # the source's own text/image column (None: guess)
    label_column: str = "label"


def resolve_data_dir(cfg: DataConfig) -> Path:
    """The folder holding known datasets: ``data.data_dir``, else ``$FEDPEFT_DATA_DIR``, else ``./data``."""
    return Path(cfg.data_dir or os.environ.get("FEDPEFT_DATA_DIR") or "data").expanduser()


def load_data(cfg: DataConfig, seed: int) -> ClassificationData:
    """Load, column-normalize, label-encode and subsample the train and test splits of ``cfg``.

    The train split is always shuffled with ``seed`` (some files are sorted by label) and then cut
    to ``cfg.max_train_samples``; the test split is shuffled and cut only if
    ``cfg.max_test_samples`` is set. When ``cfg.fingerprint`` is set (the config of a saved run),
    the loaded data must have that fingerprint.

    With ``cfg.validation_fraction`` (``fedpeft tune``'s proxy runs) the test split is never read:
    the returned ``test`` is the validation slice, the last ``round(fraction * M)`` rows of the
    same seeded shuffle of the train split, M being the rows a run without the fraction trains on
    (``cfg.max_train_samples``, or all), and training takes ``cfg.max_train_samples`` rows from
    the rest. When the split has room for both, those are exactly the rows a run without the
    fraction trains on (the same clients, the same partition). The fingerprint then covers the
    train split only.

    Raises
    ------
    DataError
        For a missing file or column, an unknown dataset name, empty cells, labels that do not
        match, data that differs from ``cfg.fingerprint``, or a validation slice that leaves no
        train row.
    """
    single_library_logs()
    train, test, labels_file, source, modality = _load_splits(cfg, with_test=cfg.validation_fraction is None)
    for split in filter(None, (train, test)):  # report a wrong or empty text/image column before any label problem
        column, key = _input_column(split, modality, cfg)
        _require_column(split, column, key)
        require_filled(split.ds, column, split.where, modality)
    train_labels = label_values(train.ds, _label_column(train, cfg), train.where)
    no_test = LabelValues(train_labels.values[:0], train_labels.class_names, train.where)
    test_labels = no_test if test is None else label_values(test.ds, _label_column(test, cfg), test.where)
    train_ids, test_ids, names = encode_labels(train_labels, test_labels, labels_file)
    train_ds = _normalize(train, train_ids, modality, cfg)
    test_ds = None if test is None else _normalize(test, test_ids, modality, cfg)
    origin = "hub" if source.startswith("hub:") else "local"
    # the whole splits read, not the seeded subsample: one dataset has one fingerprint whatever the seed
    fingerprint = data_fingerprint(origin, [(ds, None) for ds in (train_ds, test_ds) if ds is not None], names, modality)
    if cfg.fingerprint and not same_data(cfg.fingerprint, fingerprint):
        raise DataError(
            f"{source}: the dataset changed since the run was made (its fingerprint is not "
            "data.fingerprint); point data.data_dir, or data.train and data.test, at the run's data"
        )
    train_ds, test_ds, source = select_rows(train_ds, test_ds, cfg, seed, source, train.where)
    return ClassificationData(train_ds, test_ds, names, modality, source, fingerprint)


def select_rows(train_ds: datasets.Dataset, test_ds: datasets.Dataset | None, cfg: DataConfig, seed: int,
                source: str, where: str) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """The seeded train rows (``max_train_samples``), the test rows (``max_test_samples``; without
    a test split, ``validation_fraction`` of the shuffled train rows held out) and ``source`` saying
    so: the same draws for every task."""
    order = np.random.default_rng([seed, 0]).permutation(len(train_ds))
    if test_ds is None:
        order, held_out = _hold_out(order, cfg.validation_fraction, cfg.max_train_samples, where)
        test_ds = train_ds.select(held_out)
        source += f", validated on {len(held_out)} held-out train rows (data.validation_fraction)"
    if cfg.max_test_samples is not None:
        test_ds = test_ds.select(_shuffled_head(len(test_ds), cfg.max_test_samples, np.random.default_rng([seed, 1])))
    return train_ds.select(order[:cfg.max_train_samples]), test_ds, source


def resolved_config(cfg: DataConfig, data: ClassificationData) -> DataConfig:
    """``cfg`` as a run records it: the paths it loaded from made absolute, and ``data.fingerprint``.

    ``data_dir`` becomes the absolute folder a known dataset was read from (whether it came from
    ``data.data_dir``, ``$FEDPEFT_DATA_DIR`` or ``./data``); it is left as is for hub data.
    """
    used_data_dir = cfg.train is None and not data.source.startswith("hub:")
    return dataclasses.replace(
        cfg,
        data_dir=absolute_path(resolve_data_dir(cfg)) if used_data_dir else cfg.data_dir,
        train=absolute_path(cfg.train),
        test=absolute_path(cfg.test),
        cache_dir=absolute_path(cfg.cache_dir),
        fingerprint=data.fingerprint,
    )


def absolute_path(path: str | Path | None) -> str | None:
    """``path`` with ``~`` expanded, absolute and normalized (symlinks kept); None stays None."""
    return None if path is None else os.path.abspath(os.path.expanduser(path))


# --------------------------------------------------------------------------- origins


def _load_splits(cfg: DataConfig, with_test: bool) -> tuple[_Split, _Split | None, Path | None, str, Modality]:
    """The raw train and test splits of ``cfg`` (test None unless ``with_test``: then it is never
    read), its labels file, a source description, the modality."""
    if cfg.train is None and cfg.test is not None:
        raise DataError("data.test is set without data.train: give both files (they replace data.name)")
    if cfg.train is not None:
        train, test, labels_file, source = _from_files(cfg, with_test)
        return train, test, labels_file, source, _detect_modality(train.ds, cfg)
    if cfg.name in KNOWN_DATASETS:
        return _from_known(cfg, KNOWN_DATASETS[cfg.name], with_test)
    if cfg.name is not None and "/" in cfg.name:
        fix = "check the hub id, or set data.train and data.test to local files"
        train, test, source = _from_hub(cfg.name, None, "train", None, None, "label", fix, with_test)
        return train, test, None, source, _detect_modality(train.ds, cfg)
    known = ", ".join(sorted(KNOWN_DATASETS))
    problem = "no dataset given" if cfg.name is None else f"unknown dataset {cfg.name!r}"
    raise DataError(
        f"data.name: {problem}; known datasets: {known} "
        "(or a Hugging Face hub id such as 'owner/name', or set data.train and data.test)"
    )


def _from_known(cfg: DataConfig, spec: KnownDataset, with_test: bool) -> tuple[_Split, _Split | None, Path | None, str, Modality]:
    """A known dataset from its folder under the data dir, else from the hub (never for a run whose
    fingerprint says its data was local: then the folder has moved)."""
    folder = resolve_data_dir(cfg) / spec.folder
    if folder.is_dir():
        return *_from_folder(folder, spec, with_test), spec.modality
    if (cfg.fingerprint or "").startswith("local:"):
        raise DataError(
            f"data.data_dir: no folder {absolute_path(folder)}, where this run's {cfg.name} data was "
            f"(data.fingerprint is local); if it moved: --set data.data_dir=NEW, the folder that "
            f"holds {spec.folder}/"
        )
    log.info("%s not found: loading %s from the Hugging Face hub", folder, spec.hub_id)
    fix = f"no local copy at {absolute_path(folder)}: set data.data_dir to the folder holding {spec.folder}/"
    train, test, source = _from_hub(
        spec.hub_id, spec.hub_config, spec.hub_train_split, spec.hub_test_split,
        spec.hub_input_column, spec.hub_label_column, fix, with_test,
    )
    return train, test, None, source, spec.modality


def _from_files(cfg: DataConfig, with_test: bool) -> tuple[_Split, _Split | None, Path | None, str]:
    if cfg.test is None and with_test:
        raise DataError(
            f"data.test is missing: data.train = {cfg.train!r} is set, so give the test split as "
            "data.test too (fedpeft does not split the train file silently)"
        )
    train_path = Path(cfg.train).expanduser()
    train = _read_local(train_path, "data.train", cfg.image_column)
    test, source = None, f"{train_path.resolve()} (local)"
    if with_test:
        test_path = Path(cfg.test).expanduser()
        test = _read_local(test_path, "data.test", cfg.image_column)
        source = f"{train_path.resolve()} + {test_path.resolve()} (local)"
    labels_file = train_path.parent / "labels.txt"
    return train, test, labels_file if labels_file.is_file() else None, source


def _from_folder(folder: Path, spec: KnownDataset, with_test: bool) -> tuple[_Split, _Split | None, Path | None, str]:
    wanted = [("train", None)] + ([("test", spec.local_test_input_column)] if with_test else [])
    splits = []
    for name, column in wanted:
        candidates = [folder / f"{name}{suffix}" for suffix in SUFFIXES] + [folder / name]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            expected = ", ".join(p.name for p in candidates)
            raise DataError(f"{folder}: no {name} split found; expected one of: {expected}")
        split = _read_local(path, f"{spec.folder} {name} split", None)
        split.input_column = column
        splits.append(split)
    labels_file = folder / "labels.txt"
    source = f"{folder.resolve()} (local)"
    return splits[0], splits[1] if with_test else None, labels_file if labels_file.is_file() else None, source


def _from_hub(hub_id: str, config: str | None, train_split: str, test_split: str | None,
              input_column: str | None, label_column: str, fix: str, with_test: bool) -> tuple[_Split, _Split | None, str]:
    """The train and (``with_test``) test splits of a hub dataset; any failure is one DataError
    ending with ``fix``."""
    source = f"hub:{hub_id}" + (f"/{config}" if config else "")
    problem = hub_problem()
    if problem:
        raise DataError(f"data.name: cannot load {source}: {problem}; {fix}")
    try:
        dsd = datasets.load_dataset(hub_id, config)
    except Exception as exc:  # network, auth, unknown id, bad config: all reach the user as one line
        raise DataError(
            f"data.name: cannot load {source} from the Hugging Face hub: {failure_reason(exc)}; {fix}"
        ) from None
    if test_split is None:  # unknown hub dataset: prefer a test split, else validation
        test_split = next((s for s in ("test", "validation") if s in dsd), "test")
    split_list = []
    for split in [train_split, test_split] if with_test else [train_split]:
        if split not in dsd:
            raise DataError(f"{source}: no {split!r} split; available splits: {', '.join(dsd)}")
        split_list.append(_Split(dsd[split], f"{source}[{split}]", input_column, label_column))
    return split_list[0], split_list[1] if with_test else None, source


def _read_local(path: Path, key: str, image_column: str | None) -> _Split:
    """A table file (by extension) or an image folder as a raw split."""
    if path.is_dir():
        try:
            # drop_labels=False: keep the label column even when the folder has one class subfolder
            dsd = datasets.load_dataset("imagefolder", data_dir=str(path), drop_labels=False)
        except Exception as exc:  # noqa: BLE001 - the builder raises many types for a bad folder
            raise DataError(f"{key}: cannot read image folder {path}: {str(exc).strip()[:200]}") from None
        return _Split(dsd["train"], str(path), "image")
    if not path.is_file():
        raise DataError(f"{key}: file not found: {absolute_path(path)} (if it moved: --set {key}=NEW_PATH)")
    return _Split(read_table(path, image_column), str(path))


# --------------------------------------------------------------------------- normalization


def _detect_modality(ds: datasets.Dataset, cfg: DataConfig) -> Modality:
    if cfg.image_column is not None and cfg.text_column is not None:
        raise DataError("data: set only one of data.text_column and data.image_column")
    if cfg.image_column is not None:
        return "image"
    if cfg.text_column is not None:
        return "text"
    has_image = any(isinstance(ds.features.get(c), datasets.Image) for c in ("image", "img"))
    return "image" if has_image else "text"


def _input_column(split: _Split, modality: Modality, cfg: DataConfig) -> tuple[str, str]:
    """The column holding the inputs and the config key that overrides it."""
    if modality == "text":
        return cfg.text_column or split.input_column or "text", "data.text_column"
    if cfg.image_column or split.input_column:
        return cfg.image_column or split.input_column, "data.image_column"
    present = [c for c in ("image", "img") if c in split.ds.column_names]
    return (present[0] if present else "image"), "data.image_column"


def _label_column(split: _Split, cfg: DataConfig) -> str:
    column = cfg.label_column or split.label_column
    _require_column(split, column, "data.label_column")
    return column


def _require_column(split: _Split, column: str, key: str) -> None:
    if column not in split.ds.column_names:
        raise DataError(
            f"{split.where}: no column {column!r} (set {key}); "
            f"available columns: {', '.join(split.ds.column_names)}"
        )


def _normalize(split: _Split, ids: np.ndarray, modality: Modality, cfg: DataConfig) -> datasets.Dataset:
    """Keep only the input column (renamed to ``text``/``image``) and the int64 ``label`` column."""
    column, key = _input_column(split, modality, cfg)
    ds = split.ds.select_columns([column])
    if column != modality:
        ds = ds.rename_column(column, modality)
    feature = ds.features[modality]
    if modality == "image" and not isinstance(feature, datasets.Image):
        ds = ds.cast_column("image", datasets.Image())  # file paths or encoded bytes
    elif modality == "text":
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise DataError(
                f"{split.where}: text column {column!r} holds {feature}, not strings (set {key})"
            )
    return ds.add_column("label", ids.astype(np.int64), feature=datasets.Value("int64"))


def _hold_out(order: np.ndarray, fraction: float, max_train: int | None, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``order`` split into (rows to train on, the last ``round(fraction * M)`` rows, at least one),
    M = ``min(max_train, len(order))`` (all rows if ``max_train`` is None).

    Raises
    ------
    DataError
        When the slice would take every row.
    """
    used = len(order) if max_train is None else min(max_train, len(order))
    n_held_out = max(1, round(fraction * used))
    if n_held_out >= len(order):
        raise DataError(
            f"{where}: data.validation_fraction = {fraction} holds out all {len(order)} train rows: give a smaller fraction"
        )
    return order[:-n_held_out], order[-n_held_out:]


def _shuffled_head(num_rows: int, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """Row ids of a seeded shuffle of ``num_rows`` rows, cut to the first ``n`` (all if None)."""
    order = rng.permutation(num_rows)
    return order[:n] if n is not None else order
