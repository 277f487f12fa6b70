"""fedpeft as a Flower app: a ServerApp that drives the shared round loop, a ClientApp that trains.

Message API (``flwr.serverapp`` / ``flwr.clientapp``); the algorithm objects are the same as in the
in-process runtime (:class:`~fedpeft.federation.strategy.FedAvgStrategy`,
:class:`~fedpeft.federation.client.ClientTrainer`), only the transport differs.

Wire format
    ``TRAIN`` server -> client: ``arrays`` (ArrayRecord: the global exchanged state, packed by
    :func:`~fedpeft.runtime.flower.wire.state_to_record` into a ``layout`` of names, dtypes and
    shapes + one buffer per dtype; with ``federation.exchange_dtype = "bfloat16"`` the floating
    arrays as bfloat16 bits, a reply in another dtype is rejected) and
    ``config`` (ConfigRecord: ``round``, ``partition-id``, ``fedpeft-config`` = the experiment
    config as TOML text; ``assigned``, a list of names, when the client is assigned part of the
    exchanged state: :mod:`fedpeft.federation.assignment`). Reply: ``arrays`` (the client's
    exchanged state, or its assigned names only) and ``metrics``
    (MetricRecord: ``num-examples``, ``train_loss``, ``steps``, ``samples_processed``, ``flops``,
    ``compute_s``). ``QUERY``: a node reports the ``partition-id`` / ``num-partitions`` of its node
    config, so the server knows which node holds which client's data.
SCAFFOLD (``federation.scaffold``)
    ``TRAIN`` also carries ``control`` (the server's ``c``, packed like ``arrays``), the reply
    ``control`` (``delta_c_i``). The node keeps its ``c_i`` in ``context.state`` under
    :data:`CLIENT_CONTROL_KEY` (an ArrayRecord), which Flower keeps for the node across the
    messages of one run (a SuperNode's NodeState; the simulation engine's per-node context) and
    not beyond: a resumed run, or a restarted SuperNode, starts its ``c_i`` at 0.
Sample-level DP (``privacy.mode = "sample"``, :mod:`fedpeft.privacy.sample_level`)
    The node keeps its client's DP-SGD accountant (steps, sampling rate) in ``context.state``
    under :data:`ACCOUNTANT_KEY`, like SCAFFOLD's ``c_i``, and reports it in the reply's
    ``client-state`` record (with ``epsilon`` in its metrics). The server keeps that copy in its
    checkpoints and sends it back in ``client-state`` of TRAIN: a node that has none in its
    ``context.state`` (a resumed run, a restarted SuperNode: a new Flower run's node state is
    empty) continues from it, so the epsilon is the uninterrupted run's.
Secure aggregation (``privacy.secure_aggregation``)
    A round is Flower's SecAgg+ workflow driven by :func:`~fedpeft.runtime.flower.secagg.secure_fit_round`
    (four message rounds); the ClientApp's mod :func:`~fedpeft.runtime.flower.secagg.secagg_mod`
    hands those messages to Flower's ``secaggplus_mod``.
Split training (``sfprompt``)
    The TRAIN message starts a chain of ``train.split`` messages, per batch a forward and a
    backward exchange with the body on the ServerApp: :mod:`fedpeft.runtime.flower.split`
    (hooked in by :func:`train`, :func:`train_split` and :func:`make_server_app`).
Run config (deployment)
    ``fedpeft-config`` (TOML text), ``out`` (run folder on the ServerApp's machine), ``resume``.
Backbone reuse
    :data:`_CLIENT_EXPERIMENTS` keeps the built experiment (model, encoded partition) of the last
    config per process: a long-lived ClientApp process (``fedpeft flower-worker``, or a Ray
    actor in simulation) loads the backbone once for the whole run.
"""

from __future__ import annotations

