"""Build an experiment from a config and run it: config -> data -> partition -> model -> method
-> federated rounds -> results with exact costs.

>>> from fedpeft.config import load_config
>>> summary = run_experiment(load_config("examples/quickstart.toml"), out="runs/quick")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from rich.console import Console
from torch import nn

from fedpeft.config import Config, flatten_config, load_config
from fedpeft.data import ClassificationData, EncodedSplit, encode, label_histograms, load_data, partition
from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.federation.client import ClientTrainer, evaluate
from fedpeft.federation.costs import message_bytes, model_message_bytes, param_counts, train_state_bytes
from fedpeft.federation.strategy import FedAvgStrategy
from fedpeft.methods import Method, build_method, get_state, set_state
from fedpeft.models import ModelInfo, is_image_model, load_model
from fedpeft.results import RunDir
from fedpeft.runner import run_experiment  # noqa: F401 - the public entry point lives torch-free

if TYPE_CHECKING:
    from fedpeft.runtime.rounds import Clients

# config keys that may differ between a run and its resumption
RESUMABLE_CHANGES = {"federation.rounds", "runtime.progress", "runtime.threads", "output.dir"}


@dataclass
class Experiment:
    """Everything a runtime needs, built once from a :class:`Config`."""

    cfg: Config
    data: ClassificationData
    info: ModelInfo
    method: Method
    model: nn.Module  # the prepared model: backbone frozen as the method says
    names: list[str]  # exchanged parameter names
    train: EncodedSplit
    test: EncodedSplit
    parts: list[np.ndarray]  # row ids of each client
    trainer: ClientTrainer
    strategy: FedAvgStrategy

    def initial_state(self) -> dict[str, np.ndarray]:
        return get_state(self.model, self.names)

    def evaluate(self, state: dict[str, np.ndarray]) -> dict[str, float]:
        set_state(self.model, state)
        return evaluate(self.model, self.test, self.cfg.federation.eval_batch_size, self.data.num_labels)

    def static_summary(self) -> dict[str, Any]:
        trainable, total = param_counts(self.model)
        state = self.initial_state()
        return {
            "method": self.cfg.method.name,
            "model": self.cfg.model.name,
            "data": self.data.source,
            "runtime": self.cfg.runtime.kind,
            "seed": self.cfg.runtime.seed,
            "rounds": self.cfg.federation.rounds,
            "num_clients": len(self.parts),
            "clients_per_round": self.strategy.clients_per_round(),
            "train_samples": len(self.train),
            "test_samples": len(self.test),
            "num_labels": self.data.num_labels,
            "trainable_params": trainable,
            "total_params": total,
            "exchanged_params": int(sum(a.size for a in state.values())),
            "bytes_per_client_update": message_bytes(state),
            "bytes_per_client_download": message_bytes(state),
            "full_model_bytes_per_message": model_message_bytes(self.model),
            "client_train_state_bytes": train_state_bytes(self.model, self.cfg.federation.optimizer),
        }

    def partition_report(self) -> dict[str, Any]:
        labels = self.train.labels.numpy()
        hist = label_histograms(labels, self.parts, self.data.num_labels)
        return {
            "scheme": self.cfg.partition.scheme,
            "num_clients": len(self.parts),
            "label_names": self.data.label_names,
            "clients": [{"id": i, "samples": int(len(p)), "label_histogram": h} for i, (p, h) in enumerate(zip(self.parts, hist))],
        }


PRELOAD = (  # imported lazily by a first build: ~5 s on this machine's CPUs, mostly transformers
    "transformers.activations", "transformers.models.bert.modeling_bert", "transformers.models.vit.modeling_vit",
    "transformers.models.gpt2.modeling_gpt2", "transformers.models.llama.modeling_llama", "peft",
    "flwr_datasets.partitioner",
)


def preload() -> None:
    """Import now what building an experiment would import on first use (:data:`PRELOAD`), so a
    long-lived process (a Flower worker) pays it when it starts, not in its first run."""
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)


def build_experiment(cfg: Config, with_test: bool = True) -> Experiment:
    """Load data and model, apply the method, encode and partition the data.

    ``with_test=False`` (a Flower client) skips encoding the test split: ``exp.test`` is empty.
    """
    seed = cfg.runtime.seed
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    data = load_data(cfg.data, seed)
    if (data.modality == "image") != is_image_model(cfg.model.name):
        raise ConfigError(
            f"model.name {cfg.model.name!r} does not take {data.modality} data ({data.source})"
        )
    torch.manual_seed(seed)
    loaded = load_model(cfg.model, data.label_names, seed)
    method = build_method(cfg.method.name, cfg.method.options)
    torch.manual_seed(seed)
    model = method.prepare(loaded.model, loaded.info)
    model.eval()
    names = method.exchanged_names(model)
    train = encode(data.train, loaded.processor, data.modality, cfg.model.max_length, cfg.data.cache_dir)
    test_rows = data.test if with_test else data.test.select([])
    test = encode(test_rows, loaded.processor, data.modality, cfg.model.max_length, cfg.data.cache_dir)
    parts = partition(train.labels.numpy(), cfg.partition, seed)
    trainer = ClientTrainer(model, names, train, cfg.federation, seed)
    strategy = FedAvgStrategy(cfg.federation, len(parts), seed)
    return Experiment(cfg, data, loaded.info, method, model, names, train, test, parts, trainer, strategy)


def run_with_clients(
    cfg: Config,
    out: str | Path | None,
    resume: bool,
    console: Console | None,
    make_clients: Callable[[Experiment], Clients],
) -> dict[str, Any]:
    """Run (or resume) an experiment whose clients are reached through ``make_clients(exp)``.

    The run folder, resume rules, round loop, summary and model export are the same for every
    runtime; only the transport to the clients differs.
    """
    from fedpeft.history import summarize
    from fedpeft.runtime.rounds import run_rounds

    run_dir = RunDir(out or cfg.output_dir())
    if resume:
        cfg = _resumable_config(cfg, run_dir)
    elif run_dir.has_run():
        raise FedPeftError(
            f"{run_dir.path} already holds a run; continue it with --resume {run_dir.path} "
            "or choose another --out"
        )
    run_dir.create()
    cfg.save(run_dir.config)
    exp = build_experiment(cfg)
    run_dir.write_json(run_dir.partition, exp.partition_report())
    state, rows, start = exp.initial_state(), [], 1
    checkpoint = run_dir.load_checkpoint() if resume else None
    if checkpoint is not None:
        done, saved, _ = checkpoint
        if set(saved) != set(state):
            raise FedPeftError(f"{run_dir.checkpoint}: checkpoint names do not match the method's exchanged state")
        state, start = saved, done + 1
        rows = run_dir.keep_metrics_upto(done)
    elif resume:
        rows = run_dir.keep_metrics_upto(0)
    static = exp.static_summary()
    if start <= cfg.federation.rounds:
        state = run_rounds(exp, make_clients(exp), run_dir, state, rows, start, static, console)
    summary = summarize(rows, static)
    if cfg.output.save_model:
        set_state(exp.model, state)
        exp.method.save_pretrained(exp.model, run_dir.model, state)
    run_dir.write_json(run_dir.summary, summary)
    return summary


def evaluate_run(run_dir: str | Path) -> dict[str, float]:
    """Rebuild a saved run from its folder and evaluate its last checkpointed global state."""
    run = RunDir(run_dir)
    if not run.config.exists():
        raise FedPeftError(f"{run.path}: no config.toml; not a fedpeft run folder")
    cfg = load_config(run.config)
    checkpoint = run.load_checkpoint()
    if checkpoint is None:
        raise FedPeftError(f"{run.path}: no checkpoint to evaluate (the run finished no round)")
    done, state, _ = checkpoint
    exp = build_experiment(cfg)
    return {"round": done, **exp.evaluate(state)}


def _resumable_config(cfg: Config, run_dir: RunDir) -> Config:
    """The saved config of ``run_dir``, after checking ``cfg`` asks for the same experiment."""
    if not run_dir.config.exists():
        raise FedPeftError(f"--resume {run_dir.path}: no config.toml there; nothing to resume")
    saved = load_config(run_dir.config)
    new, old = flatten_config(cfg.to_dict()), flatten_config(saved.to_dict())
    changed = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise FedPeftError(
            f"--resume {run_dir.path}: the config differs from the saved one in {', '.join(changed)}"
        )
    saved.federation.rounds = cfg.federation.rounds
    saved.runtime.progress = cfg.runtime.progress
    saved.runtime.threads = cfg.runtime.threads
    return saved
