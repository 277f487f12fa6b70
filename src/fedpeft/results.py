"""A run's folder: resolved config, per-round metrics, summary, checkpoint and final model.

Layout of ``DIR``::

    config.toml        the resolved config (every key, defaults included)
    metrics.jsonl      one JSON object per finished round, appended and flushed as it ends
    partition.json     clients' sizes and label histograms
    summary.json       the headline numbers, rewritten after every round
    checkpoint/        the two newest checkpoints, round-NNNNN/ each (see fedpeft.checkpoint)
    model/             the final model, self-contained: loads without fedpeft (fedpeft.export)
    generations/       causal-lm: round_N.jsonl, a few held-out generations of each evaluated round

Every file is written atomically (temporary file, then rename), so a kill never leaves a
half-written file and never loses a finished round. The checkpoint is the source of truth: on
resume, ``metrics.jsonl`` and ``summary.json`` are rebuilt from it, and ``config.toml`` too if
it is damaged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.checkpoint import Checkpoint, latest_valid, write_checkpoint
from fedpeft.errors import FedPeftError

if TYPE_CHECKING:
    from fedpeft.config import Config


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
        self.generations = self.path / "generations"

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

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` with ``rows`` (on resume: the rows the checkpoint holds)."""
        write_text_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def write_generations(self, rnd: int, generations: list[dict[str, Any]]) -> None:
        """``generations/round_<rnd>.jsonl``: one JSON object per generation (causal-lm), written
        atomically (a resumed run that recomputes the round rewrites it)."""
        self.generations.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations)
        write_text_atomic(self.generations / f"round_{rnd}.jsonl", text)

    # ------------------------------------------------------------------ json files
    def write_json(self, path: Path, obj: Any) -> None:
        write_text_atomic(path, json.dumps(obj, indent=2) + "\n")

    def read_summary(self) -> dict[str, Any]:
        if not self.summary.exists():
            raise FedPeftError(f"no summary.json in {self.path}: not a finished fedpeft run")
        try:
            summary = json.loads(self.summary.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FedPeftError(
                f"{self.summary}: damaged ({type(exc).__name__}); fedpeft run --resume {self.path} rewrites it"
            ) from None
        if not isinstance(summary, dict):
            raise FedPeftError(f"{self.summary}: damaged (not a JSON object); fedpeft run --resume {self.path} rewrites it")
        return summary

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        """Write a checkpoint (see :mod:`fedpeft.checkpoint`); the two newest are kept."""
        write_checkpoint(self.checkpoint, ckpt)

    def resume_point(self) -> tuple[Checkpoint | None, list[str]]:
        """The newest intact checkpoint to resume from, and one line per damaged newer one.

        Raises
        ------
        FedPeftError
            When checkpoints exist but none is intact.
        """
        ckpt, problems = latest_valid(self.checkpoint)
        if ckpt is None and problems:
            raise FedPeftError(
                f"every checkpoint of {self.path} is damaged ({'; '.join(problems)}); "
                "the run cannot be resumed: start it again in a new folder (--out)"
            )
        return ckpt, problems

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint, verified; damage is a :class:`FedPeftError` saying what to do."""
        ckpt, problems = latest_valid(self.checkpoint)
        if problems:
            fix = (
                f"fedpeft run --resume {self.path} recomputes it from the checkpoint of round {ckpt.round}"
                if ckpt is not None else "no intact checkpoint is left: start the run again in a new folder"
            )
            raise FedPeftError(f"{problems[0]}; {fix}")
        return ckpt


def load_run_config(run: RunDir) -> tuple["Config", str | None]:
    """The config a run folder was made with, and a warning if ``config.toml`` had to be restored.

    ``config.toml`` is checked against the copy in the newest intact checkpoint: if it is missing
    or unreadable, the copy is used (and written back); if it reads but asks for another
    experiment (an edit, or a cut that left valid TOML), that is an error naming the keys.

    Raises
    ------
    FedPeftError
        When neither ``config.toml`` nor a checkpoint copy is usable, or when they disagree.
    """
    from fedpeft.config import RESUMABLE_CHANGES, flatten_config

    ckpt, _ = latest_valid(run.checkpoint)
    copy = ckpt.config_text if ckpt is not None and ckpt.config_text else None
    try:
        text = run.config.read_text()
        if copy is not None and text != copy and copy.startswith(text):
            raise FedPeftError("cut short")
        cfg = _parse_config(text)
    except FileNotFoundError:
        problem = "missing"
    except (OSError, UnicodeDecodeError, FedPeftError) as exc:
        problem = f"damaged ({exc})" if isinstance(exc, FedPeftError) else f"unreadable ({type(exc).__name__})"
    else:
        if copy is not None:
            saved, own = flatten_config(_parse_config(copy).to_dict()), flatten_config(cfg.to_dict())
            changed = sorted(k for k in set(saved) | set(own) if saved.get(k) != own.get(k) and k not in RESUMABLE_CHANGES)
            if changed:
                raise FedPeftError(
                    f"{run.config}: differs from the config this run was made with in {', '.join(changed)}; "
                    f"restore it from {ckpt.path / 'config.toml'}"
                )
        return cfg, None
    if copy is None:
        raise FedPeftError(f"{run.config}: {problem}, and no checkpoint holds a copy: not a resumable fedpeft run")
    write_text_atomic(run.config, copy)
    return _parse_config(copy), f"{run.config}: {problem}; restored from {ckpt.path / 'config.toml'}"


def _parse_config(text: str) -> "Config":
    import tomllib

    from fedpeft.config import Config

    try:
        return Config.from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise FedPeftError(f"invalid TOML: {exc}") from None


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
