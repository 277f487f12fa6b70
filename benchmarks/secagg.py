"""Secure aggregation: what does Flower's SecAgg+ cost on a real (loopback) deployment?

Setup (issue 16): one small experiment run twice on the same loopback deployment, once plain and
once with ``privacy.secure_aggregation = true`` (Flower's SecAgg+, ``runtime/flower/secagg.py``):
all-MiniLM-L6-v2 + BitFit (``bias``, lr 1e-2) on banking77, ``--rows`` training rows over
``--clients`` IID clients, all in every round, ``--rounds`` rounds x 1 local epoch, batch 16,
max_length 32, ``--test-rows`` test rows, seed 0; and the same pair with client-level DP
``client-local`` (each client clips its delta to ``--clip-norm`` and adds its share of the noise,
``--noise-multiplier``: under SecAgg+ the distributed-noise mode). ``--models minilm,tiny-bert``
adds the pair for tiny-bert (random weights: a much smaller state, accuracy at chance).

The deployment is :class:`~fedpeft.runtime.flower.deploy.LoopbackDeployment`: 1 SuperLink
(``--isolation process``, a long-lived ``fedpeft flower-server-worker`` running every run's
ServerApp) + one ``fedpeft flower-supernode`` per client on 127.0.0.1, insecure (TLS is not what
is measured), each worker single-threaded; started once, every run submitted to it with
``runtime.kind = "flower"`` as ``fedpeft run`` does.

Per run: final accuracy / macro-F1; against the plain run of its pair the largest absolute
difference of the global trainable state after round 1 (same starting state: must be within that
round's ``secure_aggregation.error_bound``) and after the last round (the clients of later rounds
start from states that already differ, so only the sum of the rounds' bounds is a guide there),
and the values clipped; bytes up / down per client and round, logical (``bytes_*``: payload) and
on the wire (``wire_bytes_*``: every message of the round serialized, all 4 SecAgg+ stages);
message rounds per FL round; wall time per round and SecAgg+'s ``protocol_s``; CPU seconds of the
server side (server worker + SuperLink) and of all the nodes over the run (psutil, the deployment's
processes and their children, read before and after; ``cpu.json`` in the run folder); the
ServerApp's peak RSS (``peak_rss_mb``).

Every run is a normal run folder ``OUT/<model>/<variant>``; re-running skips finished runs and
starts unfinished ones again (a run's ``runtime.superlink`` is the address of the deployment it
ran on, which is gone, and the key does not change on resume); the deployment is started only
when some run is not finished, the replays are done when missing. ``OUT/secagg.md`` holds the tables.

Usage::

    python benchmarks/secagg.py [--data-dir ../shared/data] [--out runs/bench-secagg] [--models minilm,tiny-bert]
    python benchmarks/secagg.py --out runs/bench-secagg --table
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from fedpeft.checkpoint import checkpoint_folders, read_checkpoint
from fedpeft.config import Config
from fedpeft.results import RunDir
from fedpeft.sweep import finished_summary, run_or_resume, run_status

VARIANTS = ("plain", "secagg", "dp-plain", "dp-secagg")  # each secagg variant is compared with the plain one before it
PAIRS = {"secagg": "plain", "dp-secagg": "dp-plain"}
MODELS = {"minilm": 32, "tiny-bert": 32}  # model -> max_length


def config(args: argparse.Namespace, model: str, variant: str, superlink: str | None = None,
           rounds: int | None = None) -> Config:
    """The run ``variant`` of ``model``; ``superlink`` None: the in-process runtime (the replay)."""
    privacy: dict = {}
    if variant.startswith("dp-"):
        privacy = {"mode": "client-local", "noise_multiplier": args.noise_multiplier, "clip_norm": args.clip_norm,
                   "delta": args.delta}
    if variant.endswith("secagg"):
        privacy["secure_aggregation"] = True
    return Config.from_dict({
        "model": {"name": model, "max_length": MODELS[model]},
        "data": {"name": "banking77", "data_dir": str(Path(args.data_dir).resolve()), "max_train_samples": args.rows,
                 "max_test_samples": args.test_rows},
        "partition": {"scheme": "iid", "num_clients": args.clients},
        "method": {"name": "bias"},
        "federation": {"rounds": rounds or args.rounds, "clients_per_round": args.clients, "local_epochs": 1.0,
                       "batch_size": 16, "lr": 1e-2, "checkpoint_every": 1},
        "runtime": {"seed": args.seed, "progress": False, "threads": 1,
                    **({"kind": "local"} if superlink is None else
                       {"kind": "flower", "superlink": superlink, "insecure": True, "connect_timeout": 120})},
        "output": {"save_model": False},
        **({"privacy": privacy} if privacy else {}),
    })


def folder(args: argparse.Namespace, model: str, variant: str) -> Path:
    return args.out / model / variant


# ----------------------------------------------------------------------------- measuring


def cpu_seconds(dep) -> dict[str, float]:
    """User + system CPU seconds so far of the deployment's server side (SuperLink + server
    worker) and of all its nodes (SuperNodes + their workers), each process with its children."""
    import psutil

    total = {"server": 0.0, "nodes": 0.0}
    for name, popen in dep.procs.items():
        try:
            proc = psutil.Process(popen.pid)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total["nodes" if name.startswith("supernode") else "server"] += t.user + t.system
    return total


def global_states(run: Path) -> dict[int, dict[str, np.ndarray]]:
    """round -> global state of every checkpoint kept (the two newest)."""
    states = {}
    for path in checkpoint_folders(RunDir(run).checkpoint):
        ckpt = read_checkpoint(path)
        states[ckpt.round] = ckpt.state
    return states


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a)


def replay(args: argparse.Namespace, model: str, variant: str) -> dict[int, float]:
    """For a secure run: round ``r`` -> the largest absolute difference between its global state
    after ``r`` and the plain aggregation of round ``r`` from its own state after ``r - 1``,
    recomputed in process (the plain variant's config, ``runtime.kind = "local"``: the same client
    training as on the deployment, bit for bit). This isolates round ``r``'s SecAgg+ error, which
    must be within that round's ``error_bound``; written to ``replay.json`` in the run folder."""
    from fedpeft.experiment import build_experiment
    from fedpeft.runtime.local import InProcessClients

    run = folder(args, model, variant)
    states = global_states(run)
    exp = build_experiment(config(args, model, PAIRS[variant]))
    clients, out = InProcessClients(exp), {}
    for rnd in sorted(states):
        if rnd - 1 not in states:
            continue
        aggregation = exp.strategy.start_round(rnd, states[rnd - 1])
        clients.fit_round(exp.strategy.plan_round(rnd), states[rnd - 1], aggregation.add)
        out[rnd] = max_abs_diff(aggregation.finish().state, states[rnd])
    (run / "replay.json").write_text(json.dumps(out) + "\n")
    return out


