"""``fedpeft plan``: what each method would cost each device profile, before anything trains.

For every candidate model x method x ``[budgets]`` profile, the cost model
(:func:`fedpeft.budgets.predict`, a shape-only trace: no training, no data through the model)
gives the peak memory, the FLOPs of one round, the bytes up and down and the trainable
parameters, and whether they fit the profile (for ``layers``: the deepest ``k`` that fits,
:class:`fedpeft.budgets.clients.DepthCosts`). With several candidate models it also reports, per
model, the mean number of blocks ``layers`` trains over the whole client population under the
budgets (an infeasible client trains none) and names the model that maximises it: the backbone
choice of Pfeiffer et al. 2024, https://arxiv.org/abs/2411.07826 .

The data is read only for the label names and the partition (each client's number of rows).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedpeft.budgets.clients import MB, MIB, NO_PROFILE, DepthCosts, assign_profiles
from fedpeft.config import Config, MethodConfig, ProfileConfig
from fedpeft.errors import ConfigError
from fedpeft.models import apply_model_options


@dataclass
class PlanRow:
    """One model x method x profile: costs for the profile's mean client (``samples`` rows)."""

    model: str
    method: str
    profile: str
    clients: int  # clients with this profile
    samples: int  # rows of the client the FLOPs are for (the profile's mean client)
    k: int | None
    trainable_params: int
    memory_mb: float  # MiB
    flops_per_round: int
    upload_mb: float  # MB
    download_mb: float
    fits: bool
    exceeds: list[str]


@dataclass
class ModelChoice:
    """A candidate backbone under the budgets: the mean blocks ``layers`` trains per client."""

    model: str
    num_blocks: int
    mean_k: float  # over every client; an infeasible one counts 0
    infeasible: int


@dataclass
class Planning:
    rows: list[PlanRow] = field(default_factory=list)
    models: list[ModelChoice] = field(default_factory=list)

    @property
    def best_model(self) -> str | None:
        """The model whose clients train the most blocks on average (the first on a tie)."""
        return max(self.models, key=lambda m: m.mean_k).model if self.models else None

    def fitting_methods(self) -> list[str]:
        """Methods that fit every profile (on every model listed)."""
        methods = dict.fromkeys(r.method for r in self.rows)
        return [m for m in methods if all(r.fits for r in self.rows if r.method == m)]

    def as_json(self, with_models: bool) -> Any:
        rows = [asdict(r) for r in self.rows]
        if not with_models:
            return rows
        return {"rows": rows, "models": [asdict(m) for m in self.models], "best_model": self.best_model}


def _method_config(cfg: Config, name: str) -> MethodConfig:
    from fedpeft.methods import get_method_class

    mcfg = cfg.method if name == cfg.method.name else MethodConfig.from_table({"name": name})  # unknown: ConfigError
    refused = get_method_class(mcfg.name).causal_lm_refused if cfg.task.generative else None
    if refused:
        raise ConfigError(f'--methods: "{mcfg.name}" with task.kind = "causal-lm": {refused}')
    return mcfg


def plan(cfg: Config, methods: list[str] | None = None, models: list[str] | None = None) -> Planning:
    """Price every model x method x profile of ``cfg`` (see the module docstring).

    Parameters
    ----------
    cfg : Config
        The experiment; ``[budgets]`` gives the profiles (none: one row per method, profile
        ``"none"``, fitting).
    methods : list of str, optional
        Method names (default: ``method.name``); the config's method keeps its options, others
        take their defaults.
    models : list of str, optional
        Candidate ``model.name`` values (default: ``model.name``); with any, the model choice
        for ``layers`` is reported too.

    Raises
    ------
    ConfigError
        For an unknown method or a model that cannot load.
    """
    from fedpeft.data import load_data, load_instructions, partition
    from fedpeft.methods import build_method
    from fedpeft.models import load_model

    seed = cfg.runtime.seed
    if cfg.task.generative:  # causal-lm: instruction data, partitioned over its categories
        data = load_instructions(cfg.data, seed)
        labels = data.categories()
    else:
        data = load_data(cfg.data, seed)
        labels = np.asarray(data.train["label"], dtype=np.int64)
    parts = partition(labels, cfg.partition, seed)
    samples = [len(p) for p in parts]
    assigned = assign_profiles(cfg.budgets, len(samples), seed)
    profiles: list[ProfileConfig | None] = list(cfg.budgets.profiles) or [None]
    method_cfgs = [_method_config(cfg, m) for m in (methods or [cfg.method.name])]
    out = Planning()
    for model_name in models or [cfg.model.name]:
        model_cfg = replace(cfg.model, name=model_name)
        for mcfg in method_cfgs:
            run_cfg = replace(cfg, model=model_cfg, method=mcfg)
            costs = _costs(run_cfg, mcfg, data.label_names, seed, load_model, build_method)
            for profile in profiles:
                members = [n for n, p in zip(samples, assigned or [None] * len(samples)) if p is profile]
                n = max(1, round(float(np.mean(members or samples))))
                fit = costs.fit(-1, profile, n)
                out.rows.append(PlanRow(model_name, mcfg.name, profile.name if profile else NO_PROFILE,
                                        len(members), n, fit.k, fit.trainable_params, fit.memory_bytes / MIB,
                                        fit.flops_per_round, fit.upload_bytes / MB, fit.download_bytes / MB,
                                        fit.fits, fit.exceeds))
        if models:
            out.models.append(_model_choice(replace(cfg, model=model_cfg), cfg, data.label_names, samples, assigned,
                                            load_model, build_method))
    return out


def _costs(cfg: Config, mcfg: MethodConfig, labels: list[str], seed: int, load_model, build_method) -> DepthCosts:
    torch.manual_seed(seed)
    loaded = load_model(cfg.model, labels, seed, task=cfg.task.kind)
    method = build_method(mcfg.name, mcfg.options)
    torch.manual_seed(seed)
    model = apply_model_options(method.prepare(loaded.model, loaded.info), cfg.model)  # dtype, checkpointing
    model.eval()
    names = method.exchanged_names(model)
    fedex = method.residual_fold(model)
    return DepthCosts(method, model, loaded.info, cfg, names, names + (fedex.base_names if fedex else []))


def _model_choice(cfg: Config, base: Config, labels: list[str], samples: list[int],
                  assigned: list[ProfileConfig] | None, load_model, build_method) -> ModelChoice:
    """``layers`` over the population: each client's deepest fitting suffix on this model."""
    table = {"name": "layers", **({"k": base.method.options.k} if base.method.name == "layers" else {})}
    try:
        mcfg = MethodConfig.from_table(table)
        costs = _costs(replace(cfg, method=mcfg), mcfg, labels, cfg.runtime.seed, load_model, build_method)
    except ConfigError:  # method.k above this model's blocks: every block
        mcfg = MethodConfig.from_table({"name": "layers"})
        costs = _costs(replace(cfg, method=mcfg), mcfg, labels, cfg.runtime.seed, load_model, build_method)
    fits = [costs.fit(c, p, n) for c, (p, n) in enumerate(zip(assigned or [None] * len(samples), samples))]
    return ModelChoice(cfg.model.name, costs.info.num_layers, float(np.mean([f.k if f.fits else 0 for f in fits])),
                       sum(not f.fits for f in fits))
