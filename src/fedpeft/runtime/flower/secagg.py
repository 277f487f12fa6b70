"""Secure aggregation on the Flower runtimes with Flower's own SecAgg+ (``privacy.secure_aggregation``).

In flwr 1.42 SecAgg+ exists only in the legacy workflow API: the server side is
``flwr.server.workflow.SecAggPlusWorkflow`` (four stages, each one ``grid.send_and_receive``:
setup / public keys, share keys, collect masked vectors, unmask), the client side
``flwr.client.mod.secaggplus_mod``. fedpeft drives the workflow's stages itself, once per round,
from its own round loop:

* :func:`secure_fit_round` hands the workflow a :class:`legacy context <LegacyContext>` whose
  strategy (:class:`_PlannedClients`) answers ``configure_fit`` with fedpeft's TRAIN payload
  for the round's planned clients (``FitIns``: the packed global state + the TRAIN config) and
  whose ``aggregate_fit`` only captures what the workflow computed: the weighted average of
  the clients' deltas, unmasked. The workflow talks through :class:`_CountingGrid`, which counts
  every stage's wire bytes per node. The average goes to fedpeft's aggregation as one
  :class:`~fedpeft.federation.strategy.AggregateResult` (server optimizer, client-level DP's
  fixed denominator): the server-side code never holds an individual update.
* :func:`secagg_mod` (a ClientApp mod) routes SecAgg+ messages to ``secaggplus_mod``, whose
  training step is :func:`_train_in_secagg`: fedpeft's own training (``train_content``), then
  the client's delta ``state - global`` as one flat float64 vector, weighted by its rows (or 1
  under client-level DP), which ``secaggplus_mod`` clips to ``[-c, c]``, quantizes, masks and
  sends, clearing every array of the reply.

Quantization (Flower's): client ``i`` sends ``SR((clip(r_i d_i, c) + c) Q / 2c)`` per coordinate,
``r_i = round(Q w_i / w_max) / Q`` (``SR``: stochastic rounding with numpy's global RNG, so
secure runs are not bit-reproducible), ``Q = 2**privacy.secagg_quantization_bits``,
``c = privacy.secagg_clipping_range``; the server divides the unmasked sum by ``sum r_i``. Per
coordinate of the average delta the error is at most ``n (2c + max|d|) / (Q sum r_i) <= 3 c n /
(Q sum r_i)`` (``n`` clients; rounding < 1 unit each, weight rounding < 1/2Q each), as long as no
value was clipped (``|r_i d_i| <= c``): :func:`error_bound`; clients count clipped values and the
round row reports both (``secure_aggregation``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedpeft.errors import FedPeftError
from fedpeft.federation.costs import SECAGG_VALUE_BYTES
from fedpeft.federation.strategy import AggregateResult, ClientResult, RoundPlan
from fedpeft.methods.base import NamedArrays
from fedpeft.runtime.flower.wire import record_to_state, state_to_record, wire_bytes
from fedpeft.runtime.rounds import Delivery

if TYPE_CHECKING:
    from fedpeft.experiment import Experiment
    from fedpeft.runtime.flower.app import FlowerClients

KEYS = "fedpeft-record-keys"  # FitIns config: the packed state's record keys, in the order of its tensors
TRAIN_KEYS = ("round", "partition-id", "fedpeft-config")  # FitIns config -> fedpeft's TRAIN config
MAX_WEIGHT, CLIP, UNIT = "fedpeft-secagg-max-weight", "fedpeft-secagg-clip", "fedpeft-secagg-unit-weights"
CLIPPED_METRIC = "secagg_clipped_values"  # reply metrics: values beyond [-c, c] before quantization
MODULUS = 2**32  # Flower's modulus_range (its maximum)
DEFAULT_CLIPPING_RANGE, DEFAULT_QUANTIZATION_BITS = 8.0, 22  # Flower's defaults (clipping_range, 2**22)
STAGES = 4  # message rounds per training round: setup, share keys, collect masked vectors, unmask


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ as a config resolves it (:func:`plan_secagg`)."""

    clipping_range: float  # c
    quantization_range: int  # Q
    max_weight: float  # w_max: the largest client weight (rows; 1 with unit weights)
    unit_weights: bool  # client-level DP: every client weighs 1 (the fixed denominator)
    timeout: float

    def workflow(self) -> SecAggPlusWorkflow:
        """Flower's workflow: every planned client a neighbour of every other (``num_shares = 1.0``),
        half of them needed to reconstruct a dropped client's masks."""
        return SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5, max_weight=self.max_weight,
                                  clipping_range=self.clipping_range, quantization_range=self.quantization_range,
                                  modulus_range=MODULUS, timeout=self.timeout)

    def error_bound(self, weights: list[float]) -> float:
        """Worst-case error per coordinate of the average delta for clients of ``weights``
        (module docstring), when no value was clipped."""
        q = self.quantization_range
        ratios = sum(round(w / self.max_weight * q) / q for w in weights)
        return 3 * self.clipping_range * len(weights) / (q * ratios)


