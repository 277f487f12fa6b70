"""Compare the fine-tuning methods on banking77 with MiniLM: accuracy against bytes and time.

Setup (the same for every method): all-MiniLM-L6-v2, banking77 (77 intents), a seeded subsample
of ``--rows`` training rows split over 16 clients by Dirichlet(alpha=0.5) label skew, 8 clients
per round, ``--rounds`` rounds x ``--epochs`` local epochs, batch 16, AdamW, max_length 32,
evaluation on ``--test-rows`` test rows. Centralized fine-tuning (one client holding every row,
``--central-epochs`` epochs, no federation) on the same rows is the ceiling.

Learning rates: each method gets its own. ``--tune`` picks it from a 3-point grid per method
with a centralized proxy: one client holding all the rows (IID), one epoch, seed 1 (so the
benchmark's seed-0 runs are not tuned on), keeping the LR with the best test accuracy. A
federated proxy (one round of one local epoch on the non-IID clients) was tried first and is
useless: every PEFT method stays at chance after it, whatever the LR. ``LEARNING_RATES`` holds
what ``--tune`` chose on this machine (see docs/results.md).

Usage::

    python benchmarks/methods.py [--data-dir ../shared/data] [--out runs/bench-methods]
    python benchmarks/methods.py --tune        # re-choose the learning rates first

Sized for ~30 minutes on 2 CPU cores. Each run's folder (metrics.jsonl, summary.json) is kept in
``--out``, so ``fedpeft report`` style analysis can be done afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from fedpeft.config import Config
from fedpeft.experiment import run_experiment

METHODS = ["full", "head", "bias", "adapter", "lora", "prompt"]
# chosen by --tune on 2026-11-22 (centralized proxy accuracy per LR in docs/results.md)
LEARNING_RATES = {"full": 3e-4, "head": 3e-2, "bias": 1e-2, "adapter": 3e-3, "lora": 3e-3, "prompt": 1e-2}
LR_GRID = {
    "full": [5e-5, 1e-4, 3e-4],
    "head": [3e-3, 1e-2, 3e-2],
    "bias": [1e-3, 3e-3, 1e-2],
    "adapter": [1e-3, 3e-3, 1e-2],
    "lora": [1e-3, 3e-3, 1e-2],
    "prompt": [3e-3, 1e-2, 3e-2],
}


def config(args: argparse.Namespace, method: str, lr: float, seed: int = 0, partition: dict | None = None, **federation) -> Config:
    fed = {
        "rounds": args.rounds, "clients_per_round": 8, "local_epochs": args.epochs,
        "batch_size": 16, "lr": lr, "checkpoint_every": 1000, **federation,
    }
    return Config.from_dict({
        "model": {"name": "minilm", "max_length": 32},
        "data": {"name": "banking77", "data_dir": args.data_dir, "max_train_samples": args.rows,
                 "max_test_samples": args.test_rows},
        "partition": partition or {"scheme": "dirichlet", "num_clients": 16, "alpha": 0.5},
        "method": {"name": method},
        "federation": fed,
        "runtime": {"seed": seed, "progress": False},
        "output": {"save_model": False},
    })


def run(cfg: Config, out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    return run_experiment(cfg, out=out)


def tune(args: argparse.Namespace) -> dict[str, float]:
    chosen = {}
    for method in args.methods:
        scores = {}
        for lr in LR_GRID[method]:
            cfg = config(args, method, lr, seed=1, partition={"scheme": "iid", "num_clients": 1},
                         rounds=1, clients_per_round=1, local_epochs=1)
            scores[lr] = run(cfg, args.out / "tune" / f"{method}-{lr:g}")["final_accuracy"]
        chosen[method] = max(scores, key=scores.get)
        print(f"tune {method}: " + ", ".join(f"lr {lr:g} -> {acc:.3f}" for lr, acc in scores.items())
              + f"  => {chosen[method]:g}", flush=True)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-methods"))
    parser.add_argument("--rows", type=int, default=1600)
    parser.add_argument("--test-rows", type=int, default=770)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--central-epochs", type=float, default=3)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--tune", action="store_true", help="choose each method's LR first (see docstring)")
    parser.add_argument("--no-central", action="store_true", help="skip the centralized ceiling run")
    args = parser.parse_args()

    lrs = {**LEARNING_RATES, **(tune(args) if args.tune else {})}
    rows = []
    for method in args.methods:
        s = run(config(args, method, lrs[method]), args.out / method)
        rows.append((method, lrs[method], s))
        print(f"done {method}: acc {s['final_accuracy']:.3f} in {s['wall_s']:.0f}s", flush=True)
    central = None
    if not args.no_central:
        start = time.perf_counter()
        central = run(
            config(args, "full", lrs["full"], partition={"scheme": "iid", "num_clients": 1},
                   rounds=1, clients_per_round=1, local_epochs=args.central_epochs),
            args.out / "centralized-full",
        )
        central_s = time.perf_counter() - start

    header = (
        f"banking77, MiniLM, {args.rows} train rows / {args.test_rows} test rows, 16 clients, "
        f"Dirichlet alpha=0.5, 8 clients per round, {args.rounds} rounds x {args.epochs:g} local epochs, "
        "batch 16, max_length 32, seed 0"
    )
    lines = [
        f"### Methods: {header}", "",
        "| method | lr | trainable params | MB up per round | total MB (up+down) | final accuracy | best accuracy | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, lr, s in rows:
        lines.append(
            f"| {method} | {lr:g} | {s['trainable_params']:,} | {s['mb_up_per_round']:.2f} | "
            f"{(s['total_bytes_up'] + s['total_bytes_down']) / 1e6:.1f} | {s['final_accuracy']:.3f} | "
            f"{s['best_accuracy']:.3f} | {s['wall_s']:.0f} |"
        )
    if central is not None:
        lines.append(
            f"| centralized full ({args.central_epochs:g} epochs, ceiling) | {lrs['full']:g} | "
            f"{central['trainable_params']:,} | - | - | {central['final_accuracy']:.3f} | "
            f"{central['best_accuracy']:.3f} | {central_s:.0f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "learning_rates.json").write_text(json.dumps(lrs, indent=2) + "\n")


if __name__ == "__main__":
    main()
