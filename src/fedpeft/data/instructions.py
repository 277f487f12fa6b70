"""Instruction data for ``task.kind = "causal-lm"``: prompt/response pairs from local files or the hub.

Where the data comes from: ``data.train`` / ``data.test`` (CSV, JSON/JSONL or Parquet, read as
:mod:`fedpeft.data.tables` reads classification files), or ``data.name`` a Hugging Face hub id
(its ``train`` split, and ``test`` or ``validation``; with ``data.validation_fraction`` only
``train``). Layouts (``data.format``):

``columns`` (the default)
    ``data.prompt_column`` (default ``prompt``) and ``data.response_column`` (``response``).
``alpaca``
    ``instruction``, optional ``input``, ``output`` (Taori et al. 2023, Stanford Alpaca,
    https://github.com/tatsu-lab/stanford_alpaca); the prompt is the Alpaca template
    (:data:`ALPACA_PROMPT`, :data:`ALPACA_PROMPT_NO_INPUT`), the response ``output``.
``chat``
    ``messages``: a list of ``{"role", "content"}`` (a JSON string in a CSV cell). The last message
    is the response and must be the ``assistant``'s; the messages before it are the prompt, kept
    as JSON here and rendered with the tokenizer's chat template when it is encoded
    (:mod:`fedpeft.data.instruction_encode`).

Whatever the layout, :func:`load_instructions` returns splits with the columns ``prompt`` and
``response`` (str) and, with ``data.category_column``, the train split ``category`` (int64 ids
into ``category_names``, its sorted values: what ``partition.scheme = "dirichlet"`` / ``"shards"``
skew clients over; the test split's categories are not read), a fingerprint, and the same seeded subsampling and validation slice as
:func:`fedpeft.data.load_data`. An empty prompt, response or category, a missing column or a
malformed conversation is a :class:`~fedpeft.errors.DataError` naming the file, column and rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from fedpeft.config import DataConfig
from fedpeft.data.fingerprint import _framed, same_data
from fedpeft.data.sources import KNOWN_DATASETS, _from_hub, _read_local, _Split, select_rows
from fedpeft.data.tables import blank_rows, locate_rows, require_filled
from fedpeft.errors import DataError
from fedpeft.hub import single_library_logs

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class InstructionData:
    """Train and test splits of prompt/response pairs (``prompt``, ``response``, optional ``category``)."""

    train: datasets.Dataset
    test: datasets.Dataset
    format: str  # "columns" | "alpaca" | "chat" (chat: prompt = the context messages as JSON)
    category_names: list[str]  # empty without data.category_column
    source: str
    fingerprint: str
    modality: str = "text"

    @property
    def label_names(self) -> list[str]:
        """The category names (what the partition report histograms); empty without categories."""
        return self.category_names

    @property
    def num_labels(self) -> int:
        return len(self.category_names)

    def categories(self) -> np.ndarray:
        """(N,) int64 category id of every train row (zeros without categories): the partition's labels."""
        if "category" not in self.train.column_names:
            return np.zeros(len(self.train), np.int64)
        return np.asarray(self.train.with_format("numpy")["category"], dtype=np.int64)


def load_instructions(cfg: DataConfig, seed: int) -> InstructionData:
    """Load, normalize and subsample the instruction data of ``cfg`` (see the module docstring).

    Raises
    ------
    DataError
        For a missing file or column, empty prompts, responses or (train) categories, a malformed
        conversation, data that differs from ``cfg.fingerprint``, or a classification dataset name.
    """
    single_library_logs()
    fmt = cfg.format or "columns"
    train, test, source = _instruction_splits(cfg, with_test=cfg.validation_fraction is None)
    train_ds, names = _normalize(train, fmt, cfg, None)
    test_ds = None if test is None else _normalize(test, fmt, cfg, names)[0]
    origin = "hub" if source.startswith("hub:") else "local"
    fingerprint = instruction_fingerprint(origin, [ds for ds in (train_ds, test_ds) if ds is not None], names, fmt)
    if cfg.fingerprint and not same_data(cfg.fingerprint, fingerprint):
        raise DataError(f"{source}: the dataset changed since the run was made (its fingerprint is not "
                        "data.fingerprint); point data.train and data.test at the run's data")
    train_ds, test_ds, source = select_rows(train_ds, test_ds, cfg, seed, source, train.where)
    return InstructionData(train_ds, test_ds, fmt, names, source, fingerprint)


def instruction_fingerprint(origin: str, splits: list[datasets.Dataset], category_names: list[str], fmt: str) -> str:
    """``"<origin>:<sha256>"`` over every split's prompts, responses and category ids (all rows,
    before the seeded subsample), the category names and the format."""
    digest = hashlib.sha256(fmt.encode())
    for ds in splits:
        for column in ("prompt", "response"):
            digest.update(_framed([text.encode() for text in ds.data.column(column).to_pylist()]))
        if "category" in ds.column_names:
            digest.update(ds.data.column("category").to_numpy().astype("<i8").tobytes())
    digest.update(_framed([name.encode() for name in category_names]))
    return f"{origin}:{digest.hexdigest()}"


# --------------------------------------------------------------------------- origins