def measure(args: argparse.Namespace, model: str, variant: str) -> dict | None:
    """Everything the tables show for one finished run (None: not finished)."""
    run = folder(args, model, variant)
    summary = finished_summary(run)
    if summary is None:
        return None
    rows = RunDir(run).read_metrics()
    ok = [c for r in rows for c in r["clients"] if c["status"] == "ok"]
    secure = [r.get("secure_aggregation") for r in rows]
    out = {
        "summary": summary, "rows": len(rows),
        "accuracy": summary["final_accuracy"], "macro_f1": summary["final_macro_f1"],
        "trainable": summary.get("trainable_params"),
        "up": statistics.mean(c["bytes_up"] for c in ok), "down": statistics.mean(c["bytes_down"] for c in ok),
        "wire_up": statistics.mean(c["wire_bytes_up"] for c in ok),
        "wire_down": statistics.mean(c["wire_bytes_down"] for c in ok),
        "message_rounds": secure[0]["message_rounds"] if secure[0] else 1,
        "wall_round": statistics.mean(r["wall_s"] for r in rows),
        "compute_round": statistics.mean(r["client_compute_s"] for r in rows),
        "eval_round": statistics.mean(r["eval_s"] for r in rows),
        "protocol_s": statistics.mean(s["protocol_s"] for s in secure) if secure[0] else None,
        "stage_s": [statistics.mean(st) for st in zip(*(s["stage_s"] for s in secure))]
        if secure[0] and all("stage_s" in s for s in secure) else None,
        "bounds": [s["error_bound"] for s in secure] if secure[0] else None,
        "clipped": sum(s["clipped_values"] for s in secure) if secure[0] else None,
        "epsilon": summary.get("epsilon"), "peak_rss_mb": summary.get("peak_rss_mb"),
        "failed": summary.get("clients_failed_total", 0),
    }
    for name in ("cpu", "replay"):
        path = run / f"{name}.json"
        out[name] = json.loads(path.read_text()) if path.exists() else None
    if variant in PAIRS and finished_summary(folder(args, model, PAIRS[variant])) is not None:
        mine, plain = global_states(run), global_states(folder(args, model, PAIRS[variant]))
        out["diff"] = {r: max_abs_diff(mine[r], plain[r]) for r in sorted(set(mine) & set(plain))}
    return out


# ----------------------------------------------------------------------------- the tables


def kb(x: float) -> str:
    return f"{x / 1e3:,.1f}"


