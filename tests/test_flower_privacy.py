"""Differential privacy on the Flower runtimes: client-level DP-FedAvg on Flower's simulation engine
equals the in-process run (state, epsilon, clip); sample-level DP-SGD keeps each client's
accountant on its node (``context.state``) across rounds and, through the server's copy, across a
resume, with the epsilon of the uninterrupted in-process run; under SecAgg+ the server-side code
is handed only the clients' mean delta, which equals the plain one within the stated bound."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from test_flower import FakeGrid, assert_same_run, final_state, rows_of
from test_runs import csv_data, make_cfg  # noqa: F401 - fixture reused

from fedpeft.experiment import run_experiment, run_with_clients
from fedpeft.runtime.flower.app import (
    ACCOUNTANT_KEY,
    CLIENT_STATE,
    FlowerClients,
    client_app,
    train,
)
from fedpeft.runtime.flower.wire import record_to_state

LOCAL_DP = {"mode": "client-local", "noise_multiplier": 0.8, "clip_norm": 0.05, "delta": 1e-3}
SAMPLE_DP = {"mode": "sample", "max_grad_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-3}


def privacy_rows(run):
    return [(r.get("epsilon"), r.get("clip_norm"), r.get("noise_std"), [c.get("epsilon") for c in r["clients"]])
            for r in rows_of(run)]


def test_client_level_dp_on_flower_simulation_equals_the_in_process_run(csv_data, tmp_path):
    # client-local: each node clips and noises its own delta (the trainer wrapper, seeded by
    # seed/round/client), the server averages with the fixed denominator; FedAdam steps after
    def cfg(kind):
        return make_cfg(csv_data, partition={"num_clients": 3}, privacy=LOCAL_DP, runtime={"threads": 1, "kind": kind},
                        federation={"rounds": 2, "clients_per_round": 2, "server_optimizer": "fedadam", "server_lr": 0.05})

    local = run_experiment(cfg("local"), out=tmp_path / "local")
    sim = run_experiment(cfg("flower-sim"), out=tmp_path / "sim")
    assert_same_run(tmp_path / "local", tmp_path / "sim")
    assert sim["epsilon"] == local["epsilon"] > 0 and sim["noise_multiplier"] == local["noise_multiplier"] == 0.8
    assert privacy_rows(tmp_path / "sim") == privacy_rows(tmp_path / "local")
    a, b = final_state(tmp_path / "local"), final_state(tmp_path / "sim")
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the same noise draws: bit-identical


def delivered(msg):
    """What a node receives: its own copy of the message's config records, as a transport makes
    (SecAgg+'s mod pops keys from the records it gets; the workflow sends one record to all)."""
    content = RecordDict({k: ConfigRecord(dict(v)) if isinstance(v, ConfigRecord) else v for k, v in msg.content.items()})
    out = Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type,
                  group_id=msg.metadata.group_id)
    out.metadata.__dict__["_message_id"] = msg.metadata.message_id
    return out


class NodeGrid(FakeGrid):
    """A :class:`FakeGrid` whose node ``100 + i`` runs fedpeft's ClientApp (with its mods) on its
    own copy of each message and its own :class:`Context` (``context.state`` lasts as long as this
    grid: one Flower run); ``received`` keeps every reply the server got."""

    def __init__(self, num_nodes):
        self.contexts = {i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions": num_nodes},
                                    state=RecordDict(), run_config={}) for i in range(num_nodes)}
        self.sent, self.received = [], []
        super().__init__(num_nodes, self.train)

    def train(self, cid, msg):
        self.sent.append((cid, CLIENT_STATE in msg.content.array_records))
        reply = client_app(message=delivered(msg), context=self.contexts[cid])
        self.received.append((cid, reply))
        return reply


def run_on_nodes(cfg, out, resume=False):
    grid = NodeGrid(cfg.partition.num_clients)
    make = lambda exp: FlowerClients(grid, cfg.to_toml(), cfg.partition.num_clients, cfg.runtime).connect(exp)
    return run_with_clients(cfg, out, resume, None, make), grid


