"""Server-side round logic: which clients train, who drops out, and how results are folded in.

The strategy knows nothing about transport: a runtime (in-process or Flower) asks it for a
:class:`RoundPlan`, delivers the global state to the planned clients however it likes, and hands
back their :class:`ClientResult` objects. Client instability follows FedPEFT's setting
(https://arxiv.org/abs/2210.01708): each selected client independently fails to report with
probability ``dropout``; the round aggregates the survivors, folding each result in as it arrives.
With ``federation.scaffold`` the server also keeps SCAFFOLD's control variate ``c``
(:mod:`fedpeft.federation.scaffold`), sent down with the state and moved by the clients' reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from fedpeft.config import FederationConfig
from fedpeft.errors import UpdateRejected
from fedpeft.federation.aggregate import NamedArrays, RunningFedAvg, validate_update
from fedpeft.federation.scaffold import PREFIX as SCAFFOLD_PREFIX
from fedpeft.federation.scaffold import ServerControl
from fedpeft.federation.server_opt import ServerOptimizer

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
    control: NamedArrays = field(default_factory=dict)  # SCAFFOLD: delta_c_i, sent with the state

    def without_state(self) -> "ClientResult":
        """The same facts (client, samples, metrics) without the arrays: what a runtime keeps
        once the state has been folded into the round's aggregate."""
        return replace(self, state={}, control={})


@dataclass
class RoundOutcome:
    state: NamedArrays  # the new global state (the previous one if nothing was aggregated)
    aggregated: bool
    accepted: list[int]
    rejected: dict[int, str]  # client id -> reason
    message: str = ""


class FedAvgStrategy:
    """Uniform client sampling without replacement, simulated dropout, FedAvg of survivors, then
    the server optimizer's step (``federation.server_optimizer``; Reddi et al. 2021,
    https://arxiv.org/abs/2003.00295).

    Every random draw is derived from ``(seed, round)``, so a resumed run plans the same rounds
    as an uninterrupted one; the optimizer's moments and SCAFFOLD's ``c`` go into every
    checkpoint (:meth:`state_dict`).
    """

    def __init__(self, cfg: FederationConfig, num_clients: int, seed: int) -> None:
        self.cfg = cfg
        self.num_clients = num_clients
        self.seed = seed
        self.server_opt = cfg.build_server_optimizer()  # its moments are checkpointed (state_dict)
        self.scaffold = ServerControl(num_clients) if cfg.scaffold else None  # c, checkpointed too

    def state_dict(self) -> NamedArrays:
        """What the strategy carries from round to round: the server optimizer's state and, with
        SCAFFOLD, ``c`` (``scaffold_c/<name>``)."""
        return {**self.server_opt.state_dict(), **(self.scaffold.state_dict() if self.scaffold else {})}

    def load_state_dict(self, state: NamedArrays) -> None:
        control = {k: v for k, v in state.items() if k.startswith(SCAFFOLD_PREFIX)}
        if control and self.scaffold is None:
            raise ValueError("it holds SCAFFOLD's control variate, but federation.scaffold is off")
        self.server_opt.load_state_dict({k: v for k, v in state.items() if k not in control})
        if self.scaffold is not None:
            self.scaffold.load_state_dict(control)

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
        return RoundAggregation(rnd, global_state, self.cfg.min_clients, self.server_opt, self.scaffold)


class RoundAggregation:
    """One round's aggregation, fed one client result at a time (sequential aggregation).

    Each result is validated against the global state on arrival: a result with wrong names,
    shapes, dtypes or non-finite values is rejected with its reason and never aggregated; an
    accepted one is folded into a :class:`RunningFedAvg` and its state is not kept, so the server
    holds one running sum however many clients report. :meth:`finish` moves the global state by
    the server optimizer's step on the average (plain FedAvg: the average itself); with fewer
    than ``min_clients`` accepted results it keeps the global state unchanged and says so (the
    optimizer takes no step).

    With ``scaffold`` (the server's :class:`~fedpeft.federation.scaffold.ServerControl`),
    :attr:`control` is the ``c`` sent with the state this round; every result must carry a
    ``delta_c_i`` of the global state's form, checked like the state (a bad one rejects the
    whole result), and an aggregated round moves ``c`` by the accepted ones, unweighted.
    """

    def __init__(self, rnd: int, global_state: NamedArrays, min_clients: int,
                 server_opt: ServerOptimizer | None = None, scaffold: ServerControl | None = None) -> None:
        self.round, self.global_state, self.min_clients = rnd, global_state, min_clients
        self.server_opt = server_opt or ServerOptimizer()  # plain FedAvg
        self.scaffold = scaffold
        self.control = scaffold.current(global_state) if scaffold else None  # c, sent down
        self.running = RunningFedAvg()
        self.deltas = RunningFedAvg()  # SCAFFOLD: delta_c_i, each with weight 1
        self.accepted: list[int] = []
        self.rejected: dict[int, str] = {}

    def add(self, res: ClientResult) -> bool:
        """Validate and fold in one result; True if it was accepted."""
        try:
            validate_update(res.state, self.global_state)
            if res.num_samples <= 0:
                raise UpdateRejected(f"num_samples must be positive, got {res.num_samples}")
            if self.scaffold is not None:
                try:
                    validate_update(res.control, self.global_state)
                except UpdateRejected as exc:
                    raise UpdateRejected(f"control variate delta_c: {exc}") from None
        except UpdateRejected as exc:
            self.rejected[res.client] = str(exc)
            log.warning("round %d: rejected the update of client %d: %s", self.round, res.client, exc)
            return False
        self.running.add(res.state, res.num_samples)
        if self.scaffold is not None:
            self.deltas.add(res.control, 1.0)
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
        state = self.server_opt.step(self.global_state, self.running.result())
        if self.scaffold is not None:
            self.scaffold.step(self.deltas)
        return RoundOutcome(state, True, list(self.accepted), rejected)
