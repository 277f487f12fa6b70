"""Privacy accounting of client-level DP-FedAvg: the RDP accountant of the sampled Gaussian
mechanism (Mironov et al. 2019, https://arxiv.org/abs/1908.10530) over rounds.

One round is one step of the sampled Gaussian mechanism with sampling rate
``q = clients_per_round / num_clients`` and noise multiplier ``z`` (noise std over the clip
norm, on the sum of the clipped client deltas). The RDP of ``steps`` rounds is converted to
``(epsilon, delta)``-DP at the best order. Both come from Opacus
(``opacus.accountants.analysis.rdp``, its ``RDPAccountant``'s orders), imported on first use.

The analysis assumes Poisson sampling (each client joins a round independently with probability
``q``); fedpeft samples exactly ``clients_per_round`` clients without replacement, as
DP-FedAvg's experiments and Flower do, so the reported epsilon is that of Poisson sampling at the
same rate (docs/methods.md: Differential privacy).
"""

from __future__ import annotations

import functools
import math
import warnings

MAX_NOISE_MULTIPLIER = 100.0  # a target that needs more noise than this is refused (noise drowns every update)


def _orders(integer_only: bool = False) -> list[float]:
    from opacus.accountants import RDPAccountant

    return [a for a in RDPAccountant.DEFAULT_ALPHAS if not integer_only or float(a).is_integer()]


@functools.lru_cache(maxsize=4096)
def epsilon(q: float, noise_multiplier: float, steps: int, delta: float, integer_orders: bool = False) -> float:
    """The epsilon spent after ``steps`` rounds at sampling rate ``q`` and noise multiplier
    ``noise_multiplier``, for ``delta``; ``inf`` without noise, 0 after no round.

    The orders are those of Opacus's ``RDPAccountant`` (1.1..10.9 by 0.1, 12..63), so this is the
    epsilon that accountant reports after ``steps`` steps of ``(noise_multiplier, q)``;
    ``integer_orders`` keeps its integer orders only (about 30x faster, an epsilon at least as large).
    """
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants.analysis import rdp

    orders = _orders(integer_orders)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a looser bound, still valid
        warnings.simplefilter("ignore")
        curve = rdp.compute_rdp(q=q, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
        eps, _ = rdp.get_privacy_spent(orders=orders, rdp=curve, delta=delta)
    return float(eps)


def noise_for_epsilon(target_epsilon: float, q: float, steps: int, delta: float, tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier (within ``tolerance`` relative on epsilon) whose epsilon after
    ``steps`` rounds is at most ``target_epsilon``: a bisection on the accountant at its integer
    orders, so the :func:`epsilon` reported for it (every order) is at most the target as well.

    Raises
    ------
    ValueError
        When even :data:`MAX_NOISE_MULTIPLIER` cannot meet the target.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon must be > 0 and finite, got {target_epsilon}")
    high = MAX_NOISE_MULTIPLIER
    if epsilon(q, high, steps, delta, True) > target_epsilon:
        raise ValueError(
            f"epsilon {target_epsilon:g} cannot be met: even noise_multiplier = {high:g} spends "
            f"{epsilon(q, high, steps, delta, True):.4g} over {steps} round(s) at sampling rate q = {q:.4g}, delta = {delta:g}")
    low = 0.0
    while high - low > 1e-6 * high:
        mid = (low + high) / 2
        eps = epsilon(q, mid, steps, delta, True)
        if eps > target_epsilon:
            low = mid
        else:
            high = mid
            if target_epsilon - eps <= tolerance * target_epsilon:
                break
    return high
