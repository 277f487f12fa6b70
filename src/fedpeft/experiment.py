"""Build an experiment from a config and run it: config -> data -> partition -> model -> method
-> federated rounds -> results with exact costs.

>>> from fedpeft.config import load_config
>>> summary = run_experiment(load_config("examples/quickstart.toml"), out="runs/quick")
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from rich.console import Console
from torch import nn

from fedpeft.config import DATA_LOCATION_KEYS, RESUMABLE_CHANGES, Config, DataConfig, apply_overrides, flatten_config
from fedpeft.data import (
    ClassificationData, EncodedSplit, InstructionData, absolute_path, encode, encode_instructions, label_histograms,
    load_data, load_instructions, partition, resolved_config,
)
from fedpeft.checkpoint import Checkpoint
from fedpeft.errors import ConfigError, FedPeftError, RunInterrupted, UpdateRejected
from fedpeft.federation.aggregate import validate_update
from fedpeft.federation.assignment import Assignment
from fedpeft.federation.attacks import AttackingTrainer, malicious_clients
from fedpeft.federation.client import ClientTrainer, evaluate
from fedpeft.federation.costs import (
    message_bytes,
    model_message_bytes,
    param_counts,
    secagg_update_bytes,
    train_state_bytes,
)
from fedpeft.federation.generative import eos_token_ids, evaluate_causal_lm
from fedpeft.federation.strategy import FedAvgStrategy
from fedpeft.methods import Method, NamedArrays, build_method, get_state, set_state
from fedpeft.privacy.client_level import LocalDPTrainer, plan_client_dp
from fedpeft.privacy.sample_level import SampleDPTrainer, plan_sample_dp
from fedpeft.models import Blocks, ModelInfo, apply_model_options, is_image_model, load_model, transformer_blocks
from fedpeft.provenance import git_commit, now_iso, versions
from fedpeft.results import RunDir, load_run_config
from fedpeft.runner import run_experiment  # noqa: F401 - the public entry point lives torch-free

if TYPE_CHECKING:
    from fedpeft.runtime.rounds import Clients



@dataclass
class Experiment:
    """Everything a runtime needs, built once from a :class:`Config`."""

    cfg: Config
    data: ClassificationData | InstructionData  # causal-lm: prompt/response pairs
    info: ModelInfo
    method: Method
    model: nn.Module  # the prepared model: backbone frozen as the method says
    names: list[str]  # exchanged parameter names
    train: EncodedSplit
    test: EncodedSplit
    parts: list[np.ndarray]  # row ids of each client
    trainer: ClientTrainer
    strategy: FedAvgStrategy
    processor: Any = None  # the tokenizer (text) or image processor (image) the data was encoded with
    attackers: list[int] = field(default_factory=list)  # [attack]: the malicious clients' ids
    budgets: Any = None  # [budgets]: each client's profile, k and fit (fedpeft.budgets.clients.BudgetPlan)
    sample_dp: Any = None  # [privacy] mode = "sample": its SampleDP (fedpeft.privacy.sample_level)
    eos_ids: list[int] = field(default_factory=list)  # causal-lm: the ids that end a response (first: appended)

    @property
    def assignment(self) -> Any:
        """The names each client trains and sends (:class:`~fedpeft.federation.assignment.Assignment`,
        from ``Method.assignment``), or None: every client trains every exchanged name."""
        return self.strategy.assignment

    def initial_state(self) -> dict[str, np.ndarray]:
        """The global state before round 1: the exchanged part (with FedEx-LoRA also the adapted
        layers' base weights, which the server corrects and clients only receive)."""
        fedex = self.strategy.fedex
        return get_state(self.model, self.names + (fedex.base_names if fedex else []))

    def evaluate(self, state: dict[str, np.ndarray]) -> dict[str, float]:
        """The global model's test metrics: accuracy, macro-F1, loss (classification); eval_loss,
        perplexity, exact_match, rouge_l, loss (causal-lm, :mod:`fedpeft.federation.generative`)."""
        return self.evaluate_and_sample(state)[0]

    def evaluate_and_sample(self, state: dict[str, np.ndarray]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """:meth:`evaluate` and, for causal-lm, the first ``task.saved_generations`` generations
        (prompt, reference, generation, scores); none for classification."""
        set_state(self.model, state)
        fed, task = self.cfg.federation, self.cfg.task
        if not task.generative:
            return evaluate(self.model, self.test, fed.eval_batch_size, self.data.num_labels), []
        metrics, generations = evaluate_causal_lm(
            self.model, self.test, self.data.test["response"], self.processor, fed.eval_batch_size, self.eos_ids,
            task.generation("max_new_tokens"), task.generation("generation_samples"))
        return metrics, generations[:task.generation("saved_generations")]

    def static_summary(self) -> dict[str, Any]:
        trainable, total = param_counts(self.model)
        state = get_state(self.model, self.names)  # what a client sends
        copies = 2 if self.cfg.federation.scaffold else 1  # SCAFFOLD: c down, delta_c_i up as well
        dtype = self.cfg.federation.exchange_dtype  # every floating value of a message at its size
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
            **({"task": "causal-lm", "data_format": self.data.format} if self.cfg.task.generative else {}),
            "trainable_params": trainable,
            "total_params": total,
            "exchanged_params": int(sum(a.size for a in state.values())),
            # a client that trains every exchanged name; with an assignment (layers, heterogeneous k)
            # the largest update: the rows have each client's, the summary their mean
            # (secure aggregation: the masked vector, 64 bits a value, whatever the exchange dtype)
            "bytes_per_client_update": (secagg_update_bytes(state) if self.cfg.privacy.secure_aggregation
                                        else copies * message_bytes(state, dtype)),
            # the global state (FedEx-LoRA: at most, with the dense base weights; rows have each client's) + c
            "bytes_per_client_download": message_bytes(self.initial_state(), dtype) + (copies - 1) * message_bytes(state, dtype),
            "full_model_bytes_per_message": model_message_bytes(self.model, dtype),
            "model_dtype": self.cfg.model.dtype,
            "exchange_dtype": dtype,
            "client_train_state_bytes": train_state_bytes(self.model, self.cfg.federation.optimizer,
                                                          self.cfg.federation.scaffold),
            **self.predicted_costs(),
            **self.budget_summary(),
            **self.privacy_summary(),
        }

    def privacy_summary(self) -> dict[str, Any]:
        """``[privacy]`` in the summary: the mode, ``delta``, ``noise_multiplier`` (None without
        privacy), the clip; ``epsilon`` is filled from the rows (:func:`fedpeft.history.summarize`)."""
        server = self.strategy.privacy
        if self.sample_dp is not None:  # epsilon: the largest client's, from the rows (fedpeft.history.summarize)
            return {**self.sample_dp.summary(), "epsilon": 0.0}
        if server is None:
            return {"privacy": "none", "epsilon": None, "delta": None, "noise_multiplier": None}
        return {**server.dp.summary(), "epsilon": 0.0}

    def budget_summary(self) -> dict[str, Any]:
        """``[budgets]`` in the summary: the infeasible clients and the mean depth (the per-client
        facts are in ``budgets.json``); empty without budgets."""
        if self.budgets is None:
            return {}
        plan = self.budgets.as_json()
        return {"budgets": {"clients_infeasible": plan["clients_infeasible"], "mean_k": plan["mean_k"],
                            "max_k": plan["max_k"], "profiles": sorted({c["profile"] for c in plan["clients"]})}}

    def predicted_costs(self) -> dict[str, Any]:
        """``client_peak_memory_mb`` and ``client_flops`` of the cost model
        (:func:`fedpeft.budgets.predict`) for the mean client, at ``federation.batch_size`` x
        ``model.max_length``. ``measured``: the peak of one real training step on that batch
        (:func:`fedpeft.budgets.measure_client`) with ``runtime.measure_memory``, else None.
        A model the shape-only trace cannot follow gets ``predicted: None`` and the reason."""
        from fedpeft.budgets import measure_client, predict

        mean_samples = max(1, round(float(np.mean([len(p) for p in self.parts])))) if self.parts else 1
        fedex = self.strategy.fedex
        try:
            costs = predict(self.model, self.info, self.cfg, self.names,
                            self.names + (fedex.base_names if fedex else []))
        except Exception as exc:  # a cost estimate must never stop a run
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return {"client_peak_memory_mb": {"predicted": None, "measured": None, "error": reason},
                    "client_flops": {"predicted_per_round": None, "error": reason}}
        mib = 2**20
        measured = measure_client(self.model, self.info, self.cfg).peak / mib if self.cfg.runtime.measure_memory else None
        describes = f"a client of {mean_samples} rows (the mean client) that trains every exchanged name"
        if self.budgets is not None:
            describes += (f" ({'k = ' + str(self.budgets.max_k) + ', ' if self.budgets.max_k is not None else ''}"
                          "the most any client trains); each client's own prediction under [budgets] is in budgets.json")
        return {
            "client_peak_memory_mb": {
                "describes": describes,
                "predicted": costs.memory.peak / mib,
                "measured": measured,
                "breakdown": {k: v / mib for k, v in costs.memory.as_dict().items()},
                "batch_size": costs.batch_size,
                "seq_len": costs.seq_len,
            },
            "client_flops": {
                "predicted_per_round": costs.flops_per_round(mean_samples),
                "per_sample": costs.flops_per_sample,
                "mean_client_samples": mean_samples,
                "describes": describes,
            },
        }

    def partition_report(self) -> dict[str, Any]:
        """Each client's samples and label histogram (causal-lm: the histogram over
        ``data.category_column``'s categories, none without one)."""
        labels = self.data.categories() if self.cfg.task.generative else self.train.labels.numpy()
        hist = label_histograms(labels, self.parts, self.data.num_labels) if self.data.num_labels else None
        return {
            "scheme": self.cfg.partition.scheme,
            "num_clients": len(self.parts),
            "label_names": self.data.label_names,
            "clients": [{"id": i, "samples": int(len(p)), **({} if hist is None else {"label_histogram": hist[i]})}
                        for i, p in enumerate(self.parts)],
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


def model_blocks(model: nn.Module, info: ModelInfo) -> Blocks | None:
    """The prepared model's block stack, or None when it has no single one (no frozen prefix then)."""
    try:
        return transformer_blocks(model, info.num_layers)
    except ConfigError:
        return None


def build_experiment(cfg: Config, with_test: bool = True) -> Experiment:
    """Load data and model, apply the method, encode and partition the data.

    ``exp.cfg`` is ``cfg`` resolved (:func:`fedpeft.data.resolved_config`): the data paths
    absolute and ``data.fingerprint`` set, so a run folder's config reloads the same data from any
    working directory, and says so when it cannot. ``with_test=False`` (a Flower client) skips
    encoding the test split (``exp.test`` is empty) and the ``[budgets]`` plan (the server plans
    who trains; the TRAIN message carries a client's names).

    Raises
    ------
    ConfigError
        For a ``model.name`` that cannot load (checked before any data is read) or that does not
        take the data's modality.
    DataError
        For unusable data, or data that is not the data ``cfg.data.fingerprint`` names.
    """
    seed = cfg.runtime.seed
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    generative = cfg.task.generative  # causal-lm: instruction data, a decoder with its LM head
    image_model = not generative and is_image_model(cfg.model.name)
    data = load_instructions(cfg.data, seed) if generative else load_data(cfg.data, seed)
    cfg = replace(cfg, data=resolved_config(cfg.data, data))
    if (data.modality == "image") != image_model:
        raise ConfigError(
            f"model.name {cfg.model.name!r} does not take {data.modality} data ({data.source})"
        )
    torch.manual_seed(seed)
    loaded = load_model(cfg.model, data.label_names, seed, task=cfg.task.kind)
    eos_ids = eos_token_ids(loaded.processor, loaded.model) if generative else []
    method = build_method(cfg.method.name, cfg.method.options)
    torch.manual_seed(seed)
    model = apply_model_options(method.prepare(loaded.model, loaded.info), cfg.model)  # dtype, checkpointing
    model.eval()
    names = method.exchanged_names(model)

    def encode_split(rows: Any) -> EncodedSplit:
        if generative:
            return encode_instructions(rows, loaded.processor, data.format, cfg.model.max_length, eos_ids[0],
                                       cfg.data.cache_dir)
        return encode(rows, loaded.processor, data.modality, cfg.model.max_length, cfg.data.cache_dir)

    train = encode_split(data.train)
    test = encode_split(data.test if with_test else data.test.select([]))
    parts = partition(data.categories() if generative else train.labels.numpy(), cfg.partition, seed)
    trainer = method.make_trainer(model, names, train, cfg.federation, seed, model_blocks(model, loaded.info),
                                  cfg.runtime.frozen_cache_mb)  # a ClientTrainer, or the method's own
    privacy = plan_client_dp(cfg)  # [privacy] (None: mode = "none")
    if privacy is not None and privacy.mode == "client-local":  # clients clip and noise their own delta
        trainer = LocalDPTrainer(trainer, privacy)
    sample_dp = plan_sample_dp(cfg, [len(p) for p in parts], [trainer.num_steps(len(p)) for p in parts]) \
        if cfg.privacy.mode == "sample" else None
    if sample_dp is not None:  # DP-SGD: per-sample clipped, noised gradients; a per-client accountant
        trainer = SampleDPTrainer(trainer, sample_dp)
    attackers = malicious_clients(cfg.attack, len(parts), seed)
    if attackers:  # the same wrapper wherever clients train: in process and on every Flower node
        trainer = AttackingTrainer(trainer, cfg.attack, attackers, data.num_labels, seed)
    fedex = method.residual_fold(model)
    budgets = _plan_budgets(cfg, method, model, loaded.info, names, fedex, parts) if with_test else None
    depths = {} if budgets is None or budgets.depths is None else {"depths": budgets.depths}
    assignment = method.assignment(model, len(parts), **depths)  # client -> its names (None: every client, every name)
    if assignment is not None:
        assignment.check(names)
        if budgets is not None:  # an infeasible client trains no block: its rows say k = None
            assignment = Assignment(assignment.names, {c: {**assignment.labels.get(c, {}), "k": None}
                                                       if c in budgets.infeasible else assignment.labels.get(c, {})
                                                       for c in range(len(parts))})
    strategy = FedAvgStrategy(cfg.federation, len(parts), seed, fedex, assignment,
                              budgets.infeasible if budgets is not None else None, privacy)
    return Experiment(cfg, data, loaded.info, method, model, names, train, test, parts, trainer, strategy,
                      loaded.processor, attackers, budgets, sample_dp, eos_ids)


def _plan_budgets(cfg: Config, method: Method, model: nn.Module, info: ModelInfo, names: list[str], fedex: Any,
                  parts: list[np.ndarray]) -> Any:
    """Each client's profile, depth and fit under ``[budgets]`` (:func:`fedpeft.budgets.clients.plan_clients`),
    or None without budgets."""
    if not cfg.budgets.profiles:
        return None
    from fedpeft.budgets.clients import plan_clients

    return plan_clients(method, model, info, cfg, names, [len(p) for p in parts],
                        names + (fedex.base_names if fedex else []))


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
    from fedpeft.history import off_schedule, summarize
    from fedpeft.runtime.rounds import run_rounds

    console = console or Console(stderr=True)
    run_dir = RunDir(out or cfg.output_dir())
    checkpoint, damaged = None, []
    if resume:
        saved, restored = load_run_config(run_dir)
        cfg = _resumable_config(cfg, saved, run_dir)
        checkpoint, damaged = run_dir.resume_point()
        for problem in filter(None, [restored, *damaged]):
            console.print(f"[yellow]warning:[/] {problem}", soft_wrap=True, highlight=False)
    elif run_dir.has_run():
        raise FedPeftError(
            f"{run_dir.path} already holds a run; continue it with --resume {run_dir.path} "
            "or choose another --out"
        )
    notice = cfg.method.inactive_notice()
    if notice:
        console.print(f"note: {notice}", soft_wrap=True, highlight=False)
    run_dir.create()
    cfg.save(run_dir.config)
    exp = build_experiment(cfg)
    cfg = exp.cfg
    cfg.save(run_dir.config)  # resolved: what a resumed run or `fedpeft eval` rebuilds
    run_dir.write_json(run_dir.partition, exp.partition_report())
    if exp.budgets is not None:  # a function of config, seed and partition: a resume rewrites the same
        run_dir.write_json(run_dir.path / "budgets.json", exp.budgets.as_json())
    state, rows, start = exp.initial_state(), [], 1
    if checkpoint is not None:
        state, rows, start = _restart_point(checkpoint, state, run_dir), checkpoint.rows, checkpoint.round + 1
        if checkpoint.server_state is not None:
            _load_strategy_state(exp, checkpoint)
        if rows is None:  # a fedpeft 0.1 checkpoint holds no rows: take them from metrics.jsonl
            rows = _legacy_rows(run_dir, checkpoint.round)
        rows, unevaluated = off_schedule(rows, cfg.federation.eval_every, cfg.federation.rounds)
        if unevaluated:  # federation.rounds extended: the old last round is not the last any more
            console.print(
                f"note: round {', '.join(map(str, unevaluated))} was evaluated as the last round; with "
                f"federation.rounds = {cfg.federation.rounds} it is off the federation.eval_every = "
                f"{cfg.federation.eval_every} schedule, so its row drops that evaluation, as an "
                "uninterrupted run never made it", soft_wrap=True, highlight=False)
    if resume:
        run_dir.write_metrics(rows)  # the checkpoint's rows; later rounds are recomputed
        where = f"resuming at round {start} of {cfg.federation.rounds}" if start <= cfg.federation.rounds else (
            f"all {cfg.federation.rounds} rounds are done; rewriting the summary and model")
        console.print(f"{run_dir.path}: {where}", soft_wrap=True, highlight=False)
    started = (checkpoint.extra.get("started_at") if checkpoint else None) or now_iso()
    static = {**exp.static_summary(), "status": "running", "started_at": started, "ended_at": None,
              "resumed_at": now_iso() if resume else None, "versions": versions(), "git_commit": git_commit()}
    run_dir.write_json(run_dir.summary, summarize(rows, static))
    try:
        if start <= cfg.federation.rounds:
            clients = make_clients(exp)
            if checkpoint is not None and cfg.federation.scaffold:
                restore_client_controls(exp, clients, checkpoint, console)
            if checkpoint is not None and exp.sample_dp is not None:
                restore_sample_accountant(exp, checkpoint)
            state = run_rounds(exp, clients, run_dir, state, rows, start, static, console)
        summary = {**summarize(rows, static), "status": "finished", "ended_at": now_iso()}
        if cfg.output.save_model:
            from fedpeft.export import export_model

            export_model(exp, state, run_dir.model, summary)
    except BaseException as exc:
        stopped = isinstance(exc, (RunInterrupted, KeyboardInterrupt))
        end = {"status": "interrupted" if stopped else "failed", "ended_at": now_iso()}
        if not stopped:
            end["error"] = f"{type(exc).__name__}: {exc}"
        run_dir.write_json(run_dir.summary, {**summarize(rows, static), **end})
        raise
    run_dir.write_json(run_dir.summary, summary)
    return summary


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, float]:
    """Rebuild a saved run from its folder and evaluate its last checkpointed global state.

    ``overrides`` (``section.key=value``) may change only what a resume may change, such as
    where the data now is.

    Raises
    ------
    FedPeftError
        For a folder that is no run, a run without a checkpoint, or a damaged checkpoint (naming
        the file and how to recompute it).
    """
    run = RunDir(run_dir)
    if not run.config.exists() and not run.checkpoint.is_dir():
        raise FedPeftError(f"{run.path}: no config.toml; not a fedpeft run folder")
    cfg, _ = load_run_config(run)
    if overrides:
        cfg = _resumable_config(Config.from_dict(apply_overrides(cfg.to_dict(), overrides)), cfg, run)
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        raise FedPeftError(f"{run.path}: no checkpoint to evaluate (the run finished no round)")
    exp = build_experiment(cfg)
    state = _restart_point(checkpoint, exp.initial_state(), run)
    return {"round": checkpoint.round, **exp.evaluate(state)}


def _restart_point(checkpoint: Checkpoint, state: NamedArrays, run_dir: RunDir) -> NamedArrays:
    """The checkpoint's state after checking it fits the model's exchanged ``state`` exactly."""
    try:
        validate_update(checkpoint.state, state)
    except UpdateRejected as exc:
        raise FedPeftError(f"{checkpoint.path}: the saved state does not fit this run's model: {exc}") from None
    return checkpoint.state


def _load_strategy_state(exp: Experiment, checkpoint: Checkpoint) -> None:
    try:
        exp.strategy.load_state_dict(checkpoint.server_state)
    except ValueError as exc:
        fed = exp.cfg.federation
        raise FedPeftError(
            f"{checkpoint.path}: its server state does not fit federation.server_optimizer = "
            f"{fed.server_optimizer!r}, federation.scaffold = {str(fed.scaffold).lower()}: {exc}"
        ) from None


def restore_client_controls(exp: Experiment, clients: "Clients", checkpoint: Checkpoint, console: Console) -> None:
    """Give SCAFFOLD's client control variates back to a resumed run's clients, or restart them.

    The in-process runtime keeps every ``c_i`` and its checkpoint holds them: they are restored
    and the run continues bit-identically. A Flower runtime's ``c_i`` lived in its SuperNodes'
    ``context.state``, which belongs to one Flower run: a resumed run is a new one, so every
    ``c_i`` is 0 again. SCAFFOLD needs ``c`` to be the mean of the ``c_i`` (otherwise every
    client's correction ``c - c_i`` drifts the same way), so the server's ``c`` restarts at 0
    too, said here; the global state and the server optimizer continue from the checkpoint.
    """
    try:
        restored = clients.load_client_state(checkpoint.client_state)
    except ValueError as exc:
        raise FedPeftError(f"{checkpoint.path}: its client control variates do not load: {exc}") from None
    if not restored:
        exp.strategy.scaffold.reset()
        console.print(
            f"[yellow]warning:[/] SCAFFOLD: the clients' control variates c_i lived on the SuperNodes of the "
            f"interrupted Flower run and are gone (node state lasts one Flower run); every c_i and the "
            f"server's c restart at 0 from round {checkpoint.round + 1}, so this run is not bit-identical "
            "to an uninterrupted one", soft_wrap=True, highlight=False,
        )


def restore_sample_accountant(exp: Experiment, checkpoint: Checkpoint) -> None:
    """On resume with ``privacy.mode = "sample"``: every client's DP-SGD accountant (steps, ``q``)
    from the checkpoint's ``clients.safetensors``, so the epsilon continues where it stopped."""
    if checkpoint.client_state is None:
        raise FedPeftError(f"{checkpoint.path}: holds no per-client privacy accountant (clients.safetensors) "
                           'although privacy.mode = "sample"')
    try:
        exp.trainer.sample_accountant.load_state_dict(checkpoint.client_state)
    except ValueError as exc:
        raise FedPeftError(f"{checkpoint.path}: its per-client privacy accountant does not load: {exc}") from None


def _legacy_rows(run_dir: RunDir, done: int) -> list[dict[str, Any]]:
    rows = [r for r in run_dir.read_metrics() if r["round"] <= done]
    if [r["round"] for r in rows] != list(range(1, done + 1)):
        raise FedPeftError(
            f"{run_dir.metrics}: lacks rows of rounds 1..{done}, and this run's checkpoint (fedpeft 0.1) "
            "holds no copy of them: start the run again in a new folder"
        )
    return rows


def _resumable_config(cfg: Config, saved: Config, run_dir: RunDir) -> Config:
    """The ``saved`` config of ``run_dir``, after checking ``cfg`` asks for the same experiment.

    A ``data.fingerprint`` that ``cfg`` leaves out is the saved one. A data location that ``cfg``
    sets (:data:`~fedpeft.config.DATA_LOCATION_KEYS`) and that is not the saved one as an
    absolute path replaces it: the saved fingerprint then proves that it holds the same data.
    """
    new, old = flatten_config(cfg.to_dict()), flatten_config(saved.to_dict())
    new.setdefault("data.fingerprint", old.get("data.fingerprint"))
    changed = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise FedPeftError(
            f"--resume {run_dir.path}: the config differs from the saved one in {', '.join(changed)}"
        )
    _move_data(saved.data, cfg.data, run_dir)
    saved.federation.rounds = cfg.federation.rounds
    saved.runtime.progress = cfg.runtime.progress
    saved.runtime.threads = cfg.runtime.threads
    saved.runtime.frozen_cache_mb = cfg.runtime.frozen_cache_mb
    return saved


def _move_data(saved: DataConfig, given: DataConfig, run_dir: RunDir) -> None:
    """Set in ``saved`` the data locations ``given`` moves (as absolute paths).

    Raises
    ------
    FedPeftError
        When the data itself would move but ``saved`` has no fingerprint to check it with.
    """
    moved = {}
    for key in (location.partition(".")[2] for location in DATA_LOCATION_KEYS):
        path = absolute_path(getattr(given, key))
        if path is not None and path != absolute_path(getattr(saved, key)):
            moved[key] = path
    if not saved.fingerprint and set(moved) - {"cache_dir"}:
        raise FedPeftError(
            f"--resume {run_dir.path}: {', '.join(f'data.{k}' for k in moved)} differ from the saved "
            "config, which has no data.fingerprint to check the data with: restore the saved location"
        )
    for key, path in moved.items():
        setattr(saved, key, path)
