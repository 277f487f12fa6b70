"""Which clients can train under their device budgets, and how deep (Pfeiffer et al. 2024).

Pfeiffer, Khalili, Henkel, Boehm, Rapp, *Efficient Federated Finetuning of Tiny Transformers with
Resource-Constrained Devices*, 2024, https://arxiv.org/abs/2411.07826 : each device trains the
largest suffix of the last transformer blocks that fits its memory, FLOP and upload budgets.

Composed as a hook around the method, not as flags in it. :func:`plan_clients` runs once per run
from the prepared model, the config and each client's number of rows (the partition):

1. :func:`assign_profiles` gives each client a ``[budgets]`` profile (``same`` / ``fractions``:
   exact counts by largest remainder, then a shuffle seeded by ``runtime.seed`` / ``list``).
2. Each client is priced by the cost model (:func:`fedpeft.budgets.predict`): peak memory, FLOPs
   of one round for *its* rows (``federation.local_epochs`` / ``local_steps``), upload bytes of
   the names it sends.
3. A method with depths (``layers``: :meth:`~fedpeft.methods.layers.Layers.names_for_depth`)
   gives the client the largest ``k <= method.k`` whose costs fit (each ``k`` priced once by
   ``predict`` on the model flagged for that suffix: exact, flags restored). Any other method,
   or ``layers`` when not even ``k = 0`` fits: the client is *infeasible* and never trains.

The result is a function of the config, the seed and the partition only, so a resumed run
re-derives exactly the same plan; a run writes it to ``budgets.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch import nn

from fedpeft.budgets.costmodel import ClientCosts, predict
from fedpeft.config import BudgetsConfig, Config, ProfileConfig

MIB, MB = 2**20, 1e6
NO_PROFILE = "none"


def largest_remainder(fractions: Sequence[float], total: int) -> list[int]:
    """Integer counts summing to ``total``, as close to ``fractions * total`` as possible (the
    largest-remainder method; ties go to the earlier entry)."""
    quotas = [f * total for f in fractions]
    counts = [int(np.floor(q)) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def assign_profiles(budgets: BudgetsConfig, num_clients: int, seed: int) -> list[ProfileConfig] | None:
    """Each client's profile (client id = list index), or None without ``[budgets]`` profiles."""
    if not budgets.profiles:
        return None
    by_name = {p.name: p for p in budgets.profiles}
    if budgets.assign == "same":
        return [budgets.profiles[0]] * num_clients
    if budgets.assign == "list":
        return [by_name[name] for name in budgets.clients]
    counts = largest_remainder(budgets.fractions, num_clients)
    ordered = [p for p, n in zip(budgets.profiles, counts) for _ in range(n)]
    rng = np.random.default_rng([seed, 0xB0D6E7])
    return [ordered[i] for i in rng.permutation(num_clients)]


def exceeded(profile: ProfileConfig | None, costs: ClientCosts, samples: int) -> list[str]:
    """The ``[budgets]`` keys of ``profile`` that ``costs`` (for a client of ``samples`` rows) break."""
    if profile is None:
        return []
    used = {"memory_mb": costs.memory.peak, "flops_per_round": costs.flops_per_round(samples),
            "upload_mb_per_round": costs.upload_bytes}
    return [key for key, limit in profile.limits().items() if used[key] > limit]


@dataclass
class ClientFit:
    """One client under its profile: what it would train and what that costs (``as_dict``: MiB
    for memory, MB for bytes, as the summary's keys)."""

    client: int
    profile: str
    samples: int
    k: int | None  # layers: the blocks it trains (None: another method)
    fits: bool
    exceeds: list[str]  # the budgets broken (at k = 0 for an infeasible layers client)
    memory_bytes: int
    flops_per_round: int
    upload_bytes: int
    download_bytes: int
    trainable_params: int
    measured_memory_bytes: int | None = None  # runtime.measure_memory: one real step (None: not measured)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, unit in (("memory_bytes", MIB), ("measured_memory_bytes", MIB), ("upload_bytes", MB),
                          ("download_bytes", MB)):
            value = out.pop(key)
            out[key.replace("_bytes", "_mb")] = None if value is None else value / unit
        return out


