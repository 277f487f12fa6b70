"""Client-level differential privacy: DP-FedAvg (McMahan et al. 2018, https://arxiv.org/abs/1710.06963)
with optional adaptive clipping (Andrew et al. 2021, https://arxiv.org/abs/1905.03871).

Pure functions over named arrays (:func:`delta_norm`, :func:`clip_delta`, :func:`gaussian_noise`,
:func:`adaptive_clip_update`, :func:`adaptive_noise_params`, :func:`local_noise_std`), the
settings a config resolves to (:class:`ClientDP`, :func:`plan_client_dp`), the server-side round
hook that :class:`~fedpeft.federation.strategy.RoundAggregation` calls instead of plain FedAvg
(:class:`DPRound`), and the client-side wrapper of the trainer for ``client-local``
(:class:`LocalDPTrainer`).

Every client's delta ``state - global`` (over the names it sends) is clipped to L2 norm ``C``.
The server averages the clipped deltas with a fixed denominator: every accepted client weighs 1
and the sum is divided by ``m``, the clients per round, whoever reported (DP-FedAvg's estimator
with ``w_k = 1``); one client then moves the average by at most ``C / m`` whatever the others
did, which sample-count weights would not bound. ``client-central``: the server adds
``N(0, (z C / m)^2)`` per coordinate to that average, then the server optimizer steps on it
(post-processing). ``client-local``: each client adds ``N(0, z^2 C^2 / m)`` per coordinate to its
own clipped delta, so the sum of ``m`` clients' noise is ``N(0, z^2 C^2)`` and the average's
``N(0, (z C / m)^2)``: the same as central when all ``m`` report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedpeft.config import Config

NamedArrays = dict[str, np.ndarray]

CLIP_KEY = "privacy/clip_norm"  # strategy state: the adaptive clip norm for the next round
NOISE_TAG = 0xD9  # seeds: (seed, round, NOISE_TAG) server noise; (seed, round, client, NOISE_TAG) a client's


# ----------------------------------------------------------------------------- pure functions


def delta_norm(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``state - reference`` over ``state``'s names (float64)."""
    return float(np.sqrt(sum(float(np.sum((np.asarray(v, np.float64) - reference[k]) ** 2)) for k, v in state.items())))


def clip_delta(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
               clip: float) -> tuple[NamedArrays, float, bool]:
    """``(delta, norm, clipped)``: ``state - reference`` in float64 scaled by ``min(1, clip / norm)``
    (the flat clipping of DP-FedAvg, as Flower's ``clip_inputs_inplace``), its norm before
    clipping, and whether it was scaled."""
    delta = {k: np.asarray(v, np.float64) - np.asarray(reference[k], np.float64) for k, v in state.items()}
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in delta.values())))
    if norm <= clip:
        return delta, norm, False
    factor = clip / norm
    return {k: d * factor for k, d in delta.items()}, norm, True


def gaussian_noise(shapes: Mapping[str, tuple[int, ...]], std: float, rng: np.random.Generator) -> NamedArrays:
    """``N(0, std^2)`` per coordinate (float64), drawn name by name in sorted name order (a state
    read back from a checkpoint may list its names in another order: the same draws)."""
    return {k: rng.normal(0.0, std, size=shapes[k]) if std > 0 else np.zeros(shapes[k]) for k in sorted(shapes)}


def adaptive_clip_update(clip: float, unclipped_fraction: float, target_quantile: float, lr: float) -> float:
    """Andrew et al.'s geometric step: ``C exp(-lr (b - gamma))``, ``b`` the (noised) fraction of
    updates whose norm was at most ``C``, ``gamma`` the target quantile. Flower's
    ``_geometric_update`` computes the same expression."""
    return float(clip * math.exp(-lr * (unclipped_fraction - target_quantile)))


def adaptive_noise_params(noise_multiplier: float, clients_per_round: int,
                          clipped_count_stddev: float | None) -> tuple[float, float]:
    """``(count_stddev, update_noise_multiplier)``: with adaptive clipping the accounted noise
    multiplier ``z`` is split between the update (``z_update``) and the count of unclipped
    clients (``sigma_b``, default ``m / 20``): ``z_update = (z^-2 - (2 sigma_b)^-2)^-1/2``
    (Andrew et al., Theorem 1; Flower's ``compute_adaptive_noise_params``).

    Raises
    ------
    ValueError
        When ``z >= 2 sigma_b``: the count's noise alone would exceed the budget.
    """
    std = clients_per_round / 20 if clipped_count_stddev is None else clipped_count_stddev
    if noise_multiplier <= 0:
        return (0.0 if clipped_count_stddev is None else std), 0.0
    if std <= 0 or noise_multiplier >= 2 * std:
        raise ValueError(f"noise_multiplier {noise_multiplier:.4g} needs clipped_count_stddev > "
                         f"{noise_multiplier / 2:.4g} (it is {std:.4g}; default clients_per_round / 20)")
    return std, float((noise_multiplier ** -2 - (2 * std) ** -2) ** -0.5)


