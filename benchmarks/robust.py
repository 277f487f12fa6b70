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
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedpeft.config import Config
from fedpeft.experiment import run_experiment
from fedpeft.results import RunDir
from fedpeft.sweep import clear_unfinished, run_status

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


def run_one(cfg: Config, folder: Path) -> dict:
    """Run, resume or skip (finished) one run folder; its summary."""
    status = run_status(folder, cfg.federation.rounds)
    if status != "finished":
        if status == "new":
            clear_unfinished(folder)
        run_experiment(cfg, out=folder, resume=status == "partial")
    return json.loads((folder / "summary.json").read_text())


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
    args = parser.parse_args()
    rules = [r for r in args.rules.split(",") if r]
    summaries: dict[tuple[str, str], dict] = {}
    clean_mean = args.out / "clean" / "mean"
    summaries["clean", "mean"] = run_one(config(args, {}, {}), clean_mean)
    limit = clean_norm_limit(clean_mean)
    print(f"max_update_norm = {limit:.4g} (2 x the clean round-1 median)", flush=True)
    cases = [("clean", {})] + [(f"{kind}-{n}", {"kind": kind, "fraction": n / 8})
                               for n in map(int, args.attackers.split(",")) for kind in args.attacks.split(",")]
    for case, attack in cases:
        for rule in rules:
            fed = RULES[rule] if rule != "max_norm" else {"max_update_norm": limit}
            summary = run_one(config(args, fed, attack), args.out / case / rule)
            summaries[case, rule] = summary
            print(f"{case} {rule}: acc {summary['final_accuracy']:.4f} f1 {summary['final_macro_f1']:.4f} "
                  f"excluded {summary['clients_excluded_total']} clipped {summary['clients_clipped_total']}", flush=True)
    lines = [f"# Robust aggregation: banking77, {args.method}, 8 IID clients, {args.rounds} rounds "
             f"(max_update_norm {limit:.4g})", "",
             "Final accuracy / macro-F1 (clean run of the same rule in the first row).", "",
             "| attack | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    for case, _ in cases:
        cells = [f"{summaries[case, r]['final_accuracy']:.3f} / {summaries[case, r]['final_macro_f1']:.3f}" for r in rules]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += ["", "Clients excluded / clipped over all rounds, and the most bytes of deltas a rule held in a round.", "",
              "| attack | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    for case, _ in cases:
        cells = [f"{summaries[case, r]['clients_excluded_total']} / {summaries[case, r]['clients_clipped_total']}, "
                 f"{summaries[case, r]['aggregation_buffer_bytes_max'] / 1e6:.2f} MB" for r in rules]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    (args.out / "robust.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
