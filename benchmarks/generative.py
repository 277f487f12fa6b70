"""Federated instruction tuning of a causal LM: which method learns, and does one shot suffice?

Setup (issue 17). No pre-trained causal LM is available offline here, so the default model is a
randomly initialised GPT-2 (``--size``: hidden 128, 4 blocks, 4 heads; MiniLM's 30,522-token
tokenizer; 5.0 M parameters, the LM head tied to the embeddings), written once to
``OUT/models/gpt2-h128-l4`` and loaded from that folder as any hub model is. ``--model`` takes a hub id or a
folder instead (e.g. ``--model Qwen/Qwen2.5-0.5B``): the same runs on a real pre-trained model.
GPT-2 rather than LLaMA: BitFit needs biases, which LLaMA has none of.

Tasks (instruction data as JSONL under ``OUT/data``, built from their source; nothing is copied
into the repository):

(a) ``banking77``: ``../shared/data/banking77`` (``--data-dir``): prompt ``"<customer text>
    intent:"``, response the intent label with spaces for underscores (``"card arrival"``);
    ``--rows`` seeded train rows, ``--test-rows`` test rows.
(b) ``copy``: a synthetic task: prompt ``"copy: w1 w2 w3"`` with 3 words drawn from 16 common
    English words, response ``"w1 w2 w3"``; a 1,000-row train set and 200 held-out rows.

Methods: LoRA (r 8 on ``c_attn`` and the LM head: a random model's output layer caps every logit
near +-0.6, so LoRA on attention alone cannot make any token likely; tests/test_generative.py),
soft prompts (16 virtual tokens) and BitFit. Federation: 2 IID clients, both in every round, batch
8, max_length 32, AdamW. Schedules at equal local steps per client: ``multi`` = ``--rounds`` rounds x ``--steps``
steps, ``oneshot`` = 1 round x ``rounds * steps`` steps (Wang et al. 2024,
https://arxiv.org/abs/2412.04650). Evaluation after the last round: held-out token loss and
perplexity on every test row, greedy exact match and ROUGE-L on the first 64 (at most 8 new
tokens).

Every run is a normal run folder ``OUT/<task>/<method>-<schedule>`` (the untrained model's scores,
through the same evaluation: ``OUT/<task>/untrained.json``); re-running skips finished runs and
resumes killed ones. ``OUT/generative.md`` holds the table (``--table``: finished runs
only).

Usage::

    python benchmarks/generative.py [--data-dir ../shared/data] [--out runs/bench-generative]
    python benchmarks/generative.py --out runs/bench-generative --table
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from fedpeft.config import Config
from fedpeft.sweep import finished_summary, run_or_resume

METHODS = {  # method -> (method keys, local lr)
    "lora": ({"r": 8, "target_modules": ["c_attn", "lm_head"]}, 1e-2),
    "prompt": ({"num_virtual_tokens": 16}, 3e-2),
    "bias": ({}, 3e-2),
}
SCHEDULES = ("multi", "oneshot")
TASKS = ("banking77", "copy")
# the method comparison and LoRA's one-shot first, on both tasks; then the other methods' one-shot
ORDER = ([(t, m, "multi") for t in ("copy", "banking77") for m in METHODS]
         + [(t, "lora", "oneshot") for t in ("copy", "banking77")]
         + [(t, m, "oneshot") for t in ("copy", "banking77") for m in ("prompt", "bias")])
WORDS = ("red", "blue", "green", "black", "white", "cat", "dog", "fish", "bird", "tree",
         "house", "car", "sun", "moon", "book", "door")


def random_gpt2(folder: Path, size: tuple[int, int, int]) -> str:
    """A seeded random GPT-2 (hidden, blocks, heads) with MiniLM's tokenizer, saved as a model folder."""
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    import transformers as tf

    from fedpeft.models import minilm_dir

    hidden, layers, heads = size
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_dir())
    config = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256, vocab_size=len(tokenizer),
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                           eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
    return str(path)


def banking77_data(args: argparse.Namespace) -> tuple[str, str]:
    """train/test JSONL of (customer text + " intent:", the label in words) from banking77's CSVs."""
    def rows(split: str) -> list[dict]:
        with open(args.data_dir / "banking77" / f"{split}.csv", newline="") as f:
            return [{"prompt": f"{r['text'].strip()} intent:", "response": r["label"].replace("_", " ")}
                    for r in csv.DictReader(f)]

    out = args.out / "data"
    return write_jsonl(out / "banking77-train.jsonl", rows("train")), write_jsonl(out / "banking77-test.jsonl", rows("test"))


def copy_data(args: argparse.Namespace) -> tuple[str, str]:
    """train/test JSONL of the synthetic copy task (seeded)."""
    rng = np.random.default_rng(0)

    def rows(n: int) -> list[dict]:
        words = [" ".join(rng.choice(WORDS, 3)) for _ in range(n)]
        return [{"prompt": f"copy: {w}", "response": w} for w in words]

    out = args.out / "data"
    return write_jsonl(out / "copy-train.jsonl", rows(1000)), write_jsonl(out / "copy-test.jsonl", rows(200))