def plan_secagg(exp: "Experiment") -> SecAggSettings | None:
    """The :class:`SecAggSettings` of ``exp.cfg.privacy`` (None when secure aggregation is off)."""
    p = exp.cfg.privacy
    if not p.secure_aggregation:
        return None
    unit = p.mode == "client-local"
    clip = DEFAULT_CLIPPING_RANGE if p.secagg_clipping_range is None else p.secagg_clipping_range
    bits = DEFAULT_QUANTIZATION_BITS if p.secagg_quantization_bits is None else p.secagg_quantization_bits
    return SecAggSettings(clip, 2 ** bits,
                          1.0 if unit else float(max(len(part) for part in exp.parts)), unit, exp.cfg.runtime.round_timeout)


class _PlannedClients(Strategy):
    """The legacy strategy the workflow asks: the round's fitins, and a sink for its average."""

    def __init__(self, fitins: dict[int, FitIns], grid: Any) -> None:
        self.fitins, self.grid, self.results = fitins, grid, None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(nid, self.grid, 0), ins) for nid, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = results  # every FitRes now carries the unmasked average, not its own update
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _CountingGrid:
    """``send_and_receive`` for the workflow over fedpeft's push / poll / pull
    (:class:`~fedpeft.runtime.flower.app.FlowerClients`), counting wire bytes per node."""

    def __init__(self, clients: "FlowerClients", timeout: float) -> None:
        self.clients, self.timeout = clients, timeout
        self.down: dict[int, int] = {}  # node id -> bytes sent to it, every stage
        self.up: dict[int, int] = {}
        self.stages = 0
        self.stage_s: list[float] = []  # each stage's seconds, from the first push to the last reply

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        t0 = time.perf_counter()
        msgs = {m.metadata.dst_node_id: m for m in messages}
        for nid, m in msgs.items():
            self.down[nid] = self.down.get(nid, 0) + wire_bytes(m.content)
        pushed, _ = self.clients._push(msgs)  # a message not accepted gets no reply: SecAgg+ drops that node
        replies = self.clients._collect(pushed, timeout or self.timeout, None)
        for nid, reply in replies.items():
            if not reply.has_error():
                self.up[nid] = self.up.get(nid, 0) + wire_bytes(reply.content)
        self.stages += 1
        self.stage_s.append(time.perf_counter() - t0)
        return list(replies.values())


