"""Server-side round logic: which clients train, who drops out, and how results are folded in.

The strategy knows nothing about transport: a runtime (in-process or Flower) asks it for a
:class:`RoundPlan`, delivers the global state to the planned clients however it likes, and hands
back their :class:`ClientResult` objects. Client instability follows FedPEFT's setting
(https://arxiv.org/abs/2210.01708): each selected client independently fails to report with
probability ``dropout``; the round aggregates the survivors.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from fedpeft.config import FederationConfig
from fedpeft.errors import UpdateRejected
from fedpeft.federation.aggregate import NamedArrays, fedavg, validate_update

log = logging.getLogger(__name__)


@dataclass
class RoundPlan:
    round: int
    selected: list[int]  # client ids that receive the global state
    dropped: list[int]  # of those, the ones that will fail to report (simulated instability)

    @property
    def training(self) -> list[int]:
        dropped = set(self.dropped)
        return [c for c in self.selected if c not in dropped]


@dataclass
class ClientResult:
    client: int
    state: NamedArrays  # the client's exchanged state after local training
    num_samples: int  # FedAvg weight
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundOutcome:
    state: NamedArrays  # the new global state (the previous one if nothing was aggregated)
    aggregated: bool
    accepted: list[int]
    rejected: dict[int, str]  # client id -> reason
    message: str = ""


class FedAvgStrategy:
    """Uniform client sampling without replacement, simulated dropout, FedAvg of survivors.

    Every random draw is derived from ``(seed, round)``, so a resumed run plans the same rounds
    as an uninterrupted one.
    """

    def __init__(self, cfg: FederationConfig, num_clients: int, seed: int) -> None:
        self.cfg = cfg
        self.num_clients = num_clients
        self.seed = seed

    def clients_per_round(self) -> int:
        cpr = self.cfg.clients_per_round
        count = math.ceil(cpr * self.num_clients) if isinstance(cpr, float) else int(cpr)
        return max(1, min(count, self.num_clients))

    def plan_round(self, rnd: int) -> RoundPlan:
        rng = np.random.default_rng([self.seed, rnd, 0x5E1EC7])
        k = self.clients_per_round()
        selected = sorted(int(c) for c in rng.choice(self.num_clients, size=k, replace=False))
        fails = rng.random(len(selected)) < self.cfg.dropout
        dropped = [c for c, f in zip(selected, fails) if f]
        return RoundPlan(rnd, selected, dropped)

    def aggregate_round(
        self,
        rnd: int,
        global_state: NamedArrays,
        results: list[ClientResult],
        rejected_before: dict[int, str] | None = None,
    ) -> RoundOutcome:
        """Validate each result against the global state, then FedAvg the accepted ones.

        A result with wrong names, shapes, dtypes or non-finite values is rejected with its
        reason and never aggregated; ``rejected_before`` adds replies a transport could not even
        decode. With fewer than ``min_clients`` accepted results the global state is kept
        unchanged and the outcome says so.
        """
        accepted: list[ClientResult] = []
        rejected: dict[int, str] = dict(rejected_before or {})
        for cid, reason in rejected.items():
            log.warning("round %d: rejected the reply of client %d: %s", rnd, cid, reason)
        for res in results:
            try:
                validate_update(res.state, global_state)
                if res.num_samples <= 0:
                    raise UpdateRejected(f"num_samples must be positive, got {res.num_samples}")
            except UpdateRejected as exc:
                rejected[res.client] = str(exc)
                log.warning("round %d: rejected the update of client %d: %s", rnd, res.client, exc)
                continue
            accepted.append(res)
        ids = [r.client for r in accepted]
        if len(accepted) < self.cfg.min_clients:
            message = (
                f"round {rnd}: {len(accepted)} client(s) reported, fewer than min_clients="
                f"{self.cfg.min_clients}; the global state is unchanged"
            )
            log.warning(message)
            return RoundOutcome(global_state, False, ids, rejected, message)
        new_state = fedavg([(r.state, r.num_samples) for r in accepted])
        return RoundOutcome(new_state, True, ids, rejected)