def test_sample_level_dp_keeps_each_accountant_on_its_node_and_across_a_resume(csv_data, tmp_path):
    def cfg(rounds):
        return make_cfg(csv_data, partition={"num_clients": 3}, privacy=SAMPLE_DP, runtime={"threads": 1},
                        federation={"rounds": rounds, "clients_per_round": 2, "local_steps": 3, "batch_size": 8})

    local = run_experiment(cfg(3), out=tmp_path / "local")
    nodes, grid = run_on_nodes(cfg(3), tmp_path / "nodes")
    assert_same_run(tmp_path / "local", tmp_path / "nodes")
    assert privacy_rows(tmp_path / "nodes") == privacy_rows(tmp_path / "local") and nodes["epsilon"] == local["epsilon"] > 0
    steps = {}  # each node's context.state holds its own client's history, and only that
    for r in rows_of(tmp_path / "local"):
        for c in r["clients"]:
            steps[c["id"]] = steps.get(c["id"], 0) + c["steps"]
    for cid, context in grid.contexts.items():
        kept = record_to_state(context.state.array_records[ACCOUNTANT_KEY]) if cid in steps else {}
        assert kept == ({f"privacy_steps/{cid}": steps[cid], f"privacy_q/{cid}": pytest.approx(8 / 40)} if cid in steps else {})
    # a resume is a new Flower run: the nodes' context.state is empty, the server's copy (from the
    # checkpoint) travels in TRAIN and the epsilon goes on from where it stopped
    run_on_nodes(cfg(1), tmp_path / "cut")
    resumed, again = run_on_nodes(cfg(3), tmp_path / "cut", resume=True)
    assert privacy_rows(tmp_path / "cut") == privacy_rows(tmp_path / "local") and resumed["epsilon"] == local["epsilon"]
    a, b = final_state(tmp_path / "local"), final_state(tmp_path / "cut")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    first = {c["id"] for c in rows_of(tmp_path / "local")[0]["clients"]}
    assert any(cid in first and carried for cid, carried in again.sent)  # the server's copy was sent


def test_a_reply_without_the_nodes_accountant_is_rejected(csv_data, tmp_path):
    from test_flower import reply_with, trained

    from fedpeft.experiment import build_experiment
    from fedpeft.federation.strategy import RoundPlan

    cfg = make_cfg(csv_data, partition={"num_clients": 2}, privacy=SAMPLE_DP, runtime={"round_timeout": 5},
                   federation={"clients_per_round": 2})
    exp = build_experiment(cfg)
    grid = NodeGrid(2)
    grid.reply = lambda cid, msg: train(msg, grid.contexts[cid]) if cid == 0 else reply_with(msg, trained(msg))
    clients = FlowerClients(grid, cfg.to_toml(), 2, cfg.runtime).connect(exp)
    state = exp.initial_state()
    aggregation = exp.strategy.start_round(1, state)
    delivery = clients.fit_round(RoundPlan(1, [0, 1], []), state, aggregation.add)
    assert set(delivery.rejected) == {1} and "the node's accountant" in delivery.rejected[1]
    assert set(clients.client_state()) == {"privacy_steps/0", "privacy_q/0"}  # client 0's history, kept


# ------------------------------------------------------------------ secure aggregation (SecAgg+)


def secure_cfg(csv_data, secure, rounds=2, **privacy):
    return make_cfg(csv_data, partition={"num_clients": 4, "scheme": "dirichlet", "alpha": 1.0},
                    runtime={"threads": 1, "kind": "flower-sim"}, privacy={"secure_aggregation": secure, **privacy},
                    federation={"rounds": rounds, "clients_per_round": 3, "server_optimizer": "fedadam", "server_lr": 0.05})


