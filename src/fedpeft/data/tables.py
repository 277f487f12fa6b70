"""Read one local table file (CSV, JSON/JSONL or Parquet, chosen by extension) into a Dataset.

Files are read with pandas into an in-memory :class:`datasets.Dataset`, so nothing is written to
the Hugging Face cache and the dataset fingerprint is a hash of the content (identical files give
identical fingerprints, which keys the encoding cache of :mod:`fedpeft.data.encode`).

CSV cells are read as strings without NA guessing (``"NA"`` or ``"null"`` stay text); integer-like
label strings are turned into ints later by :mod:`fedpeft.data.labels`.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pandas as pd

from fedpeft.errors import DataError

# extension -> reader kind; the order is the search order for <folder>/<split><suffix>
SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def read_table(path: Path, image_column: str | None = None) -> datasets.Dataset:
    """Read ``path`` into an in-memory Dataset.

    Parameters
    ----------
    path : Path
        An existing ``.csv``, ``.json``, ``.jsonl`` or ``.parquet`` file.
    image_column : str, optional
        A column of image file paths; relative paths are resolved against the file's folder.

    Raises
    ------
    DataError
        For an unsupported extension, an unparsable or empty file.
    """
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix or '(none)'!r}; use one of "
            f"{', '.join(SUFFIXES)} or a folder of images in class subfolders"
        )
    try:
        if kind == "csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif kind == "json":
            frame = _read_json(path)
        else:
            frame = pd.read_parquet(path)
    except (ValueError, OSError, ImportError) as exc:  # pandas parse errors are ValueErrors
        raise DataError(f"{path}: cannot read as {kind}: {_first_line(exc)}") from None
    if len(frame) == 0:
        raise DataError(f"{path}: the file has no rows")
    if image_column is not None and image_column in frame.columns:
        frame[image_column] = [_resolve_image(v, path.parent) for v in frame[image_column]]
    try:
        return datasets.Dataset.from_pandas(frame, preserve_index=False)
    except (ValueError, TypeError) as exc:  # pyarrow: mixed types within a column
        raise DataError(f"{path}: cannot convert to a dataset: {_first_line(exc)}") from None


def _read_json(path: Path) -> pd.DataFrame:
    """A JSON array of records or JSON lines (tried in the order the extension suggests)."""
    lines_first = path.suffix.lower() == ".jsonl"
    try:
        return pd.read_json(path, lines=lines_first, dtype=False)
    except ValueError:
        return pd.read_json(path, lines=not lines_first, dtype=False)


def _resolve_image(value: object, base: Path) -> object:
    if isinstance(value, str) and not Path(value).is_absolute():
        return str(base / value)
    return value


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