def _instruction_splits(cfg: DataConfig, with_test: bool) -> tuple[_Split, _Split | None, str]:
    if cfg.train is None and cfg.test is not None:
        raise DataError("data.test is set without data.train: give both files (they replace data.name)")
    if cfg.train is not None:
        if cfg.test is None and with_test:
            raise DataError(f"data.test is missing: data.train = {cfg.train!r} is set, so give the test split as "
                            "data.test too (or data.validation_fraction to hold out train rows)")
        train = _read_local(Path(cfg.train).expanduser(), "data.train", None)
        test = _read_local(Path(cfg.test).expanduser(), "data.test", None) if with_test else None
        where = " + ".join(str(Path(s.where).resolve()) for s in (train, test) if s is not None)
        return train, test, f"{where} (local)"
    if cfg.name in KNOWN_DATASETS:
        raise DataError(f"data.name: {cfg.name!r} is a classification dataset; task.kind = \"causal-lm\" needs "
                        "instruction data: data.train + data.test files, or a hub id of an instruction dataset")
    if cfg.name is None or "/" not in cfg.name:
        raise DataError("data.name: give a hub id such as 'owner/name' of an instruction dataset, or set "
                        "data.train and data.test")
    fix = "check the hub id, or set data.train and data.test to local files"
    return _from_hub(cfg.name, None, "train", None, None, "label", fix, with_test)


# --------------------------------------------------------------------------- normalization


def _normalize(split: _Split, fmt: str, cfg: DataConfig,
               category_names: list[str] | None) -> tuple[datasets.Dataset, list[str]]:
    """``prompt``, ``response`` (+ ``category``) of one split, and the category names (from the
    train split when ``category_names`` is None)."""
    ds, where = split.ds, split.where
    if fmt == "columns":
        prompt_col, response_col = cfg.prompt_column or "prompt", cfg.response_column or "response"
        _require(split, prompt_col, "data.prompt_column")
        _require(split, response_col, "data.response_column")
        require_filled(ds, prompt_col, where, "prompt")
        require_filled(ds, response_col, where, "response")
        prompts, responses = _strings(ds, prompt_col, where), _strings(ds, response_col, where)
    elif fmt == "alpaca":
        for column in ("instruction", "output"):
            _require(split, column, "data.format")
            require_filled(ds, column, where, f"alpaca {column}")
        inputs = _strings(ds, "input", where, optional=True) if "input" in ds.column_names else [""] * len(ds)
        prompts = [(ALPACA_PROMPT if inp.strip() else ALPACA_PROMPT_NO_INPUT).format(instruction=ins, input=inp)
                   for ins, inp in zip(_strings(ds, "instruction", where), inputs)]
        responses = _strings(ds, "output", where)
    else:
        _require(split, "messages", "data.format")
        prompts, responses = _conversations(ds, where)
    table: dict[str, Any] = {"prompt": prompts, "response": responses}
    names = category_names or []
    if cfg.category_column is not None and category_names is None:  # train only: the partition's labels
        ids, names = _categories(split, cfg.category_column)
        table["category"] = ids
    return datasets.Dataset.from_dict(table), names


def _require(split: _Split, column: str, key: str) -> None:
    if column not in split.ds.column_names:
        raise DataError(f"{split.where}: no column {column!r} (set {key}); "
                        f"available columns: {', '.join(split.ds.column_names)}")


def _strings(ds: datasets.Dataset, column: str, where: str, optional: bool = False) -> list[str]:
    values = ds[column]
    if optional:
        values = ["" if v is None else v for v in values]
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise DataError(f"{where}: column {column!r} holds {type(values[bad[0]]).__name__}, not text, in "
                        f"{locate_rows(where, np.asarray(bad), len(ds))}")
    return values


def _conversations(ds: datasets.Dataset, where: str) -> tuple[list[str], list[str]]:
    """Each row's context messages (as canonical JSON) and final assistant content."""
    prompts, responses, bad, reason = [], [], [], ""
    for i, value in enumerate(ds["messages"]):
        messages, problem = _messages(value)
        if problem:
            bad.append(i)
            reason = reason or problem
            continue
        prompts.append(json.dumps(messages[:-1], ensure_ascii=False, sort_keys=True))
        responses.append(messages[-1]["content"])
    if bad:
        count = f"{len(bad)} row" + ("s" if len(bad) > 1 else "")
        raise DataError(f"{where}: column 'messages' is not a usable conversation in {count} "
                        f"({locate_rows(where, np.asarray(bad), len(ds))}): {reason}")
    return prompts, responses


def _messages(value: Any) -> tuple[list[dict[str, str]], str]:
    """A conversation as ``[{"role", "content"}, ...]``, and "" or what is wrong with it."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [], "not a JSON list of messages"
    if value is None or isinstance(value, dict) or not hasattr(value, "__len__"):
        return [], "expected a list of {role, content} messages"
    messages = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return [], "every message needs a string role and content"
        messages.append({"role": m["role"], "content": m["content"]})
    if len(messages) < 2:
        return [], "needs at least one message before the response"
    if messages[-1]["role"] != "assistant":
        return [], f"the last message (the response) must be the assistant's, not {messages[-1]['role']!r}"
    if not messages[-1]["content"].strip():
        return [], "the response (the last message's content) is empty"
    return messages, ""


def _categories(split: _Split, column: str) -> tuple[np.ndarray, list[str]]:
    """Category ids (int64) of the train split's ``column`` and the names (its sorted values, as text)."""
    _require(split, column, "data.category_column")
    blank = blank_rows(split.ds, column)
    if len(blank):
        raise DataError(f"{split.where}: category column {column!r} is empty in {len(blank)} row(s) "
                        f"({locate_rows(split.where, blank, len(split.ds))}); fill them in or remove those rows")
    values = np.asarray([str(v) for v in split.ds[column]])
    names = sorted(set(values.tolist()))
    return np.searchsorted(np.asarray(names), values).astype(np.int64), names
