"""SFPrompt's split training on Flower: per batch a forward and a backward exchange, as real messages.

SFPrompt (Cao, Zhu, Gong 2024, https://arxiv.org/abs/2407.17533): the ServerApp holds the frozen
body and runs it (:class:`~fedpeft.split.protocol.InProcessBodyServer`, one per client of the
round); each SuperNode runs its client's :class:`~fedpeft.split.session.SplitSession`, one message
at a time. Only the ServerApp sends; a client answers each message:

==========================  =========================================  ==========================
server -> client            the client does                            reply (client -> server)
==========================  =========================================  ==========================
``train``: global state     pruning, local loss, head on batch 0       ``forward``: hidden, context
``train.split`` body-output tail + loss + backward                     ``backward``: grad at body out
``train.split`` cut-grad    head backward, step; head on batch i + 1   ``forward`` (or the result)
==========================  =========================================  ==========================

The last ``cut-grad`` is answered with the usual TRAIN reply (``arrays`` + ``metrics``). The server
answers every reply as it arrives, so the chains of all the round's clients run at once.

Between messages a client keeps nothing in Python: a ClientApp process may serve other nodes (a
Ray actor) or be another process next time. Its session lives in ``context.state``, which Flower
keeps per node for the run: :data:`SESSION_ARRAYS_KEY` (the snapshot's tensors, packed like a
state) and :data:`SESSION_META_KEY` (its JSON and the experiment config); it is removed when the
round ends. A restored session runs the head forward again (``recompute_flops``, reported apart).

Bytes: the body server counts the tensor payload of every split message it receives and sends
(``activation_bytes_up`` / ``_down``: the same counter, the same tensors as in process); the
serialized size of those messages is ``activation_wire_bytes_up`` / ``_down``. The TRAIN message
and the final reply are the parameter exchange (``bytes_*``, ``wire_bytes_*``) as for any method.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedpeft.errors import FedPeftError
from fedpeft.federation.costs import message_bytes
from fedpeft.federation.strategy import ClientResult, RoundPlan
from fedpeft.methods.base import NamedArrays
from fedpeft.runtime.flower.app import CONFIG_KEY, METRIC_KEYS, OVERSIZE_FACTOR, FlowerClients, decode_reply
from fedpeft.runtime.flower.wire import record_to_state, state_to_record, wire_bytes
from fedpeft.runtime.rounds import Delivery
from fedpeft.split import InProcessBodyServer
from fedpeft.split import Message as SplitMessage
from fedpeft.split.session import SplitSession
from fedpeft.split.trainer import SplitTrainer, body_metrics

if TYPE_CHECKING:
    from fedpeft.experiment import Experiment

SPLIT_ACTION = "train.split"  # the message type of every server -> client message after the first
SPLIT_ARRAYS = "split"  # ArrayRecord: a split message's tensors
SPLIT_META = "split-meta"  # ConfigRecord: "kind" and "meta" (JSON)
SESSION_ARRAYS_KEY = "fedpeft.split.session"  # context.state: the session's tensors
SESSION_META_KEY = "fedpeft.split.meta"  # context.state: its JSON and the experiment config
NEXT = {"forward": "body-output", "backward": "cut-grad"}  # the server's answer to each client kind
POLL_S = (0.01, 0.2)  # the server asks for replies after 0.01 s, backing off to 0.2 s while none come


# --------------------------------------------------------------------------------------- codec

def to_content(message: SplitMessage, kind: str) -> RecordDict:
    """A split :class:`~fedpeft.split.protocol.Message` as Flower records (tensors packed by
    :func:`~fedpeft.runtime.flower.wire.state_to_record`, ``meta`` as JSON)."""
    arrays = {}
    for name, tensor in message.tensors.items():
        if tensor.dtype == torch.bfloat16:
            raise FedPeftError(f"split message tensor {name!r}: bfloat16 does not cross Flower (NumPy has no bfloat16)")
        arrays[name] = tensor.detach().cpu().numpy()
    return RecordDict({SPLIT_ARRAYS: state_to_record(arrays),
                       SPLIT_META: ConfigRecord({"kind": kind, "meta": json.dumps(message.meta)})})


def from_content(content: RecordDict) -> tuple[str, SplitMessage]:
    """The kind and message of :func:`to_content`; ``ValueError`` naming what is missing."""
    if SPLIT_ARRAYS not in content.array_records or SPLIT_META not in content.config_records:
        raise ValueError(f"not a split message: records {sorted(content.keys())}")
    meta = content.config_records[SPLIT_META]
    return str(meta["kind"]), SplitMessage(state_to_tensors(record_to_state(content.array_records[SPLIT_ARRAYS])),
                                           json.loads(str(meta["meta"])))


def tensors_to_state(tensors: dict[str, torch.Tensor]) -> NamedArrays:
    return {name: t.detach().cpu().numpy() for name, t in tensors.items()}


def state_to_tensors(state: NamedArrays) -> dict[str, torch.Tensor]:
    """Tensors owning a copy of each array (a decoded record's arrays are read-only views)."""
    return {name: torch.from_numpy(np.array(a)) for name, a in state.items()}


# --------------------------------------------------------------------------------------- client

def split_trainer(exp: Experiment) -> SplitTrainer:
    """The experiment's :class:`SplitTrainer`, unwrapped (a wrapper's ``fit`` would never run)."""
    if not isinstance(exp.trainer, SplitTrainer):  # a wrapper (attack, client-local DP): refused by the config
        raise FedPeftError(f"sfprompt on Flower trains with a SplitTrainer, not {type(exp.trainer).__name__}")
    return exp.trainer


def begin_round(received: RecordDict, context: Context, exp: Experiment, pid: int) -> RecordDict:
    """The round's TRAIN message (its content): start the session (pruning, local loss); the
    reply's content is the head's output on the first batch."""
    config = received["config"]
    state, rnd = record_to_state(received["arrays"]), int(config["round"])
    session = SplitSession.begin(split_trainer(exp), pid, exp.parts[pid], state, rnd)
    return _forward_or_result(context, session, str(config[CONFIG_KEY]))


def continue_round(msg: Message, context: Context, build: Callable[[str, Any], Experiment]) -> Message:
    """A ``train.split`` message: continue this node's session (restored from ``context.state``)
    with the body's output or the gradient at the cut."""
    if SESSION_META_KEY not in context.state.config_records or SESSION_ARRAYS_KEY not in context.state.array_records:
        raise FedPeftError("a split message arrived but this node has no split session (its TRAIN message was lost?)")
    saved = context.state.config_records[SESSION_META_KEY]
    text = str(saved[CONFIG_KEY])
    exp = build(text, context.node_config)
    tensors = state_to_tensors(record_to_state(context.state.array_records[SESSION_ARRAYS_KEY]))
    session = SplitSession.restore(split_trainer(exp), tensors, json.loads(str(saved["meta"])))
    kind, message = from_content(msg.content)
    if message.meta.get("request") != session.request:
        raise FedPeftError(f"split message for request {message.meta.get('request')!r}, "
                           f"the session is at {session.request!r}")
    if kind == "body-output":
        reply = session.on_body_output(message)
        _save(context, session, text)
        return Message(to_content(reply, "backward"), reply_to=msg)
    if kind == "cut-grad":
        session.on_cut_grad(message)
        return Message(_forward_or_result(context, session, text), reply_to=msg)
    raise FedPeftError(f"unknown split message kind {kind!r}")


def _forward_or_result(context: Context, session: SplitSession, text: str) -> RecordDict:
    """The next batch's forward request, or the round's result (the usual TRAIN reply)."""
    if not session.done:
        request = session.forward_request()
        _save(context, session, text)
        return to_content(request, "forward")
    res = session.result()
    for key in (SESSION_ARRAYS_KEY, SESSION_META_KEY):
        if key in context.state:
            del context.state[key]
    metrics = {"num-examples": res.num_samples, **{k: float(res.metrics[k]) for k in METRIC_KEYS if k in res.metrics}}
    return RecordDict({"arrays": state_to_record(res.state), "metrics": MetricRecord(metrics)})


def _save(context: Context, session: SplitSession, text: str) -> None:
    tensors, meta = session.snapshot()
    context.state[SESSION_ARRAYS_KEY] = state_to_record(tensors_to_state(tensors))
    context.state[SESSION_META_KEY] = ConfigRecord({"meta": json.dumps(meta), CONFIG_KEY: text})


# --------------------------------------------------------------------------------------- server

def split_clients(clients: FlowerClients, exp: Experiment) -> Any:
    """``clients``, or for ``sfprompt`` the same nodes reached through :class:`SplitFlowerClients`."""
    return SplitFlowerClients(clients, exp) if exp.cfg.method.name == "sfprompt" else clients


class SplitFlowerClients:
    """The Flower clients of an ``sfprompt`` run: :meth:`fit_round` drives every client's chain of
    split messages with the body on this ServerApp (the module docstring)."""

    def __init__(self, clients: FlowerClients, exp: Experiment) -> None:
        self.clients, self.split = clients, exp.trainer.split

    def client_state(self) -> NamedArrays | None:
        return self.clients.client_state()

    def load_client_state(self, state: NamedArrays | None) -> bool:
        return self.clients.load_client_state(state)

    def fit_round(self, plan: RoundPlan, state: NamedArrays, on_result: Callable[[ClientResult], None],
                  control: NamedArrays | None = None) -> Delivery:
        if control is not None:
            raise FedPeftError("sfprompt takes no SCAFFOLD control variates")
        clients, runtime = self.clients, self.clients.runtime
        connected = clients.connected(plan.training)
        records = {"arrays": state_to_record(state)}
        delivery = Delivery(wire_up={}, wire_down={})
        msgs: dict[int, Message] = {}
        for cid in plan.training:
            if clients.nodes.get(cid) not in connected:
                delivery.failed[cid] = "its SuperNode is not connected"
                continue
            config = ConfigRecord({"round": plan.round, "partition-id": cid, CONFIG_KEY: clients.text})
            content = RecordDict({**records, "config": config})
            msgs[cid] = Message(content, dst_node_id=clients.nodes[cid], message_type=MessageType.TRAIN,
                                group_id=str(plan.round))
            delivery.wire_down[cid] = wire_bytes(content)
        limit = OVERSIZE_FACTOR * wire_bytes(RecordDict(records)) + 64 * 1024
        chains = {cid: _Chain(InProcessBodyServer(self.split)) for cid in msgs}

        def answer(cid: int, reply: Message) -> Message | None:
            """The next message of ``cid``'s chain, or None when it ended (result or failure)."""
            chain = chains[cid]
            if reply.has_error():
                delivery.failed[cid] = f"client error: {reply.error.reason}"
                return None
            if SPLIT_ARRAYS not in reply.content.array_records:  # the result: the client's new state
                delivery.wire_up[cid] = size = wire_bytes(reply.content)
                decoded = decode_reply(cid, reply.content, size, limit)
                if isinstance(decoded, str):
                    delivery.rejected[cid] = decoded
                    return None
                decoded.metrics.update(body_metrics(chain.body), activation_wire_bytes_up=float(chain.wire_up),
                                       activation_wire_bytes_down=float(chain.wire_down))
                delivery.bytes_up[cid] = message_bytes(decoded.state)
                on_result(decoded)
                delivery.results.append(decoded.without_state())
                return None
            chain.wire_up += wire_bytes(reply.content)
            try:
                kind, message = from_content(reply.content)
                request = str(message.meta.get("request"))
                if kind not in NEXT:
                    raise ValueError(f"unknown split message kind {kind!r}")
                call = chain.body.forward if kind == "forward" else chain.body.backward
                out = call(request, message)
                out.meta["request"] = request
                content = to_content(out, NEXT[kind])
            except Exception as exc:  # noqa: BLE001 - a client's message can be anything
                delivery.failed[cid] = f"split exchange: {type(exc).__name__}: {exc}"
                return None
            chain.wire_down += wire_bytes(content)
            chain.exchanges += 1
            return Message(content, dst_node_id=clients.nodes[cid], message_type=SPLIT_ACTION, group_id=str(plan.round))

        pending, unsent = clients._push(msgs)  # message id -> client
        delivery.failed.update(unsent)
        open_chains = set(pending.values())
        deadline = time.monotonic() + runtime.round_timeout
        wait = POLL_S[0]
        while pending and time.monotonic() < deadline:
            following: dict[int, Message] = {}
            for reply in clients.grid.pull_messages(list(pending)):
                cid = pending.pop(reply.metadata.reply_to_message_id, None)
                if cid is None:
                    continue
                nxt = answer(cid, reply)
                if nxt is None:
                    open_chains.discard(cid)
                else:
                    following[cid] = nxt
            if following:
                pushed, unsent = clients._push(following)
                pending.update(pushed)
                for cid, reason in unsent.items():
                    delivery.failed[cid] = f"split exchange: {reason}"
                    open_chains.discard(cid)
                wait = POLL_S[0]
            elif pending:
                time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
                wait = min(wait * 1.5, POLL_S[1])
        for cid in open_chains:
            delivery.failed.setdefault(cid, f"no reply within runtime.round_timeout={runtime.round_timeout:g} s "
                                            f"(split training: {chains[cid].exchanges} exchanges answered)")
        return delivery


class _Chain:
    """One client's exchanges in a round: its body server, the wire bytes of its split messages."""

    def __init__(self, body: InProcessBodyServer) -> None:
        self.body, self.wire_up, self.wire_down, self.exchanges = body, 0, 0, 0
