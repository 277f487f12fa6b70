"""The Flower runtime: malformed-update fuzzing (fake grid), parity with the in-process runtime on
Flower's simulation engine and on a real loopback deployment, and a SuperNode killed mid-run."""

import dataclasses
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.error import Error

from fedpeft.results import RunDir
from fedpeft.experiment import build_experiment, run_experiment
from fedpeft.federation.strategy import RoundPlan
from fedpeft.runtime.flower.app import FlowerClients
from fedpeft.runtime.flower.wire import record_to_state, state_to_record
from test_runs import csv_data, make_cfg  # noqa: F401 - fixture reused

# ------------------------------------------------------------------ malformed replies (fake grid)


class FakeGrid:
    """A Grid whose nodes answer at once: node ``100 + i`` holds partition ``i``; ``reply(cid, msg)``
    makes a TRAIN reply (or None for silence)."""

    def __init__(self, num_nodes, reply, num_partitions=None):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # as a Flower process has
        self.num_nodes, self.reply, self.outbox, self.pushed = num_nodes, reply, [], []
        self.num_partitions = num_partitions or num_nodes

    def get_node_ids(self):
        return [100 + i for i in range(self.num_nodes)]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            ids.append(msg.metadata.message_id)
            cid = msg.metadata.dst_node_id - 100
            self.pushed.append((msg.metadata.message_type, cid))
            if msg.metadata.message_type == MessageType.QUERY:
                node = ConfigRecord({"partition-id": cid, "num-partitions": self.num_partitions})
                out = Message(RecordDict({"node": node}), reply_to=msg)
            else:
                out = self.reply(cid, msg)
            if out is not None:
                out.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
                self.outbox.append(out)
        return ids

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        found = [m for m in self.outbox if m.metadata.reply_to_message_id in wanted]
        self.outbox = [m for m in self.outbox if m not in found]
        return found


def trained(msg, delta=0.5):
    return {k: v + np.asarray(delta, v.dtype) for k, v in record_to_state(msg.content["arrays"]).items()}


def reply_with(msg, state, metrics=None):
    metrics = {"num-examples": 10} if metrics is None else metrics
    return Message(RecordDict({"arrays": state_to_record(state), "metrics": MetricRecord(metrics)}), reply_to=msg)


def first(state):
    return next(iter(state))


def bad_layout(msg, grow):
    """A reply whose layout claims ``grow`` more values for its first array than were sent."""
    record = state_to_record(trained(msg))
    layout = json.loads(record["layout"].numpy().tobytes())
    layout[0][2] = [int(np.prod(layout[0][2])) + grow]
    record["layout"] = Array(np.frombuffer(json.dumps(layout).encode(), np.uint8).copy())
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)


MALFORMED = {
    "missing name": (lambda m: reply_with(m, {k: v for i, (k, v) in enumerate(trained(m).items()) if i}), "rejected", "wrong parameter names"),
    "extra name": (lambda m: reply_with(m, {**trained(m), "evil.weight": np.zeros(3, np.float32)}), "rejected", "wrong parameter names"),
    "wrong shape": (lambda m: reply_with(m, {k: (v[..., :1] if i == 0 else v) for i, (k, v) in enumerate(trained(m).items())}), "rejected", "shape"),
    "wrong dtype": (lambda m: reply_with(m, {k: v.astype(np.float64) for k, v in trained(m).items()}), "rejected", "dtype"),
    "nan": (lambda m: reply_with(m, {k: (np.full_like(v, np.nan) if i == 0 else v) for i, (k, v) in enumerate(trained(m).items())}), "rejected", "non-finite"),
    "inf": (lambda m: reply_with(m, {k: (np.full_like(v, np.inf) if i == 0 else v) for i, (k, v) in enumerate(trained(m).items())}), "rejected", "non-finite"),
    "oversized": (lambda m: reply_with(m, {**trained(m), "pad": np.zeros(2_000_000, np.float32)}), "rejected", "oversized payload"),
    "no metrics": (lambda m: Message(RecordDict({"arrays": state_to_record(trained(m))}), reply_to=m), "rejected", "malformed reply"),
    "layout past the buffer": (lambda m: bad_layout(m, 1), "rejected", "arrays do not decode"),
    "values left over": (lambda m: bad_layout(m, -1), "rejected", "arrays do not decode"),
    "zero examples": (lambda m: reply_with(m, trained(m), {"num-examples": 0}), "rejected", "num-examples"),
    "error reply": (lambda m: Message(Error(code=0, reason="CUDA out of memory"), reply_to=m), "failed", "CUDA out of memory"),
    "silence": (lambda m: None, "failed", "no reply within"),
}


