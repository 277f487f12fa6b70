"""A run's folder: resolved config, per-round metrics, summary, checkpoint and final model.

Layout of ``DIR``::

    config.toml        the resolved config (every key, defaults included)
    metrics.jsonl      one JSON object per finished round, appended and flushed as it ends
    partition.json     clients' sizes and label histograms
    summary.json       the headline numbers, rewritten after every round
    checkpoint/        global.safetensors + state.json: enough to resume after a kill
    model/             the final trainable part, loadable without fedpeft (see docs/methods.md)

Every file is written atomically (temporary file, then rename), so a kill never leaves a
half-written file and never loses a finished round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedpeft.errors import FedPeftError

NamedArrays = dict[str, np.ndarray]


class RunDir:
    """Reads and writes the files of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.toml"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.partition = self.path / "partition.json"
        self.checkpoint = self.path / "checkpoint"
        self.model = self.path / "model"

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def has_run(self) -> bool:
        """True if a run already wrote results here (which must not be overwritten)."""
        return self.metrics.exists() or self.checkpoint.exists() or self.summary.exists()

    # ------------------------------------------------------------------ metrics
    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill mid-write: drop it
                    break
        return rows

    def keep_metrics_upto(self, rnd: int) -> list[dict[str, Any]]:
        """Drop rows after round ``rnd`` (they are recomputed on resume); return the kept rows."""
        rows = [r for r in self.read_metrics() if r["round"] <= rnd]
        write_text_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))
        return rows

    # ------------------------------------------------------------------ json files
    def write_json(self, path: Path, obj: Any) -> None:
        write_text_atomic(path, json.dumps(obj, indent=2) + "\n")

    def read_summary(self) -> dict[str, Any]:
        if not self.summary.exists():
            raise FedPeftError(f"no summary.json in {self.path}: not a finished fedpeft run")
        return json.loads(self.summary.read_text())

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self, rnd: int, state: NamedArrays, extra: dict[str, Any]) -> None:
        """Write the global state after round ``rnd`` and the bookkeeping needed to resume.

        The state goes to a new file named by round; ``state.json`` then points at it in one
        atomic rename, and only then is the previous state file removed.
        """
        self.checkpoint.mkdir(parents=True, exist_ok=True)
        name = f"global-{rnd:05d}.safetensors"
        tmp = self.checkpoint / (name + ".tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
        os.replace(tmp, self.checkpoint / name)
        self.write_json(self.checkpoint / "state.json", {"round": rnd, "state_file": name, **extra})
        for old in self.checkpoint.glob("global-*.safetensors"):
            if old.name != name:
                old.unlink()

    def load_checkpoint(self) -> tuple[int, NamedArrays, dict[str, Any]] | None:
        """(round, global state, bookkeeping) of the last checkpoint, or None if there is none."""
        meta_path = self.checkpoint / "state.json"
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        state = load_file(str(self.checkpoint / meta.pop("state_file")))
        return int(meta.pop("round")), state, meta


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
