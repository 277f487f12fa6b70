"""Split federated prompt tuning (SFPrompt): what do the split, the pruning and the local loss buy?

Setup (issue 15): all-MiniLM-L6-v2 on banking77, 16 clients with Dirichlet(0.5) label skew, 8 per
round, ``--rounds`` rounds x 1 local epoch, batch 16, max_length 32 (the label-skew benchmark's
setup, benchmarks/skew.py, so its full FedAvg run is the same run). Variants:

- ``full``: FL full fine-tuning (FedAvg),
- ``prompt``: FedPEFT soft prompts (the whole model on the client, prompts + head trained),
- ``sfprompt``: SFPrompt (Cao et al. 2024, https://arxiv.org/abs/2407.17533): the client holds
  the embeddings + ``head_blocks`` and the last ``tail_blocks`` + classifier, the server the
  frozen body; EL2N pruning keeps ``prune_keep`` of each client's rows; a local-loss phase
  trains prompts + tail on the client's own head output before the split phase,
- ``sfprompt-noprune`` (``prune = false``), ``sfprompt-nolocal`` (``local_loss = false``) and
  ``sfprompt-split-only`` (neither: the split phase alone).

Learning rates come from ``fedpeft tune`` on this config (``--tune``: ``OUT/tune``, 2 proxy rounds
on validation rows of the train split) or from :data:`LEARNING_RATES`; ``full`` takes the skew
benchmark's tuned 3e-4. Reported: accuracy and macro-F1, total bytes (parameters + activations
both ways), client FLOPs as % of full fine-tuning's on the same rows, wall time. Every run is a
normal run folder ``OUT/<variant>``; re-running skips finished runs and resumes killed ones;
``--full-run DIR`` reads an existing full FedAvg run of the same config instead of running it.

Usage::

    python benchmarks/split.py [--data-dir ../shared/data] [--out runs/bench-split] [--tune]
    python benchmarks/split.py --out runs/bench-split --table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpeft.config import Config
from fedpeft.sweep import finished_summary, run_or_resume
from fedpeft.tune import run_tune

VARIANTS = {  # name -> (method, options)
    "full": ("full", {}),
    "prompt": ("prompt", {}),
    "sfprompt": ("sfprompt", {}),
    "sfprompt-noprune": ("sfprompt", {"prune": False}),
    "sfprompt-nolocal": ("sfprompt", {"local_loss": False}),
    "sfprompt-split-only": ("sfprompt", {"prune": False, "local_loss": False}),  # neither: what each adds alone
}
LEARNING_RATES = {"full": 3e-4, "prompt": 1e-2, "sfprompt": 1e-3}


def config(args: argparse.Namespace, method: str, options: dict, lr: float) -> Config:
    return Config.from_dict({
        "model": {"name": "minilm", "max_length": 32},
        "data": {"name": "banking77", "data_dir": str(args.data_dir), "max_train_samples": args.rows,
                 "max_test_samples": args.test_rows},
        "partition": {"scheme": "dirichlet", "num_clients": 16, "alpha": 0.5},
        "method": {"name": method, **options},
        "federation": {"rounds": args.rounds, "clients_per_round": 8, "local_epochs": 1.0, "batch_size": 16,
                       "lr": lr},
        "runtime": {"seed": args.seed, "progress": False},
        "output": {"save_model": False},
    })


def tuned_lrs(args: argparse.Namespace) -> dict[str, float]:
    """``fedpeft tune`` of prompt and sfprompt on this config; the chosen lr per method."""
    folder = args.out / "tune"
    folder.mkdir(parents=True, exist_ok=True)
    config(args, "prompt", {}, LEARNING_RATES["prompt"]).save(folder / "config.toml")
    tuning = run_tune(folder / "config.toml", folder / "runs", methods=["prompt", "sfprompt"], rounds=2)
    (folder / "tune.json").write_text((folder / "runs" / "tune.json").read_text())
    return {**LEARNING_RATES, **{m: c.lr for m, c in tuning.choices.items()}}


def table(args: argparse.Namespace, lrs: dict[str, float]) -> str:
    """Markdown: one row per finished variant ('-': not yet)."""
    full = finished_summary(args.full_run or args.out / "full")
    lines = [f"# SFPrompt: banking77, MiniLM, 16 Dirichlet(0.5) clients, 8 per round, {args.rounds} rounds", "",
             "| variant | lr | accuracy | macro-F1 | MB parameters (up + down) | MB activations (up + down) "
             "| MB total | client FLOPs % of full | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, (method, _) in VARIANTS.items():
        s = full if name == "full" else finished_summary(args.out / name)
        if s is None:
            lines.append(f"| {name} | - | - | - | - | - | - | - | - |")
            continue
        params = (s["total_bytes_up"] + s["total_bytes_down"]) / 1e6
        acts = (s.get("activation_bytes_up", 0) + s.get("activation_bytes_down", 0)) / 1e6
        pct = s.get("client_flops_pct_of_full")  # sfprompt: against full fine-tuning of its own rows
        if pct is None and full is not None:  # the others: measured FLOPs against the full run's
            pct = 100 * s["client_flops_total"] / full["client_flops_total"]
        pct_cell = "-" if pct is None else f"{pct:.1f}"
        lines.append(f"| {name} | {lrs.get(method, float('nan')):g} | {s['final_accuracy']:.3f} | {s['final_macro_f1']:.3f}"
                     f" | {params:,.1f} | {acts:,.1f} | {params + acts:,.1f} | {pct_cell} | {s['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-split"))
    parser.add_argument("--rows", type=int, default=1600)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tune", action="store_true", help="choose prompt's and sfprompt's lr with fedpeft tune first")
    parser.add_argument("--full-run", type=Path, help="a finished full FedAvg run of the same config (skips 'full')")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--table", action="store_true", help="only write the table of the finished runs")
    args = parser.parse_args()
    tune_json = args.out / "tune" / "tune.json"
    if args.tune and not args.table:
        lrs = tuned_lrs(args)
    elif tune_json.is_file():
        lrs = {**LEARNING_RATES, **{m: float(c["federation.lr"]) for m, c in json.loads(tune_json.read_text())["choices"].items()}}
    else:
        lrs = dict(LEARNING_RATES)
    only = {x for x in args.only.split(",") if x}
    for name, (method, options) in VARIANTS.items() if not args.table else []:
        if (only and name not in only) or (name == "full" and args.full_run):
            continue
        s = run_or_resume(config(args, method, options, lrs[method]), args.out / name)
        print(f"{name}: acc {s['final_accuracy']:.4f} f1 {s['final_macro_f1']:.4f}", flush=True)
    text = table(args, lrs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "split.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