@pytest.fixture(scope="module")
def small_exp(csv_data):  # noqa: F811
    cfg = make_cfg(csv_data, partition={"num_clients": 2}, federation={"clients_per_round": 2, "min_clients": 1},
                   runtime={"round_timeout": 0.3, "connect_timeout": 5})
    return cfg, build_experiment(cfg)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_reply_is_refused_with_its_reason_and_never_aggregated(small_exp, case):
    cfg, exp = small_exp
    bad, status, reason = MALFORMED[case]
    grid = FakeGrid(2, lambda cid, msg: reply_with(msg, trained(msg)) if cid == 0 else bad(msg))
    clients = FlowerClients(grid, cfg.to_toml(), len(exp.parts), cfg.runtime).connect()
    assert clients.nodes == {0: 100, 1: 101}
    state = exp.initial_state()
    aggregation = exp.strategy.start_round(1, state)
    delivery = clients.fit_round(RoundPlan(1, [0, 1], []), state, aggregation.add)
    outcome = aggregation.finish(delivery.rejected)
    assert all(not r.state for r in delivery.results)  # states were folded in, not kept

    where = delivery.failed if status == "failed" else outcome.rejected
    assert set(where) == {1} and reason in where[1], (case, where)
    assert outcome.accepted == [0] and outcome.aggregated
    honest = {k: v + np.float32(0.5) for k, v in state.items()}
    for k in state:  # the aggregate is client 0's update alone
        np.testing.assert_array_equal(outcome.state[k], honest[k])


class RefusingGrid(FakeGrid):
    """A FakeGrid whose SuperLink refuses the TRAIN message to node ``100 + refused``: it gives it
    no id, as Flower does, either ``None`` in its place (``style = "none"``, the deployment's
    grid) or left out of the list (``"omit"``, the simulation's in-memory grid)."""

    def __init__(self, refused, style):
        super().__init__(2, lambda cid, msg: reply_with(msg, trained(msg)))
        self.refused, self.style = refused, style

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        out = []
        for msg, mid in zip(messages, ids):
            if msg.metadata.message_type == MessageType.TRAIN and msg.metadata.dst_node_id - 100 == self.refused:
                self.outbox = [m for m in self.outbox if m.metadata.reply_to_message_id != mid]  # never delivered
                if self.style == "none":
                    out.append(None)
            else:
                out.append(mid)
        return out


@pytest.mark.parametrize("style", ["none", "omit"])
@pytest.mark.parametrize("refused", [0, 1])
def test_a_message_the_superlink_gives_no_id_fails_that_client_at_once_with_the_reason(small_exp, refused, style):
    cfg, exp = small_exp
    runtime = dataclasses.replace(cfg.runtime, round_timeout=30.0)  # not waited for: nothing can come
    clients = FlowerClients(RefusingGrid(refused, style), cfg.to_toml(), 2, runtime).connect()
    state = exp.initial_state()
    aggregation = exp.strategy.start_round(1, state)
    start = time.monotonic()
    delivery = clients.fit_round(RoundPlan(1, [0, 1], []), state, aggregation.add)
    assert time.monotonic() - start < 10
    outcome = aggregation.finish(delivery.rejected)
    assert list(delivery.failed) == [refused]
    assert "did not accept its train message (no message id)" in delivery.failed[refused]
    assert [r.client for r in delivery.results] == [1 - refused] == outcome.accepted  # never another's reply


def test_nodes_are_asked_for_their_partition_once_before_the_server_loads_its_model(small_exp):
    cfg, exp = small_exp
    grid = FakeGrid(2, lambda cid, msg: None)
    clients = FlowerClients(grid, cfg.to_toml(), 2, cfg.runtime)  # made before the server's experiment
    asked = [(t, c) for t, c in grid.pushed if t == MessageType.QUERY]
    assert sorted(asked) == [(MessageType.QUERY, 0), (MessageType.QUERY, 1)] and not clients.nodes
    clients.connect()  # collects those answers without asking again
    assert grid.pushed == asked and clients.nodes == {0: 100, 1: 101}


def test_the_server_polls_for_replies_often_at_first_then_backs_off(small_exp, monkeypatch):
    from fedpeft.runtime.flower import app as flower_app

    cfg, exp = small_exp
    grid = FakeGrid(2, lambda cid, msg: reply_with(msg, trained(msg)))
    runtime = dataclasses.replace(cfg.runtime, round_timeout=60.0)  # time stands still: sleep is mocked
    clients = FlowerClients(grid, cfg.to_toml(), 2, runtime).connect()
    late, pull = [], grid.pull_messages
    grid.pull_messages = lambda ids: pull(ids) if len(late) >= 12 else late.append(1) or []  # 12 empty polls
    slept = []
    monkeypatch.setattr(flower_app.time, "sleep", slept.append)
    state = exp.initial_state()
    aggregation = exp.strategy.start_round(1, state)
    delivery = clients.fit_round(RoundPlan(1, [0, 1], []), state, aggregation.add)
    assert sorted(r.client for r in delivery.results) == [0, 1]
    assert len(slept) == 12 and slept[0] == flower_app.POLL_S[0] and max(slept) == flower_app.POLL_S[1]
    assert all(b >= a for a, b in zip(slept, slept[1:]))  # never faster again while clients train


