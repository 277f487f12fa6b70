"""The cost model against a measured training step on the real all-MiniLM-L6-v2.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/costmodel.py [--batch 32] [--length 64]

For every method: fedpeft.budgets.predict (no training) vs fedpeft.budgets.measure_step (a real
steady-state step of 32 random-token rows of 64 tokens, row 0 padded, profiled by torch), and
the time each took. Prints a markdown table (docs/budgets.md has this machine's).
"""

from __future__ import annotations

import argparse
import time

import torch

from fedpeft.budgets import measure_step, predict
from fedpeft.config import Config, ModelConfig
from fedpeft.methods import build_method
from fedpeft.models import load_model

METHODS = ["full", "head", "bias", "adapter", "lora", "prompt"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = Config()
    cfg.federation.batch_size, cfg.model.max_length = args.batch, args.length
    mb = 2**20
    print(f"all-MiniLM-L6-v2, 77 labels, batch {args.batch} x {args.length} tokens, AdamW, 1 thread")
    print("| method | activations pred / meas (MiB) | err | peak pred / meas (MiB) | err | predict s | measure s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        loaded = load_model(ModelConfig(name="minilm"), [f"l{i}" for i in range(77)])
        model = build_method(method).prepare(loaded.model, loaded.info)
        t0 = time.perf_counter()
        costs = predict(model, loaded.info, cfg)
        t1 = time.perf_counter()
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 20000, (args.batch, args.length), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, -5:] = 0
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 77, (args.batch,), generator=gen)}
        measured = measure_step(model, batch, cfg.federation)
        t2 = time.perf_counter()
        m = costs.memory
        print(f"| {method} | {m.activations / mb:.1f} / {measured.after_forward / mb:.1f} | "
              f"{m.activations / measured.after_forward - 1:+.2%} | {m.peak / mb:.1f} / {measured.peak / mb:.1f} | "
              f"{m.peak / measured.peak - 1:+.2%} | {t1 - t0:.1f} | {t2 - t1:.1f} |", flush=True)


if __name__ == "__main__":
    main()
