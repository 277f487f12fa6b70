"""Differential privacy: how much accuracy does a formal (epsilon, delta) guarantee cost?

Setup (issue 16): all-MiniLM-L6-v2 on banking77 (``--dataset``: another known one, e.g. sst2),
max_length 32, delta 1e-5, one seed, accuracy and macro-F1 at epsilon = infinity (no privacy),
8, 3 and 1 for BitFit, LoRA and soft prompts, each at its banking77 lr (benchmarks/methods.py,
tuned without privacy):

- ``sample`` level (DP-SGD with Opacus, per client: every client's own rows are protected,
  ``--rows`` training rows, Poisson-sampled batches of expected size ``--batch-size`` (16),
  per-sample clipping at ``--max-grad-norm``, the noise multiplier solved for
  ``privacy.target_epsilon`` by Opacus's RDP accountant over the client's local steps of every
  round): 8 IID clients, all in every round, ``--rounds`` rounds x 1 local epoch;
- ``client`` level (DP-FedAvg, client-central: each client's delta clipped to ``--clip-norm``,
  Gaussian noise on the sum at the server, the noise multiplier solved for the target over the
  rounds at the client sampling rate): ``--clients`` IID clients (default 100), ``--per-round``
  of them per round (default 20), ``--client-rounds`` rounds.

The epsilon actually spent (summary.json ``epsilon``: the largest client's at sample level) is
shown next to the target. Every run is a normal run folder ``OUT/<level>/<method>-eps<e>``;
re-running skips finished runs and resumes killed ones; ``OUT/privacy.md`` holds the table.
Goal: at epsilon 8, within 10 points of the non-private run.

Usage::

    python benchmarks/privacy.py [--data-dir ../shared/data] [--out runs/bench-privacy] [--levels sample,client]
    python benchmarks/privacy.py --out runs/bench-privacy --table
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fedpeft.config import Config
from fedpeft.sweep import finished_summary, run_or_resume

LEARNING_RATES = {"bias": 1e-2, "lora": 3e-3, "prompt": 1e-2}  # benchmarks/methods.py
EPSILONS = (math.inf, 8.0, 3.0, 1.0)


def config(args: argparse.Namespace, level: str, method: str, epsilon: float) -> Config:
    client = level == "client"
    privacy: dict = {}
    if math.isfinite(epsilon):
        privacy = ({"mode": "client-central", "target_epsilon": epsilon, "clip_norm": args.clip_norm} if client
                   else {"mode": "sample", "target_epsilon": epsilon, "max_grad_norm": args.max_grad_norm})
        privacy["delta"] = args.delta
    return Config.from_dict({
        "model": {"name": "minilm", "max_length": 32},
        "data": {"name": args.dataset, "data_dir": str(args.data_dir),
                 "max_train_samples": args.client_rows if client else args.rows, "max_test_samples": args.test_rows},
        "partition": {"scheme": "iid", "num_clients": args.clients if client else 8},
        "method": {"name": method},
        "federation": {"rounds": args.client_rounds if client else args.rounds,
                       "clients_per_round": args.per_round if client else 8, "local_epochs": 1.0,
                       "batch_size": args.batch_size, "lr": LEARNING_RATES[method]},
        "runtime": {"seed": args.seed, "progress": False},
        "output": {"save_model": False},
        **({"privacy": privacy} if privacy else {}),
    })


def folder(args: argparse.Namespace, level: str, method: str, epsilon: float) -> Path:
    return args.out / level / f"{method}-eps{'inf' if math.isinf(epsilon) else f'{epsilon:g}'}"


def table(args: argparse.Namespace, levels: list[str], methods: list[str]) -> str:
    """Markdown per level: accuracy / macro-F1 (points against the non-private run) per epsilon,
    and the epsilon spent with the noise multiplier used."""
    lines = [f"# Differential privacy: {args.dataset}, MiniLM, delta = " + f"{args.delta:g}", ""]
    for level in levels:
        head = (f"sample level (DP-SGD): {args.rows} rows over 8 IID clients, batch {args.batch_size}, {args.rounds} rounds, "
                f"max_grad_norm {args.max_grad_norm:g}"
                if level == "sample" else
                f"client level (DP-FedAvg, server noise): {args.clients} IID clients, {args.per_round} per round, "
                f"{args.client_rounds} rounds, clip_norm {args.clip_norm:g}")
        lines += [f"## {head}", "", "| method | " + " | ".join(f"epsilon {e:g}" for e in EPSILONS) + " |",
                  "|---|" + "---|" * len(EPSILONS)]
        for method in methods:
            base = finished_summary(folder(args, level, method, math.inf))
            cells = []
            for eps in EPSILONS:
                s = finished_summary(folder(args, level, method, eps))
                if s is None:
                    cells.append("-")
                    continue
                cell = f"{s['final_accuracy']:.3f} / {s['final_macro_f1']:.3f}"
                if base is not None and math.isfinite(eps):
                    cell += f" ({100 * (s['final_accuracy'] - base['final_accuracy']):+.1f})"
                if math.isfinite(eps):
                    cell += f", spent {s['epsilon']:.2f}, z {s['noise_multiplier']:.2f}"
                cells.append(cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-privacy"))
    parser.add_argument("--dataset", default="banking77")
    parser.add_argument("--levels", default="sample,client")
    parser.add_argument("--methods", default=",".join(LEARNING_RATES))
    parser.add_argument("--epsilons", default="inf,8,3,1")
    parser.add_argument("--rows", type=int, default=1600, help="training rows at sample level")
    parser.add_argument("--client-rows", type=int, default=6000, help="training rows at client level")
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16,
                        help="expected batch at sample level (Poisson): larger batches raise the signal-to-noise ratio")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--client-rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", action="store_true", help="only write the table of the finished runs")
    args = parser.parse_args()
    levels = [x for x in args.levels.split(",") if x]
    methods = [x for x in args.methods.split(",") if x]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    for level in levels if not args.table else []:
        for method in methods:
            for eps in epsilons:
                s = run_or_resume(config(args, level, method, eps), folder(args, level, method, eps))
                print(f"{level} {method} eps {eps:g}: acc {s['final_accuracy']:.4f} f1 {s['final_macro_f1']:.4f} "
                      f"spent {s.get('epsilon')}", flush=True)
    text = table(args, levels, methods)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "privacy.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