@dataclass
class BudgetPlan:
    """Every client's :class:`ClientFit` for one run (client id = list index)."""

    method: str
    max_k: int | None  # layers: the depth the prepared model trains
    clients: list[ClientFit] = field(default_factory=list)

    @property
    def infeasible(self) -> list[int]:
        return [c.client for c in self.clients if not c.fits]

    @property
    def depths(self) -> list[int] | None:
        """Each client's ``k`` (an infeasible client: 0, it never trains), or None (no depths)."""
        return None if self.max_k is None else [c.k if c.fits else 0 for c in self.clients]

    def as_json(self) -> dict[str, Any]:
        feasible = [c for c in self.clients if c.fits]
        mean_k = (float(np.mean([c.k for c in feasible])) if feasible else 0.0) if self.max_k is not None else None
        return {"method": self.method, "max_k": self.max_k, "clients_infeasible": self.infeasible,
                "mean_k": mean_k, "clients": [c.as_dict() for c in self.clients]}


class DepthCosts:
    """The cost model's prediction for a method, per depth for ``layers`` (each priced once).

    Parameters
    ----------
    method, model, info, cfg
        The method and its prepared model (``Method.prepare``), its ``ModelInfo``, the config.
    names, download_names : list of str
        The exchanged names and the global state's (FedEx-LoRA adds base weights).
    """

    def __init__(self, method: Any, model: nn.Module, info: Any, cfg: Config, names: list[str],
                 download_names: list[str] | None = None) -> None:
        self.method, self.model, self.info, self.cfg = method, model, info, cfg
        self.names, self.download_names = names, download_names or names
        self.max_k: int | None = method.depth(info) if hasattr(method, "names_for_depth") else None
        self._cache: dict[int | None, ClientCosts] = {}
        self._measured: dict[int | None, int] = {}

    def at(self, k: int | None = None) -> ClientCosts:
        """Costs of a client of depth ``k`` (None: the method's own prepared flags)."""
        if k not in self._cache:
            if k is None or k == self.max_k:
                self._cache[k] = predict(self.model, self.info, self.cfg, self.names, self.download_names)
            else:
                names = self.method.names_for_depth(self.model, k)
                with _trainable(self.model, set(names)):
                    self._cache[k] = predict(self.model, self.info, self.cfg, names, self.download_names)
        return self._cache[k]

    def measured(self, k: int | None = None) -> int:
        """Peak bytes of one real training step at depth ``k`` (:func:`~fedpeft.budgets.measure.
        measure_client`), measured once per depth."""
        from fedpeft.budgets.measure import measure_client

        if k not in self._measured:
            names = None if k is None or k == self.max_k else self.method.names_for_depth(self.model, k)
            self._measured[k] = measure_client(self.model, self.info, self.cfg, names).peak
        return self._measured[k]

    def fit(self, client: int, profile: ProfileConfig | None, samples: int) -> ClientFit:
        """The client's :class:`ClientFit`: the deepest ``k`` that fits (layers), or whether the
        method fits at all."""
        depths = [None] if self.max_k is None else list(range(self.max_k, -1, -1))
        for k in depths:
            costs = self.at(k)
            broken = exceeded(profile, costs, samples)
            if not broken or k in (None, 0):
                measured = self.measured(k) if self.cfg.runtime.measure_memory and not broken else None
                return ClientFit(client, profile.name if profile else NO_PROFILE, samples, k, not broken, broken,
                                 costs.memory.peak, costs.flops_per_round(samples), costs.upload_bytes,
                                 costs.download_bytes, costs.trainable_params, measured)
        raise AssertionError("unreachable: the last depth returns")


@contextmanager
def _trainable(model: nn.Module, names: set[str]):
    """Only ``names`` trainable inside (a client's suffix); the flags are restored after."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def plan_clients(method: Any, model: nn.Module, info: Any, cfg: Config, names: list[str], samples: Sequence[int],
                 download_names: list[str] | None = None) -> BudgetPlan | None:
    """Every client's profile, depth and feasibility under ``[budgets]``; None without budgets.

    Parameters
    ----------
    method : Method
        The method that prepared ``model`` (``layers``: depths are chosen per client).
    model : nn.Module
        The prepared model; its flags and values are unchanged afterwards.
    info : ModelInfo
        The model's info.
    cfg : Config
        ``budgets``, ``runtime.seed``, and what the cost model reads.
    names, download_names : list of str
        Exchanged names, global state names (default: ``names``).
    samples : sequence of int
        Each client's number of training rows (the partition).
    """
    profiles = assign_profiles(cfg.budgets, len(samples), cfg.runtime.seed)
    if profiles is None:
        return None
    costs = DepthCosts(method, model, info, cfg, names, download_names)
    return BudgetPlan(cfg.method.name, costs.max_k,
                      [costs.fit(c, p, int(n)) for c, (p, n) in enumerate(zip(profiles, samples))])
