"""Simulated malicious clients (``[attack]``), so robust aggregation can be measured.

The attack wraps a :class:`~fedpeft.federation.client.ClientTrainer`: the same trainer serves the
in-process runtime and every Flower ClientApp, so an attack behaves the same in each. The
malicious clients are a seeded draw of ``attack.fraction`` of all clients
(:func:`malicious_clients`), fixed for the run; they attack whenever they are selected.

Model poisoning on the exchanged state (``delta = y - x``, ``x`` the global state the client
received):

- ``scale``: ``x + s * delta`` (a boosted update, e.g. Bhagoji et al. 2019,
  https://arxiv.org/abs/1811.12470);
- ``sign_flip``: ``x - s * delta`` (Damaskinos et al. 2018; used by Bulyan's evaluation);
- ``gaussian``: ``x + N(0, s^2)`` instead of the update (Blanchard et al. 2017,
  https://papers.nips.cc/paper/6617).

Data poisoning: ``label_flip`` trains honestly on the client's rows with every label ``y``
replaced by ``C - 1 - y`` (Tolpegin et al. 2020, https://arxiv.org/abs/2007.08432).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from fedpeft.config import AttackConfig
from fedpeft.federation.strategy import ClientResult
from fedpeft.methods.base import NamedArrays


def malicious_clients(attack: AttackConfig, num_clients: int, seed: int) -> list[int]:
    """The ids of the malicious clients: ``attack.num_malicious`` drawn from ``(seed, 0xA77AC)``."""
    count = attack.num_malicious(num_clients)
    if not count:
        return []
    rng = np.random.default_rng([seed, 0xA77AC])
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def poison(kind: str, scale: float, global_state: NamedArrays, state: NamedArrays, rng: np.random.Generator) -> NamedArrays:
    """The state a model-poisoning client sends instead of ``state`` (see the module docstring)."""
    out = {}
    for name, value in state.items():
        x = np.asarray(global_state[name], np.float64)
        delta = np.asarray(value, np.float64) - x
        if kind == "scale":
            poisoned = x + scale * delta
        elif kind == "sign_flip":
            poisoned = x - scale * delta
        elif kind == "gaussian":
            poisoned = x + rng.normal(0.0, scale, size=x.shape)
        else:
            raise ValueError(f"attack.kind: {kind!r} does not poison the model")
        out[name] = poisoned.astype(value.dtype)
    return out


class AttackingTrainer:
    """A :class:`~fedpeft.federation.client.ClientTrainer` whose ``malicious`` clients attack.

    Everything but :meth:`fit` is the wrapped trainer's.
    """

    def __init__(self, trainer: Any, attack: AttackConfig, malicious: list[int], num_labels: int, seed: int) -> None:
        self.trainer, self.attack, self.seed = trainer, attack, seed
        self.malicious = set(malicious)
        self.flipped = None
        if attack.kind == "label_flip":  # (N,) labels y -> C - 1 - y, the features shared
            self.flipped = replace(trainer.train, labels=num_labels - 1 - trainer.train.labels)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trainer, name)

    def fit(self, client: int, indices: np.ndarray, global_state: NamedArrays, rnd: int,
            controls: tuple[NamedArrays, NamedArrays] | None = None,
            names: list[str] | tuple[str, ...] | None = None) -> ClientResult:
        if client not in self.malicious:
            return self.trainer.fit(client, indices, global_state, rnd, controls, names)
        if self.flipped is not None:
            honest = self.trainer.train
            self.trainer.train = self.flipped
            try:
                return self.trainer.fit(client, indices, global_state, rnd, controls, names)
            finally:
                self.trainer.train = honest
        res = self.trainer.fit(client, indices, global_state, rnd, controls, names)
        rng = np.random.default_rng([self.seed, rnd, client, 0xA77])
        return replace(res, state=poison(self.attack.kind, self.attack.attack_scale(), global_state, res.state, rng))
