"""Overhead of the in-process runtime, and memory with many simulated clients.

1. Throughput: MiniLM + LoRA on banking77 rows, 4 clients, a few rounds. The same samples, in the
   same batches and order, are trained by (a) ``fedpeft``'s in-process runtime and (b) a plain
   PyTorch loop over the same model (no federation: one optimizer, no state copies, no
   aggregation, no files). Reported: training samples/s of each and their ratio (target >= 0.95).
   Evaluation is excluded from both.
2. Memory: peak RSS of whole ``fedpeft run`` processes with 10, 100 and 1,000 simulated LoRA
   clients (sst2 rows), which should stay flat: a client's state is only its exchanged part.
3. SCAFFOLD's client control variates: 1,000 LoRA clients that all train once (one round of
   1,000 clients, one step each), with and without ``federation.scaffold``: peak RSS and the
   checkpoint's size, which grow by one exchanged state per client (``c_i``).

Usage: ``python benchmarks/overhead.py [--data-dir ../shared/data] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedpeft.config import Config
from fedpeft.experiment import build_experiment, run_experiment
from fedpeft.federation.client import client_seed


def workload(data_dir: str, **federation) -> Config:
    return Config.from_dict({
        "model": {"name": "minilm", "max_length": 48},
        "data": {"name": "banking77", "data_dir": data_dir, "max_train_samples": 512, "max_test_samples": 64},
        "partition": {"scheme": "iid", "num_clients": 4},
        "method": {"name": "lora", "r": 8},
        "federation": {"rounds": 2, "clients_per_round": 4, "local_epochs": 1, "batch_size": 16,
                       "lr": 5e-3, "eval_every": 1000, **federation},
        "runtime": {"seed": 0, "progress": False},
        "output": {"save_model": False},
    })


def fedpeft_throughput(cfg: Config) -> float:
    with tempfile.TemporaryDirectory() as out:
        summary = run_experiment(cfg, out=out)
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    samples = sum(c["samples_processed"] for r in rows for c in r["clients"] if c["status"] == "ok")
    return samples / (summary["wall_s"] - summary["eval_s"])


def plain_loop_throughput(cfg: Config) -> float:
    """The same batches through a bare PyTorch training loop on the same prepared model."""
    exp = build_experiment(cfg)
    model, trainer, fed = exp.model, exp.trainer, cfg.federation
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=fed.lr)
    model.train()
    samples, start = 0, time.perf_counter()
    for rnd in range(1, fed.rounds + 1):
        for cid in exp.strategy.plan_round(rnd).training:
            gen = torch.Generator().manual_seed(client_seed(cfg.runtime.seed, rnd, cid))
            for rows in trainer.batch_order(exp.parts[cid], trainer.num_steps(len(exp.parts[cid])), gen):
                batch = exp.train.batch(rows)
                optimizer.zero_grad(set_to_none=True)
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, fed.max_grad_norm)
                optimizer.step()
                samples += len(rows)
    return samples / (time.perf_counter() - start)


def memory_with_clients(data_dir: str, num_clients: int, *overrides: str) -> dict:
    """The summary of one ``fedpeft run`` of overhead_memory.toml, plus ``checkpoint_bytes``."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "fedpeft.cli", "run", str(Path(__file__).with_name("overhead_memory.toml")),
            "--out", out, "--set", f"data.data_dir={json.dumps(data_dir)}",
            "--set", f"partition.num_clients={num_clients}", *(a for o in overrides for a in ("--set", o)),
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        checkpoint = sum(f.stat().st_size for f in (Path(out) / "checkpoint").rglob("*") if f.is_file())
        return {**json.loads((Path(out) / "summary.json").read_text()), "checkpoint_bytes": checkpoint}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    cfg = workload(args.data_dir)
    plain_loop_throughput(cfg)  # warm-up: caches, allocator, kernels
    fed, plain = [], []
    for _ in range(args.repeats):  # interleaved, best of N: robust to machine noise
        fed.append(fedpeft_throughput(cfg))
        plain.append(plain_loop_throughput(cfg))
    print("## In-process runtime vs plain PyTorch loop (MiniLM + LoRA, banking77, 4 clients, 2 rounds)\n")
    print("| loop | samples/s (best of %d) |" % args.repeats)
    print("|---|---|")
    print(f"| plain PyTorch | {max(plain):.1f} |")
    print(f"| fedpeft in-process | {max(fed):.1f} |")
    print(f"\nratio fedpeft / plain = **{max(fed) / max(plain):.3f}** (target >= 0.95)\n")

    print("## Memory with many simulated LoRA clients (sst2, MiniLM, 10 clients per round)\n")
    print("| simulated clients | peak RSS MB | client train-state MB | exchanged KB per update |")
    print("|---|---|---|---|")
    for n in (10, 100, 1000):
        s = memory_with_clients(args.data_dir, n)
        print(f"| {n} | {s['peak_rss_mb']:.0f} | {s['client_train_state_bytes'] / 2**20:.2f} | {s['bytes_per_client_update'] / 1024:.1f} |")

    print("\n## SCAFFOLD: 1,000 LoRA clients, each trained once (sst2, MiniLM)\n")
    print("| federation.scaffold | peak RSS MB | checkpoint MB |")
    print("|---|---|---|")
    every_client_once = ("federation.rounds=1", "federation.clients_per_round=1000", "federation.local_steps=1",
                         "runtime.threads=1")
    for scaffold in ("false", "true"):
        s = memory_with_clients(args.data_dir, 1000, *every_client_once, f"federation.scaffold={scaffold}")
        print(f"| {scaffold} | {s['peak_rss_mb']:.0f} | {s['checkpoint_bytes'] / 1e6:.0f} |")


if __name__ == "__main__":
    main()
