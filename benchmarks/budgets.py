"""Device budgets: which method gives the best accuracy when clients cannot all train everything?

Setup (issue 14): all-MiniLM-L6-v2 on banking77, 16 clients with Dirichlet(0.5) label skew, 8 per
round, ``--rounds`` rounds x 1 local epoch, batch 16, max_length 32 (the label-skew benchmark's
setup, benchmarks/skew.py). Methods: ``layers`` (each client trains the deepest suffix of blocks
its budgets allow: Pfeiffer et al. 2024, https://arxiv.org/abs/2411.07826), LoRA, BitFit and the
head, at the same budgets and rounds. Learning rates: the banking77 choices of ``fedpeft tune`` in
the skew benchmark (lora, bias 1e-2), the head 1e-2 (benchmarks/robust.py) and ``layers`` 3e-4
(full fine-tuning's tuned lr: it trains whole blocks).

Budgets are derived from the cost model on the real model (:func:`fedpeft.budgets.predict`),
not guessed, and printed:

(a) ``one``: every client gets the same memory budget ("medium"), halfway between what ``layers``
    needs at k = 2 blocks and what LoRA and BitFit need over all six (they keep every block's
    activations for backward; measured here: k = 2 153 MiB < BitFit 159 < LoRA 160 < k = 3 182),
    so under it LoRA and BitFit cannot train at all; the head and ``layers`` (k = 2) can.
(b) ``mix``: 50% small (between k = 1 and 2), 30% medium (as in a), 20% large (no limit):
    ``layers`` trains each client as deep as it can (large: all six blocks); the other methods
    train on the clients they fit and skip the rest (infeasible clients never train).

Every run sets ``runtime.measure_memory``, so each client's predicted peak memory sits next to a
measured one (one real step under torch's memory profiler) in budgets.json. Every run is a normal
run folder ``OUT/<scenario>/<method>``: re-running skips finished runs and resumes killed ones.
``OUT/budgets.md`` holds the table. The frozen-prefix cache's epoch times (head, layers k = 1) are
``benchmarks/frozen_cache.py``'s.

Usage::

    python benchmarks/budgets.py [--data-dir ../shared/data] [--out runs/bench-budgets]
    python benchmarks/budgets.py --out runs/bench-budgets --table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpeft.budgets import predict
from fedpeft.budgets.clients import DepthCosts
from fedpeft.config import Config
from fedpeft.methods import build_method
from fedpeft.models import load_model
from fedpeft.sweep import finished_summary, run_or_resume

METHODS = {"layers": 3e-4, "lora": 1e-2, "bias": 1e-2, "head": 1e-2}  # method -> local lr
MIB = 2**20


def config(args: argparse.Namespace, method: str, budgets: dict | None = None) -> Config:
    return Config.from_dict({
        "model": {"name": "minilm", "max_length": 32},
        "data": {"name": "banking77", "data_dir": str(args.data_dir), "max_train_samples": args.rows,
                 "max_test_samples": args.test_rows},
        "partition": {"scheme": "dirichlet", "num_clients": 16, "alpha": 0.5},
        "method": {"name": method},
        "federation": {"rounds": args.rounds, "clients_per_round": 8, "local_epochs": 1.0, "batch_size": 16,
                       "lr": METHODS[method]},
        "runtime": {"seed": args.seed, "progress": False, "measure_memory": True},
        "output": {"save_model": False},
        **({"budgets": budgets} if budgets else {}),
    })


def predicted_memory(args: argparse.Namespace) -> dict[str, float]:
    """MiB the cost model predicts: each method over all blocks, and ``layers`` at each k."""
    out = {}
    for method in METHODS:
        cfg = config(args, method)
        loaded = load_model(cfg.model, [str(i) for i in range(77)], cfg.runtime.seed)
        built = build_method(method, cfg.method.options)
        model = built.prepare(loaded.model, loaded.info)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if method == "layers":
            costs = DepthCosts(built, model, loaded.info, cfg, names)
            out.update({f"layers-k{k}": costs.at(k).memory.peak / MIB for k in range(costs.max_k + 1)})
        else:
            out[method] = predict(model, loaded.info, cfg, names).memory.peak / MIB
    return out


def scenarios(memory: dict[str, float]) -> dict[str, dict]:
    """The two ``[budgets]`` tables (see the module docstring)."""
    small = (memory["layers-k1"] + memory["layers-k2"]) / 2
    medium = (memory["layers-k2"] + min(memory["lora"], memory["bias"])) / 2
    assert memory["layers-k3"] > medium > memory["layers-k2"] > memory["head"], memory  # layers k = 2, the head fit
    return {
        "one": {"profiles": [{"name": "device", "memory_mb": medium}], "assign": "same"},
        "mix": {"profiles": [{"name": "small", "memory_mb": small}, {"name": "medium", "memory_mb": medium},
                             {"name": "large"}], "assign": "fractions", "fractions": [0.5, 0.3, 0.2]},
    }


def row(folder: Path) -> str | None:
    summary = finished_summary(folder)
    if summary is None:
        return None
    plan = json.loads((folder / "budgets.json").read_text())
    trained = [c for c in plan["clients"] if c["fits"]]
    ks = sorted({c["k"] for c in trained if c["k"] is not None})
    pred = max((c["memory_mb"] for c in trained), default=0.0)
    meas = max((c["measured_memory_mb"] or 0.0 for c in trained), default=0.0)
    flops = sum(c["flops"] for r in _rows(folder) for c in r["clients"] if "flops" in c)
    mb = (summary["total_bytes_up"] + summary["total_bytes_down"]) / 1e6
    return (f"{summary['final_accuracy']:.3f} | {summary['final_macro_f1']:.3f} | {len(trained)}/{len(plan['clients'])}"
            f" | {','.join(map(str, ks)) or '-'} | {pred:.0f} / {meas:.0f} | {flops / 1e12:.1f} | {mb:.1f}")


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def table(args: argparse.Namespace, memory: dict[str, float], cases: dict[str, dict]) -> str:
    lines = [f"# Device budgets: banking77, MiniLM, 16 Dirichlet(0.5) clients, 8 per round, {args.rounds} rounds", "",
             "Predicted peak memory (MiB, batch 16 x 32 tokens): " +
             ", ".join(f"{k} {v:.0f}" for k, v in memory.items()), ""]
    for name, budgets in cases.items():
        limits = ", ".join(f"{p['name']} {p.get('memory_mb', float('inf')):.0f} MiB" for p in budgets["profiles"])
        lines += [f"## {name}: {limits}", "",
                  "| method | accuracy | macro-F1 | clients that train | k | peak MiB predicted / measured "
                  "(largest trained client) | client TFLOPs (all rounds) | MB up + down |",
                  "|---|---|---|---|---|---|---|---|"]
        for method in METHODS:
            cells = row(args.out / name / method)
            lines.append(f"| {method} | {cells or '- | - | - | - | - | - | -'} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-budgets"))
    parser.add_argument("--rows", type=int, default=1600)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated scenario/method (e.g. mix/layers)")
    parser.add_argument("--table", action="store_true", help="only write the table of the finished runs")
    args = parser.parse_args()
    memory = predicted_memory(args)
    cases = scenarios(memory)
    print("predicted MiB:", {k: round(v) for k, v in memory.items()}, flush=True)
    only = {x for x in args.only.split(",") if x}
    for name, budgets in cases.items() if not args.table else []:
        for method in METHODS:
            if only and f"{name}/{method}" not in only:
                continue
            summary = run_or_resume(config(args, method, budgets), args.out / name / method)
            print(f"{name} {method}: acc {summary['final_accuracy']:.4f} f1 {summary['final_macro_f1']:.4f}", flush=True)
    text = table(args, memory, cases)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "budgets.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