@pytest.mark.parametrize("privacy", [{}, LOCAL_DP], ids=["fedavg", "client-local-dp"])
def test_under_secure_aggregation_the_server_holds_only_the_sum_and_it_is_the_plain_one(
        csv_data, tmp_path, monkeypatch, privacy):
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
    )

    from fedpeft.federation import strategy
    from fedpeft.runtime.flower import secagg

    sent, folded = {}, []  # each client's true delta (recorded on the client), what the server folded in
    train_in_secagg = secagg._train_in_secagg

    def spy_client(msg, context):
        reply = train_in_secagg(msg, context)
        fitres = secagg.compat.recorddict_to_fitres(reply.content, keep_input=True)
        rnd = int(secagg.compat.recorddict_to_fitins(msg.content, keep_input=True).config["round"])
        sent[(rnd, msg.metadata.dst_node_id - 100)] = (secagg.parameters_to_ndarrays(fitres.parameters)[0], fitres.num_examples)
        return reply

    add = strategy.RoundAggregation.add
    monkeypatch.setattr(secagg, "_train_in_secagg", spy_client)
    monkeypatch.setattr(strategy.RoundAggregation, "add", lambda self, res: folded.append(res) or add(self, res))
    cfg = secure_cfg(csv_data, True, **privacy)
    summary, grid = run_on_nodes(cfg, tmp_path / "secure")
    assert summary["rounds_completed"] == 2 and summary["clients_failed_total"] == 0

    # 1. fedpeft's aggregation was handed one mean per round, never a client's state
    results = folded
    assert len(results) == 2 and all(isinstance(r, strategy.AggregateResult) for r in results)
    # 2. no reply the server received holds an array; each masked vector looks nothing like its update
    for cid, reply in grid.received:
        if reply.metadata.message_type == "train":
            assert all(len(rec) == 0 for rec in reply.content.array_records.values()), cid
    configs = [(cid, r.content.config_records.get(RECORD_KEY_CONFIGS, {})) for cid, r in grid.received]
    masked = [(cid, c[Key.MASKED_PARAMETERS]) for cid, c in configs if Key.MASKED_PARAMETERS in c]
    assert len(masked) == 6
    rows = rows_of(tmp_path / "secure")
    for rnd, row in enumerate(rows, 1):
        info = row["secure_aggregation"]
        assert info["message_rounds"] == 4 and info["clipped_values"] == 0
        assert len(info["stage_s"]) == 4 and 0 < sum(info["stage_s"]) <= info["protocol_s"]
        assert {c["aggregation"] for c in row["clients"] if c["status"] == "ok"} == {"secure"}
        # 3. the mean the server got = the plain weighted mean of the true deltas, within the bound
        deltas = [(d, w) for (r, _), (d, w) in sent.items() if r == rnd]
        plain = sum(w * d for d, w in deltas) / sum(w for _, w in deltas)
        got = np.concatenate([np.ravel(v) for v in results[rnd - 1].mean_delta.values()])
        error = float(np.max(np.abs(got - plain)))
        assert 0 < error <= info["error_bound"], (error, info["error_bound"])  # quantized, within the bound
        assert info["error_bound"] < 1e-3 * float(np.max(np.abs(plain)))  # 22 bits, c = 8: ~0.05% of the largest value
    for cid, vectors in masked:  # [masked weight, masked flat update]: uniform mod 2**32, unrelated to the delta
        vector = bytes_to_ndarray(vectors[1]).astype(np.float64)
        for (_, owner), (delta, _) in sent.items():
            if owner == cid:
                assert vector.shape == delta.shape and abs(np.corrcoef(vector, delta)[0, 1]) < 0.2
        assert 0.3 < vector.mean() / 2**32 < 0.7
    # every update sent was the masked vector, one 64-bit integer per value: the summary's update
    # size (the largest, used for upload_reduction_vs_full) is that, not the plain float32 state's
    sizes = {c["bytes_up"] for r in rows for c in r["clients"] if c["status"] == "ok"}
    assert sizes == {8 * summary["exchanged_params"]} == {summary["bytes_per_client_update"]}
    assert summary["bytes_per_client_update_mean"] == summary["bytes_per_client_update"]
    assert summary["upload_reduction_vs_full"] == summary["full_model_bytes_per_message"] / (8 * summary["exchanged_params"])
    if privacy:  # client-local DP: the same epsilon as without secure aggregation (same accountant)
        assert summary["epsilon"] == pytest.approx(float(rows[-1]["epsilon"])) and summary["epsilon"] > 0


@pytest.mark.parametrize("sections,key", [
    ({"runtime": {"kind": "local"}}, "privacy.secure_aggregation"),
    ({"privacy": {"mode": "client-central", "noise_multiplier": 1.0, "clip_norm": 0.1, "delta": 1e-3}}, "privacy.secure_aggregation"),
    ({"privacy": {"mode": "sample", "max_grad_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-3}}, "privacy.secure_aggregation"),
    ({"federation": {"clients_per_round": 1}}, "federation.clients_per_round"),
    ({"federation": {"aggregator": "median"}}, "federation.aggregator"),
    ({"federation": {"max_update_norm": 1.0}}, "federation.max_update_norm"),
    ({"federation": {"scaffold": True}}, "federation.scaffold"),
    ({"method": {"name": "lora", "aggregation": "fedex"}}, "method.aggregation"),
    ({"privacy": {"secagg_quantization_bits": 31}}, "privacy.secagg_quantization_bits"),
    ({"privacy": {"secagg_quantization_bits": 30}, "federation": {"clients_per_round": 4}},
     "privacy.secagg_quantization_bits"),  # 4 x 2**30 overflows the 32-bit modulus
    ({"privacy": {"secagg_clipping_range": 0.0}}, "privacy.secagg_clipping_range"),
    ({"privacy": {"secure_aggregation": False, "secagg_clipping_range": 1.0}}, "privacy.secagg_clipping_range"),
])
def test_secure_aggregation_config_errors_name_the_key(csv_data, sections, key):
    from fedpeft.errors import ConfigError

    raw = {"privacy": {"secure_aggregation": True}, "runtime": {"kind": "flower-sim"}, "federation": {"clients_per_round": 3}}
    for name, table in sections.items():
        raw[name] = {**raw.get(name, {}), **table}
    with pytest.raises(ConfigError) as err:
        make_cfg(csv_data, **raw)
    assert str(err.value).startswith(key), str(err.value)
