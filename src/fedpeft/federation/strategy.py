"""Server-side round logic: which clients train, who drops out, and how results are folded in.

The strategy knows nothing about transport: a runtime (in-process or Flower) asks it for a
:class:`RoundPlan`, delivers the global state to the planned clients however it likes, and hands
back their :class:`ClientResult` objects. Client instability follows FedPEFT's setting
(https://arxiv.org/abs/2210.01708): each selected client independently fails to report with
probability ``dropout``; the round aggregates the survivors, folding each result in as it arrives.
With ``federation.scaffold`` the server also keeps SCAFFOLD's control variate ``c``
(:mod:`fedpeft.federation.scaffold`), sent down with the state and moved by the clients' reports.
With FedEx-LoRA (:mod:`fedpeft.federation.fedex`) the global state also holds the adapted layers'
corrected base weights, which clients receive but never send. With an
:class:`~fedpeft.federation.assignment.Assignment` (the ``layers`` method) a client trains and sends
only its assigned names, and each name is averaged over the clients that carried it. Clients
whose device budget fits no training (``[budgets]``, :mod:`fedpeft.budgets.clients`) may be
selected but are marked ``infeasible`` in the plan and never sent work, by any runtime.
With client-level differential privacy (``[privacy]``, :mod:`fedpeft.privacy`) a round hands every
accepted update to the privacy hook (:class:`~fedpeft.privacy.client_level.DPRound`: clipped,
weight 1, a fixed denominator, noised) instead of FedAvg's running sum.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from fedpeft.config import FederationConfig
from fedpeft.errors import ConfigError, UpdateRejected
from fedpeft.federation.aggregate import NamedArrays, RunningFedAvg, validate_update
from fedpeft.federation.assignment import Assignment
from fedpeft.federation.costs import message_bytes
from fedpeft.federation.fedex import FedExLoRA, FedExRound
from fedpeft.federation.robust import check_rule, robust_aggregate, squared_distance
from fedpeft.federation.scaffold import PREFIX as SCAFFOLD_PREFIX
from fedpeft.federation.scaffold import ServerControl
from fedpeft.federation.server_opt import ServerOptimizer
from fedpeft.privacy.client_level import CLIP_KEY, ClientDP, ServerDP

log = logging.getLogger(__name__)

FEDEX_ACCEPTED = "fedex/accepted"  # strategy state: clients aggregated per round (FedEx download bytes)


@dataclass
class RoundPlan:
    round: int
    selected: list[int]  # client ids that receive the global state
    dropped: list[int]  # of those, the ones that will fail to report (simulated instability)
    # selected client -> the exchanged names it trains and sends, where that is not every name
    assigned: dict[int, tuple[str, ...]] = field(default_factory=dict)
    # of the selected, those whose device budget fits no training ([budgets]): never sent work
    infeasible: list[int] = field(default_factory=list)

    @property
    def training(self) -> list[int]:
        """The selected clients a runtime sends work to: neither dropped nor infeasible."""
        skipped = set(self.dropped) | set(self.infeasible)
        return [c for c in self.selected if c not in skipped]


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
class AggregateResult:
    """The weighted average of several clients' deltas, computed where the server could not see
    any one of them (secure aggregation, :mod:`fedpeft.runtime.flower.secagg`): ``mean_delta`` =
    ``sum_i w_i (state_i - global) / sum_i w_i`` over ``clients``, ``weight`` = ``sum_i w_i``
    (rows, or one each under client-level DP); ``info`` goes into the round row as
    ``secure_aggregation``."""

    clients: list[int]
    mean_delta: NamedArrays  # float64
    weight: float
    info: dict = field(default_factory=dict)


@dataclass
class RoundOutcome:
    state: NamedArrays  # the new global state (the previous one if nothing was aggregated)
    aggregated: bool
    accepted: list[int]
    rejected: dict[int, str]  # client id -> reason
    message: str = ""
    # accepted client id -> {"update_norm": L2 norm of its delta, "aggregation": kept | clipped | excluded}
    client_info: dict[int, dict] = field(default_factory=dict)
    buffer_bytes: int = 0  # the round's deltas a rule other than "mean" held at once (0 for "mean")
    privacy: dict = field(default_factory=dict)  # [privacy]: epsilon spent so far, clip_norm, noise_std (row fields)


@dataclass(frozen=True)
class AggregationRule:
    """How a round combines the accepted updates (:mod:`fedpeft.federation.robust`)."""

    aggregator: str = "mean"
    trim_fraction: float = 0.2
    byzantine: int = 0
    max_update_norm: float | None = None

    @classmethod
    def from_config(cls, cfg: FederationConfig) -> "AggregationRule":
        return cls(cfg.aggregator, max_update_norm=cfg.max_update_norm, **cfg.rule_options())

    @property
    def holds_updates(self) -> bool:
        """True when the rule needs every update of the round at once (all but ``mean``)."""
        return self.aggregator != "mean"


class FedAvgStrategy:
    """Uniform client sampling without replacement, simulated dropout, FedAvg of survivors, then
    the server optimizer's step (``federation.server_optimizer``; Reddi et al. 2021,
    https://arxiv.org/abs/2003.00295).

    Every random draw is derived from ``(seed, round)``, so a resumed run plans the same rounds
    as an uninterrupted one; the optimizer's moments and SCAFFOLD's ``c`` go into every
    checkpoint (:meth:`state_dict`).
    """

    def __init__(self, cfg: FederationConfig, num_clients: int, seed: int, fedex: FedExLoRA | None = None,
                 assignment: Assignment | None = None, infeasible: list[int] | None = None,
                 privacy: ClientDP | None = None) -> None:
        self.cfg = cfg
        self.num_clients = num_clients
        self.seed = seed
        self.server_opt = cfg.build_server_optimizer()  # its moments are checkpointed (state_dict)
        self.scaffold = ServerControl(num_clients) if cfg.scaffold else None  # c, checkpointed too
        self.fedex = fedex
        self.fedex_accepted: list[int] = []  # FedEx: clients aggregated in rounds 1.., checkpointed too
        self.rule = AggregationRule.from_config(cfg)
        self.assignment = assignment  # client -> its names (None: every client trains every name)
        self.infeasible = sorted(infeasible or [])  # [budgets]: clients whose device fits no training
        self.privacy = ServerDP(privacy) if privacy is not None else None  # [privacy]: clip norm, checkpointed
        if assignment is not None and assignment.names:
            unsupported = [key for key, on in (("federation.scaffold", cfg.scaffold),
                                               ('method.aggregation = "fedex"', fedex is not None),
                                               ("privacy.mode", privacy is not None)) if on]
            if unsupported:
                raise ConfigError(
                    f"{' and '.join(unsupported)} with clients assigned different parts of the exchanged state "
                    "(method.name = \"layers\" with heterogeneous k): not supported; their control variates / "
                    "residual / the DP average's fixed denominator assume every client sends every name"
                )

    def state_dict(self) -> NamedArrays:
        """What the strategy carries from round to round: the server optimizer's state, with
        SCAFFOLD ``c`` (``scaffold_c/<name>``), with FedEx-LoRA the clients aggregated per round."""
        fedex = {FEDEX_ACCEPTED: np.asarray(self.fedex_accepted, np.int64)} if self.fedex else {}
        privacy = self.privacy.state_dict() if self.privacy else {}  # the adaptive clip norm
        return {**self.server_opt.state_dict(), **(self.scaffold.state_dict() if self.scaffold else {}), **fedex,
                **privacy}

    def load_state_dict(self, state: NamedArrays) -> None:
        state = dict(state)
        privacy = {CLIP_KEY: state.pop(CLIP_KEY)} if CLIP_KEY in state else {}
        if privacy and self.privacy is None:
            raise ValueError("it holds an adaptive clip norm, but privacy.mode is \"none\"")
        if self.privacy is not None:
            self.privacy.load_state_dict(privacy)
        accepted = state.pop(FEDEX_ACCEPTED, None)
        if (accepted is None) != (self.fedex is None):
            raise ValueError("it was written with another method.aggregation (FedEx-LoRA state "
                             f"{'missing' if accepted is None else 'present'})")
        self.fedex_accepted = [] if accepted is None else [int(k) for k in accepted]
        control = {k: v for k, v in state.items() if k.startswith(SCAFFOLD_PREFIX)}
        if control and self.scaffold is None:
            raise ValueError("it holds SCAFFOLD's control variate, but federation.scaffold is off")
        self.server_opt.load_state_dict({k: v for k, v in state.items() if k not in control})
        if self.scaffold is not None:
            self.scaffold.load_state_dict(control)

    def download_bytes(self, plan: RoundPlan, state: NamedArrays, control: NamedArrays | None) -> dict[int, int]:
        """Payload bytes each selected client of ``plan`` downloads: the state (and SCAFFOLD's
        ``c``); with FedEx-LoRA the exchanged part plus the base-weight residuals that client has
        not received (:meth:`~fedpeft.federation.fedex.FedExLoRA.download_bytes`)."""
        if self.fedex is None:  # every floating value at federation.exchange_dtype's size
            down = message_bytes(state, self.cfg.exchange_dtype) + message_bytes(control or {}, self.cfg.exchange_dtype)
            return {cid: down for cid in plan.selected}
        shared = message_bytes(self.fedex.upload_view(state)) + message_bytes(control or {})
        last = {}  # client -> the last round before plan.round it was selected in
        for rnd in range(1, plan.round):
            last.update({cid: rnd for cid in self.plan_round(rnd).selected})
        history = self.fedex_accepted[: plan.round - 1]  # history[r - 1]: clients aggregated in round r
        # a client last selected in round t0 holds the base weights after round t0 - 1: it needs rounds t0..
        return {cid: shared + self.fedex.download_bytes(state, history[last.get(cid, 1) - 1 :]) for cid in plan.selected}

    def clients_per_round(self) -> int:
        count = self.cfg.clients_per_round_count(self.num_clients)  # Config.from_dict checks it fits
        return max(1, min(count, self.num_clients))

    def plan_round(self, rnd: int) -> RoundPlan:
        rng = np.random.default_rng([self.seed, rnd, 0x5E1EC7])
        k = self.clients_per_round()
        selected = sorted(int(c) for c in rng.choice(self.num_clients, size=k, replace=False))
        fails = rng.random(len(selected)) < self.cfg.dropout  # drawn for every selected client: the
        infeasible = sorted(set(selected) & set(self.infeasible))  # same draws with or without budgets
        dropped = [c for c, f in zip(selected, fails) if f and c not in infeasible]
        assigned = {} if self.assignment is None else {
            c: self.assignment.of(c) for c in selected if self.assignment.of(c) is not None and c not in infeasible}
        return RoundPlan(rnd, selected, dropped, assigned, infeasible)

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
        return RoundAggregation(rnd, global_state, self.cfg.min_clients, self.server_opt, self.scaffold,
                                self.fedex, self.fedex_accepted, self.rule,
                                self.assignment.names if self.assignment is not None else None, self.privacy)


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

    With ``fedex`` (FedEx-LoRA) results carry the global state's names without the base weights;
    an aggregated round folds the residual of its averages into them, and appends the number of
    clients it aggregated (0 when it did not) to ``fedex_accepted``.

    ``rule`` (:class:`AggregationRule`): every accepted update's delta ``state - global`` has its
    L2 norm recorded and, with ``max_update_norm``, is clipped to it before anything else; ``mean``
    folds it into the running sum, every other rule holds the round's deltas (float32 copies) and
    combines them in :meth:`finish` (:func:`~fedpeft.federation.robust.robust_aggregate`); a
    round with fewer updates than the rule needs is not aggregated and says so.

    ``assigned`` (client -> names, :class:`~fedpeft.federation.assignment.Assignment`): a listed
    client's update must carry exactly its names (validated against the global state restricted
    to them: a missing or an unassigned name rejects it, by name); every other client's, every
    name. Each name is averaged over the accepted clients that carried it, weighted by samples;
    a name nobody carried keeps its global value exactly, and the server optimizer steps only the
    names that were carried (the others' moments are untouched). ``max_update_norm`` bounds each
    client's whole update (over the names it carried). A rule other than ``mean`` runs once per
    *group*: the names carried by the same set of clients, on those clients' deltas; a group with
    too few clients for the rule keeps its global values, logged and said in the outcome's
    message; a client is ``excluded`` when a group's rule left it out. With every client assigned
    every name there is one group and everything is as without ``assigned``.
    """

    def __init__(self, rnd: int, global_state: NamedArrays, min_clients: int,
                 server_opt: ServerOptimizer | None = None, scaffold: ServerControl | None = None,
                 fedex: FedExLoRA | None = None, fedex_accepted: list[int] | None = None,
                 rule: AggregationRule | None = None, assigned: Mapping[int, tuple[str, ...]] | None = None,
                 privacy: ServerDP | None = None) -> None:
        self.round, self.global_state, self.min_clients = rnd, global_state, min_clients
        self.assigned = dict(assigned or {})
        self.server_opt = server_opt or ServerOptimizer()  # plain FedAvg
        self.scaffold = scaffold
        self.fedex, self.fedex_accepted = fedex, fedex_accepted if fedex_accepted is not None else []
        self.fedex_round: FedExRound | None = fedex.start_round() if fedex else None
        self.reference = fedex.upload_view(global_state) if fedex else global_state  # what a result carries
        self.control = scaffold.current(self.reference) if scaffold else None  # c, sent down
        self.running = RunningFedAvg(partial=bool(self.assigned))
        self.deltas = RunningFedAvg()  # SCAFFOLD: delta_c_i, each with weight 1
        self.accepted: list[int] = []
        self.rejected: dict[int, str] = {}
        self.rule = rule or AggregationRule()
        self.info: dict[int, dict] = {}  # accepted client -> update_norm, aggregation
        self.held: list[tuple[NamedArrays, float]] = []  # rules but mean: (delta, weight) per accepted client
        self.dp_round = privacy.start_round(rnd, self.reference) if privacy is not None else None  # [privacy]
        self.secure: dict | None = None  # a secure aggregate's row fields (AggregateResult.info)

    def add(self, res: "ClientResult | AggregateResult") -> bool:
        """Validate and fold in one result (or a secure aggregate of several); True if accepted."""
        if isinstance(res, AggregateResult):
            return self.add_aggregate(res)
        try:
            validate_update(res.state, self.reference, assigned=self.assigned.get(res.client))
            if res.num_samples <= 0:
                raise UpdateRejected(f"num_samples must be positive, got {res.num_samples}")
            if self.scaffold is not None:
                try:
                    validate_update(res.control, self.reference)
                except UpdateRejected as exc:
                    raise UpdateRejected(f"control variate delta_c: {exc}") from None
        except UpdateRejected as exc:
            self.rejected[res.client] = str(exc)
            log.warning("round %d: rejected the update of client %d: %s", self.round, res.client, exc)
            return False
        if self.dp_round is not None:  # client-level DP: clipped, weight 1, noised at finish (fedpeft.privacy)
            self.info[res.client] = self.dp_round.add(res.state)
            self.accepted.append(res.client)
            return True
        state = self._bounded(res)
        if self.rule.holds_updates:
            self.held.append(({k: (state[k].astype(np.float64) - self.reference[k]).astype(np.float32) for k in state},
                              float(res.num_samples)))
        else:
            self.running.add(state, res.num_samples)
        if self.fedex_round is not None:
            self.fedex_round.add(state, res.num_samples)
        if self.scaffold is not None:
            self.deltas.add(res.control, 1.0)
        self.accepted.append(res.client)
        return True

    def add_aggregate(self, agg: AggregateResult) -> bool:
        """Fold in a secure aggregate: its mean delta is checked (names, shapes, finite values)
        as one update; every client in it counts as accepted (``aggregation = "secure"``: no
        norm is known). Only the plain mean and client-level DP's fixed-denominator sum take
        it (``Config`` refuses the rest: robust rules, SCAFFOLD, FedEx-LoRA, max_update_norm)."""
        if self.rule.holds_updates or self.scaffold is not None or self.fedex_round is not None or self.assigned:
            raise ValueError("a secure aggregate combines only with the plain mean (no robust rule, SCAFFOLD, "
                             "FedEx-LoRA or per-client names)")
        try:
            validate_update({k: v.astype(self.reference[k].dtype) for k, v in agg.mean_delta.items()
                             if k in self.reference}, self.reference)
            if set(agg.mean_delta) != set(self.reference) or not all(np.all(np.isfinite(v)) for v in agg.mean_delta.values()):
                raise UpdateRejected("the secure aggregate does not match the global state's names or is not finite")
        except UpdateRejected as exc:
            for cid in agg.clients:
                self.rejected[cid] = f"secure aggregate: {exc}"
            log.warning("round %d: rejected the secure aggregate of clients %s: %s", self.round, agg.clients, exc)
            return False
        if self.dp_round is not None:  # client-local: each delta clipped and noised on its client, weight 1
            self.dp_round.add_sum({k: d * len(agg.clients) for k, d in agg.mean_delta.items()}, len(agg.clients))
        else:
            ref = self.reference
            self.running.add({k: (np.asarray(ref[k], np.float64) + d).astype(np.asarray(ref[k]).dtype)
                              for k, d in agg.mean_delta.items()}, agg.weight)
        self.accepted.extend(agg.clients)
        self.info.update({cid: {"aggregation": "secure"} for cid in agg.clients})
        self.secure = agg.info
        return True

    def finish(self, rejected_before: dict[int, str] | None = None) -> RoundOutcome:
        """The round's outcome; ``rejected_before`` adds replies a transport could not decode."""
        for cid, reason in (rejected_before or {}).items():
            log.warning("round %d: rejected the reply of client %d: %s", self.round, cid, reason)
        rejected = {**(rejected_before or {}), **self.rejected}
        note = ""
        if len(self.accepted) < self.min_clients:
            message = (
                f"round {self.round}: {len(self.accepted)} client(s) reported, fewer than min_clients="
                f"{self.min_clients}; the global state is unchanged"
            )
            return self._unchanged(rejected, message)
        if self.rule.holds_updates:
            try:
                average, note = self._robust_average()
            except ValueError as exc:
                return self._unchanged(rejected, f"round {self.round}: {self.rule.aggregator} cannot combine "
                                                 f"{len(self.held)} update(s): {exc}; the global state is unchanged")
        elif self.dp_round is not None:  # the noised fixed-denominator average; the optimizer post-processes it
            average = self.dp_round.result()
        else:
            average = self.running.result()
        state = self.server_opt.step(self.reference, average)
        if self.fedex_round is not None:  # fedavg, server_lr 1 (Config checks): state == average
            state = {**state, **self.fedex_round.fold(self.global_state, average)}
            state = {name: state[name] for name in self.global_state}
            self._record_fedex(len(self.accepted))
        if self.scaffold is not None:
            self.scaffold.step(self.deltas)
        privacy = self.dp_round.close(True) if self.dp_round is not None else {}
        if self.secure is not None:
            privacy = {**privacy, "secure_aggregation": self.secure}
        return RoundOutcome(state, True, list(self.accepted), rejected, note, self.info, self._held_bytes(), privacy)

    def _unchanged(self, rejected: dict[int, str], message: str) -> RoundOutcome:
        """The outcome of a round that is not aggregated: the global state as it was, and why."""
        log.warning(message)
        self._record_fedex(0)
        privacy = self.dp_round.close(False) if self.dp_round is not None else {}
        if self.secure is not None:
            privacy = {**privacy, "secure_aggregation": self.secure}
        return RoundOutcome(self.global_state, False, list(self.accepted), rejected, message, self.info,
                            self._held_bytes(), privacy)

    def _bounded(self, res: ClientResult) -> NamedArrays:
        """``res.state``, its delta clipped to ``max_update_norm``; records the delta's L2 norm."""
        ref = self.reference
        norm = float(np.sqrt(sum(squared_distance(v, ref[k]) for k, v in res.state.items())))
        limit = self.rule.max_update_norm
        clipped = limit is not None and norm > limit
        self.info[res.client] = {"update_norm": norm, "aggregation": "clipped" if clipped else "kept"}
        if not clipped:
            return res.state
        factor = limit / norm  # global + factor * delta: the delta scaled to norm `limit`
        return {k: (ref[k] + factor * (np.asarray(v, np.float64) - ref[k])).astype(v.dtype) for k, v in res.state.items()}

    def _robust_average(self) -> tuple[NamedArrays, str]:
        """The held deltas combined by the rule per group of names carried by the same clients,
        added to the global state; marks the excluded. Returns the average of the groups that
        could be combined and a note naming the others (empty when there are none).

        Raises
        ------
        ValueError
            When no group can be combined (too few updates for the rule in every group).
        """
        rule = self.rule
        groups: dict[tuple[int, ...], list[str]] = {}  # held indices -> the names all of them (only) carry
        for name in dict.fromkeys(n for d, _ in self.held for n in d):
            groups.setdefault(tuple(i for i, (d, _) in enumerate(self.held) if name in d), []).append(name)
        average, skipped, errors = {}, [], []
        for members, names in groups.items():
            deltas = [self.held[i][0] for i in members]
            if len(groups) > 1:
                deltas = [{n: d[n] for n in names} for d in deltas]
            try:
                check_rule(rule.aggregator, len(members), rule.trim_fraction, rule.byzantine)
            except ValueError as exc:
                if len(groups) == 1:
                    raise
                skipped.append(f"{len(names)} name(s) carried by client(s) {[self.accepted[i] for i in members]}")
                errors.append(str(exc))
                continue
            delta, statuses = robust_aggregate(rule.aggregator, deltas, [self.held[i][1] for i in members],
                                               trim_fraction=rule.trim_fraction, byzantine=rule.byzantine)
            for i, status in zip(members, statuses):
                if status == "excluded":
                    self.info[self.accepted[i]]["aggregation"] = "excluded"
            average.update({k: (np.asarray(self.reference[k], np.float64) + delta[k]).astype(self.reference[k].dtype)
                            for k in delta})
        if not average:
            raise ValueError("; ".join(dict.fromkeys(errors)))
        note = ""
        if skipped:
            note = (f"round {self.round}: {rule.aggregator} kept the global values of {'; '.join(skipped)}: "
                    f"too few updates for the rule ({errors[0]})")
            log.warning(note)
        return average, note

    def _held_bytes(self) -> int:
        return sum(int(a.nbytes) for d, _ in self.held for a in d.values())

    def _record_fedex(self, count: int) -> None:
        if self.fedex is not None:
            del self.fedex_accepted[self.round - 1 :]  # a round recomputed after a damaged checkpoint
            self.fedex_accepted.append(count)