def table(args: argparse.Namespace, models: list[str]) -> str:
    lines = [(f"# Secure aggregation (SecAgg+) on a loopback deployment: banking77, BitFit, {args.clients} IID "
              f"clients all in every round, {args.rounds} rounds x 1 epoch, {args.rows} train / {args.test_rows} test rows"), ""]
    for model in models:
        got = {v: measure(args, model, v) for v in VARIANTS}
        if not any(got.values()):
            continue
        n = next(m["trainable"] for m in got.values() if m)
        lines += [f"## {model} ({n:,} exchanged values)", "",
                  ("| variant | accuracy / macro-F1 | max abs diff vs plain run: round 1 (bound) | "
                   f"round {args.rounds} (sum of bounds) | vs plain replay of the round: round {args.rounds} (bound) "
                   "| values clipped | epsilon |"),
                  "|---|---|---|---|---|---|---|"]
        for v in VARIANTS:
            m = got[v]
            if m is None:
                lines.append(f"| {v} | - | - | - | - | - | - |")
                continue
            diff = m.get("diff") or {}
            b = m["bounds"]
            first = f"{diff[1]:.2e} ({b[0]:.2e})" if 1 in diff and b else "-"
            last = (f"{diff[args.rounds]:.2e} ({sum(b):.2e})" if args.rounds in diff and b else "-")
            again = m["replay"] or {}
            replayed = (f"{again[str(args.rounds)]:.2e} ({b[-1]:.2e})" if str(args.rounds) in again and b else "-")
            eps = "-" if m["epsilon"] is None else f"{m['epsilon']:.2f}"
            lines.append(f"| {v} | {m['accuracy']:.3f} / {m['macro_f1']:.3f} | {first} | {last} | {replayed} | "
                         f"{'-' if m['clipped'] is None else m['clipped']} | {eps} |")
        lines += ["", ("Cost per client and round (KB: logical payload / on the wire), message rounds per FL round, "
                       "seconds per round (wall, the server's evaluation in it; clients' compute, summed over clients; "
                       "SecAgg+ protocol, training included, and its stages: setup, share keys, collect masked vectors, "
                       "unmask), CPU seconds over the whole run (server worker + SuperLink; all nodes), the ServerApp's "
                       "peak RSS:"), "",
                  ("| variant | up KB | down KB | message rounds | wall s / round (eval) | compute s / round | "
                   "protocol s / round (its 4 stages) | server CPU s | nodes CPU s | server peak RSS MB |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for v in VARIANTS:
            m = got[v]
            if m is None:
                continue
            cpu = m["cpu"] or {}
            lines.append(
                f"| {v} | {kb(m['up'])} / {kb(m['wire_up'])} | {kb(m['down'])} / {kb(m['wire_down'])} | "
                f"{m['message_rounds']} | {m['wall_round']:.2f} ({m['eval_round']:.2f}) | {m['compute_round']:.2f} | "
                f"{'-' if m['protocol_s'] is None else format(m['protocol_s'], '.2f')}"
                f"{' (' + ' / '.join(f'{x:.2f}' for x in m['stage_s']) + ')' if m['stage_s'] else ''} | "
                f"{cpu.get('server', float('nan')):.1f} | {cpu.get('nodes', float('nan')):.1f} | "
                f"{m['peak_rss_mb']:.0f} |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running


def run_all(args: argparse.Namespace, models: list[str]) -> None:
    todo = [(m, v) for m in models for v in VARIANTS if finished_summary(folder(args, m, v)) is None]
    if todo:
        deploy(args, todo)
    for model in models:
        for variant in PAIRS:
            if finished_summary(folder(args, model, variant)) and not (folder(args, model, variant) / "replay.json").exists():
                print(f"{model} {variant}: replayed rounds {replay(args, model, variant)}", flush=True)


def deploy(args: argparse.Namespace, todo: list[tuple[str, str]]) -> None:
    """Run ``todo`` on one fresh loopback deployment, after a 1-round warm-up run per model (not
    reported: the first run on new processes pays one-off costs)."""
    from fedpeft.runtime.flower.deploy import LoopbackDeployment

    args.out.mkdir(parents=True, exist_ok=True)
    with LoopbackDeployment(args.clients, args.out / "deployment", threads=1) as dep:
        warm = set()
        for model, variant in todo:
            if model not in warm:
                warmup = args.out / "deployment" / f"warmup-{model}"
                shutil.rmtree(warmup, ignore_errors=True)
                run_or_resume(config(args, model, "plain", dep.superlink, rounds=1), warmup)
                warm.add(model)
            run = folder(args, model, variant)
            if run_status(run, args.rounds) == "partial":  # its SuperLink is gone (runtime.superlink is not resumable)
                shutil.rmtree(run)
            before, t0 = cpu_seconds(dep), time.perf_counter()
            s = run_or_resume(config(args, model, variant, dep.superlink), run)
            after = cpu_seconds(dep)
            cpu = {k: after[k] - before[k] for k in before}
            (run / "cpu.json").write_text(json.dumps({**cpu, "elapsed_s": time.perf_counter() - t0}) + "\n")
            print(f"{model} {variant}: acc {s['final_accuracy']:.4f} f1 {s['final_macro_f1']:.4f} "
                  f"wall {s['wall_s']:.1f} s cpu {cpu}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-secagg"))
    parser.add_argument("--models", default="minilm")
    parser.add_argument("--rows", type=int, default=320, help="training rows")
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="2: both checkpoints (rounds 1 and 2) are kept")
    parser.add_argument("--noise-multiplier", type=float, default=0.5)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", action="store_true", help="only write the table of the finished runs")
    args = parser.parse_args()
    args.out = args.out.resolve()
    models = [m for m in args.models.split(",") if m]
    if not args.table:
        run_all(args, models)
    text = table(args, models)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "secagg.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