def secure_fit_round(clients: "FlowerClients", plan: RoundPlan, state: NamedArrays,
                     on_result: Any, settings: SecAggSettings) -> Delivery:
    """One round through SecAgg+: the planned clients train, the server learns only the weighted
    average of their deltas, handed to ``on_result`` as one :class:`AggregateResult`."""
    if plan.assigned:
        raise FedPeftError("privacy.secure_aggregation: clients assigned part of the state (method layers) "
                           "would need one secure sum per group of names; not built")
    delivery = Delivery(wire_up={}, wire_down={})
    connected = set(clients.grid.get_node_ids())
    record = state_to_record(state)
    keys = list(record.keys())
    params = ndarrays_to_parameters([record[k].numpy() for k in keys])
    fitins: dict[int, FitIns] = {}
    for cid in plan.training:
        if clients.nodes.get(cid) not in connected:
            delivery.failed[cid] = "its SuperNode is not connected"
            continue
        fitins[clients.nodes[cid]] = FitIns(params, {
            "round": plan.round, "partition-id": cid, "fedpeft-config": clients.text, KEYS: json.dumps(keys),
            MAX_WEIGHT: settings.max_weight, CLIP: settings.clipping_range, UNIT: settings.unit_weights})
    by_node = {clients.nodes[cid]: cid for cid in plan.training if cid not in delivery.failed}
    if len(fitins) < 2:
        for cid in by_node.values():
            delivery.failed[cid] = f"SecAgg+ needs at least 2 clients in a round, {len(fitins)} connected"
        return delivery
    grid = _CountingGrid(clients, settings.timeout)
    strategy = _PlannedClients(fitins, clients.grid)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: plan.round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    t0 = time.perf_counter()
    settings.workflow()(grid, context)
    delivery.wire_down = {by_node[n]: b for n, b in grid.down.items() if n in by_node}
    delivery.wire_up = {by_node[n]: b for n, b in grid.up.items() if n in by_node}
    contributed = {by_node[p.node_id]: res for p, res in (strategy.results or [])}
    for cid in set(by_node.values()) - set(contributed):
        delivery.failed[cid] = ("dropped out of SecAgg+ (no masked update, or an error reply)" if strategy.results
                                else f"SecAgg+ halted after {grid.stages} of {STAGES} stages: too few clients answered")
    if not contributed:
        return delivery
    flat = parameters_to_ndarrays(next(iter(contributed.values())).parameters)[0]
    average, start = {}, 0
    for name, ref in state.items():  # the flat average back into named arrays (float64)
        size = int(np.prod(np.shape(ref), dtype=np.int64))
        average[name] = flat[start:start + size].reshape(np.shape(ref))
        start += size
    weights = [float(res.num_examples) for res in contributed.values()]
    clipped = int(sum(res.metrics.get(CLIPPED_METRIC, 0) for res in contributed.values()))
    info = {"message_rounds": grid.stages, "error_bound": settings.error_bound(weights), "clipped_values": clipped,
            "clipping_range": settings.clipping_range, "quantization_range": settings.quantization_range,
            "protocol_s": time.perf_counter() - t0, "stage_s": grid.stage_s}
    for cid, res in sorted(contributed.items()):
        metrics = {k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))}
        delivery.results.append(ClientResult(cid, {}, int(metrics.pop("num-examples", res.num_examples)), metrics))
        delivery.bytes_up[cid] = flat.size * SECAGG_VALUE_BYTES  # one masked 64-bit integer per coordinate
    on_result(AggregateResult(sorted(contributed), average, sum(weights), info))
    return delivery


# ----------------------------------------------------------------------------- client side


def secagg_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """fedpeft's ClientApp mod: SecAgg+ messages (they carry ``secaggplus_mod``'s config record)
    go through ``secaggplus_mod`` with :func:`_train_in_secagg` as its training step; every
    other message is fedpeft's own."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, _train_in_secagg)


def _train_in_secagg(msg: Message, context: Context) -> Message:
    """Train from a SecAgg+ ``FitIns`` and reply with the ``FitRes`` ``secaggplus_mod`` masks:
    the delta ``state - global`` as one flat float64 vector, weighted by the client's rows (1
    with ``unit weights``), its values beyond ``[-c, c]`` after weighting counted."""
    from fedpeft.runtime.flower.app import train_content

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = fitins.config
    record = ArrayRecord({k: Array(a) for k, a in zip(json.loads(str(cfg[KEYS])), parameters_to_ndarrays(fitins.parameters))})
    reply = train_content(RecordDict({"arrays": record, "config": ConfigRecord({k: cfg[k] for k in TRAIN_KEYS})}), context)
    start, trained = record_to_state(record), record_to_state(reply["arrays"])
    delta = np.concatenate([(np.asarray(trained[k], np.float64) - np.asarray(v, np.float64)).reshape(-1)
                            for k, v in start.items()])
    if not np.all(np.isfinite(delta)):
        raise FedPeftError("secure aggregation: this client's update is not finite; it is not sent")
    metrics = {k: v for k, v in reply["metrics"].items()}
    weight = 1 if bool(cfg[UNIT]) else int(metrics["num-examples"])
    metrics[CLIPPED_METRIC] = int(np.sum(np.abs(delta * (weight / float(cfg[MAX_WEIGHT]))) > float(cfg[CLIP])))
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([delta]), weight, metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