import hashlib
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import Config, RuntimeConfig
from fedpeft.errors import FedPeftError
from fedpeft.federation.costs import message_bytes
from fedpeft.federation.precision import exchange_result
from fedpeft.federation.scaffold import advance, zeros_like
from fedpeft.federation.strategy import ClientResult, RoundPlan
from fedpeft.history import CLIENT_METRICS
from fedpeft.methods.base import NamedArrays
from fedpeft.runtime.flower.polling import fast_grid_pulls
from fedpeft.runtime.flower.secagg import plan_secagg, secagg_mod, secure_fit_round
from fedpeft.runtime.flower.wire import record_to_state, state_to_record, wire_bytes
from fedpeft.runtime.rounds import Delivery

if TYPE_CHECKING:
    from fedpeft.experiment import Experiment

CONFIG_KEY = "fedpeft-config"
METRIC_KEYS = CLIENT_METRICS  # what a reply's metrics carry
POLL_S = (0.05, 1.0)  # the ServerApp asks for replies after 0.05 s, backing off to every 1 s
OVERSIZE_FACTOR = 1.5  # a reply larger than this x the global state's wire size is not decoded
CLIENT_CONTROL_KEY = "fedpeft.scaffold.c_i"  # SCAFFOLD: the node's c_i in context.state
ASSIGNED_KEY = "assigned"  # TRAIN config: the names the client trains and sends (absent: every name)
ACCOUNTANT_KEY = "fedpeft.privacy.sample_accountant"  # DP-SGD: the node's client's accountant in context.state
CLIENT_STATE = "client-state"  # TRAIN and reply record: the client's DP-SGD accountant (privacy.mode = "sample")


def config_from_text(text: str) -> Config:
    """The experiment config carried as TOML text (run config or message)."""
    try:
        return Config.from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise FedPeftError(f"{CONFIG_KEY}: not valid TOML: {exc}") from None


# --------------------------------------------------------------------------------------- client

client_app = ClientApp(mods=[secagg_mod])  # SecAgg+ messages to Flower's secaggplus_mod, the rest as is
_CLIENT_EXPERIMENTS: dict[str, "Experiment"] = {}


NODE_DATA_KEYS = {"data-dir": "data_dir", "data-train": "train", "data-test": "test"}  # node config -> [data]


def client_experiment(text: str, node_config: Mapping[str, object] | None = None) -> "Experiment":
    """Build (once per config, per process) the experiment a client trains with.

    The config's data paths are the server's. A SuperNode whose copy of the data lives elsewhere
    says where in its node config (``data-dir``, ``data-train``, ``data-test``: see
    :data:`NODE_DATA_KEYS`); ``data.fingerprint`` then proves it is the same data, or the build
    fails naming what differs.
    """
    from fedpeft.experiment import build_experiment

    local = {key: str(node_config[name]) for name, key in NODE_DATA_KEYS.items() if node_config and name in node_config}
    cache_key = hashlib.sha256((text + repr(sorted(local.items()))).encode()).hexdigest()
    if cache_key not in _CLIENT_EXPERIMENTS:
        _CLIENT_EXPERIMENTS.clear()  # one backbone per process
        cfg = config_from_text(text)
        if local:
            cfg = replace(cfg, data=replace(cfg.data, **local))
        _CLIENT_EXPERIMENTS[cache_key] = build_experiment(cfg, with_test=False)
    return _CLIENT_EXPERIMENTS[cache_key]


