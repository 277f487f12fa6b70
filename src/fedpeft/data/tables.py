"""Read one local table file (CSV, JSON/JSONL or Parquet, chosen by extension) into a Dataset.

Files are read with pandas into an in-memory :class:`datasets.Dataset`, so nothing is written to
the Hugging Face cache and the dataset fingerprint is a hash of the content (identical files give
identical fingerprints, which keys the encoding cache of :mod:`fedpeft.data.encode`).

CSV cells are read as strings without NA guessing (``"NA"`` or ``"null"`` stay text); integer-like
label strings are turned into ints later by :mod:`fedpeft.data.labels`. Empty cells (null, ``""``
or only whitespace) are found by :func:`require_filled`, which names their file lines.
"""

from __future__ import annotations

import csv
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fedpeft.errors import DataError

# extension -> reader kind; the order is the search order for <folder>/<split><suffix>
SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MAX_ROWS_SHOWN = 5  # row numbers listed in an error message


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


def require_filled(ds: datasets.Dataset, column: str, where: str, what: str) -> None:
    """Raise :class:`DataError` if ``column`` of ``ds`` (as read from ``where``) has empty cells.

    A cell is empty when it is null (JSON ``null``, a Parquet null) or text that is ``""`` or only
    whitespace. The message names ``where``, the ``what`` column (``"label"``, ``"text"``), how
    many rows and the first few: file lines for CSV and JSON lines files, 1-based rows otherwise.
    """
    rows = blank_rows(ds, column)
    if len(rows):
        count = f"{len(rows)} row" + ("s" if len(rows) > 1 else "")
        located = locate_rows(where, rows, len(ds))
        raise DataError(
            f"{where}: {what} column {column!r} is empty in {count} ({located}); fill them in or remove those rows"
        )


def blank_rows(ds: datasets.Dataset, column: str) -> np.ndarray:
    """0-based ids (int64) of the rows of ``ds`` (no index mapping) whose ``column`` is empty."""
    values = ds.data.column(column)
    empty = values.is_null()
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        empty = pc.or_kleene(empty, pc.equal(pc.utf8_trim_whitespace(values), ""))  # null -> True
    return np.flatnonzero(empty.to_numpy(zero_copy_only=False))


def locate_rows(where: str, rows: np.ndarray, num_rows: int) -> str:
    """``"line 3"``, ``"lines 3, 8, ..."`` of ``rows`` in a CSV or JSON lines file ``where`` of
    ``num_rows`` records; ``"row 1"``, ``"rows 1, 4"`` (1-based) elsewhere."""
    path, shown = Path(where), rows[:MAX_ROWS_SHOWN]
    lines = _record_lines(path) if path.is_file() else None
    if lines is not None and len(lines) != num_rows:  # parsed otherwise than pandas did: count rows
        lines = None
    word, numbers = ("row", shown + 1) if lines is None else ("line", [lines[r] for r in shown])
    more = ", ..." if len(rows) > len(shown) else ""
    return f"{word}{'s' if len(rows) > 1 else ''} {', '.join(map(str, numbers))}{more}"


def _record_lines(path: Path) -> list[int] | None:
    """The file line each data record starts on (CSV: header excluded, quoted newlines and blank
    lines counted as pandas reads them; JSON lines: blank lines skipped); None for other files."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        return None
    with path.open(encoding="utf-8", newline="") as f:
        if suffix == ".jsonl":
            return [number for number, line in enumerate(f, 1) if line.strip()]
        reader, starts, start = csv.reader(f), [], 1
        for record in reader:
            if record:  # pandas skips blank lines
                starts.append(start)
            start = reader.line_num + 1
    return starts[1:]


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
