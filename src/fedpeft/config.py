"""Typed, validated experiment configuration, read from TOML.

A config has the sections ``model``, ``task``, ``data``, ``partition``, ``method``, ``federation``,
``runtime``, ``output``, ``attack``, ``budgets`` and ``privacy``; each is a dataclass below. Every key is checked where the config is
built: unknown keys are rejected with the list of valid ones, wrong types and out-of-range values
name the key. ``method`` holds ``name`` plus the options of that method (see
:mod:`fedpeft.methods`), so each method validates its own options.

Example
-------
>>> cfg = load_config("examples/quickstart.toml", overrides=["federation.rounds=3"])
>>> cfg.federation.rounds
3
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from fedpeft.errors import ConfigError

if typing.TYPE_CHECKING:
    from fedpeft.federation.server_opt import ServerOptimizer


@dataclass
class ModelConfig:
    """Which pre-trained model to fine-tune.

    ``name`` is a Hugging Face hub id, a local folder, or an alias: ``minilm`` (the packaged,
    offline all-MiniLM-L6-v2) or ``tiny-bert``/``tiny-gpt2``/``tiny-llama``/``tiny-vit``
    (small randomly initialised models for tests and smoke runs).
    """

    name: str = "minilm"  # hub id, local folder, or alias (minilm, tiny-*)
    max_length: int = 64  # tokens per text sample (longer texts are truncated)
    image_size: int | None = None  # resize images to this (default: the model's own size)
    dtype: Literal["float32", "bfloat16"] = "float32"  # every parameter (frozen and trained) in this dtype
    gradient_checkpointing: bool = False  # recompute each block's activations in backward (less memory, more FLOPs)

    def validate(self) -> None:
        _check(self.max_length >= 2, "model.max_length", "must be >= 2")
        _check(self.image_size is None or self.image_size >= 8, "model.image_size", "must be >= 8")


TASK_KINDS = ("classification", "causal-lm")
GENERATION_DEFAULTS = {"max_new_tokens": 32, "generation_samples": 32, "saved_generations": 5}
# data keys that only instruction data (task.kind = "causal-lm") reads, and classification's own
INSTRUCTION_DATA_KEYS = ("prompt_column", "response_column", "format", "category_column")
CLASSIFICATION_DATA_KEYS = ("text_column", "label_column", "image_column")
ENCODER_ALIASES = ("minilm", "tiny-bert", "tiny-vit")  # no causal LM for these aliases


@dataclass
class TaskConfig:
    """What the model learns: ``classification`` (a head over the labels, the default) or
    ``causal-lm`` (instruction tuning of a decoder: the loss on the response tokens, evaluated by
    token loss, perplexity and greedy generation; :mod:`fedpeft.data.instructions`,
    :mod:`fedpeft.federation.generative`). The generation keys apply to ``causal-lm`` only.
    """

    kind: Literal["classification", "causal-lm"] = "classification"  # classification | causal-lm
    max_new_tokens: int | None = None  # causal-lm: tokens generated per held-out prompt (unset: 32)
    generation_samples: int | None = None  # causal-lm: held-out rows generated on per evaluation (unset: 32; 0: none)
    saved_generations: int | None = None  # causal-lm: of those, written to DIR/generations/round_N.jsonl (unset: 5)

    def validate(self) -> None:
        given = [k for k in GENERATION_DEFAULTS if getattr(self, k) is not None]
        _check(self.kind == "causal-lm" or not given, f"task.{given[0] if given else ''}",
               f'is only used with task.kind = "causal-lm" (it is "{self.kind}")')
        _check(self.max_new_tokens is None or self.max_new_tokens >= 1, "task.max_new_tokens", "must be >= 1")
        for key in ("generation_samples", "saved_generations"):
            _check(getattr(self, key) is None or getattr(self, key) >= 0, f"task.{key}", "must be >= 0")

    @property
    def generative(self) -> bool:
        return self.kind == "causal-lm"

    def generation(self, key: str) -> int:
        """``max_new_tokens``, ``generation_samples`` or ``saved_generations``, or its default."""
        value = getattr(self, key)
        return GENERATION_DEFAULTS[key] if value is None else value

    def check_sections(self, cfg: "Config") -> None:
        """The other sections against the task: instruction-data keys only with ``causal-lm``, and
        what ``causal-lm`` does not support yet refused, naming the key."""
        data = cfg.data
        if not self.generative:
            given = [k for k in INSTRUCTION_DATA_KEYS if getattr(data, k) is not None]
            _check(not given, f"data.{given[0] if given else ''}",
                   'is read for instruction data only: set task.kind = "causal-lm" (or remove it)')
            return
        from fedpeft.methods import get_method_class

        given = [k for k in CLASSIFICATION_DATA_KEYS if getattr(data, k) is not None]
        _check(not given, f"data.{given[0] if given else ''}",
               'is a classification key; with task.kind = "causal-lm" give data.prompt_column and '
               'data.response_column (data.format = "columns"), or data.format = "alpaca" / "chat"')
        fmt = data.format or "columns"
        for key in ("prompt_column", "response_column"):
            _check(getattr(data, key) is None or fmt == "columns", f"data.{key}",
                   f'is only read with data.format = "columns" (it is "{fmt}": its columns have fixed names)')
        _check(cfg.model.name not in ENCODER_ALIASES, "model.name",
               f'"{cfg.model.name}" has no causal LM (task.kind = "causal-lm" needs a decoder: tiny-gpt2, '
               "tiny-llama, or a hub id / folder of a GPT-2, LLaMA, Qwen, Mistral ... model)")
        _check(cfg.model.max_length >= 4, "model.max_length",
               'must be >= 4 with task.kind = "causal-lm" (room for a prompt token, a response token and EOS)')
        refused = get_method_class(cfg.method.name).causal_lm_refused
        _check(refused is None, "method.name", f'"{cfg.method.name}" with task.kind = "causal-lm": {refused}')
        _check(cfg.partition.scheme == "iid" or data.category_column is not None, "partition.scheme",
               f'"{cfg.partition.scheme}" with task.kind = "causal-lm" skews clients over a category: set '
               'data.category_column (e.g. a task or domain column), or use scheme = "iid"')
        _check(cfg.federation.label_skew == "none", "federation.label_skew",
               f'"{cfg.federation.label_skew}" corrects a classifier\'s logits by label counts; with task.kind = '
               '"causal-lm" there are no labels: use label_skew = "none"')
        _check(cfg.attack.kind != "label_flip", "attack.kind",
               '"label_flip" flips class labels; with task.kind = "causal-lm" there are none: use "scale", '
               '"sign_flip" or "gaussian"')


@dataclass
class DataConfig:
    """Where the labelled data comes from.

    ``name`` is a known dataset (see ``fedpeft datasets``) looked up in ``data_dir`` first and on
    the Hugging Face hub when that folder is absent. ``train``/``test`` are local CSV, JSON(L)
    or Parquet files, or image folders, and take precedence over ``name``.
    """

    name: str | None = None  # a known dataset (fedpeft datasets) or a hub id
    train: str | None = None  # CSV / JSON(L) / Parquet file or image folder; overrides name
    test: str | None = None  # required with train
    data_dir: str | None = None  # default: $FEDPEFT_DATA_DIR, then ./data
    text_column: str | None = None  # default: the dataset's own, else "text"
    label_column: str | None = None  # default: the dataset's own, else "label"
    image_column: str | None = None  # default: "image" or "img" for image data
    max_train_samples: int | None = None  # seeded shuffle, then the first N rows
    max_test_samples: int | None = None  # seeded shuffle, then the first N rows
    validation_fraction: float | None = None  # evaluate on this seeded share of the train rows; test unread
    cache_dir: str | None = None  # tokenized-data cache; default ~/.cache/fedpeft
    fingerprint: str | None = None  # set by a run: hash of the data loaded; checked when set
    # instruction data (task.kind = "causal-lm"; fedpeft.data.instructions)
    format: Literal["columns", "alpaca", "chat"] | None = None  # causal-lm: columns (unset), alpaca or chat
    prompt_column: str | None = None  # causal-lm, format "columns": the prompt (default "prompt")
    response_column: str | None = None  # causal-lm, format "columns": the response (default "response")
    category_column: str | None = None  # causal-lm: a task / domain column that dirichlet and shards skew over

    def validate(self) -> None:
        _check(
            self.name is not None or self.train is not None,
            "data",
            "set data.name (a known dataset) or data.train (a file path)",
        )
        for key in ("max_train_samples", "max_test_samples"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"data.{key}", "must be >= 1")
        fraction = self.validation_fraction
        _check(fraction is None or 0 < fraction < 1, "data.validation_fraction", "must be in (0, 1)")


@dataclass
class PartitionConfig:
    """How training samples are spread over clients (every sample goes to exactly one client)."""

    scheme: Literal["iid", "dirichlet", "shards"] = "iid"  # label distribution over clients
    num_clients: int = 10  # simulated clients (every training row goes to exactly one)
    alpha: float = 0.5  # Dirichlet concentration: smaller -> more label skew
    min_samples: int = 1  # dirichlet: resample until every client has at least this many
    shards_per_client: int = 2  # shards: classes-ish per client (pathological non-IID)

    def validate(self) -> None:
        _check(self.num_clients >= 1, "partition.num_clients", "must be >= 1")
        _check(self.alpha > 0, "partition.alpha", "must be > 0")
        _check(self.min_samples >= 0, "partition.min_samples", "must be >= 0")
        _check(self.shards_per_client >= 1, "partition.shards_per_client", "must be >= 1")


@dataclass
class MethodConfig:
    """The fine-tuning method by registered name, and that method's own options.

    Keys that belong to another registered method (e.g. ``r`` when ``name = "head"``) are kept
    but ignored, so one config can be swept over ``method.name``; keys no method knows are an
    error.
    """

    name: str = "lora"
    options: Any = None  # the method's Options dataclass instance (filled by from_table)
    inactive: dict[str, Any] = field(default_factory=dict)  # other methods' keys, kept verbatim

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> "MethodConfig":
        from fedpeft.methods import get_method_class, method_names

        table = dict(table)
        name = table.pop("name", cls.name)
        if not isinstance(name, str):
            raise ConfigError(f"method.name: expected a string, got {name!r}")
        try:
            method_cls = get_method_class(name)
        except KeyError:
            raise ConfigError(
                f"method.name: unknown method {name!r}; known methods: {', '.join(method_names())}"
            ) from None
        own = {f.name for f in dataclasses.fields(method_cls.Options)}
        others = {
            f.name
            for other in method_names()
            if other != name
            for f in dataclasses.fields(get_method_class(other).Options)
        }
        inactive = {k: v for k, v in table.items() if k not in own and k in others}
        active = {k: v for k, v in table.items() if k not in inactive}
        options = _build(method_cls.Options, active, "method", extra_valid=["name"])
        return cls(name=name, options=options, inactive=inactive)

    def to_table(self) -> dict[str, Any]:
        return {"name": self.name, **_to_table(self.options), **self.inactive}

    def inactive_notice(self) -> str | None:
        """One line naming the kept but ignored keys of other methods, or None if there are none.

        Example: ``"method.r, method.alpha belong to lora, not to head: ignored"``.
        """
        if not self.inactive:
            return None
        from fedpeft.methods import get_method_class, method_names

        owners = sorted(
            other
            for other in method_names()
            if any(f.name in self.inactive for f in dataclasses.fields(get_method_class(other).Options))
        )
        keys = ", ".join(f"method.{k}" for k in self.inactive)
        verb = "belong" if len(self.inactive) > 1 else "belongs"
        return f"{keys} {verb} to {' and '.join(owners)}, not to {self.name}: ignored"


# federation.<key> -> the server optimizer's argument (fedpeft.federation.server_opt)
SERVER_OPTIMIZER_KEYS = {"server_lr": "server_lr", "server_momentum": "server_momentum",
                         "server_beta_1": "beta_1", "server_beta_2": "beta_2", "server_tau": "tau"}


@dataclass
class FederationConfig:
    """Federated rounds, client sampling and instability, and local training."""

    rounds: int = 5  # aggregation rounds (1 = one-shot federated fine-tuning)
    clients_per_round: int | float = 1.0  # int: a count; float in (0, 1]: a fraction of clients
    min_clients: int = 1  # a round aggregates only if at least this many clients reported
    dropout: float = 0.0  # probability that a selected client fails to report
    local_epochs: float = 1.0  # passes over a client's rows per round (fractions allowed)
    local_steps: int | None = None  # if set, overrides local_epochs (batches per client-round)
    batch_size: int = 16  # local training batch size
    optimizer: Literal["adamw", "sgd"] = "adamw"  # a fresh optimizer per client and round
    lr: float = 5e-3  # local learning rate (PEFT methods like 1e-3..1e-2; full ~1e-4)
    weight_decay: float = 0.0  # decoupled (AdamW) or L2 (SGD)
    momentum: float = 0.9  # sgd only
    max_grad_norm: float = 1.0  # clip the trainable part's gradient norm; 0 disables clipping
    eval_every: int = 1  # evaluate the global model every N rounds (and after the last)
    eval_batch_size: int = 64  # batch size of global evaluation
    checkpoint_every: int = 1  # write a resumable checkpoint every N rounds
    # server optimizer after FedAvg (Reddi et al. 2021); unset options take Flower's defaults
    server_optimizer: Literal["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"] = "fedavg"
    server_lr: float | None = None  # Flower's eta: 1 (fedavg, fedavgm), 0.1 (fedadagrad, fedadam), 0.01 (fedyogi)
    server_momentum: float | None = None  # fedavgm only: server momentum (Flower's default 0 = FedAvg)
    server_beta_1: float | None = None  # fedadam, fedyogi: 0.9; fedadagrad: 0 (Flower has none)
    server_beta_2: float | None = None  # fedadam, fedyogi: 0.99
    server_tau: float | None = None  # fedadagrad, fedadam, fedyogi: adaptivity 1e-3
    # client-side corrections (issue 12)
    proximal_mu: float = 0.0  # FedProx: + mu/2 ||w - w_global||^2 on the trainable part; 0 = off
    label_skew: Literal["none", "fedlc", "fedrs"] = "none"  # loss from the client's own label counts
    fedlc_tau: float | None = None  # fedlc only: calibration strength tau > 0 (unset: 1.0)
    fedrs_alpha: float | None = None  # fedrs only: absent classes' logit scale in (0, 1] (unset: 0.5)
    scaffold: bool = False  # SCAFFOLD control variates c, c_i (c_i: mean local gradient); doubles the bytes both ways
    # robust aggregation over client deltas (issue 13; fedpeft.federation.robust)
    aggregator: Literal["mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan"] = "mean"
    trim_fraction: float | None = None  # trimmed_mean only: share cut at each end per coordinate (unset: 0.2, Flower's beta)
    byzantine: int | None = None  # krum, multikrum, bulyan: malicious clients per round f the rule tolerates (unset: 0)
    max_update_norm: float | None = None  # norm bounding: every client delta clipped to this L2 norm first
    # what crosses between server and clients (fedpeft.federation.precision); the server keeps float32
    exchange_dtype: Literal["float32", "bfloat16"] = "float32"  # every floating value of a message, down and up

    def validate(self) -> None:
        _check(self.rounds >= 1, "federation.rounds", "must be >= 1")
        cpr = self.clients_per_round
        if isinstance(cpr, float):
            _check(0 < cpr <= 1, "federation.clients_per_round", "a fraction must be in (0, 1]")
        else:
            _check(cpr >= 1, "federation.clients_per_round", "a count must be >= 1")
        _check(self.min_clients >= 1, "federation.min_clients", "must be >= 1")
        _check(0 <= self.dropout < 1, "federation.dropout", "must be in [0, 1)")
        _check(self.local_epochs > 0, "federation.local_epochs", "must be > 0")
        _check(self.local_steps is None or self.local_steps >= 1, "federation.local_steps", "must be >= 1")
        _check(self.batch_size >= 1, "federation.batch_size", "must be >= 1")
        _check(self.lr > 0, "federation.lr", "must be > 0")
        _check(self.weight_decay >= 0, "federation.weight_decay", "must be >= 0")
        _check(self.max_grad_norm >= 0, "federation.max_grad_norm", "must be >= 0 (0 disables clipping)")
        _check(self.eval_every >= 1, "federation.eval_every", "must be >= 1")
        _check(self.eval_batch_size >= 1, "federation.eval_batch_size", "must be >= 1")
        _check(self.checkpoint_every >= 1, "federation.checkpoint_every", "must be >= 1")
        self.build_server_optimizer()  # its options' names and ranges
        self._validate_client_corrections()
        self._validate_aggregator()

    def _validate_aggregator(self) -> None:
        """Robust aggregation (issue 13): options of the chosen rule only, in range; SCAFFOLD's
        control variates are averaged over every client, so they do not combine with a rule."""
        _check(self.trim_fraction is None or self.aggregator == "trimmed_mean", "federation.trim_fraction",
               f'is only used with federation.aggregator = "trimmed_mean" (it is "{self.aggregator}")')
        _check(self.byzantine is None or self.aggregator in ("krum", "multikrum", "bulyan"), "federation.byzantine",
               f'is only used with federation.aggregator = "krum", "multikrum" or "bulyan" (it is "{self.aggregator}")')
        _check(self.trim_fraction is None or 0 <= self.trim_fraction < 0.5, "federation.trim_fraction", "must be in [0, 0.5)")
        _check(self.byzantine is None or self.byzantine >= 0, "federation.byzantine", "must be >= 0")
        _check(self.max_update_norm is None or (math.isfinite(self.max_update_norm) and self.max_update_norm > 0),
               "federation.max_update_norm", "must be > 0 (unset: no norm bounding)")
        _check(not (self.scaffold and self.aggregator != "mean"), "federation.aggregator",
               f'"{self.aggregator}" with federation.scaffold: SCAFFOLD moves c by the mean of every client\'s '
               "delta_c_i, attackers included; use aggregator = \"mean\" (with max_update_norm) or scaffold = false")

    def rule_options(self) -> dict[str, float | int]:
        """``trim_fraction`` and ``byzantine`` with their defaults (0.2 and 0, as Flower's)."""
        return {"trim_fraction": 0.2 if self.trim_fraction is None else self.trim_fraction,
                "byzantine": 0 if self.byzantine is None else self.byzantine}

    def _validate_client_corrections(self) -> None:
        """FedProx and the label-skew losses (issue 12): ranges, and no option of a loss not chosen."""
        _check(
            math.isfinite(self.proximal_mu) and self.proximal_mu >= 0,
            "federation.proximal_mu", "must be >= 0 (0 disables FedProx)",
        )
        for key, owner in (("fedlc_tau", "fedlc"), ("fedrs_alpha", "fedrs")):
            _check(
                getattr(self, key) is None or self.label_skew == owner,
                f"federation.{key}",
                f'is only used with federation.label_skew = "{owner}" (it is "{self.label_skew}"): '
                f'remove it or set label_skew = "{owner}"',
            )
        tau, alpha = self.fedlc_tau, self.fedrs_alpha
        _check(tau is None or (math.isfinite(tau) and tau > 0), "federation.fedlc_tau", "must be > 0")
        _check(alpha is None or 0 < alpha <= 1, "federation.fedrs_alpha", "must be in (0, 1]")

    def build_server_optimizer(self) -> "ServerOptimizer":
        """The server optimizer these keys describe (a fresh one: no moments yet).

        Raises
        ------
        ConfigError
            For an option the chosen optimizer does not take, or a value out of its range.
        """
        from fedpeft.federation.server_opt import build_server_optimizer

        options = {arg: getattr(self, key) for key, arg in SERVER_OPTIMIZER_KEYS.items() if getattr(self, key) is not None}
        try:
            return build_server_optimizer(self.server_optimizer, **options)
        except ValueError as exc:
            given = ", ".join(f"federation.{k}" for k, arg in SERVER_OPTIMIZER_KEYS.items() if arg in options)
            raise ConfigError(f"federation.server_optimizer = {self.server_optimizer!r} with {given or 'defaults'}: {exc}") from None

    def clients_per_round_count(self, num_clients: int) -> int:
        """Clients selected per round out of ``num_clients``: the count, or ceil(fraction * num_clients)."""
        cpr = self.clients_per_round
        return math.ceil(cpr * num_clients) if isinstance(cpr, float) else cpr


@dataclass
class RuntimeConfig:
    """Where the federation runs: ``local`` simulates every client in this process; ``flower-sim``
    runs the same experiment on Flower's simulation engine (one virtual SuperNode per client);
    ``flower`` submits it to a Flower SuperLink (real SuperNodes, see README: Flower deployment)."""

    kind: Literal["local", "flower-sim", "flower"] = "local"  # local | flower-sim | flower
    seed: int = 0  # every random draw derives from it: same seed, same result
    threads: int | None = None  # torch intra-op threads (default: torch's choice)
    progress: bool = True  # rich progress bar over rounds and clients
    superlink: str = "127.0.0.1:9093"  # flower: the SuperLink's host:port (Fleet, Control, Runtime APIs)
    insecure: bool = False  # flower: plain text to the SuperLink (loopback trials only)
    root_certificates: str | None = None  # flower: CA certificate (PEM) that signed the SuperLink's TLS certificate
    round_timeout: float = 600.0  # flower*: seconds to wait for a round's replies; then silent clients fail
    connect_timeout: float = 300.0  # flower*: seconds for every partition's SuperNode to connect and load
    sim_cpus_per_client: float = 1.0  # flower-sim: Ray CPUs per virtual client (parallelism)
    frozen_cache_mb: float = 512.0  # memory for each process's cache of frozen-prefix outputs (head, layers); 0: none
    measure_memory: bool = False  # measure a client's peak memory on one real step next to the prediction (slower start)

    def validate(self) -> None:
        _check(not (self.insecure and self.root_certificates), "runtime.insecure",
               "is true and runtime.root_certificates is set: choose TLS (root_certificates, the CA of the "
               "SuperLink's certificate) or plain text (insecure = true, loopback trials only)")
        _check(self.round_timeout > 0, "runtime.round_timeout", "must be > 0")
        _check(self.connect_timeout > 0, "runtime.connect_timeout", "must be > 0")
        _check(self.sim_cpus_per_client > 0, "runtime.sim_cpus_per_client", "must be > 0")
        _check(self.threads is None or self.threads >= 1, "runtime.threads", "must be >= 1")
        _check(math.isfinite(self.frozen_cache_mb) and self.frozen_cache_mb >= 0, "runtime.frozen_cache_mb",
               f"must be >= 0 (MB; 0 caches nothing), got {self.frozen_cache_mb}")


ATTACK_KINDS = ("none", "scale", "sign_flip", "gaussian", "label_flip")
DEFAULT_ATTACK_SCALE = {"scale": 1000.0, "sign_flip": 1.0, "gaussian": 1.0}  # label_flip takes none


@dataclass
class AttackConfig:
    """Simulated malicious clients, so that robustness can be measured (:mod:`fedpeft.federation.attacks`).

    A seeded ``fraction`` of the clients attack whenever they train: ``scale`` sends
    ``global + scale * delta``, ``sign_flip`` ``global - scale * delta``, ``gaussian``
    ``global + N(0, scale^2)`` noise instead of its update, ``label_flip`` trains honestly on its
    rows with every label ``y`` turned into ``C - 1 - y``.
    """

    kind: Literal["none", "scale", "sign_flip", "gaussian", "label_flip"] = "none"
    fraction: float = 0.0  # share of partition.num_clients that is malicious (rounded; at least 1 when > 0)
    scale: float | None = None  # default: 1000 (scale), 1 (sign_flip), 1 (gaussian: the noise's std)

    def validate(self) -> None:
        _check(self.kind in ATTACK_KINDS, "attack.kind", f"must be one of {', '.join(ATTACK_KINDS)}")
        _check(0.0 <= self.fraction < 1.0, "attack.fraction", "must be in [0, 1)")
        if self.kind == "none":
            _check(self.fraction == 0 and self.scale is None, "attack.kind",
                   'is "none": attack.fraction and attack.scale would do nothing; set attack.kind')
            return
        _check(self.fraction > 0, "attack.fraction", f'must be > 0 for attack.kind = "{self.kind}"')
        if self.kind == "label_flip":
            _check(self.scale is None, "attack.scale", 'label_flip takes no scale')
        _check(self.scale is None or (math.isfinite(self.scale) and self.scale > 0), "attack.scale", "must be > 0")

    def attack_scale(self) -> float:
        """``scale``, or the kind's default (:data:`DEFAULT_ATTACK_SCALE`)."""
        return self.scale if self.scale is not None else DEFAULT_ATTACK_SCALE.get(self.kind, 0.0)

    def num_malicious(self, num_clients: int) -> int:
        return 0 if self.kind == "none" else max(1, round(self.fraction * num_clients))


BUDGET_KEYS = ("memory_mb", "flops_per_round", "upload_mb_per_round")
BUDGET_ASSIGN = ("same", "fractions", "list")


@dataclass
class ProfileConfig:
    """One device profile of ``[budgets]``: what a client of this kind can spend per round.

    Each budget is optional (unset: unlimited). ``memory_mb`` is peak training memory in MiB
    (2**20 bytes, as ``client_peak_memory_mb``), ``flops_per_round`` the training FLOPs of one
    round, ``upload_mb_per_round`` the update's payload in MB (1e6 bytes, as ``mb_up_per_round``).
    """

    name: str
    memory_mb: float | None = None
    flops_per_round: float | None = None
    upload_mb_per_round: float | None = None

    def check(self, key: str) -> None:
        _check(bool(self.name.strip()), f"{key}.name", "must not be empty")
        for budget in BUDGET_KEYS:
            value = getattr(self, budget)
            _check(value is None or (math.isfinite(value) and value > 0), f"{key}.{budget}",
                   f"must be > 0 (leave it out for no limit), got {value!r}")

    def limits(self) -> dict[str, float]:
        """The budgets that are set, in the cost model's units: bytes, FLOPs, bytes."""
        scale = {"memory_mb": 2**20, "flops_per_round": 1, "upload_mb_per_round": 1e6}
        return {k: getattr(self, k) * scale[k] for k in BUDGET_KEYS if getattr(self, k) is not None}


@dataclass
class BudgetsConfig:
    """Client device budgets (Pfeiffer et al. 2024, https://arxiv.org/abs/2411.07826).

    ``profiles`` are the kinds of device; ``assign`` says which client gets which: ``same`` (one
    profile, every client), ``fractions`` (one per profile, summing to 1: exact counts by largest
    remainder, then a shuffle seeded by ``runtime.seed``) or ``list`` (``clients``: one profile
    name per client). No profiles: no budgets. See :mod:`fedpeft.budgets.clients`.
    """

    profiles: list[ProfileConfig] = field(default_factory=list)
    assign: Literal["same", "fractions", "list"] = "same"
    fractions: list[float] | None = None
    clients: list[str] | None = None

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> "BudgetsConfig":
        raw = dict(table)
        profiles = raw.pop("profiles", [])
        if not isinstance(profiles, list):
            raise ConfigError(f"budgets.profiles: expected a list of tables [[budgets.profiles]], got {profiles!r}")
        built = []
        for i, item in enumerate(profiles):
            key = f"budgets.profiles[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(f"{key}: expected a table with name, {', '.join(BUDGET_KEYS)}; got {item!r}")
            if "name" not in item:
                raise ConfigError(f"{key}.name: missing (every profile needs a name)")
            built.append(_build(ProfileConfig, item, key))
            built[-1].check(key)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise ConfigError(f"budgets: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}")
        hints = typing.get_type_hints(cls)
        out = cls(built, **{k: _coerce(v, hints[k], f"budgets.{k}") for k, v in raw.items()})
        out.validate()
        return out

    def validate(self) -> None:
        if not self.profiles:
            _check(self.fractions is None and self.clients is None and self.assign == "same", "budgets.profiles",
                   "is empty: budgets.assign, fractions and clients need profiles [[budgets.profiles]]")
            return
        names = [p.name for p in self.profiles]
        twice = sorted({n for n in names if names.count(n) > 1})
        _check(not twice, "budgets.profiles", f"profile names must be unique; repeated: {', '.join(twice)}")
        if self.assign == "same":
            _check(len(self.profiles) == 1, "budgets.assign",
                   f'"same" gives every client the one profile, but {len(self.profiles)} are given: '
                   'use assign = "fractions" or "list"')
        _check(self.assign == "fractions" or self.fractions is None, "budgets.fractions",
               f'is only read with assign = "fractions" (assign = "{self.assign}")')
        _check(self.assign == "list" or self.clients is None, "budgets.clients",
               f'is only read with assign = "list" (assign = "{self.assign}")')
        if self.assign == "fractions":
            f = self.fractions
            _check(f is not None and len(f) == len(self.profiles), "budgets.fractions",
                   f"needs one fraction per profile ({len(self.profiles)}), got {f!r}")
            _check(all(x >= 0 for x in f), "budgets.fractions", f"must be >= 0, got {f!r}")
            _check(abs(sum(f) - 1.0) < 1e-6, "budgets.fractions", f"must sum to 1, got {f!r} (sum {sum(f):g})")
        if self.assign == "list":
            _check(self.clients is not None, "budgets.clients", 'is required with assign = "list"')
            unknown = sorted(set(self.clients) - set(names))
            _check(not unknown, "budgets.clients",
                   f"unknown profile name(s) {', '.join(map(repr, unknown))}; profiles: {', '.join(names)}")

    def check_clients(self, num_clients: int) -> None:
        """``clients`` has one entry per client (checked across sections)."""
        if self.assign == "list" and self.profiles and len(self.clients) != num_clients:
            raise ConfigError(f"budgets.clients: needs one profile name per client (partition.num_clients = "
                              f"{num_clients}), got {len(self.clients)}")

    def to_table(self) -> dict[str, Any]:
        if not self.profiles:
            return {}
        out: dict[str, Any] = {"profiles": [_to_table(p) for p in self.profiles], "assign": self.assign}
        for key in ("fractions", "clients"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


PRIVACY_MODES = ("none", "sample", "client-central", "client-local")
ADAPTIVE_KEYS = ("target_clipped_quantile", "clip_norm_lr", "clipped_count_stddev")  # Flower's names


@dataclass
class PrivacyConfig:
    """Differential privacy (:mod:`fedpeft.privacy`). ``client-central``: DP-FedAvg, the server clips
    every client's delta to ``clip_norm`` and noises the average; ``client-local``: each client
    clips and noises its own delta; ``sample``: DP-SGD on each client's rows (per-sample clip
    ``max_grad_norm``, Poisson batches, a per-client accountant: :mod:`fedpeft.privacy.sample_level`).

    Exactly one of ``target_epsilon`` (the noise multiplier is searched on the accountant) and
    ``noise_multiplier`` with a client mode. ``adaptive_clip`` moves the clip norm toward the
    ``target_clipped_quantile`` of the update norms (Andrew et al. 2021), starting at ``clip_norm``.
    """

    mode: Literal["none", "sample", "client-central", "client-local"] = "none"
    target_epsilon: float | None = None  # spend at most this over federation.rounds (client level)
    noise_multiplier: float | None = None  # z: noise std / clip norm on the sum of clipped deltas
    delta: float = 1e-5  # of (epsilon, delta)-DP; must be < 1 / partition.num_clients
    max_grad_norm: float | None = None  # sample level: L2 bound of one row's gradient (mode = "sample")
    clip_norm: float | None = None  # client level: L2 bound of a client's delta (adaptive: initial, default 0.1)
    adaptive_clip: bool = False  # client-central: adaptive clipping (Andrew et al. 2021)
    target_clipped_quantile: float | None = None  # adaptive: quantile of unclipped norms the clip tracks (0.5)
    clip_norm_lr: float | None = None  # adaptive: geometric learning rate of the clip norm (0.2)
    clipped_count_stddev: float | None = None  # adaptive: noise std of the unclipped count (clients per round / 20)
    secure_aggregation: bool = False  # Flower runtimes: Flower's SecAgg+, the server learns only the sum of updates
    secagg_clipping_range: float | None = None  # SecAgg+: c, each weighted delta value is clipped to [-c, c] (8.0)
    secagg_quantization_bits: int | None = None  # SecAgg+: values quantized to 2**bits levels over [-c, c] (22)

    def validate(self) -> None:
        self._validate_secure()
        _check(self.max_grad_norm is None or self.mode == "sample", "privacy.max_grad_norm",
               'is the per-sample clip of privacy.mode = "sample" (DP-SGD); client-level modes use privacy.clip_norm')
        _check(0 < self.delta < 1, "privacy.delta", f"must be in (0, 1), got {self.delta}")
        if self.mode == "none":
            given = [k for k in ("target_epsilon", "noise_multiplier", "clip_norm", *ADAPTIVE_KEYS)
                     if getattr(self, k) is not None] + (["adaptive_clip"] if self.adaptive_clip else [])
            _check(not given, "privacy.mode", f'is "none": {", ".join("privacy." + k for k in given)} would do '
                   'nothing; set privacy.mode = "client-central" or "client-local"')
            return
        if self.mode == "sample":
            self._validate_sample()
            return
        _check((self.target_epsilon is None) != (self.noise_multiplier is None), "privacy.target_epsilon",
               f'give exactly one of privacy.target_epsilon and privacy.noise_multiplier with mode = "{self.mode}"')
        _check(self.target_epsilon is None or (math.isfinite(self.target_epsilon) and self.target_epsilon > 0),
               "privacy.target_epsilon", "must be > 0")
        _check(self.noise_multiplier is None or (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0),
               "privacy.noise_multiplier", "must be >= 0 (0: clipping only, no privacy guarantee)")
        _check(self.clip_norm is not None or self.adaptive_clip, "privacy.clip_norm",
               f'is required with mode = "{self.mode}" (the L2 bound of a client\'s delta), unless adaptive_clip = true')
        _check(self.clip_norm is None or (math.isfinite(self.clip_norm) and self.clip_norm > 0), "privacy.clip_norm",
               f"must be > 0, got {self.clip_norm}")
        _check(not (self.adaptive_clip and self.mode == "client-local"), "privacy.adaptive_clip",
               'with mode = "client-local" is not built yet (clients would send their norm bits); '
               'use mode = "client-central" or a fixed clip_norm')
        if not self.adaptive_clip:
            given = [k for k in ADAPTIVE_KEYS if getattr(self, k) is not None]
            _check(not given, f"privacy.{given[0] if given else ''}", "is only used with privacy.adaptive_clip = true")
        q, lr, std = self.target_clipped_quantile, self.clip_norm_lr, self.clipped_count_stddev
        _check(q is None or 0 <= q <= 1, "privacy.target_clipped_quantile", "must be in [0, 1]")
        _check(lr is None or (math.isfinite(lr) and lr > 0), "privacy.clip_norm_lr", "must be > 0")
        _check(std is None or (math.isfinite(std) and std >= 0), "privacy.clipped_count_stddev", "must be >= 0")

    def _validate_secure(self) -> None:
        """``secure_aggregation`` and its keys on their own (the rest: :meth:`_check_secure`)."""
        c, bits = self.secagg_clipping_range, self.secagg_quantization_bits
        if not self.secure_aggregation:
            given = [k for k in ("secagg_clipping_range", "secagg_quantization_bits") if getattr(self, k) is not None]
            _check(not given, f"privacy.{given[0] if given else ''}", "is only used with privacy.secure_aggregation = true")
            return
        _check(c is None or (math.isfinite(c) and c > 0), "privacy.secagg_clipping_range", f"must be > 0, got {c}")
        _check(bits is None or 8 <= bits <= 30, "privacy.secagg_quantization_bits", f"must be in [8, 30], got {bits}")
        _check(self.mode in ("none", "client-local"), "privacy.secure_aggregation",
               f'with privacy.mode = "{self.mode}": ' + (
                   "the server clips every client's delta, which SecAgg+ hides from it; use mode = \"client-local\" "
                   "(each client clips and adds its share of the noise: distributed noise)" if self.mode == "client-central"
                   else "each node's DP-SGD accountant travels as arrays, which secaggplus_mod clears from the reply; not built"))

    def _check_secure(self, cfg: "Config") -> None:
        """``secure_aggregation`` against the other sections: a Flower runtime, at least 2 clients
        a round whose quantized sum fits the 32-bit modulus, and only the plain mean."""
        if not self.secure_aggregation:
            return
        fed = cfg.federation
        _check(cfg.runtime.kind in ("flower-sim", "flower"), "privacy.secure_aggregation",
               f'needs runtime.kind = "flower-sim" or "flower" (Flower\'s SecAgg+), not "{cfg.runtime.kind}"')
        m = fed.clients_per_round_count(cfg.partition.num_clients)
        bits = 22 if self.secagg_quantization_bits is None else self.secagg_quantization_bits
        _check(m >= 2, "federation.clients_per_round", f"must be >= 2 with privacy.secure_aggregation (got {m})")
        _check(m * 2 ** bits < 2 ** 32, "privacy.secagg_quantization_bits",
               f"{bits}: {m} clients' sum of {bits}-bit values overflows the 32-bit modulus; use at most "
               f"{32 - math.ceil(math.log2(m + 1))} bits")
        for key, ok, why in (
                ("federation.aggregator", fed.aggregator == "mean", f'"{fed.aggregator}" needs every update; SecAgg+ gives the sum only'),
                ("federation.max_update_norm", fed.max_update_norm is None, "clips every update on the server, which SecAgg+ hides"),
                ("federation.scaffold", not fed.scaffold, "each client's delta_c_i would need a secure sum too; not built"),
                ("method.aggregation", getattr(cfg.method.options, "aggregation", "fedavg") != "fedex",
                 "FedEx-LoRA needs every client's A and B; SecAgg+ gives the sum only")):
            _check(ok, key, f"with privacy.secure_aggregation: {why}")

    def _validate_sample(self) -> None:
        """``mode = "sample"`` (DP-SGD, :mod:`fedpeft.privacy.sample_level`): ``max_grad_norm`` and
        exactly one of ``target_epsilon`` / ``noise_multiplier``; no client-level key."""
        c = self.max_grad_norm
        _check(c is not None, "privacy.max_grad_norm", 'is required with mode = "sample" (the L2 bound of a row\'s gradient)')
        _check(math.isfinite(c) and c > 0, "privacy.max_grad_norm", f"must be > 0, got {c}")
        given = [k for k in ("clip_norm", *ADAPTIVE_KEYS) if getattr(self, k) is not None] + (
            ["adaptive_clip"] if self.adaptive_clip else [])
        _check(not given, f"privacy.{given[0] if given else ''}",
               'is a client-level key; mode = "sample" clips each row\'s gradient to privacy.max_grad_norm')
        _check((self.target_epsilon is None) != (self.noise_multiplier is None), "privacy.target_epsilon",
               'give exactly one of privacy.target_epsilon and privacy.noise_multiplier with mode = "sample"')
        _check(self.target_epsilon is None or (math.isfinite(self.target_epsilon) and self.target_epsilon > 0),
               "privacy.target_epsilon", "must be > 0")
        _check(self.noise_multiplier is None or (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0),
               "privacy.noise_multiplier", "must be >= 0 (0: clipping only, no privacy guarantee)")

    def _check_sample(self, cfg: "Config") -> None:
        """``mode = "sample"`` against the other sections; the accountant's checks need the
        partition (:func:`fedpeft.privacy.sample_level.plan_sample_dp`, at build time)."""
        from fedpeft.privacy.sample_level import REFUSED_METHODS

        _check(cfg.method.name not in REFUSED_METHODS, "method.name",
               f'"{cfg.method.name}" with privacy.mode = "sample": {REFUSED_METHODS.get(cfg.method.name)}')
        _check(not cfg.federation.scaffold, "federation.scaffold",
               'with privacy.mode = "sample" is not supported (its per-client control variates and the per-client '
               "accountant would share the client checkpoint); set scaffold = false")

    def check_federation(self, cfg: "Config") -> None:
        """Checks against the other sections (``mode`` != none), then the accountant's: the
        target epsilon must be reachable, the adaptive noise split must fit; secure aggregation's."""
        self._check_secure(cfg)
        if self.mode == "none":
            return
        if self.mode == "sample":
            self._check_sample(cfg)
            return
        fed, num_clients = cfg.federation, cfg.partition.num_clients
        _check(self.delta < 1 / num_clients, "privacy.delta",
               f"must be < 1 / partition.num_clients = {1 / num_clients:.4g} (got {self.delta:g}): a larger delta "
               "allows releasing one client's data outright")
        _check(fed.aggregator == "mean", "federation.aggregator",
               f'"{fed.aggregator}" with privacy.mode = "{self.mode}": a robust rule\'s output can move by more than '
               "clip_norm / clients_per_round when one client changes, so the noise would not cover it; use \"mean\"")
        _check(fed.max_update_norm is None, "federation.max_update_norm",
               f'with privacy.mode = "{self.mode}" is redundant: privacy.clip_norm bounds every delta; remove it')
        _check(not fed.scaffold, "federation.scaffold",
               f'with privacy.mode = "{self.mode}": each client\'s delta_c_i (its mean gradient) would reach the '
               "server unclipped and without noise, outside the guarantee; set scaffold = false")
        _check(getattr(cfg.method.options, "aggregation", "fedavg") != "fedex", "method.aggregation",
               f'"fedex" with privacy.mode = "{self.mode}": the residual folded into the base weights is a '
               'product of the clients\' un-noised A and B; use aggregation = "fedavg"')
        from fedpeft.privacy.client_level import plan_client_dp

        try:
            dp = plan_client_dp(cfg)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        from fedpeft.privacy.accountant import MAX_NOISE_MULTIPLIER

        _check(dp.noise_multiplier <= MAX_NOISE_MULTIPLIER, "privacy.noise_multiplier",
               f"{dp.noise_multiplier:g} is above {MAX_NOISE_MULTIPLIER:g}: the noise would drown every update")


@dataclass
class OutputConfig:
    """Where results go. ``fedpeft run --out DIR`` overrides ``dir``."""

    dir: str = "runs/{method}-{data}-seed{seed}"  # {method}, {data}, {seed} are filled in
    save_model: bool = True  # export the final trainable part to DIR/model/
    tensorboard: bool = False  # also log every round's metrics to DIR/tensorboard (needs tensorboard)


@dataclass
class Config:
    """A whole experiment; built by :func:`load_config` or :meth:`from_dict`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    budgets: BudgetsConfig = field(default_factory=BudgetsConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ConfigError(
                f"unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(sections)}"
            )
        built: dict[str, Any] = {}
        for name, f in sections.items():
            table = raw.get(name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{name}: expected a table [{name}], got {table!r}")
            if name in ("method", "budgets"):
                built[name] = f.default_factory().__class__.from_table(table)  # type: ignore[misc]
            else:
                built[name] = _build(f.default_factory().__class__, table, name)  # type: ignore[misc]
        cfg = cls(**built)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Checks across sections (each section has checked its own keys)."""
        fed, num_clients = self.federation, self.partition.num_clients
        self.budgets.check_clients(num_clients)
        cpr = fed.clients_per_round
        if isinstance(cpr, int) and cpr > num_clients:
            raise ConfigError(
                f"federation.clients_per_round = {cpr} is above partition.num_clients = {num_clients}: "
                f"give at most {num_clients}, or a fraction such as 0.5"
            )
        per_round = fed.clients_per_round_count(num_clients)
        if fed.min_clients > per_round:
            raise ConfigError(
                f"federation.min_clients = {fed.min_clients} is above the {per_round} clients per round "
                f"(federation.clients_per_round = {cpr}, partition.num_clients = {num_clients}): "
                f"give at most {per_round}"
            )

        self.task.check_sections(self)
        self._check_precision()
        if self.method.name == "sfprompt" and self.runtime.kind != "local":
            # a Flower client runs the split session message by message, not the wrapped trainer's fit
            wrapped = [setting for setting, on in ((f'attack.kind = "{self.attack.kind}"', self.attack.kind != "none"),
                                                   ('privacy.mode = "client-local"', self.privacy.mode == "client-local"),
                                                   ("privacy.secure_aggregation = true", self.privacy.secure_aggregation))
                       if on]
            if wrapped:
                raise ConfigError(
                    f'runtime.kind = "{self.runtime.kind}": method.name = "sfprompt" with {" and ".join(wrapped)} is '
                    'not built on Flower (its clients run the split session message by message, outside that '
                    'client-side wrapper or SecAgg+\'s training step); use runtime.kind = "local" (or no secure '
                    'aggregation)')
        fedex = getattr(self.method.options, "aggregation", "fedavg") == "fedex"
        if fed.aggregator != "mean":
            from fedpeft.federation.robust import check_rule

            try:
                check_rule(fed.aggregator, per_round, **fed.rule_options())
            except ValueError as exc:
                raise ConfigError(
                    f"federation.aggregator = {fed.aggregator!r} with {per_round} clients per round "
                    f"(federation.clients_per_round = {cpr}): {exc}"
                ) from None
            if fedex:
                raise ConfigError(f'method.aggregation = "fedex" needs federation.aggregator = "mean" (it is '
                                  f'"{fed.aggregator}"): its residual is that of the plain average')
        if fedex:
            if fed.server_optimizer != "fedavg" or fed.server_lr not in (None, 1.0):
                raise ConfigError(
                    'method.aggregation = "fedex" folds the residual of plain FedAvg into the base weights; '
                    f"federation.server_optimizer = {fed.server_optimizer!r}"
                    f"{'' if fed.server_lr is None else f' with server_lr = {fed.server_lr}'} would move A and B "
                    'by another step: use server_optimizer = "fedavg" (server_lr 1) or aggregation = "fedavg"'
                )
        self.privacy.check_federation(self)

    def _check_precision(self) -> None:
        """``model.dtype``, ``model.gradient_checkpointing`` and ``federation.exchange_dtype``
        against what does not take them (:mod:`fedpeft.federation.precision`)."""
        model, fed = self.model, self.federation
        if self.method.name == "sfprompt":  # the split protocol runs the blocks and carries float32 tensors
            for key, on in (("model.dtype", model.dtype != "float32"), ("model.gradient_checkpointing",
                            model.gradient_checkpointing), ("federation.exchange_dtype", fed.exchange_dtype != "float32")):
                _check(not on, key, f'{"is on" if key.endswith("checkpointing") else "is not float32"} with method.name = '
                       '"sfprompt": its split protocol runs the blocks itself and carries float32 tensors; not built')
        _check(not (model.gradient_checkpointing and self.privacy.mode == "sample"), "model.gradient_checkpointing",
               'with privacy.mode = "sample": Opacus\'s per-sample gradient hooks see no activations inside '
               "checkpointed blocks; set gradient_checkpointing = false")
        if fed.exchange_dtype == "float32":
            return
        _check(not self.privacy.secure_aggregation, "federation.exchange_dtype",
               '"bfloat16" with privacy.secure_aggregation: SecAgg+ sends quantized integers, not the state; '
               'use exchange_dtype = "float32"')
        _check(getattr(self.method.options, "aggregation", "fedavg") != "fedex", "federation.exchange_dtype",
               '"bfloat16" with method.aggregation = "fedex": its residual downloads are counted in float32; not built')

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            out[f.name] = section.to_table() if hasattr(section, "to_table") else _to_table(section)
        if not out["budgets"]:
            del out["budgets"]  # no budgets: the config (and its saved copy) as before [budgets] existed
        if self.privacy == PrivacyConfig():
            del out["privacy"]  # no privacy: the config as before [privacy] existed (resume of older runs)
        if self.task == TaskConfig():
            del out["task"]  # classification: the config as before [task] existed
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())

    def output_dir(self) -> Path:
        data = self.data.name or Path(self.data.train or "data").stem
        return Path(
            self.output.dir.format(method=self.method.name, data=data, seed=self.runtime.seed)
        )


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a TOML file, apply ``section.key=value`` overrides, and validate everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return Config.from_dict(apply_overrides(raw, overrides or []))


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``section.key=value`` applied.

    The value is read as a TOML value (``3``, ``0.5``, ``true``, ``["a", "b"]``); anything that
    is not valid TOML is taken as a plain string, so ``method.name=lora`` works unquoted.
    """
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. federation.rounds=3")
        section, name = parts
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"--set {item!r}: {section} is not a section")
        raw[section][name] = value
    return raw


# --------------------------------------------------------------------------- helpers


# config keys that may differ between a run and its resumption (or its saved config.toml)
# data.data_dir, data.train, data.test may move: data.fingerprint proves it is the same data
DATA_LOCATION_KEYS = ("data.data_dir", "data.train", "data.test", "data.cache_dir")
RESUMABLE_CHANGES = {"federation.rounds", "runtime.progress", "runtime.threads", "runtime.frozen_cache_mb",
                     "runtime.measure_memory",
                     "output.dir", *DATA_LOCATION_KEYS}  # frozen_cache_mb: speed only, same results


def flatten_config(d: dict[str, Any]) -> dict[str, Any]:
    """``{"section": {"key": v}}`` (a config as a dict) -> ``{"section.key": v}``."""
    return {f"{s}.{k}": v for s, table in d.items() for k, v in table.items()}


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _to_table(obj: Any) -> dict[str, Any]:
    """A dataclass as a TOML-ready dict (TOML has no null: None values are left out)."""
    if obj is None:
        return {}
    return {k: v for k, v in dataclasses.asdict(obj).items() if v is not None}


def _build(cls: type, table: dict[str, Any], section: str, extra_valid: list[str] = ()) -> Any:
    """Build dataclass ``cls`` from ``table``, checking keys and types, then ``validate()``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        valid = ", ".join(list(extra_valid) + list(fields))
        raise ConfigError(
            f"{section}: unknown key(s) {', '.join(unknown)}; valid keys: {valid}"
        )
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in table.items()}
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against type ``hint``; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # int | float: keep the int as a count, a float as a fraction
        for arg in args:
            if arg is not type(None) and _matches(value, arg):
                return _coerce(value, arg, key)
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg, key)
                except ConfigError:
                    pass
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value] if args else value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any or _matches(value, hint):
        return value
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    if hint in (int, float) and isinstance(value, bool):
        return False
    if typing.get_origin(hint) is not None:
        return False
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
