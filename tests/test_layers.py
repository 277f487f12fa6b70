"""The ``layers`` method (CAFF, https://arxiv.org/abs/2411.07826) and per-client partial aggregation:
hand-computed layer-wise averages, assignment validation, frozen blocks, costs, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_runs import csv_data, make_cfg  # noqa: F401 - fixture reused

from fedpeft.config import Config, FederationConfig
from fedpeft.errors import ConfigError
from fedpeft.experiment import build_experiment, run_with_clients
from fedpeft.federation.assignment import Assignment
from fedpeft.federation.costs import message_bytes
from fedpeft.federation.strategy import ClientResult, FedAvgStrategy, RoundAggregation
from fedpeft.methods import get_state
from fedpeft.methods import layers as layers_module
from fedpeft.methods.layers import Layers, LayersOptions
from fedpeft.models import transformer_blocks
from fedpeft.results import RunDir
from fedpeft.runtime.local import InProcessClients

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (conftest)

# ------------------------------------------------------------------ pure partial aggregation

# a 3-block model in miniature: blocks b0 (bottom) .. b2 (top), then the head
GLOBAL = {"b0.w": np.array([1.0, -1.0], np.float32), "b1.w": np.array([2.0, 0.5], np.float32),
          "b2.w": np.array([[3.0], [-2.0]], np.float32), "head.w": np.array([0.25, 4.0, -1.0], np.float32)}
DEPTH_NAMES = {0: ("head.w",), 1: ("b2.w", "head.w"), 2: ("b1.w", "b2.w", "head.w")}  # nobody trains b0
SAMPLES = {0: 10, 1: 30, 2: 60}


def client_states(seed=0):
    """Client c (depth c) returns its assigned names, moved away from the global state."""
    rng = np.random.default_rng(seed)
    return {c: {n: (GLOBAL[n] + rng.normal(0, 1, GLOBAL[n].shape)).astype(np.float32) for n in DEPTH_NAMES[c]}
            for c in range(3)}


def aggregate(states, rule=None, server="fedavg", **fed):
    cfg = FederationConfig(server_optimizer=server, **fed)
    strategy = FedAvgStrategy(cfg, 3, 0, assignment=Assignment({c: DEPTH_NAMES[c] for c in range(3)}))
    aggregation = strategy.start_round(1, GLOBAL)
    for c, state in states.items():
        aggregation.add(ClientResult(c, state, SAMPLES[c]))
    return aggregation.finish(), strategy


def test_each_name_is_averaged_over_the_clients_that_trained_it_weighted_by_samples():
    states = client_states()
    outcome, _ = aggregate(states)
    assert outcome.aggregated and outcome.accepted == [0, 1, 2] and not outcome.rejected
    x = {c: {n: v.astype(np.float64) for n, v in s.items()} for c, s in states.items()}
    expected = {
        "b0.w": GLOBAL["b0.w"],  # nobody trained it: the global value, exactly
        "b1.w": x[2]["b1.w"],  # only client 2
        "b2.w": (30 * x[1]["b2.w"] + 60 * x[2]["b2.w"]) / 90,
        "head.w": (10 * x[0]["head.w"] + 30 * x[1]["head.w"] + 60 * x[2]["head.w"]) / 100,
    }
    assert list(outcome.state) == list(GLOBAL)
    for name, value in expected.items():
        assert outcome.state[name].dtype == np.float32
        np.testing.assert_allclose(outcome.state[name], value, rtol=1e-6, err_msg=name)
    assert np.array_equal(outcome.state["b0.w"], GLOBAL["b0.w"])


def test_the_server_optimizer_steps_only_the_names_that_were_carried():
    states = client_states()
    outcome, strategy = aggregate(states, server="fedadam", server_lr=0.1)
    moments = strategy.server_opt.state_dict()
    assert "v/b0.w" not in moments and "step/b0.w" not in moments  # untouched: no moments at all
    assert np.array_equal(outcome.state["b0.w"], GLOBAL["b0.w"])
    # FedAdam's first step by hand on b1.w (only client 2): m = 0.1 d, v = 0.01 d^2, lr_t = lr sqrt(1-b2^2)/(1-b1^2)
    d = states[2]["b1.w"].astype(np.float64) - GLOBAL["b1.w"]
    lr = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    np.testing.assert_allclose(outcome.state["b1.w"], GLOBAL["b1.w"] + lr * 0.1 * d / (np.sqrt(0.01 * d * d) + 1e-3),
                               rtol=1e-6)


def test_a_robust_rule_runs_per_group_of_names_and_keeps_a_group_too_small_for_it():
    states = client_states(1)
    outcome, _ = aggregate(states, aggregator="median")
    x = {c: {n: v.astype(np.float64) for n, v in s.items()} for c, s in states.items()}
    np.testing.assert_allclose(outcome.state["head.w"], np.median([x[c]["head.w"] for c in range(3)], axis=0), rtol=1e-6)
    np.testing.assert_allclose(outcome.state["b2.w"], (x[1]["b2.w"] + x[2]["b2.w"]) / 2, rtol=1e-6)  # unweighted
    np.testing.assert_allclose(outcome.state["b1.w"], x[2]["b1.w"], rtol=1e-6)
    assert np.array_equal(outcome.state["b0.w"], GLOBAL["b0.w"])
    # krum (f = 0) needs 3 updates: only the head (3 clients) is combined, b1 and b2 keep their values
    outcome, _ = aggregate(states, aggregator="krum")
    assert outcome.aggregated and "krum kept the global values" in outcome.message
    assert "client(s) [1, 2]" in outcome.message and "client(s) [2]" in outcome.message
    for name in ("b0.w", "b1.w", "b2.w"):
        assert np.array_equal(outcome.state[name], GLOBAL[name]), name
    assert any(np.array_equal(outcome.state["head.w"], states[c]["head.w"]) for c in range(3))


def test_max_update_norm_bounds_each_client_update_over_the_names_it_carried():
    states = client_states(2)
    outcome, _ = aggregate(states, max_update_norm=0.5)
    norms = {c: np.sqrt(sum(np.sum((s[n].astype(np.float64) - GLOBAL[n]) ** 2) for n in s)) for c, s in states.items()}
    for c in range(3):
        assert outcome.client_info[c]["update_norm"] == pytest.approx(norms[c])
        assert outcome.client_info[c]["aggregation"] == ("clipped" if norms[c] > 0.5 else "kept")
    factor = min(1.0, 0.5 / norms[2])
    clipped_2 = {n: GLOBAL[n] + factor * (states[2][n].astype(np.float64) - GLOBAL[n]) for n in states[2]}
    np.testing.assert_allclose(outcome.state["b1.w"], clipped_2["b1.w"], rtol=1e-5)


@pytest.mark.parametrize("client,state,message", [
    (0, lambda s: {**s[0], "b2.w": s[1]["b2.w"]}, "unassigned b2.w"),  # head only, but sent block 2 too
    (1, lambda s: {"b2.w": s[1]["b2.w"]}, "missing head.w"),
    (2, lambda s: {**s[2], "b0.w": GLOBAL["b0.w"]}, "unassigned b0.w"),
    (1, lambda s: {**s[1], "b2.w": s[1]["b2.w"][:1]}, "b2.w: shape"),
])
def test_an_update_that_is_not_its_assignment_is_rejected_naming_the_names(client, state, message):
    states = client_states()
    aggregation = RoundAggregation(1, GLOBAL, 1, assigned={c: DEPTH_NAMES[c] for c in range(3)})
    assert not aggregation.add(ClientResult(client, state(states), 5))
    assert message in aggregation.rejected[client]
    assert aggregation.add(ClientResult((client + 1) % 3, states[(client + 1) % 3], 5))
    outcome = aggregation.finish()
    assert client in outcome.rejected and outcome.accepted == [(client + 1) % 3]


def test_every_client_assigned_every_name_is_todays_fedavg_bit_for_bit():
    rng = np.random.default_rng(3)
    states = [{n: (v + rng.normal(0, 1, v.shape)).astype(np.float32) for n, v in GLOBAL.items()} for _ in range(3)]
    for extra in ({}, {"aggregator": "trimmed_mean", "trim_fraction": 0.2}, {"max_update_norm": 1.0}):
        cfg = FederationConfig(server_optimizer="fedadam", **extra)
        plain = FedAvgStrategy(cfg, 3, 0).aggregate_round(1, GLOBAL, [ClientResult(c, s, 7 + c) for c, s in enumerate(states)])
        everyone = Assignment({c: tuple(GLOBAL) for c in range(3)})  # assigned, but every name
        full = FedAvgStrategy(cfg, 3, 0, assignment=everyone).aggregate_round(
            1, GLOBAL, [ClientResult(c, s, 7 + c) for c, s in enumerate(states)])
        for name in GLOBAL:
            assert np.array_equal(plain.state[name], full.state[name]), (extra, name)


# ------------------------------------------------------------------ the method on tiny models


def prepared(tiny, family, k=None):
    loaded = tiny(family)
    method = Layers(LayersOptions(k=k))
    return loaded, method, method.prepare(loaded.model, loaded.info)


@pytest.mark.parametrize("family", ["tiny-bert", "tiny-vit", "tiny-gpt2", "tiny-llama"])
def test_k_trains_the_last_k_blocks_and_what_sits_above_them(tiny, family):
    above = {"tiny-bert": ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"],
             "tiny-vit": ["vit.layernorm.weight", "vit.layernorm.bias", "classifier.weight", "classifier.bias"],
             "tiny-gpt2": ["transformer.ln_f.weight", "transformer.ln_f.bias", "score.weight"],
             "tiny-llama": ["model.norm.weight", "score.weight"]}[family]
    for k in (0, 1, 2):
        loaded, method, model = prepared(tiny, family, k)
        blocks = transformer_blocks(model, loaded.info.num_layers)
        expected = {n for n, _ in model.named_parameters()
                    if n in above or (blocks.index_of(n) is not None and blocks.index_of(n) >= 2 - k)}
        assert set(method.exchanged_names(model)) == expected == {n for n, p in model.named_parameters() if p.requires_grad}
        assert not any("embed" in n or n.startswith(("transformer.wte", "transformer.wpe")) for n in expected)
        for depth in range(k + 1):  # a client of depth d: its last d blocks + above
            assert set(method.names_for_depth(model, depth)) == {
                n for n in expected if blocks.index_of(n) is None or blocks.index_of(n) >= 2 - depth}


def test_method_k_is_checked_against_the_model(tiny):
    with pytest.raises(ConfigError, match="method.k: must be >= 0"):
        Config.from_dict({"data": {"name": "x"}, "method": {"name": "layers", "k": -1}})
    with pytest.raises(ConfigError, match="method.k: the model has 2 transformer blocks, got k = 3"):
        prepared(tiny, "tiny-bert", 3)


def test_a_client_trains_only_its_blocks_and_the_ones_below_build_no_graph(tiny, csv_data):  # noqa: F811
    cfg = make_cfg(csv_data, method={"name": "layers", "k": 2}, partition={"num_clients": 3})
    exp = build_experiment(cfg)
    blocks = transformer_blocks(exp.model, exp.info.num_layers)
    graphs = {}
    hooks = [b.register_forward_hook(lambda m, i, out, idx=idx: graphs.setdefault(idx, []).append(
        (out[0] if isinstance(out, tuple) else out).grad_fn is not None)) for idx, b in enumerate(blocks.modules)]
    state, flops = exp.initial_state(), {}
    try:
        for k in (0, 1, 2):
            graphs.clear()
            names = exp.method.names_for_depth(exp.model, k)
            res = exp.trainer.fit(0, exp.parts[0], state, 1, names=None if k == 2 else names)
            assert list(res.state) == names
            for idx in range(2):
                assert set(graphs[idx]) == {idx >= 2 - k}, (k, idx)  # a graph only through trained blocks
            moved = {n for n in state if not np.array_equal(get_state(exp.model, [n])[n], state[n])}
            assert moved == set(names), k
            flops[k] = res.metrics["flops"]
    finally:
        for h in hooks:
            h.remove()
    assert flops[0] < flops[1] < flops[2]  # backward stops at the lowest trained block
    assert {n for n, p in exp.model.named_parameters() if p.requires_grad} == set(exp.names)  # restored


# ------------------------------------------------------------------ whole runs


def force_depths(monkeypatch, depths):
    """Give the clients these depths, as the client budgets would (``Layers.assignment(depths=)``)."""
    assign = layers_module.Layers.assignment
    monkeypatch.setattr(layers_module.Layers, "assignment",
                        lambda self, model, n, **_: assign(self, model, n, depths[:n]))


@pytest.fixture
def heterogeneous(monkeypatch):
    """Three clients of depths 0, 1, 2 (tests/test_budgets.py has the client budgets choose them)."""
    force_depths(monkeypatch, [0, 1, 2])


def layers_cfg(csv_data, rounds=2, **federation):  # noqa: F811
    return make_cfg(csv_data, method={"name": "layers"}, partition={"num_clients": 3},
                    federation={"rounds": rounds, "clients_per_round": 3, **federation})


def test_a_heterogeneous_run_counts_each_clients_upload_and_never_moves_frozen_weights(
        csv_data, monkeypatch, tiny, tmp_path):  # noqa: F811
    cfg = make_cfg(csv_data, method={"name": "layers", "k": 1}, partition={"num_clients": 3},
                   federation={"rounds": 2, "clients_per_round": 3})
    force_depths(monkeypatch, [0, 1, 1])
    built = {}

    def clients(exp):
        built["exp"] = exp
        return InProcessClients(exp)

    summary = run_with_clients(cfg, tmp_path / "run", False, None, clients)
    exp = built["exp"]
    pretrained = tiny("tiny-bert").model.state_dict()
    frozen = [n for n, _ in exp.model.named_parameters() if n not in set(exp.names)]
    assert frozen and all(".layer.1." not in n for n in frozen)  # k = 1: embeddings and block 0
    for name, p in exp.model.named_parameters():
        if name in frozen:
            assert torch.equal(p.detach(), pretrained[name]), name
    state = RunDir(tmp_path / "run").latest_checkpoint().state
    assert set(state) == set(exp.names)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sizes = {k: message_bytes({n: state[n] for n in exp.method.names_for_depth(exp.model, k)}) for k in (0, 1)}
    for row in rows:
        assert [(c["k"], c["bytes_up"]) for c in row["clients"]] == [(0, sizes[0]), (1, sizes[1]), (1, sizes[1])]
        assert all(c["bytes_down"] == message_bytes(state) for c in row["clients"])  # the whole exchanged state
    assert summary["bytes_per_client_update"] == sizes[1]  # the largest update
    assert summary["bytes_per_client_update_mean"] == pytest.approx((sizes[0] + 2 * sizes[1]) / 3)


def test_a_resumed_heterogeneous_run_assigns_and_ends_as_an_uninterrupted_one(csv_data, heterogeneous, tmp_path):  # noqa: F811
    from fedpeft.experiment import run_experiment

    run_experiment(layers_cfg(csv_data, rounds=2), out=tmp_path / "whole")
    run_experiment(layers_cfg(csv_data, rounds=1), out=tmp_path / "cut")
    run_experiment(layers_cfg(csv_data, rounds=2), out=tmp_path / "cut", resume=True)
    a, b = (RunDir(tmp_path / r).latest_checkpoint().state for r in ("whole", "cut"))
    assert all(np.array_equal(a[n], b[n]) for n in a)
    rows = {r: [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("whole", "cut")}
    for ra, rb in zip(rows["whole"], rows["cut"], strict=True):
        assert [(c["k"], c["bytes_up"]) for c in ra["clients"]] == [(c["k"], c["bytes_up"]) for c in rb["clients"]]
        assert [c["k"] for c in ra["clients"]] == [0, 1, 2]


@pytest.mark.parametrize("federation,key", [({"scaffold": True}, "federation.scaffold")])
def test_unsupported_combinations_with_heterogeneous_assignments_are_config_errors(
        csv_data, heterogeneous, monkeypatch, federation, key):  # noqa: F811
    with pytest.raises(ConfigError, match=key):
        build_experiment(layers_cfg(csv_data, **federation))
    monkeypatch.undo()  # every client of depth method.k: supported
    build_experiment(make_cfg(csv_data, method={"name": "layers"}, federation=federation))  # homogeneous: fine