def local_noise_std(noise_multiplier: float, clip: float, clients_per_round: int) -> float:
    """A ``client-local`` client's noise std per coordinate: ``z C / sqrt(m)``, so that the sum of
    ``m`` clients' noise has std ``z C`` (the central mechanism's)."""
    return noise_multiplier * clip / math.sqrt(clients_per_round)


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ClientDP:
    """Client-level DP as a config resolves it (:func:`plan_client_dp`)."""

    mode: str  # client-central | client-local
    noise_multiplier: float  # z, the accounted one (given, or found for target_epsilon)
    update_noise_multiplier: float  # the update's: z, or z_update with adaptive clipping
    clip_norm: float  # fixed clip, or the initial one (adaptive)
    delta: float
    clients_per_round: int  # m: the fixed denominator
    sampling_rate: float  # q = m / num_clients
    seed: int
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float = 0.0

    def epsilon(self, rounds: int) -> float:
        """The epsilon spent after ``rounds`` rounds (:func:`fedpeft.privacy.accountant.epsilon`)."""
        from fedpeft.privacy.accountant import epsilon

        return epsilon(self.sampling_rate, self.noise_multiplier, rounds, self.delta)

    def summary(self) -> dict[str, Any]:
        return {"privacy": self.mode, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "clip_norm": None if self.adaptive else self.clip_norm,
                **({"update_noise_multiplier": self.update_noise_multiplier, "clipped_count_stddev": self.count_stddev,
                    "initial_clip_norm": self.clip_norm} if self.adaptive else {}),
                **({"local_noise_std": local_noise_std(self.noise_multiplier, self.clip_norm, self.clients_per_round)}
                   if self.mode == "client-local" else {})}


def plan_client_dp(cfg: "Config") -> ClientDP | None:
    """The :class:`ClientDP` of ``cfg.privacy`` (None for ``mode = "none"`` or ``"sample"``), the noise multiplier
    searched on the accountant for ``target_epsilon``.

    Raises
    ------
    ValueError
        Naming the key, for a target the rounds and sampling rate cannot meet, or adaptive noise
        parameters that do not fit.
    """
    p = cfg.privacy
    if p.mode in ("none", "sample"):  # sample level: fedpeft.privacy.sample_level
        return None
    num_clients = cfg.partition.num_clients
    m = cfg.federation.clients_per_round_count(num_clients)
    q = m / num_clients
    rounds = cfg.federation.rounds
    if p.noise_multiplier is not None:
        z = p.noise_multiplier
    else:
        from fedpeft.privacy.accountant import noise_for_epsilon

        try:
            z = noise_for_epsilon(p.target_epsilon, q, rounds, p.delta)
        except ValueError as exc:
            raise ValueError(f"privacy.target_epsilon = {p.target_epsilon:g}: {exc}; raise target_epsilon or "
                             "delta, or lower federation.rounds or clients_per_round") from None
    dp = ClientDP(p.mode, z, z, p.clip_norm if p.clip_norm is not None else 0.1, p.delta, m, q, cfg.runtime.seed)
    if p.adaptive_clip:
        try:
            std, z_update = adaptive_noise_params(z, m, p.clipped_count_stddev)
        except ValueError as exc:
            raise ValueError(f"privacy.clipped_count_stddev: {exc}") from None
        dp = replace(dp, adaptive=True, update_noise_multiplier=z_update, count_stddev=std,
                     target_quantile=0.5 if p.target_clipped_quantile is None else p.target_clipped_quantile,
                     clip_lr=0.2 if p.clip_norm_lr is None else p.clip_norm_lr)
    return dp


# ----------------------------------------------------------------------------- server side