def node_partition(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise FedPeftError("SuperNode node config needs partition-id and num-partitions")
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


@client_app.query()
def report_partition(msg: Message, context: Context) -> Message:
    """Say which partition this node holds, after building the experiment (model + data) so the
    first training round costs what every round costs."""
    pid, num = node_partition(context)
    if "config" in msg.content.config_records:
        client_experiment(str(msg.content.config_records["config"][CONFIG_KEY]), context.node_config)
    return Message(RecordDict({"node": ConfigRecord({"partition-id": pid, "num-partitions": num})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's partition from the global state in ``msg``; reply with the new state."""
    return Message(train_content(msg.content, context), reply_to=msg)


def train_content(received: RecordDict, context: Context) -> RecordDict:
    """:func:`train` on records: the TRAIN message's content in, the reply's content out (also
    what :mod:`fedpeft.runtime.flower.secagg` trains with inside SecAgg+)."""
    pid, num = node_partition(context)
    config = received["config"]
    if int(config["partition-id"]) != pid:
        raise FedPeftError(f"asked to train partition {config['partition-id']} but this node holds {pid}")
    exp = client_experiment(str(config[CONFIG_KEY]), context.node_config)
    if num != len(exp.parts):
        raise FedPeftError(f"node config num-partitions={num} but partition.num_clients={len(exp.parts)}")
    if exp.cfg.method.name == "sfprompt":  # split training: the first message of the round's chain
        from fedpeft.runtime.flower.split import begin_round

        return begin_round(received, context, exp, pid)
    dtype = exp.cfg.federation.exchange_dtype  # every floating value of the messages
    state, rnd = record_to_state(received["arrays"], dtype), int(config["round"])
    names = [str(n) for n in config[ASSIGNED_KEY]] if ASSIGNED_KEY in config else None
    accountant = getattr(exp.trainer, "sample_accountant", None)  # privacy.mode = "sample"
    if accountant is not None:  # this node's own history, else the server's copy (a new Flower run)
        kept = context.state.array_records.get(ACCOUNTANT_KEY, received.array_records.get(CLIENT_STATE))
        accountant.load_client_state(pid, {} if kept is None else record_to_state(kept))
    if not exp.cfg.federation.scaffold:
        res = exchange_result(exp.trainer.fit(pid, exp.parts[pid], state, rnd, names=names), dtype)
    else:
        if "control" not in received.array_records:
            raise FedPeftError("federation.scaffold is on but the TRAIN message carries no 'control' record")
        c = record_to_state(received["control"], dtype)
        kept = context.state.array_records.get(CLIENT_CONTROL_KEY)
        c_i = zeros_like(c) if kept is None else record_to_state(kept)
        res = exchange_result(exp.trainer.fit(pid, exp.parts[pid], state, rnd, controls=(c, c_i)), dtype)
        context.state[CLIENT_CONTROL_KEY] = state_to_record(advance(c_i, res.control))
    metrics = {"num-examples": res.num_samples, **{k: float(res.metrics[k]) for k in METRIC_KEYS if k in res.metrics}}
    content = {"arrays": state_to_record(res.state, dtype), "metrics": MetricRecord(metrics)}
    if exp.cfg.federation.scaffold:
        content["control"] = state_to_record(res.control, dtype)
    if accountant is not None:
        context.state[ACCOUNTANT_KEY] = content[CLIENT_STATE] = state_to_record(accountant.client_state(pid))
    return RecordDict(content)


@client_app.train("split")
def train_split(msg: Message, context: Context) -> Message:
    """sfprompt: the next split exchange of this node's round (:mod:`fedpeft.runtime.flower.split`)."""
    from fedpeft.runtime.flower.split import continue_round

    return continue_round(msg, context, client_experiment)


# --------------------------------------------------------------------------------------- server

class FlowerClients:
    """Reaches clients through a Flower :class:`Grid`: partition ``i`` lives on the SuperNode whose
    node config says ``partition-id = i``.

    Made before the server builds its own experiment: it asks the connected nodes at once which
    partition they hold, sending the config, so every node loads its model and data while the
    server loads its own; :meth:`connect` then waits for the answers.
    """

    def __init__(self, grid: Grid, config_text: str, num_partitions: int, runtime: RuntimeConfig) -> None:
        self.grid, self.text, self.num_partitions, self.runtime = grid, config_text, num_partitions, runtime
        self.nodes: dict[int, int] = {}  # partition id -> node id
        self.asked: dict[str, int] = {}  # message id -> node id of queries not answered yet
        self.asked = self._ask_new_nodes()
        self.accountant = None  # privacy.mode = "sample": the server's copy of the accountants (connect)
        self.exchange_dtype = "float32"  # federation.exchange_dtype (connect)
        self.secagg = None  # privacy.secure_aggregation: SecAgg+ settings (connect)

    def connect(self, exp: "Experiment | None" = None) -> "FlowerClients":
        """Map every partition to a connected node, or fail naming the missing partitions.

        ``exp`` (the server's experiment): with ``privacy.mode = "sample"`` its trainer's
        accountant holds the server's copy of every client's DP-SGD history (checkpointed,
        restored on resume, sent to the nodes and updated from their replies).
        """
        self.accountant = getattr(exp.trainer, "sample_accountant", None) if exp is not None else None
        self.exchange_dtype = exp.cfg.federation.exchange_dtype if exp is not None else "float32"
        self.secagg = plan_secagg(exp) if exp is not None else None  # privacy.secure_aggregation
        wanted = self.num_partitions
        deadline = time.monotonic() + self.runtime.connect_timeout
        while True:
            self.discover(max(1.0, deadline - time.monotonic()))
            missing = sorted(set(range(wanted)) - set(self.nodes))
            if not missing:
                return self
            if time.monotonic() > deadline:
                raise FedPeftError(
                    f"no SuperNode with partition-id {missing[:10]} connected within "
                    f"{self.runtime.connect_timeout:g} s ({len(self.nodes)}/{wanted} partitions found)"
                )
            time.sleep(0.5)

    def _ask_new_nodes(self) -> dict[str, int]:
        known = set(self.nodes.values()) | set(self.asked.values())
        new = [n for n in self.grid.get_node_ids() if n not in known]
        content = RecordDict({"config": ConfigRecord({CONFIG_KEY: self.text})})
        msgs = {n: Message(content, dst_node_id=n, message_type=MessageType.QUERY, group_id="discover") for n in new}
        return self._push(msgs)[0] if msgs else {}  # a node whose query was not accepted is asked again

    def discover(self, timeout: float) -> None:
        """Ask connected nodes we do not know yet which partition they hold (and let them load
        the model and their data meanwhile)."""
        asked, self.asked = {**self.asked, **self._ask_new_nodes()}, {}  # unanswered ones are asked again
        for reply in self._collect(asked, timeout=timeout, on_reply=None).values():
            if reply.has_error() or "node" not in reply.content:
                continue
            node = reply.content["node"]
            pid, num = int(node["partition-id"]), int(node["num-partitions"])
            if num != self.num_partitions:
                raise FedPeftError(
                    f"SuperNode {reply.metadata.src_node_id} has num-partitions={num}, but the "
                    f"experiment has partition.num_clients={self.num_partitions}"
                )
            self.nodes[pid] = reply.metadata.src_node_id

    def connected(self, clients: list[int]) -> set[int]:
        """The node ids connected now, after asking new nodes first if a SuperNode of ``clients``
        is missing (a restarted SuperNode has a new node id)."""
        connected = set(self.grid.get_node_ids())
        if any(self.nodes.get(c) not in connected for c in clients):
            self.discover(self.runtime.connect_timeout)
            connected = set(self.grid.get_node_ids())
        return connected

    def client_state(self) -> NamedArrays | None:
        """The server's copy of every client's DP-SGD accountant (``privacy.mode = "sample"``);
        otherwise None: each SuperNode keeps its own client state (SCAFFOLD's ``c_i``) in
        ``context.state``."""
        return None if self.accountant is None else self.accountant.state_dict()

    def load_client_state(self, state: NamedArrays | None) -> bool:
        """False: the client state of an earlier Flower run stayed on its nodes and is gone (a
        resumed run is a new Flower run, whose nodes start with an empty ``context.state``)."""
        return False

    def fit_round(self, plan: RoundPlan, state: NamedArrays, on_result: Callable[[ClientResult], None],
                  control: NamedArrays | None = None) -> Delivery:
        connected = self.connected(plan.training)
        if self.secagg is not None:  # SecAgg+: the server learns only the clients' mean delta
            if control is not None:
                raise FedPeftError("privacy.secure_aggregation with SCAFFOLD is not built")
            return secure_fit_round(self, plan, state, on_result, self.secagg)
        dtype = self.exchange_dtype  # state and c already rounded to it (runtime.rounds); packed losslessly
        records = {"arrays": state_to_record(state, dtype)}
        if control is not None:  # SCAFFOLD: c travels with the state, packed the same way
            records["control"] = state_to_record(control, dtype)
        delivery = Delivery(wire_up={}, wire_down={})
        msgs: dict[int, Message] = {}
        for cid in plan.training:
            if self.nodes.get(cid) not in connected:
                delivery.failed[cid] = "its SuperNode is not connected"
                continue
            config = ConfigRecord({"round": plan.round, "partition-id": cid, CONFIG_KEY: self.text,
                                   **({ASSIGNED_KEY: list(plan.assigned[cid])} if cid in plan.assigned else {})})
            kept = self.accountant.client_state(cid) if self.accountant is not None else {}
            content = RecordDict({**records, "config": config, **({CLIENT_STATE: state_to_record(kept)} if kept else {})})
            msgs[cid] = Message(content, dst_node_id=self.nodes[cid], message_type=MessageType.TRAIN, group_id=str(plan.round))
            delivery.wire_down[cid] = wire_bytes(content)
        limit = OVERSIZE_FACTOR * wire_bytes(RecordDict(records)) + 64 * 1024

        def on_reply(cid: int, reply: Message) -> None:  # decode and fold in as each reply arrives
            if reply.has_error():
                delivery.failed[cid] = f"client error: {reply.error.reason}"
                return
            delivery.wire_up[cid] = size = wire_bytes(reply.content)
            if self.accountant is not None:  # the privacy it spent counts even if its update is refused
                refused = keep_accountant(self.accountant, cid, reply.content)
                if refused:
                    delivery.rejected[cid] = refused
                    return
            decoded = decode_reply(cid, reply.content, size, limit, control is not None, dtype)
            if isinstance(decoded, str):
                delivery.rejected[cid] = decoded
                return
            delivery.bytes_up[cid] = message_bytes(decoded.state, dtype) + message_bytes(decoded.control, dtype)
            on_result(decoded)
            delivery.results.append(decoded.without_state())

        pushed, unsent = self._push(msgs)
        delivery.failed.update(unsent)
        replies = self._collect(pushed, self.runtime.round_timeout, on_reply)
        for cid in msgs.keys() - replies.keys() - unsent.keys():
            delivery.failed[cid] = f"no reply within runtime.round_timeout={self.runtime.round_timeout:g} s"
        return delivery

    def _push(self, msgs: dict[int, Message]) -> tuple[dict[str, int], dict[int, str]]:
        """Push ``msgs`` (keyed by client or node).

        Returns
        -------
        pushed : dict of str to int
            Message id -> key of every message the SuperLink accepted.
        unsent : dict of int to str
            Key -> reason of every message it did not: Flower's grid gives such a message no id
            (``None`` or ``""`` in its place, or, the in-memory grid, leaves it out of the list),
            and no reply to it can ever be pulled. Each caller decides what that means (a
            client ``failed`` in a round, a node asked again at the next discovery).
        """
        ids = list(self.grid.push_messages(list(msgs.values())))
        if len(ids) == len(msgs):  # one id per message, in order (None or "": not pushed)
            pushed = {str(mid): key for mid, key in zip(ids, msgs) if mid}
        else:  # a grid that leaves refused messages out: match by the id Flower gave each message
            accepted = {str(mid) for mid in ids if mid}
            pushed = {m.metadata.message_id: key for key, m in msgs.items() if m.metadata.message_id in accepted}
        unsent = {key: f"the SuperLink did not accept its {msgs[key].metadata.message_type} message (no message id)"
                  for key in msgs.keys() - set(pushed.values())}
        return pushed, unsent

    def _collect(self, keys: dict[str, int], timeout: float,
                 on_reply: Callable[[int, Message], None] | None) -> dict[int, Message]:
        """Pull replies to the pushed messages ``keys`` until all arrived or ``timeout`` s passed;
        ``on_reply(key, reply)`` runs as each one arrives."""
        pending, replies = set(keys), {}
        deadline = time.monotonic() + timeout
        wait = POLL_S[0]
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    replies[keys[mid]] = reply
                    if on_reply is not None:
                        on_reply(keys[mid], reply)
            if pending:  # polling costs the SuperLink CPU: back off while clients train
                time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
                wait = min(wait * 1.5, POLL_S[1])
        return replies


def decode_reply(cid: int, content: RecordDict, size: int, limit: float, with_control: bool = False,
                 exchange_dtype: str | None = None) -> ClientResult | str:
    """A reply's content as a :class:`ClientResult`, or the reason it cannot be one.

    Oversized payloads are refused before decoding; names, shapes, dtypes and values are checked
    afterwards by the strategy like any other update. ``with_control``: SCAFFOLD is on, the
    reply must carry ``control`` (``delta_c_i``) too. ``exchange_dtype``: floating arrays that
    arrive in another dtype do not decode (bfloat16 ones decode to float32).
    """
    if size > limit:
        return f"oversized payload: {size} bytes on the wire, limit {int(limit)}"
    wanted = ("arrays", "control") if with_control else ("arrays",)
    if any(k not in content.array_records for k in wanted) or "metrics" not in content.metric_records:
        expected = ", ".join(repr(k) for k in (*wanted, "metrics"))
        return f"malformed reply: records {sorted(content.keys())}, expected {expected}"
    metrics = content.metric_records["metrics"]
    num = metrics.get("num-examples")
    if not isinstance(num, int) or num <= 0:
        return f"malformed reply: num-examples={num!r}, expected a positive integer"
    decoded = {}
    for key in wanted:
        try:
            decoded[key] = record_to_state(content.array_records[key], exchange_dtype)
        except Exception as exc:  # noqa: BLE001 - a client's bytes can be anything
            what = "arrays" if key == "arrays" else "control variate arrays"
            return f"malformed reply: {what} do not decode ({type(exc).__name__}: {exc})"
    metric_values = {k: float(metrics[k]) for k in METRIC_KEYS if k in metrics}
    return ClientResult(cid, decoded["arrays"], num, metric_values, decoded.get("control", {}))


def keep_accountant(accountant: Any, cid: int, content: RecordDict) -> str | None:
    """Take client ``cid``'s DP-SGD accountant from a reply's ``client-state`` into the server's
    copy; the reason to reject the reply when it is missing or malformed, else None."""
    record = content.array_records.get(CLIENT_STATE)
    if record is None or len(record) > 3:  # a layout + 2 buffers at most
        return f"malformed reply: privacy.mode = \"sample\" and no valid {CLIENT_STATE!r} record (the node's accountant)"
    try:
        accountant.load_client_state(cid, record_to_state(record))
    except Exception as exc:  # noqa: BLE001 - a client's bytes can be anything
        return f"malformed reply: {CLIENT_STATE!r} does not decode ({type(exc).__name__}: {exc})"
    return None


def make_server_app(config_text: str | None = None, out: str | None = None, resume: bool = False,
                    outcome: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp for one experiment. Without arguments it reads ``fedpeft-config``, ``out`` and
    ``resume`` from the run config (deployment, ``flwr run``); ``outcome`` receives the summary or
    the exception (simulation, where the ServerApp runs in a thread)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from rich.console import Console

        from fedpeft.experiment import run_with_clients
        from fedpeft.runtime.flower.split import split_clients

        try:
            fast_grid_pulls()
            text = config_text if config_text is not None else str(context.run_config.get(CONFIG_KEY, ""))
            if not text.strip():
                raise FedPeftError(f"run config {CONFIG_KEY!r} is empty: pass the experiment config (TOML text)")
            run_out = out if out is not None else (str(context.run_config.get("out", "")) or None)
            again = resume or bool(context.run_config.get("resume", False))
            cfg = config_from_text(text)
            clients = FlowerClients(grid, text, cfg.partition.num_clients, cfg.runtime)  # nodes start loading
            summary = run_with_clients(cfg, run_out, again, Console(stderr=True),
                                       lambda exp: split_clients(clients.connect(exp), exp))
            if outcome is not None:
                outcome["summary"] = summary
        except BaseException as exc:
            if outcome is None:
                raise
            outcome["error"] = exc

    return app


server_app = make_server_app()