def config(args: argparse.Namespace, task: str, method: str, schedule: str, data: tuple[str, str]) -> Config:
    options, lr = METHODS[method]
    rounds, steps = (args.rounds, args.steps) if schedule == "multi" else (1, args.rounds * args.steps)
    rows = {"max_train_samples": args.rows, "max_test_samples": args.test_rows} if task == "banking77" else {}
    return Config.from_dict({
        "model": {"name": args.model, "max_length": 32},
        "task": {"kind": "causal-lm", "max_new_tokens": 8, "generation_samples": 64, "saved_generations": 8},
        "data": {"train": data[0], "test": data[1], **rows},
        "partition": {"scheme": "iid", "num_clients": 2},
        "method": {"name": method, **options},
        "federation": {"rounds": rounds, "clients_per_round": 2, "local_steps": steps, "batch_size": 8, "lr": lr,
                       "eval_every": rounds},
        "runtime": {"seed": args.seed, "progress": False},
        "output": {"save_model": False},
    })


def untrained_scores(cfg: Config, path: Path) -> None:
    """The base model's held-out scores through fedpeft's own evaluation (as a summary's keys)."""
    if path.is_file():
        return
    from fedpeft.experiment import build_experiment

    exp = build_experiment(cfg)
    scores = exp.evaluate(exp.initial_state())
    summary = {f"final_{k}": scores[k] for k in ("eval_loss", "perplexity", "exact_match", "rouge_l")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**summary, "trainable_params": 0, "total_bytes_up": 0, "total_bytes_down": 0,
                                "wall_s": 0.0}) + "\n")


def cells(summary: dict | None) -> str:
    if summary is None:
        return "- | - | - | - | - | - | -"
    mb = (summary["total_bytes_up"] + summary["total_bytes_down"]) / 1e6
    return (f"{summary['final_eval_loss']:.3f} | {summary['final_perplexity']:.4g} | {summary['final_exact_match']:.3f} | "
            f"{summary['final_rouge_l']:.3f} | {summary['trainable_params']:,} | {mb:.2f} | {summary['wall_s']:.0f}")


def table(args: argparse.Namespace) -> str:
    lines = [f"# Federated instruction tuning: {args.model_label}, 2 IID clients, equal local steps "
             f"({args.rounds} x {args.steps} = 1 x {args.rounds * args.steps})", "",
             "| task | method | schedule | eval loss | perplexity | exact match | ROUGE-L | trainable params | "
             "MB up + down | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task in TASKS:
        path = args.out / task / "untrained.json"
        base = json.loads(path.read_text()) if path.is_file() else None
        lines.append(f"| {task} | untrained | - | {cells(base)} |")
        for method in METHODS:
            for schedule in SCHEDULES:
                label = f"{args.rounds} x {args.steps}" if schedule == "multi" else f"1 x {args.rounds * args.steps}"
                lines.append(f"| {task} | {method} | {label} | {cells(finished_summary(args.out / task / f'{method}-{schedule}'))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-generative"))
    parser.add_argument("--model", default="", help="hub id or model folder (default: a random GPT-2 of --size)")
    parser.add_argument("--size", default="128,4,4", help="hidden,blocks,heads of the default random GPT-2")
    parser.add_argument("--rows", type=int, default=1000, help="banking77 train rows")
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="local steps per round (multi-round)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated task/method-schedule (e.g. copy/lora-multi)")
    parser.add_argument("--table", action="store_true", help="only write the table of the finished runs")
    args = parser.parse_args()
    size = tuple(int(x) for x in args.size.split(","))
    args.model_label = args.model or f"random GPT-2 (hidden {size[0]}, {size[1]} blocks)"
    args.model = args.model or random_gpt2(args.out / "models" / f"gpt2-h{size[0]}-l{size[1]}", size)
    only = {x for x in args.only.split(",") if x}
    data = {task: banking77_data(args) if task == "banking77" else copy_data(args) for task in TASKS}
    for task in TASKS if not args.table else []:
        untrained_scores(config(args, task, "lora", "multi", data[task]), args.out / task / "untrained.json")
    for task, method, schedule in [] if args.table else ORDER:
        name = f"{method}-{schedule}"
        if only and f"{task}/{name}" not in only:
            continue
        summary = run_or_resume(config(args, task, method, schedule, data[task]), args.out / task / name)
        print(f"{task} {name}: loss {summary['final_eval_loss']:.3f} em {summary['final_exact_match']:.3f} "
              f"rouge_l {summary['final_rouge_l']:.3f} wall {summary['wall_s']:.0f}s", flush=True)
    text = table(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generative.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
