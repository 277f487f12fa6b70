"""Wall time of one workload on every runtime, against a plain PyTorch loop.

Workload: MiniLM + LoRA on banking77 rows, 4 IID clients, all 4 per round, 3 rounds x 1 epoch,
evaluation once at the end. Each entry is a fresh process timed from launch to exit (imports,
model load, data, training, evaluation, outputs):

- plain loop: one process, the same samples in the same batches, one optimizer, no federation;
- local: ``fedpeft run`` (in-process runtime);
- flower-sim: ``fedpeft run --set runtime.kind=flower-sim`` (Ray, one actor per client);
- flower (warm): a loopback deployment (1 SuperLink + 4 SuperNodes, started beforehand like real
  machines): the SuperLink runs ``--isolation process`` with a long-lived ``fedpeft
  flower-server-worker``, each node is a ``fedpeft flower-supernode --idle-poll 0.25`` (Flower's
  SuperNode with a long-lived ``fedpeft flower-worker``); timed from ``fedpeft run --set
  runtime.kind=flower`` to exit;
- flower (warm, run again): the same config submitted a second time to the same deployment, whose
  workers still hold the built experiment (backbone + partition): what every run after the first
  costs on a long-lived deployment;
- flower (cold, ``--cold``): the same deployment with Flower's defaults: a fresh ServerApp process
  per run, plain ``flower-supernode``s starting a fresh ClientApp process per message (re-importing
  torch and reloading the model every round), idle pulls every 3 s.

Every runtime gets the CPUs the benchmark may use (``taskset``) and uses them as a user would:
the single-process runtimes (plain loop, local) run that many torch threads; flower-sim runs one
single-threaded Ray actor per CPU; the deployment's 4 workers share the CPUs (threads = CPUs // 4,
at least 1). On one core (``taskset -c 1``) every process has one thread and the ratios measure
pure overhead; on the whole machine they measure what a user of this machine would see.

Usage: ``[taskset -c 1] python benchmarks/runtimes.py [--data-dir ../shared/data] [--cold] [--rows 1024]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[1]


def workload(data_dir: str, rows: int) -> dict:
    return {
        "model": {"name": "minilm", "max_length": 32},
        "data": {"name": "banking77", "data_dir": str(Path(data_dir).resolve()), "max_train_samples": rows, "max_test_samples": 256},
        "partition": {"scheme": "iid", "num_clients": 4},
        "method": {"name": "lora", "r": 8},
        "federation": {"rounds": 3, "clients_per_round": 4, "local_epochs": 1, "batch_size": 16, "lr": 3e-3,
                       "eval_every": 1000},
        "runtime": {"seed": 0, "progress": False, "threads": 1, "sim_cpus_per_client": 1.0},
        "output": {"save_model": False},
    }


def plain_loop(config: str) -> None:
    """The same batches through a bare PyTorch loop on the same prepared model, then one eval."""
    import torch

    from fedpeft.config import load_config
    from fedpeft.experiment import build_experiment
    from fedpeft.federation.client import client_seed

    cfg = load_config(config)
    exp = build_experiment(cfg)
    model, trainer, fed = exp.model, exp.trainer, cfg.federation
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=fed.lr)
    model.train()
    for rnd in range(1, fed.rounds + 1):
        for cid in exp.strategy.plan_round(rnd).training:
            gen = torch.Generator().manual_seed(client_seed(cfg.runtime.seed, rnd, cid))
            for rows in trainer.batch_order(exp.parts[cid], trainer.num_steps(len(exp.parts[cid])), gen):
                optimizer.zero_grad(set_to_none=True)
                model(**exp.train.batch(rows)).loss.backward()
                torch.nn.utils.clip_grad_norm_(params, fed.max_grad_norm)
                optimizer.step()
    model.eval()
    print(json.dumps(exp.evaluate(exp.initial_state())))


def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def fedpeft_run(config: Path, out: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "fedpeft.cli", "run", str(config), "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cold", action="store_true", help="also time Flower's default per-message ClientApp process")
    parser.add_argument("--only", nargs="+", choices=["plain", "local", "flower-sim", "flower"],
                        help="time only these runtimes (default: all)")
    parser.add_argument("--plain-loop", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_loop:
        return plain_loop(args.plain_loop)

    from fedpeft.runtime.flower.deploy import LoopbackDeployment

    from fedpeft.runtime.flower.launch import usable_cpus

    cpus = usable_cpus()
    work = Path(tempfile.mkdtemp(prefix="fedpeft-runtimes-"))

    def config_for(name: str, threads: int) -> Path:
        cfg = workload(args.data_dir, args.rows)
        cfg["runtime"]["threads"] = threads
        path = work / f"{name}.toml"
        path.write_text(tomli_w.dumps(cfg))
        return path

    single = config_for("single-process", cpus)  # plain loop, local: every CPU to one process
    per_actor = config_for("per-actor", 1)  # flower-sim: one single-threaded actor per CPU
    per_node = config_for("per-node", max(1, cpus // 4))  # deployment: 4 workers share the CPUs
    subprocess.run(fedpeft_run(single, work / "warmup", "federation.rounds=1", "federation.local_steps=1"),
                   check=True, capture_output=True)  # tokenized-data cache, page cache
    only = set(args.only or ["plain", "local", "flower-sim", "flower"])
    results: dict[str, tuple[float, dict | None]] = {}
    if "plain" in only:
        results["plain PyTorch loop"] = (timed([sys.executable, __file__, "--plain-loop", str(single)], work / "plain.log"), None)
    for name, config, sets in (("fedpeft local", single, []), ("fedpeft flower-sim", per_actor, ["runtime.kind=flower-sim"])):
        if name.split()[-1] not in only:
            continue
        out = work / name.split()[-1]
        results[name] = (timed(fedpeft_run(config, out, *sets), work / f"{out.name}.log"), json.loads((out / "summary.json").read_text()))
    for warm in ((True, False) if args.cold else (True,)) if "flower" in only else ():
        label = "fedpeft flower, loopback deployment, " + ("warm flower-worker" if warm else "cold (Flower default)")
        with LoopbackDeployment(4, work / f"deploy-{warm}", warm=warm) as dep:
            sets = ["runtime.kind=flower", f"runtime.superlink={dep.superlink}", "runtime.insecure=true"]
            for again in (False, True) if warm else (False,):
                out = work / f"flower-{warm}-{again}"
                key = label + (", run again (backbones loaded)" if again else "")
                results[key] = (timed(fedpeft_run(per_node, out, *sets), work / f"{out.name}.log"), json.loads((out / "summary.json").read_text()))

    plain = results["plain PyTorch loop"][0] if "plain PyTorch loop" in results else float("nan")
    samples = 3 * args.rows  # 3 rounds x 1 epoch over every row
    print(f"## Runtimes: MiniLM + LoRA, banking77, {args.rows} rows, 4 clients, 3 rounds x 1 epoch, {cpus} CPU(s) (logs: {work})\n")
    print("| runtime | wall time (s) | training samples/s | x plain loop | final accuracy | MB up (payload / on the wire) |")
    print("|---|---|---|---|---|---|")
    for name, (wall, s) in results.items():
        acc = "-" if s is None else f"{s['final_accuracy']:.3f}"
        up = "-" if s is None else f"{s['total_bytes_up'] / 1e6:.2f} / " + (
            "-" if s.get("total_wire_bytes_up") is None else f"{s['total_wire_bytes_up'] / 1e6:.2f}")
        print(f"| {name} | {wall:.1f} | {samples / wall:.1f} | {wall / plain:.2f} | {acc} | {up} |")


if __name__ == "__main__":
    main()
