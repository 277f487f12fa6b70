"""Local-epoch time with and without the frozen-prefix cache (``runtime.frozen_cache_mb``).

MiniLM (``model.name = "minilm"``) on banking77 rows, one client holding every row, ``head`` and
``layers`` (k = 1). Each ``fit`` is one local epoch (one round); the trainer, and so its cache,
lives across them, so epoch 1 fills the cache and epochs 2+ reuse it. Three settings per method:

- ``before``: the trainer without a prefix (``blocks = None``): the full forward pass on each batch,
  dropout everywhere, as fedpeft did before the cache;
- ``no cache``: ``frozen_cache_mb = 0``: the prefix in eval mode, recomputed each epoch (each
  batch's rows of one token length together);
- ``cache``: the default bound.

Run (one thread, as the figures in docs/methods.md)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/frozen_cache.py --rows 400 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from fedpeft.config import Config
from fedpeft.experiment import build_experiment

DATA = Path(os.environ.get("FEDPEFT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data") / "banking77"


def config(method: dict, rows: int, cache_mb: float) -> Config:
    return Config.from_dict({
        "model": {"name": "minilm", "max_length": 64},
        "data": {"train": str(DATA / "train.csv"), "test": str(DATA / "test.csv"), "max_train_samples": rows,
                 "max_test_samples": 8},
        "partition": {"scheme": "iid", "num_clients": 1},
        "method": method,
        "federation": {"rounds": 1, "clients_per_round": 1, "local_epochs": 1, "batch_size": 32, "lr": 1e-2},
        "runtime": {"seed": 0, "progress": False, "threads": 1, "frozen_cache_mb": cache_mb},
    })


def epoch_times(method: dict, rows: int, epochs: int, setting: str) -> tuple[list[float], float, int]:
    """Seconds of each local epoch, FLOPs of all of them, and the cache's bytes at the end."""
    exp = build_experiment(config(method, rows, 0.0 if setting == "no cache" else 512.0))
    if setting == "before":
        exp.trainer.blocks = None
    state, times, flops = exp.initial_state(), [], 0.0
    for rnd in range(1, epochs + 1):
        t0 = time.perf_counter()
        res = exp.trainer.fit(0, exp.parts[0], state, rnd)
        times.append(time.perf_counter() - t0)
        flops += res.metrics["flops"]
        state = res.state
    return times, flops, exp.trainer.frozen.used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"MiniLM, {args.rows} banking77 rows, batch 32, max_length 64, 1 thread; seconds per local epoch")
    print("| method | setting | epoch 1 | epochs 2+ (mean) | GFLOPs (all epochs) | cache MB |")
    print("|---|---|---|---|---|---|")
    for label, method in (("head", {"name": "head"}), ("layers k=1", {"name": "layers", "k": 1})):
        for setting in ("before", "no cache", "cache"):
            times, flops, used = epoch_times(method, args.rows, args.epochs, setting)
            later = sum(times[1:]) / max(1, len(times) - 1)
            print(f"| {label} | {setting} | {times[0]:.2f} | {later:.3f} | {flops / 1e9:.1f} | {used / 2**20:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
