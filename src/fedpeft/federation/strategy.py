"""Server-side round logic: which clients train, who drops out, and how results are folded in.

The strategy knows nothing about transport: a runtime (in-process or Flower) asks it for a
:class:`RoundPlan`, delivers the global state to the planned clients however it likes, and hands
back their :class:`ClientResult` objects. Client instability follows FedPEFT's setting
(https://arxiv.org/abs/2210.01708): each selected client independently fails to report with
probability ``dropout``; the round aggregates the survivors, folding each result in as it arrives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from fedpeft.config import FederationConfig
from fedpeft.errors import UpdateRejected
from fedpeft.federation.aggregate import NamedArrays, RunningFedAvg, validate_update

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

    def without_state(self) -> "ClientResult":
        """The same facts (client, samples, metrics) without the arrays: what a runtime keeps
        once the state has been folded into the round's aggregate."""
        return replace(self, state={})


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
        count = self.cfg.clients_per_round_count(self.num_clients)  # Config.from_dict checks it fits
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
        """Validate each result against the global state, then FedAvg the accepted ones (the
        batch form of :meth:`start_round`: the same checks and sums)."""
        aggregation = self.start_round(rnd, global_state)
        for res in results:
            aggregation.add(res)
        return aggregation.finish(rejected_before)

    def start_round(self, rnd: int, global_state: NamedArrays) -> "RoundAggregation":
        """An aggregation that folds results in as they arrive (see :class:`RoundAggregation`)."""
        return RoundAggregation(rnd, global_state, self.cfg.min_clients)


class RoundAggregation:
    """One round's aggregation, fed one client result at a time (sequential aggregation).

    Each result is validated against the global state on arrival: a result with wrong names,
    shapes, dtypes or non-finite values is rejected with its reason and never aggregated; an
    accepted one is folded into a :class:`RunningFedAvg` and its state is not kept, so the server
    holds one running sum however many clients report. With fewer than ``min_clients`` accepted
    results, :meth:`finish` keeps the global state unchanged and says so.
    """

    def __init__(self, rnd: int, global_state: NamedArrays, min_clients: int) -> None:
        self.round, self.global_state, self.min_clients = rnd, global_state, min_clients
        self.running = RunningFedAvg()
        self.accepted: list[int] = []
        self.rejected: dict[int, str] = {}

    def add(self, res: ClientResult) -> bool:
        """Validate and fold in one result; True if it was accepted."""
        try:
            validate_update(res.state, self.global_state)
            if res.num_samples <= 0:
                raise UpdateRejected(f"num_samples must be positive, got {res.num_samples}")
        except UpdateRejected as exc:
            self.rejected[res.client] = str(exc)
            log.warning("round %d: rejected the update of client %d: %s", self.round, res.client, exc)
            return False
        self.running.add(res.state, res.num_samples)
        self.accepted.append(res.client)
        return True

    def finish(self, rejected_before: dict[int, str] | None = None) -> RoundOutcome:
        """The round's outcome; ``rejected_before`` adds replies a transport could not decode."""
        for cid, reason in (rejected_before or {}).items():
            log.warning("round %d: rejected the reply of client %d: %s", self.round, cid, reason)
        rejected = {**(rejected_before or {}), **self.rejected}
        if len(self.accepted) < self.min_clients:
            message = (
                f"round {self.round}: {len(self.accepted)} client(s) reported, fewer than min_clients="
                f"{self.min_clients}; the global state is unchanged"
            )
            log.warning(message)
            return RoundOutcome(self.global_state, False, list(self.accepted), rejected, message)
        return RoundOutcome(self.running.result(), True, list(self.accepted), rejected)
