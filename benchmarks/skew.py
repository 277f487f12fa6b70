"""Learning under label skew: which server optimizer / drift or skew correction rescues PEFT?

Setup (issue 12): all-MiniLM-L6-v2, 16 clients with Dirichlet(0.5) label skew, 8 per round,
``--rounds`` rounds (at least 8) x ``--epochs`` local epochs, batch 16, max_length 32, on two
datasets: banking77 (77 balanced intents) and an imbalanced 4-class set built from ag_news
(World and Sports whole, Business and Sci/Tech cut to ``--minority`` of their rows, in train and
test alike, so accuracy alone rewards predicting the majority classes: macro-F1 shows it).

Variants: lora, bias and adapter x {fedavg, fedadam, fedprox, fedlc} (+ scaffold when the
installed fedpeft has ``federation.scaffold``), lora with ``freeze_a`` (FFA-LoRA) (+ ``fedex``
when ``method.aggregation`` exists), and full FedAvg on the same rounds as the reference. Each
variant's local lr comes from ``--lrs tune.json`` (``fedpeft tune`` output: its ``chosen``
mapping of method -> lr), else from :data:`LEARNING_RATES` (chosen for benchmarks/methods.py).
With ``--tune`` each dataset's local learning rates come from ``fedpeft tune`` run on that
dataset's own config first (``OUT/tune/<dataset>``: 2 proxy rounds, validation rows of the train
split, never the test split); the chosen lr of a method is used by all its variants, and FedAdam's
``server_lr`` is tuned the same way at that local lr (``OUT/tune/<dataset>-fedadam/<method>``,
candidates :data:`SERVER_LRS`; without ``--tune`` it is 1e-2).

Usage::

    python benchmarks/skew.py --tune [--data-dir ../shared/data] [--out runs/bench-skew]
    python benchmarks/skew.py --lrs DIR/tune.json --datasets ag_news_imbalanced --only lora-fedavg,lora-fedlc

Runs go variant by variant, each on every dataset, so a partial benchmark compares datasets.

Does the tune proxy rank like the full runs? ``--rank-check bias`` (after ``--tune``) runs the full
benchmark config of that method's plain FedAvg at every lr tune tried (``OUT/rank/<dataset>``)
and prints, per dataset, the Spearman correlation between the proxy's validation macro-F1 and the
full runs' test macro-F1 over those lrs, and over the methods (each method's chosen proxy score
against its ``<method>-fedavg`` run).

Every run is a normal run folder under ``OUT/<dataset>/<variant>``: re-running skips finished
runs and resumes killed ones (kill it and start it again at will); ``OUT/<dataset>/report.md``
(``fedpeft report``) is rewritten at the end with accuracy, macro-F1, classes predicted, MB and
time per variant. About 5 minutes per PEFT run on 2 CPU cores at the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pandas as pd

from fedpeft.config import Config, FederationConfig
from fedpeft.methods.lora import LoraOptions
from fedpeft.report import markdown_table, write_report
from fedpeft.sweep import finished_summary, run_or_resume, run_status
from fedpeft.tune import run_tune

LEARNING_RATES = {"full": 3e-4, "bias": 1e-2, "adapter": 3e-3, "lora": 3e-3}
CORRECTIONS = {  # variant suffix -> federation keys
    "fedavg": {},
    "fedadam": {"server_optimizer": "fedadam", "server_lr": 1e-2},  # server_lr: tuned with --tune
    "fedprox": {"proximal_mu": 0.01},
    "fedlc": {"label_skew": "fedlc"},
    "scaffold": {"scaffold": True},
}
SERVER_LRS = "3e-2,1e-1,3e-1"  # FedAdam's server_lr candidates around Flower's default 0.1 (1e-2: LoRA 0.127 vs 0.331 on banking77)
MINORITY = ("Business", "Sci/Tech")
FIRST = ("full-fedavg", "lora-fedavg", "bias-fedavg", "adapter-fedavg", "lora-fedlc", "bias-fedlc", "adapter-fedlc",
         "lora-fedex", "lora-freeze_a", "lora-scaffold", "bias-scaffold")  # run order: a partial run still answers


def variants() -> dict[str, tuple[str, dict, dict]]:
    """``name -> (method, method options, federation keys)`` for what this fedpeft supports."""
    fed_keys = {f.name for f in dataclasses.fields(FederationConfig)}
    out = {"full-fedavg": ("full", {}, {})}
    for method in ("lora", "bias", "adapter"):
        for suffix, keys in CORRECTIONS.items():
            if set(keys) <= fed_keys:
                out[f"{method}-{suffix}"] = (method, {}, keys)
    out["lora-freeze_a"] = ("lora", {"freeze_a": True}, {})
    if "aggregation" in {f.name for f in dataclasses.fields(LoraOptions)}:
        out["lora-fedex"] = ("lora", {"aggregation": "fedex"}, {})
    first = [v for v in FIRST if v in out]  # the reference and each method's plain run first
    return {v: out[v] for v in [*first, *(v for v in out if v not in first)]}


def imbalanced_ag_news(data_dir: Path, out: Path, minority: float, seed: int = 0) -> Path:
    """Write ``out/train.csv`` and ``out/test.csv``: ag_news with the :data:`MINORITY` classes cut
    to a ``minority`` fraction of their rows (test: its ``description`` column, as train's text)."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        frame = pd.read_csv(data_dir / "ag_news" / f"{split}.csv")
        if "description" in frame.columns:
            frame = frame.assign(text=frame["description"])
        keep = [g if name not in MINORITY else g.sample(frac=minority, random_state=seed)
                for name, g in frame.groupby("label")]
        pd.concat(keep)[["text", "label"]].sample(frac=1.0, random_state=seed).to_csv(out / f"{split}.csv", index=False)
    return out


def config(args: argparse.Namespace, dataset: str, method: str, options: dict, fed: dict, lr: float) -> Config:
    if dataset == "banking77":
        data = {"name": "banking77", "data_dir": str(args.data_dir)}
    else:
        folder = imbalanced_ag_news(args.data_dir, args.out / "data" / dataset, args.minority)
        data = {"train": str(folder / "train.csv"), "test": str(folder / "test.csv")}
    return Config.from_dict({
        "model": {"name": "minilm", "max_length": 32},
        "data": {**data, "max_train_samples": args.rows, "max_test_samples": args.test_rows},
        "partition": {"scheme": "dirichlet", "num_clients": 16, "alpha": 0.5},
        "method": {"name": method, **options},
        "federation": {"rounds": args.rounds, "clients_per_round": 8, "local_epochs": args.epochs,
                       "batch_size": 16, "lr": lr, **fed},
        "runtime": {"seed": args.seed, "progress": False},
        "output": {"save_model": False},
    })


def chosen_lrs(tune_json: Path) -> dict[str, float]:
    """``method -> federation.lr`` from a ``fedpeft tune`` output."""
    return {m: float(c["federation.lr"]) for m, c in json.loads(tune_json.read_text())["choices"].items()}


def tuned_lrs(args: argparse.Namespace, dataset: str, methods: list[str]) -> dict[str, float]:
    """Run (or finish) ``fedpeft tune`` for ``methods`` on ``dataset``'s config; their chosen lrs."""
    folder = args.out / "tune" / dataset  # outside OUT/<dataset>, whose report lists the benchmark runs only
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config(args, dataset, methods[0], {}, {}, LEARNING_RATES[methods[0]])
    cfg.save(folder / "config.toml")
    tuning = run_tune(folder / "config.toml", folder / "runs", methods=methods, rounds=2)
    (folder / "tune.json").write_text((folder / "runs" / "tune.json").read_text())
    print(f"{dataset} tuned: " + ", ".join(f"{m} {c.lr:g}" for m, c in tuning.choices.items()), flush=True)
    return chosen_lrs(folder / "tune.json")


def tuned_server_lr(args: argparse.Namespace, dataset: str, method: str, options: dict, fed: dict, lr: float) -> float:
    """``fedpeft tune`` of ``federation.server_lr`` (:data:`SERVER_LRS`) for ``method`` with the
    server optimizer of ``fed``, at the local ``lr`` tuned for plain FedAvg; the chosen value."""
    folder = args.out / "tune" / f"{dataset}-{fed['server_optimizer']}" / method
    folder.mkdir(parents=True, exist_ok=True)
    config(args, dataset, method, options, fed, lr).save(folder / "config.toml")
    tuning = run_tune(folder / "config.toml", folder / "runs", methods=[method], rounds=2,
                      grid=[f"federation.lr={lr:g}", f"federation.server_lr={SERVER_LRS}"])
    server_lr = float(dict(tuning.choices[method].settings)["federation.server_lr"])
    print(f"{dataset} {method} {fed['server_optimizer']}: server_lr {server_lr:g} (local lr {lr:g})", flush=True)
    return server_lr


def frame_markdown(frame: pd.DataFrame) -> str:
    """A small DataFrame as a markdown table (numbers to 4 significant digits)."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns),
                      *("| " + " | ".join(r) + " |" for r in cells)])


def rank_check(args: argparse.Namespace, dataset: str, method: str) -> str:
    """The full runs of ``method`` at every lr tune tried on ``dataset``; markdown with the
    proxy's and the full runs' macro-F1 and their Spearman correlations (over lrs, over methods)."""
    record = json.loads((args.out / "tune" / dataset / "tune.json").read_text())
    chosen_lr = float(record["choices"][method]["federation.lr"])
    rows = []
    for cand in (c for c in record["candidates"] if c["method"] == method and c["error"] is None):
        lr = float(cand["settings"]["federation.lr"])
        cfg = config(args, dataset, method, {}, {}, lr)
        folder = args.out / dataset / f"{method}-fedavg"  # the benchmark's own run at the chosen lr
        if lr != chosen_lr or run_status(folder, cfg.federation.rounds) != "finished":
            folder = args.out / "rank" / dataset / f"{method}-lr{lr:g}"
        summary = run_or_resume(cfg, folder)
        rows.append({"lr": lr, "proxy_f1": cand["macro_f1"], "full_f1": summary["final_macro_f1"],
                     "full_acc": summary["final_accuracy"]})
    by_lr = pd.DataFrame(rows).sort_values("lr")
    methods = []
    for m, choice in record["choices"].items():
        summary = args.out / dataset / f"{m}-fedavg" / "summary.json"
        proxy = [c["macro_f1"] for c in record["candidates"] if c["method"] == m and c["settings"] == choice]
        if summary.is_file() and proxy:
            methods.append({"method": m, "proxy_f1": proxy[0], "full_f1": json.loads(summary.read_text())["final_macro_f1"]})
    by_method = pd.DataFrame(methods)
    lines = [f"### {dataset}: proxy (2 rounds, validation rows) against full runs ({args.rounds} rounds, test)", "",
             f"{method} over lrs: Spearman {by_lr.proxy_f1.corr(by_lr.full_f1, method='spearman'):.2f}", "",
             frame_markdown(by_lr), ""]
    if len(by_method) > 1:
        lines += [f"methods at their chosen lr: Spearman {by_method.proxy_f1.corr(by_method.full_f1, method='spearman'):.2f}",
                  "", frame_markdown(by_method), ""]
    return "\n".join(lines)


def comparison_table(out: Path, dataset: str, names: list[str]) -> str:
    """Markdown: every finished variant of ``dataset`` against full FedAvg (accuracy and macro-F1
    differences in points, total MB up + down, full's bytes over the variant's, wall time)."""
    done = {name: s for name in names if (s := finished_summary(out / dataset / name)) is not None}
    full = done.get("full-fedavg")
    lines = ["| variant | accuracy | macro-F1 | vs full (points) | classes | MB up + down | full / variant bytes | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in done.items():
        mb = (s["total_bytes_up"] + s["total_bytes_down"]) / 1e6
        versus = ratio = "-"
        if full is not None and name != "full-fedavg":
            versus = (f"{100 * (s['final_accuracy'] - full['final_accuracy']):+.1f} / "
                      f"{100 * (s['final_macro_f1'] - full['final_macro_f1']):+.1f}")
            ratio = f"{(full['total_bytes_up'] + full['total_bytes_down']) / 1e6 / mb:.0f}x"
        lines.append(f"| {name} | {s['final_accuracy']:.3f} | {s['final_macro_f1']:.3f} | {versus} | "
                     f"{s['predicted_classes']}/{s['num_labels']} | {mb:,.1f} | {ratio} | {s['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-skew"))
    parser.add_argument("--datasets", default="banking77,ag_news_imbalanced")
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--lrs", type=Path, help="a fedpeft tune.json: its chosen lr per method, for every dataset")
    parser.add_argument("--tune", action="store_true", help="run fedpeft tune on each dataset first and use its lrs")
    parser.add_argument("--rows", type=int, default=1600)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--minority", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank-check", default="", help="a method: full runs at every lr tune tried (see above)")
    parser.add_argument("--table", action="store_true", help="only print the finished variants against full FedAvg")
    args = parser.parse_args()
    chosen = variants()
    wanted = [v for v in args.only.split(",") if v] or list(chosen)
    unknown = sorted(set(wanted) - set(chosen))
    if unknown:
        raise SystemExit(f"unknown or unsupported variants {unknown}; available: {', '.join(chosen)}")
    datasets = args.datasets.split(",")
    if args.table:
        for dataset in datasets:
            print(f"\n## {dataset}\n\n{comparison_table(args.out, dataset, wanted)}")
        return
    lrs = {d: dict(LEARNING_RATES) for d in datasets}
    for dataset in datasets:
        if args.lrs:
            lrs[dataset].update(chosen_lrs(args.lrs))
        if args.tune:
            # every method, not only --only's: tune.json keeps all choices (finished candidates are skipped)
            lrs[dataset].update(tuned_lrs(args, dataset, sorted({m for m, _, _ in chosen.values()})))
    if args.rank_check:
        for dataset in datasets:
            print(rank_check(args, dataset, args.rank_check), flush=True)
        return
    for name in wanted:
        for dataset in datasets:
            method, options, fed = chosen[name]
            folder = args.out / dataset / name
            if args.tune and "server_optimizer" in fed and run_status(folder, args.rounds) != "finished":
                fed = {**fed, "server_lr": tuned_server_lr(args, dataset, method, options, fed, lrs[dataset][method])}
            cfg = config(args, dataset, method, options, fed, lrs[dataset][method])
            if run_status(folder, cfg.federation.rounds) == "finished":
                continue
            summary = run_or_resume(cfg, folder)
            print(f"{dataset} {name}: acc {summary['final_accuracy']:.4f} f1 {summary['final_macro_f1']:.4f} "
                  f"classes {summary['predicted_classes']} up {summary['total_bytes_up'] / 1e6:.1f} MB "
                  f"{summary['wall_s']:.0f} s", flush=True)
    for dataset in datasets:
        report = write_report(args.out / dataset)
        print(f"\n## {dataset}\n\n{markdown_table(report.rows, report.columns)}\n\n{comparison_table(args.out, dataset, wanted)}")


if __name__ == "__main__":
    main()
