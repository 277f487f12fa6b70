"""Robust aggregation under simulated attacks: which rule keeps a run near its clean accuracy?

Setup (issue 13): all-MiniLM-L6-v2 on banking77, ``--method`` (bias or head), 8 IID clients, all
8 in every round, ``--rounds`` rounds x 1 local epoch, batch 16, max_length 32. Attacks
(``[attack]``): scale (1000 x its delta), sign_flip, gaussian (N(0, 1) noise instead of an
update), label_flip, with 1 and 2 of the 8 clients malicious (``--attackers``). Rules
(``federation``): mean, median, trimmed_mean (trim 0.25: two cut at each end), krum and
multikrum (byzantine 2), and mean with ``max_update_norm`` set to twice the median client update
norm of the clean mean run's first round (measured, not guessed).

Every run is a normal run folder ``OUT/<attack>-<n>/<rule>`` (clean runs: ``OUT/clean/<rule>``);
re-running skips finished runs and resumes killed ones. At the end ``OUT/robust.md`` holds final
accuracy and macro-F1 per attack and rule next to the clean run's, the clients each rule
excluded or clipped, and the bytes of deltas a rule held per round.

Usage::

    python benchmarks/robust.py [--data-dir ../shared/data] [--out runs/bench-robust] [--method bias]
    python benchmarks/robust.py --out runs/bench-robust --table   # the finished runs only ('-': not yet)
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from fedpeft.config import Config
from fedpeft.results import RunDir
from fedpeft.sweep import finished_summary, run_or_resume

ATTACKS = ("scale", "sign_flip", "gaussian", "label_flip")
RULES = {  # rule name -> federation keys (max_norm gets max_update_norm at run time)
    "mean": {},
    "median": {"aggregator": "median"},
    "trimmed_mean": {"aggregator": "trimmed_mean", "trim_fraction": 0.25},
    "krum": {"aggregator": "krum", "byzantine": 2},
    "multikrum": {"aggregator": "multikrum", "byzantine": 2},
    "max_norm": {},
}
LEARNING_RATES = {"bias": 1e-2, "head": 1e-2}


def config(args: argparse.Namespace, fed: dict, attack: dict) -> Config:
    return Config.from_dict({
        "model": {"name": "minilm", "max_length": 32},
        "data": {"name": "banking77", "data_dir": str(args.data_dir), "max_train_samples": args.rows,
                 "max_test_samples": args.test_rows},
        "partition": {"scheme": "iid", "num_clients": 8},
        "method": {"name": args.method},
        "federation": {"rounds": args.rounds, "clients_per_round": 8, "local_epochs": 1.0, "batch_size": 16,
                       "lr": LEARNING_RATES[args.method], "eval_every": args.eval_every, **fed},
        "runtime": {"seed": args.seed, "progress": False},
        "attack": attack,
        "output": {"save_model": False},
    })


def clean_norm_limit(folder: Path) -> float:
    """Twice the median client update norm of a clean mean run's first round."""
    first = RunDir(folder).read_metrics()[0]
    return 2.0 * statistics.median(c["update_norm"] for c in first["clients"] if "update_norm" in c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-robust"))
    parser.add_argument("--method", choices=sorted(LEARNING_RATES), default="bias")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--attackers", default="1,2", help="malicious clients of 8, comma-separated")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--rows", type=int, default=1600)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=1, help="test-set evaluation every N rounds (the table "
                        "uses the final round's, which evaluation does not change)")
    parser.add_argument("--table", action="store_true", help="only write the table of the finished runs")
    args = parser.parse_args()
    rules = [r for r in args.rules.split(",") if r]
    clean_mean = args.out / "clean" / "mean"
    if not args.table:
        run_or_resume(config(args, {}, {}), clean_mean)
    limit = clean_norm_limit(clean_mean)
    print(f"max_update_norm = {limit:.4g} (2 x the clean round-1 median)", flush=True)
    cases = [("clean", {})] + [(f"{kind}-{n}", {"kind": kind, "fraction": n / 8})
                               for n in map(int, args.attackers.split(",")) for kind in args.attacks.split(",")]
    for case, attack in cases if not args.table else []:
        for rule in rules:
            fed = RULES[rule] if rule != "max_norm" else {"max_update_norm": limit}
            summary = run_or_resume(config(args, fed, attack), args.out / case / rule)
            print(f"{case} {rule}: acc {summary['final_accuracy']:.4f} f1 {summary['final_macro_f1']:.4f} "
                  f"excluded {summary['clients_excluded_total']} clipped {summary['clients_clipped_total']}", flush=True)
    text = robust_table(args, [c for c, _ in cases], rules, limit)
    (args.out / "robust.md").write_text(text)
    print(text)


def robust_table(args: argparse.Namespace, cases: list[str], rules: list[str], limit: float) -> str:
    """Markdown: final accuracy / macro-F1 per attack and rule (points against the clean mean run),
    then the clients each rule excluded or clipped and the bytes of deltas it held; '-' = not run."""
    runs = {(c, r): finished_summary(args.out / c / r) for c in cases for r in rules}
    clean = runs.get(("clean", "mean")) or finished_summary(args.out / "clean" / "mean")
    header = ["| attack | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    lines = [f"# Robust aggregation: banking77, {args.method}, 8 IID clients, {args.rounds} rounds "
             f"(max_update_norm {limit:.4g})", "",
             "Final accuracy / macro-F1, and accuracy in points against the clean mean run "
             f"({clean['final_accuracy']:.3f}).", "", *header]
    for case in cases:
        cells = []
        for r in rules:
            s = runs[case, r]
            cells.append("-" if s is None else f"{s['final_accuracy']:.3f} / {s['final_macro_f1']:.3f} "
                         f"({100 * (s['final_accuracy'] - clean['final_accuracy']):+.1f})")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += ["", "Clients excluded / clipped over all rounds, and the most bytes of deltas a rule held in a round.", "",
              *header]
    for case in cases:
        cells = ["-" if (s := runs[case, r]) is None else f"{s['clients_excluded_total']} / {s['clients_clipped_total']}, "
                 f"{s['aggregation_buffer_bytes_max'] / 1e6:.2f} MB" for r in rules]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