class ServerDP:
    """The server's client-level DP across rounds: the clip norm (moved by adaptive clipping,
    strategy state in checkpoints) and each round's :class:`DPRound`."""

    def __init__(self, dp: ClientDP) -> None:
        self.dp = dp
        self.clip = dp.clip_norm

    def state_dict(self) -> NamedArrays:
        return {CLIP_KEY: np.asarray(self.clip, np.float64)} if self.dp.adaptive else {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if (CLIP_KEY in state) != self.dp.adaptive:
            raise ValueError(f"it was written {'with' if CLIP_KEY in state else 'without'} adaptive clipping "
                             f"(privacy.adaptive_clip = {str(self.dp.adaptive).lower()})")
        if self.dp.adaptive:
            self.clip = float(state[CLIP_KEY])

    def start_round(self, rnd: int, reference: NamedArrays) -> "DPRound":
        return DPRound(self, rnd, reference)


class DPRound:
    """One round of DP-FedAvg on the server, fed one accepted update at a time.

    :meth:`add` clips the client's delta to the round's clip norm (``client-central``; a
    ``client-local`` client has clipped and noised its own) and adds it, weight 1, to a float64
    running sum; :meth:`result` is ``reference + sum / m + N(0, (z_update C / m)^2)`` (no server
    noise for ``client-local``), the noise seeded by ``(seed, round)``; :meth:`close` moves an
    adaptive clip by the noised fraction of unclipped updates (over ``m``).
    """

    def __init__(self, server: ServerDP, rnd: int, reference: NamedArrays) -> None:
        self.server, self.dp, self.round, self.reference = server, server.dp, rnd, reference
        self.clip = server.clip
        self.sum = {k: np.zeros(np.shape(v), np.float64) for k, v in reference.items()}
        self.count = 0
        self.unclipped = 0

    def add(self, state: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Fold one accepted update in; returns its ``update_norm`` and ``aggregation`` (kept|clipped)."""
        if self.dp.mode == "client-central":
            delta, norm, clipped = clip_delta(state, self.reference, self.clip)
        else:  # client-local: clipped and noised on the client; its norm is no longer bounded by C
            delta = {k: np.asarray(v, np.float64) - self.reference[k] for k, v in state.items()}
            norm, clipped = float(np.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))), False
        for k, d in delta.items():
            self.sum[k] += d
        self.count += 1
        self.unclipped += not clipped
        return {"update_norm": norm, "aggregation": "clipped" if clipped else "kept"}

    def add_sum(self, delta_sum: Mapping[str, np.ndarray], count: int) -> None:
        """Fold in the sum of ``count`` clients' deltas that secure aggregation computed
        (``client-local`` only: each was clipped and noised on its client, the server never saw it)."""
        if self.dp.mode != "client-local":
            raise ValueError(f'a secure sum needs privacy.mode = "client-local", not "{self.dp.mode}"')
        for k, d in delta_sum.items():
            self.sum[k] += np.asarray(d, np.float64)
        self.count += count
        self.unclipped += count

    def noise_std(self) -> float:
        """The server noise's std per coordinate of the average."""
        if self.dp.mode != "client-central":
            return 0.0
        return self.dp.update_noise_multiplier * self.clip / self.dp.clients_per_round

    def result(self) -> NamedArrays:
        """The noised fixed-denominator average, in the reference's dtypes."""
        m = self.dp.clients_per_round
        rng = np.random.default_rng([self.dp.seed, self.round, NOISE_TAG])
        noise = gaussian_noise({k: np.shape(v) for k, v in self.reference.items()}, self.noise_std(), rng)
        return {k: (np.asarray(ref, np.float64) + self.sum[k] / m + noise[k]).astype(np.asarray(ref).dtype)
                for k, ref in self.reference.items()}

    def close(self, aggregated: bool) -> dict[str, Any]:
        """End the round: an adaptive clip takes its step (only when the round was aggregated);
        returns the row's privacy fields: ``epsilon`` spent so far, ``clip_norm`` used this round,
        ``noise_std``."""
        if self.dp.adaptive and aggregated:
            rng = np.random.default_rng([self.dp.seed, self.round, NOISE_TAG, 1])
            fraction = (self.unclipped + rng.normal(0.0, self.dp.count_stddev)) / self.dp.clients_per_round
            self.server.clip = adaptive_clip_update(self.clip, fraction, self.dp.target_quantile, self.dp.clip_lr)
        return {"epsilon": self.dp.epsilon(self.round), "clip_norm": self.clip,
                "noise_std": self.noise_std() if aggregated else 0.0}


# ----------------------------------------------------------------------------- client side


class LocalDPTrainer:
    """A :class:`~fedpeft.federation.client.ClientTrainer` whose clients clip their own delta to
    ``C`` and add ``N(0, z^2 C^2 / m)`` per coordinate (:func:`local_noise_std`) before sending
    (``privacy.mode = "client-local"``). The noise is seeded by ``(seed, round, client)``.
    Everything but :meth:`fit` is the wrapped trainer's, so every runtime that trains with it
    (in process, each Flower ClientApp) sends the same noised update."""

    def __init__(self, trainer: Any, dp: ClientDP) -> None:
        self.trainer, self.dp = trainer, dp

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trainer, name)

    def fit(self, client: int, indices: np.ndarray, global_state: NamedArrays, rnd: int,
            controls: Any = None, names: Any = None) -> Any:
        res = self.trainer.fit(client, indices, global_state, rnd, controls, names)
        delta, norm, clipped = clip_delta(res.state, global_state, self.dp.clip_norm)
        rng = np.random.default_rng([self.dp.seed, rnd, client, NOISE_TAG])
        std = local_noise_std(self.dp.noise_multiplier, self.dp.clip_norm, self.dp.clients_per_round)
        noise = gaussian_noise({k: d.shape for k, d in delta.items()}, std, rng)
        state = {k: (np.asarray(global_state[k], np.float64) + delta[k] + noise[k]).astype(v.dtype)
                 for k, v in res.state.items()}
        metrics = {**res.metrics, "dp_local_norm": norm, "dp_local_clipped": float(clipped)}
        return replace(res, state=state, metrics=metrics)