def test_a_node_with_the_wrong_num_partitions_is_named(small_exp):
    cfg, exp = small_exp
    grid = FakeGrid(3, lambda cid, msg: None)  # says num-partitions=3, the experiment has 2
    with pytest.raises(Exception, match="num-partitions=3"):
        FlowerClients(grid, cfg.to_toml(), len(exp.parts), cfg.runtime).connect()


def test_missing_supernodes_are_named_after_connect_timeout(small_exp):
    cfg, exp = small_exp
    cfg.runtime.connect_timeout = 0.5
    try:
        with pytest.raises(Exception, match=r"partition-id \[1\]"):
            FlowerClients(FakeGrid(1, lambda cid, msg: None, num_partitions=2), cfg.to_toml(), 2, cfg.runtime).connect()
    finally:
        cfg.runtime.connect_timeout = 5


def test_a_state_crosses_the_wire_packed_with_its_names():
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    rng = np.random.default_rng(0)
    state = {f"layer{i}.lora_{ab}": rng.normal(size=(8, 16)).astype(np.float32) for i in range(12) for ab in "AB"}
    state |= {"head.bias": rng.normal(size=5).astype(np.float16), "steps": np.arange(3), "scalar": np.float32(2) * np.ones(())}
    back = record_to_state(state_to_record(state))
    assert list(back) == list(state)  # names, in order
    for name in state:
        assert back[name].dtype == state[name].dtype and back[name].shape == state[name].shape
        np.testing.assert_array_equal(back[name], state[name])
    # 27 arrays travel as a layout + one buffer per dtype (3): a handful of Flower objects, where
    # one Array per name makes two per array, each one request per hop
    naive = ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in state.items()})
    assert len(get_all_nested_objects(state_to_record(state))) <= 2 * (1 + 3) + 3 < 50 < len(get_all_nested_objects(naive))


# ------------------------------------------------------------------ real Flower processes


def final_state(run):
    return RunDir(run).latest_checkpoint().state


