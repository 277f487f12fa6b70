"""Optional experiment tracking: every round's metrics to TensorBoard, beside metrics.jsonl.

``output.tensorboard = true`` writes event files to ``DIR/tensorboard`` with
:class:`torch.utils.tensorboard.SummaryWriter` (needs the ``tensorboard`` package:
``pip install "fedpeft[tensorboard]"``); view them with ``tensorboard --logdir runs``.
The step of every scalar is the round, so a resumed run continues the same curves.
"""

from __future__ import annotations

from typing import Any

from fedpeft.errors import ConfigError
from fedpeft.results import RunDir

# metrics.jsonl keys logged as scalars, under these tags
SCALARS = {
    "accuracy": "eval/accuracy", "macro_f1": "eval/macro_f1", "loss": "eval/loss", "train_loss": "train/loss",
    "bytes_up": "cost/bytes_up", "bytes_down": "cost/bytes_down", "cum_bytes_up": "cost/cum_bytes_up",
    "cum_bytes_down": "cost/cum_bytes_down", "client_flops": "cost/client_flops", "wall_s": "time/wall_s",
    "peak_rss_mb": "cost/peak_rss_mb", "clients_reported": "clients/reported", "clients_dropped": "clients/dropped",
    # causal-lm rows (fedpeft.history.GENERATIVE_METRICS)
    "eval_loss": "eval/token_loss", "perplexity": "eval/perplexity", "exact_match": "eval/exact_match",
    "rouge_l": "eval/rouge_l",
}


class RoundTracker:
    """A context manager that logs each round row to the enabled trackers (none by default)."""

    def __init__(self, run_dir: RunDir, tensorboard: bool) -> None:
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError(
                    "output.tensorboard = true needs the tensorboard package: pip install tensorboard"
                ) from exc
            self.writer = SummaryWriter(log_dir=str(run_dir.path / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, tag in SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], global_step=row["round"])
        self.writer.flush()

    def __enter__(self) -> "RoundTracker":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()