def rows_of(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(local, other):
    a, b = final_state(local), final_state(other)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for ra, rb in zip(rows_of(local), rows_of(other), strict=True):
        assert (ra["bytes_up"], ra["bytes_down"]) == (rb["bytes_up"], rb["bytes_down"])
        assert [c["status"] for c in ra["clients"]] == [c["status"] for c in rb["clients"]]
    sa = json.loads((local / "summary.json").read_text())
    sb = json.loads((other / "summary.json").read_text())
    assert set(sa) == set(sb)
    assert sa["total_bytes_up"] == sb["total_bytes_up"] and sa["total_bytes_down"] == sb["total_bytes_down"]


def parity_cfg(csv_data, **runtime):  # noqa: F811
    # a server optimizer with state (FedAdam's moments): the same server step in every runtime
    return make_cfg(csv_data, partition={"num_clients": 2}, runtime={"threads": 1, **runtime},
                    federation={"rounds": 2, "clients_per_round": 2, "server_optimizer": "fedadam", "server_lr": 0.05})


@pytest.fixture(scope="module")
def local_run(csv_data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("local") / "run"
    run_experiment(parity_cfg(csv_data), out=out)
    return out


# Ray simulations cost ~40 s each in the suite, so each one checks several things: LoRA + FedEx +
# SCAFFOLD (tests/test_lora_aggregation.py), an attack under MultiKrum (tests/test_robust_rounds.py),
# and here FedAdam's server state over layer assignments of different depths.
def test_flower_simulation_with_heterogeneous_layer_depths_matches_the_in_process_runtime(
        csv_data, tmp_path, monkeypatch):  # noqa: F811
    from fedpeft.methods import layers

    # client 0 trains the head part only, client 1 the last block too, nobody block 0: the
    # assignment travels in the TRAIN config, each reply carries its own names (FedAdam steps those:
    # a server optimizer with state, the same server step in every runtime)
    assign = layers.Layers.assignment
    monkeypatch.setattr(layers.Layers, "assignment", lambda self, model, n, depths=None: assign(self, model, n, [0, 1]))
    cfg = dict(method={"name": "layers"}, partition={"num_clients": 2},
               federation={"rounds": 2, "clients_per_round": 2, "server_optimizer": "fedadam", "server_lr": 0.05})
    run_experiment(make_cfg(csv_data, runtime={"threads": 1}, **cfg), out=tmp_path / "local")
    summary = run_experiment(make_cfg(csv_data, runtime={"threads": 1, "kind": "flower-sim"}, **cfg), out=tmp_path / "sim")
    assert summary["runtime"] == "flower-sim" and summary["total_wire_bytes_up"] > summary["total_bytes_up"]
    assert_same_run(tmp_path / "local", tmp_path / "sim")
    up = [[(c["k"], c["bytes_up"]) for c in r["clients"]] for r in rows_of(tmp_path / "sim")]
    assert up[0] == up[1] and [k for k, _ in up[0]] == [0, 1] and up[0][0][1] < up[0][1][1]
    initial = build_experiment(make_cfg(csv_data, **cfg)).initial_state()
    block0 = [n for n in initial if ".layer.0." in n]
    assert block0 and all(np.array_equal(final_state(tmp_path / "sim")[n], initial[n]) for n in block0)


# The loopback deployment parity runs (plain, failing ServerApp, warm workers again, SCAFFOLD +
# FedEx-LoRA) run on the TLS deployment: tests/test_flower_secure.py.


def fedex_scaffold_cfg(csv_data, **runtime):  # noqa: F811
    return make_cfg(csv_data, partition={"num_clients": 2}, runtime={"threads": 1, **runtime},
                    method={"name": "lora", "r": 4, "aggregation": "fedex"},
                    federation={"rounds": 2, "clients_per_round": 2, "optimizer": "sgd", "momentum": 0.0,
                                "lr": 0.05, "scaffold": True})


@pytest.fixture(scope="module")
def ragged_data(tmp_path_factory):
    """Texts of 2 to 7 words: padded batches, so a mask crosses with the activations."""
    root = tmp_path_factory.mktemp("ragged")
    rng = np.random.default_rng(1)
    words = ["goal match team score ball", "rain sun cloud storm wind", "bank card cash loan price"]
    for split, n in (("train", 96), ("test", 30)):
        rows = [f"{' '.join(rng.choice(words[i % 3].split(), size=int(rng.integers(2, 8))))},{'abc'[i % 3]}"
                for i in range(n)]
        (root / f"{split}.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    return root


def sfprompt_cfg(data, **runtime):
    return make_cfg(data, partition={"num_clients": 2}, runtime={"threads": 1, **runtime},
                    method={"name": "sfprompt", "head_blocks": 0, "tail_blocks": 1, "num_prompt_tokens": 4,
                            "prune_keep": 0.5, "local_loss_steps": 2},
                    federation={"rounds": 2, "clients_per_round": 2, "local_steps": 3, "lr": 5e-2})


@pytest.fixture(scope="module")
def sfprompt_local_run(ragged_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sfprompt-local") / "run"
    run_experiment(sfprompt_cfg(ragged_data), out=out)
    return out


SPLIT_ROW_KEYS = ("activation_bytes_up", "activation_bytes_down", "server_flops", "client_flops")
SPLIT_CLIENT_KEYS = ("activation_bytes_up", "activation_bytes_down", "server_flops", "flops", "kept_rows",
                     "samples_processed", "client_flops_pct_of_full")


def assert_same_split_run(local, flower):
    """Same final state and parameter bytes (:func:`assert_same_run`), and the same activation
    bytes and FLOPs per client and round; Flower's split messages were serialized (wire bytes)."""
    assert_same_run(local, flower)
    for ra, rb in zip(rows_of(local), rows_of(flower), strict=True):
        assert ra["activation_bytes_up"] > ra["activation_bytes_down"] > 0  # the mask goes up only
        for key in SPLIT_ROW_KEYS:
            assert ra[key] == rb[key], (ra["round"], key)
        for ca, cb in zip(ra["clients"], rb["clients"], strict=True):
            assert [ca[k] for k in SPLIT_CLIENT_KEYS] == [cb[k] for k in SPLIT_CLIENT_KEYS]
            assert "activation_wire_bytes_up" not in ca and cb["activation_wire_bytes_up"] > cb["activation_bytes_up"]
            assert cb["activation_wire_bytes_down"] > cb["activation_bytes_down"]
    sa = json.loads((local / "summary.json").read_text())
    sb = json.loads((flower / "summary.json").read_text())
    for key in ("activation_bytes_up", "activation_bytes_down", "server_flops", "client_flops_total"):
        assert sa[key] == sb[key] > 0, key
    assert sa["activation_wire_bytes_up"] is None and sb["activation_wire_bytes_up"] > sb["activation_bytes_up"]


# one Ray simulation for SFPrompt (~40 s in the suite): chains of split messages through the
# simulation engine, where a node's consecutive messages may reach different actor processes
def test_flower_simulation_of_sfprompt_matches_the_in_process_runtime(ragged_data, sfprompt_local_run, tmp_path):
    summary = run_experiment(sfprompt_cfg(ragged_data, kind="flower-sim"), out=tmp_path / "sim")
    assert summary["runtime"] == "flower-sim" and summary["clients_failed_total"] == 0
    assert_same_split_run(sfprompt_local_run, tmp_path / "sim")


class NodeApps:
    """Fake nodes that run the real ClientApp, all in this process on one client model (as a Ray
    actor serving several nodes); each node's ``context.state`` goes through its protobuf form
    after every message, as Flower stores it. ``tamper[(cid, n)](msg, reply)`` replaces the reply
    to client ``cid``'s ``n``-th message."""

    def __init__(self, num_nodes, tamper=None):
        from flwr.app import Context

        self.contexts = {c: Context(run_id=1, node_id=100 + c, node_config={"partition-id": c, "num-partitions": num_nodes},
                                    state=RecordDict(), run_config={}) for c in range(num_nodes)}
        self.calls, self.tamper = {c: 0 for c in range(num_nodes)}, tamper or {}

    def __call__(self, cid, msg):
        from flwr.common.serde import context_from_proto, context_to_proto

        from fedpeft.runtime.flower.app import client_app

        self.calls[cid] += 1
        reply = client_app(message=msg, context=self.contexts[cid])
        self.contexts[cid] = context_from_proto(context_to_proto(self.contexts[cid]))
        change = self.tamper.get((cid, self.calls[cid]))
        return reply if change is None else change(msg, reply)


def split_round(clients, exp, rnd, state):
    aggregation = exp.strategy.start_round(rnd, state)
    delivery = clients.fit_round(RoundPlan(rnd, [0, 1], []), state, aggregation.add)
    return delivery, aggregation.finish(delivery.rejected)


def split_clients_on(nodes, cfg, exp):
    from fedpeft.runtime.flower.split import split_clients

    grid = FakeGrid(2, nodes)
    return grid, split_clients(FlowerClients(grid, cfg.to_toml(), 2, cfg.runtime).connect(), exp)


def test_split_rounds_through_the_real_client_app_match_the_in_process_round_bit_for_bit(ragged_data):
    from fedpeft.runtime.local import InProcessClients

    cfg = sfprompt_cfg(ragged_data, kind="flower", round_timeout=30)
    exp = build_experiment(cfg)
    nodes = NodeApps(2)
    grid, clients = split_clients_on(nodes, cfg, exp)
    state = exp.initial_state()
    delivery, flower = split_round(clients, exp, 1, state)
    local_delivery, local = split_round(InProcessClients(exp), exp, 1, state)
    assert not delivery.failed and not delivery.rejected and flower.accepted == [0, 1]
    for name in state:
        np.testing.assert_array_equal(flower.state[name], local.state[name], err_msg=name)
    by_client = {r.client: r.metrics for r in local_delivery.results}
    for res in delivery.results:
        ref = by_client[res.client]
        assert [res.metrics[k] for k in SPLIT_CLIENT_KEYS if k != "flops"] == [ref[k] for k in SPLIT_CLIENT_KEYS if k != "flops"]
        assert res.metrics["flops"] == ref["flops"] and res.metrics["train_loss"] == ref["train_loss"]
        assert res.metrics["activation_wire_bytes_up"] > res.metrics["activation_bytes_up"] > res.metrics["activation_bytes_down"]
    assert delivery.bytes_up == local_delivery.bytes_up
    # per client: one TRAIN, then a body output and a cut gradient for each of the 3 batches
    sent = [(t, c) for t, c in grid.pushed if t != MessageType.QUERY]
    assert sorted(sent) == sorted([(MessageType.TRAIN, c) for c in (0, 1)] + [("train.split", c) for c in (0, 1)] * 6)
    assert all(not ctx.state for ctx in nodes.contexts.values())  # the sessions end with the round


@pytest.mark.parametrize("family", ["bert", "vit", "gpt2", "llama"])
def test_split_messages_cross_flower_records_unchanged_for_every_family(family, flower_identity):
    """The head's output and every block input (masks, GPT-2's causal mask, LLaMA's rotary
    cos/sin) survive the records: the body gives the same output from the decoded message."""
    import torch

    from conftest import make_batch
    from fedpeft.split import context_of, forward_message
    from fedpeft.runtime.flower.split import from_content, to_content
    from test_split import prepared

    loaded, method = prepared(family)
    batch = make_batch(loaded, n=3)
    with torch.no_grad():
        head = method.split.head(batch)
        sent = forward_message(head.hidden, head.context)
        sent.meta["request"] = "1/0/0"
        kind, got = from_content(to_content(sent, "forward"))
        assert kind == "forward" and got.meta == json.loads(json.dumps(sent.meta))
        assert {k: (v.dtype, v.shape) for k, v in got.tensors.items()} == {k: (v.dtype, v.shape) for k, v in sent.tensors.items()}
        direct = method.split.body(head.hidden, head.context)
        torch.testing.assert_close(method.split.body(got.tensors["hidden"], context_of(got)), direct, rtol=0, atol=0)


def test_a_client_failing_mid_chain_fails_alone_and_a_bad_activation_is_named(ragged_data):
    from flwr.app.error import Error

    from fedpeft.runtime.flower.split import SPLIT_ARRAYS

    def wrong_width(msg, reply):  # the head's output with a hidden size the body does not take
        record = record_to_state(reply.content[SPLIT_ARRAYS])
        record["hidden"] = record["hidden"][..., :5].copy()
        reply.content[SPLIT_ARRAYS] = state_to_record(record)
        return reply

    cfg = sfprompt_cfg(ragged_data, kind="flower", round_timeout=30)
    exp = build_experiment(cfg)
    nodes = NodeApps(2, {(1, 3): lambda msg, reply: Message(Error(code=0, reason="worker killed"), reply_to=msg),
                         (0, 5): wrong_width})
    _, clients = split_clients_on(nodes, cfg, exp)
    state = exp.initial_state()
    delivery, outcome = split_round(clients, exp, 1, state)
    assert "client error: worker killed" in delivery.failed[1]
    assert delivery.failed[0].startswith("split exchange: RuntimeError") and not outcome.aggregated
    delivery, outcome = split_round(clients, exp, 2, state)  # the nodes' stale sessions give way to the new round
    assert not delivery.failed and outcome.accepted == [0, 1]


LM_KEYS = ("eval_loss", "perplexity", "exact_match", "rouge_l", "train_loss", "client_flops")
LM_SUMMARY_KEYS = ("task", "final_eval_loss", "final_perplexity", "final_exact_match", "final_rouge_l", "best_rouge_l",
                   "client_flops_total", "exchanged_params")


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    """Prompt/response pairs for task.kind = "causal-lm" (JSONL files)."""
    root = tmp_path_factory.mktemp("lm")
    things = ["snow", "grass", "sky", "coal", "blood", "sun"]
    colours = ["white", "green", "blue", "black", "red", "yellow"]
    for split, n in (("train", 24), ("test", 6)):
        rows = [{"prompt": f"the colour of {things[i % 6]}", "response": f"it is {colours[i % 6]}"} for i in range(n)]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def lm_cfg(data, dtype="float32", **runtime):
    """A causal-lm run: LoRA on tiny-gpt2, 2 clients, 2 rounds; ``dtype``: model.dtype and
    federation.exchange_dtype."""
    from fedpeft.config import Config

    fed = {"rounds": 2, "clients_per_round": 2, "local_steps": 3, "batch_size": 4, "lr": 1e-2, "exchange_dtype": dtype}
    return Config.from_dict({
        "model": {"name": "tiny-gpt2", "max_length": 16, "dtype": dtype}, "task": {"kind": "causal-lm", "max_new_tokens": 3,
                                                                   "generation_samples": 4, "saved_generations": 2},
        "data": {"train": str(data / "train.jsonl"), "test": str(data / "test.jsonl")},
        "method": {"name": "lora", "r": 4}, "partition": {"num_clients": 2}, "federation": fed,
        "runtime": {"threads": 1, "progress": False, **runtime}, "output": {"save_model": False}})


def assert_same_lm_run(local, flower):
    """:func:`assert_same_run` bit for bit, and the causal-lm metrics, generations and summary."""
    assert_same_run(local, flower)
    a, b = final_state(local), final_state(flower)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for ra, rb in zip(rows_of(local), rows_of(flower), strict=True):
        assert [ra[k] for k in LM_KEYS] == [rb[k] for k in LM_KEYS] and ra["accuracy"] is rb["accuracy"] is None
        assert ra["eval_loss"] > 0 and rb["wire_bytes_up"] > 0
        name = f"generations/round_{ra['round']}.jsonl"
        assert (local / name).read_text() == (flower / name).read_text() != ""
    sa = json.loads((local / "summary.json").read_text())
    sb = json.loads((flower / "summary.json").read_text())
    assert [sa[k] for k in LM_SUMMARY_KEYS] == [sb[k] for k in LM_SUMMARY_KEYS] and sa["task"] == "causal-lm"


def test_a_causal_lm_run_through_the_real_client_app_matches_the_in_process_run(lm_data, tmp_path):
    """Instruction tuning on Flower's records: the real ClientApp trains its encoded instruction
    partition, the server evaluates (loss, perplexity, generations): the in-process run's results.
    (The same config over a real deployment: tests/test_flower_secure.py.)"""
    from fedpeft.experiment import run_with_clients

    run_experiment(lm_cfg(lm_data), out=tmp_path / "local")
    cfg = lm_cfg(lm_data, kind="flower", round_timeout=60)
    nodes = NodeApps(2)
    summary = run_with_clients(cfg, tmp_path / "flower", False, None,
                               lambda exp: FlowerClients(FakeGrid(2, nodes), cfg.to_toml(), 2, cfg.runtime).connect(exp))
    assert summary["runtime"] == "flower" and summary["clients_failed_total"] == 0
    assert_same_lm_run(tmp_path / "local", tmp_path / "flower")
    assert all(n == 2 for n in nodes.calls.values())  # a TRAIN per round (the grid answers the QUERY)


def test_submitting_to_a_superlink_does_not_import_torch():
    """`fedpeft run` with runtime.kind = "flower" only submits (the ServerApp runs on the
    SuperLink), so it must not pay torch's ~5 s import."""
    code = "import sys, fedpeft.cli, fedpeft.runner, fedpeft.runtime.flower.launch; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_the_repo_flower_app_is_the_packaged_one_and_names_importable_apps(tmp_path):
    import importlib
    import tomllib
    from pathlib import Path

    from fedpeft.runtime.flower.launch import write_app_dir

    root = Path(__file__).resolve().parents[1]
    written = write_app_dir(tmp_path / "app") / "pyproject.toml"
    assert (root / "flower" / "pyproject.toml").read_text() == written.read_text()
    app = tomllib.loads(written.read_text())["tool"]["flwr"]["app"]
    assert set(app["config"]) == {"fedpeft-config", "out", "resume"}
    kinds = {"serverapp": "ServerApp", "clientapp": "ClientApp"}
    for key, ref in app["components"].items():
        module, attr = ref.split(":")
        assert type(getattr(importlib.import_module(module), attr)).__name__ == kinds[key]


# ------------------------------------------------------------------ fedpeft flower-supernode


def test_idle_poll_caps_the_waits_of_the_installed_flower_supernode_loop(monkeypatch):
    import flwr.supernode.start_client_internal as node_loop

    from fedpeft.runtime.flower import polling as flower_polling

    monkeypatch.setattr(node_loop, "time", node_loop.time)  # restored after the test
    monkeypatch.setattr(node_loop, "pull_objects", node_loop.pull_objects)
    slept = []
    monkeypatch.setattr(flower_polling.time, "sleep", slept.append)
    assert flower_polling.shorten_idle_wait(0.25)  # flwr's loop still has its fixed 3 s wait
    node_loop.time.sleep(3)
    node_loop.time.sleep(0.1)
    assert slept == [0.25, 0.1]
    assert node_loop.time.monotonic is flower_polling.time.monotonic  # everything else untouched
    assert node_loop.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.25}


def test_fast_retries_pull_an_object_as_soon_as_it_is_uploaded(monkeypatch):
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

    from fedpeft.runtime.flower.polling import fast_retries

    waits, calls = [], {"n": 0}

    def pull(object_id):  # there after two misses
        calls["n"] += 1
        if calls["n"] < 3:
            raise ObjectUnavailableError(object_id)
        return b"content"

    monkeypatch.setattr("flwr.supercore.inflatable.inflatable_utils.random.uniform", lambda a, b: 0.0)
    pull_fast = fast_retries(pull_objects, 0.01, 0.02)
    real_wait = __import__("threading").Event.wait
    monkeypatch.setattr("threading.Event.wait", lambda self, t=None: (t is not None and waits.append(t)) or real_wait(self, 0 if t is not None else t))
    assert pull_fast(["a"], pull) == {"a": b"content"}
    assert waits[:2] == [0.01, 0.02]  # flwr's defaults would wait 1 s, then 2 s


def test_flower_supernode_refuses_the_options_it_sets_itself():
    from fedpeft.errors import FedPeftError
    from fedpeft.runtime.flower.supernode import run_supernode

    for args in (["--isolation", "subprocess"], ["--port=9999"]):
        with pytest.raises(FedPeftError, match="set by fedpeft flower-supernode"):
            run_supernode(["--insecure", *args], 0.25, 9094, None)
    with pytest.raises(FedPeftError, match="--idle-poll"):
        run_supernode([], 0.0, 9094, None)


def test_a_worker_preloads_what_a_first_build_imports():
    from fedpeft.experiment import PRELOAD, preload

    preload()
    assert set(PRELOAD) <= set(sys.modules)


def test_a_worker_signs_its_task_requests_with_the_superexec_secret(tmp_path):
    from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor

    from fedpeft.errors import FedPeftError
    from fedpeft.runtime.flower.worker import acquiring_client

    (tmp_path / "secret").write_bytes(b"0123456789abcdef0123456789abcdef")
    signed = acquiring_client("127.0.0.1:1", True, None, str(tmp_path / "secret"))
    plain = acquiring_client("127.0.0.1:1", True, None, None)
    kinds = [[type(i) for i in c._interceptors] for c in (signed, plain)]
    assert SuperExecAuthHttpInterceptor in kinds[0] and SuperExecAuthHttpInterceptor not in kinds[1]
    with pytest.raises(FedPeftError, match="--superexec-auth-secret-file"):
        acquiring_client("127.0.0.1:1", True, None, str(tmp_path / "missing"))


def test_the_supernode_restarts_a_dead_worker_and_stops_it_with_the_node(tmp_path):
    from fedpeft.runtime.flower.supernode import Worker

    starts = tmp_path / "starts"
    worker = Worker([sys.executable, "-c", f"open({str(starts)!r}, 'a').write('x'); import time; time.sleep(0.2)"])
    worker.start()
    deadline = time.monotonic() + 30
    while (not starts.exists() or len(starts.read_text()) < 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(starts.read_text()) >= 2  # it exited and came back
    worker.stop()
    count = len(starts.read_text())
    time.sleep(1.5)  # longer than the restart delay
    assert len(starts.read_text()) == count and worker.proc.poll() is not None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="taskset / CPU affinity are Linux's")
def test_ray_is_sized_to_the_cpus_this_process_may_use_not_the_machine(tmp_path):
    import shutil

    if shutil.which("taskset") is None:
        pytest.skip("no taskset")
    code = "from fedpeft.runtime.flower.launch import usable_cpus; print(usable_cpus())"
    done = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "1", done.stderr


def test_the_server_grid_retries_uploading_replies_fast_and_wraps_once(monkeypatch):
    import functools

    import flwr.superlink.grid.http_grid as http_grid

    from fedpeft.runtime.flower.polling import fast_grid_pulls

    original = getattr(http_grid.pull_objects, "func", http_grid.pull_objects)  # an earlier ServerApp here wrapped it
    monkeypatch.setattr(http_grid, "pull_objects", original)  # flwr's own; restored after the test
    fast_grid_pulls()
    fast_grid_pulls()  # a second run in the same server worker
    assert isinstance(http_grid.pull_objects, functools.partial) and http_grid.pull_objects.func is original
    assert http_grid.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5}


def test_a_node_reads_its_data_from_its_node_config_and_the_fingerprint_proves_it(csv_data, tmp_path):  # noqa: F811
    """The server's config names the server's data paths (absolute, e.g. after a resume); a
    SuperNode whose copy lives elsewhere gives data-train/data-test (or data-dir) in its node
    config, and a copy that is not the same data is named, never trained on."""
    import shutil

    from flwr.app import Context

    from fedpeft.errors import DataError, FedPeftError
    from fedpeft.runtime.flower.app import CONFIG_KEY, train

    moved = tmp_path / "server-data"
    shutil.copytree(csv_data, moved)
    cfg = build_experiment(make_cfg(moved, partition={"num_clients": 2}, runtime={"threads": 1})).cfg  # resolved
    text = cfg.to_toml()
    state = build_experiment(cfg).initial_state()
    shutil.rmtree(moved)  # the server's paths do not exist on this node
    FakeGrid(1, None)  # sets the task identity a Flower process has

    def send(node_config):
        context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2, **node_config},
                          state=RecordDict(), run_config={})
        config = ConfigRecord({"round": 1, "partition-id": 1, CONFIG_KEY: text})
        msg = Message(RecordDict({"arrays": state_to_record(state), "config": config}), dst_node_id=7,
                      message_type=MessageType.TRAIN)
        msg.metadata.__dict__["_message_id"] = msg.object_id
        return train(msg, context)

    with pytest.raises(FedPeftError, match="server-data"):
        send({})
    local = {"data-train": str(csv_data / "train.csv"), "data-test": str(csv_data / "test.csv")}
    reply = send(local)
    assert set(record_to_state(reply.content["arrays"])) == set(state)
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.csv").write_text((csv_data / "train.csv").read_text().replace("goal", "gaol"))
    shutil.copy(csv_data / "test.csv", other / "test.csv")
    with pytest.raises(DataError, match="fingerprint"):
        send({"data-train": str(other / "train.csv"), "data-test": str(other / "test.csv")})
