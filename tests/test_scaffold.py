"""SCAFFOLD (Karimireddy et al. 2020, https://arxiv.org/abs/1910.06378): the control variates
by hand (option II for SGD, the mean gradient for AdamW), equality with plain training while c = c_i = 0, bytes both ways, resume, the
Flower runtime's node state, and refused malformed delta_c_i."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from rich.console import Console
from torch import nn

from conftest import interrupt_at

from fedpeft.checkpoint import CheckpointDamaged, read_checkpoint
from fedpeft.config import FederationConfig
from fedpeft.data.encode import EncodedSplit
from fedpeft.errors import FedPeftError
from fedpeft.experiment import build_experiment, restore_client_controls, run_experiment
from fedpeft.federation.client import ClientTrainer
from fedpeft.federation.costs import message_bytes
from fedpeft.federation.strategy import ClientResult, FedAvgStrategy, RoundPlan
from fedpeft.results import RunDir
from fedpeft.runtime.flower.app import CLIENT_CONTROL_KEY, CONFIG_KEY, FlowerClients, train
from fedpeft.runtime.flower.wire import record_to_state, state_to_record
from fedpeft.runtime.local import InProcessClients
from test_flower import FakeGrid, trained
from test_integrity import rows_of, strip_times
from test_runs import csv_data, final_state, make_cfg  # noqa: F401 - csv_data is a fixture

# ------------------------------------------------------------------ control variates by hand


class Linear(nn.Module):
    """``t ~ x @ w + b`` with loss ``mean(0.5 * (x @ w + b - t)^2)``: gradients by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0]))
        self.b = nn.Parameter(torch.tensor([0.25]))

    def forward(self, x, labels):
        return SimpleNamespace(loss=0.5 * ((x @ self.w + self.b - labels) ** 2).mean())


X = np.array([[1.0, 2.0], [0.0, 1.0], [2.0, -1.0], [1.0, 1.0], [-1.0, 0.5]])
T = np.array([1.0, -0.5, 2.0, 0.0, 1.5])
PARTS = [np.array([0, 1]), np.array([2, 3, 4])]  # client 0: 2 rows, client 1: 3 rows (FedAvg weights)
LR, K, N = 0.1, 2, 2


def gradient(v, rows):
    """The full-batch gradient of the loss over ``rows`` at ``v = [w0, w1, b]``, in float64."""
    r = X[rows] @ v[:2] + v[2] - T[rows]
    return np.r_[X[rows].T @ r / len(rows), r.mean()]


def flat(state):
    return np.r_[state["w"], state["b"]].astype(np.float64)


def local_path(x, rows, c, c_i, optimizer):
    """``K`` full-batch steps from ``x`` along ``g + c - c_i`` with plain SGD or AdamW (torch's
    update, weight decay 0), in float64; the end point and the mean uncorrected gradient."""
    y, m, v, grads = x.copy(), np.zeros(3), np.zeros(3), []
    for t in range(1, K + 1):
        g = gradient(y, rows)
        grads.append(g)
        d = g + c - c_i
        if optimizer == "sgd":
            y = y - LR * d
        else:
            m, v = 0.9 * m + 0.1 * d, 0.999 * v + 0.001 * d**2
            y = y - LR * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return y, np.mean(grads, axis=0)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_control_variates_and_server_state_match_a_hand_computation(optimizer):
    """c_i+ is the mean uncorrected local gradient: for plain SGD the paper's option II
    ``c_i - c + (x - y_i) / (K lr)``; for AdamW still a gradient (option II's displacement is not)."""
    model = Linear()
    split = EncodedSplit({"x": torch.tensor(X, dtype=torch.float32)}, torch.tensor(T, dtype=torch.float32))
    cfg = FederationConfig(optimizer=optimizer, momentum=0.0, lr=LR, local_steps=K, batch_size=3, max_grad_norm=0.0,
                           weight_decay=0.0, clients_per_round=2, scaffold=True)
    trainer = ClientTrainer(model, ["w", "b"], split, cfg, seed=0)
    strategy = FedAvgStrategy(cfg, N, seed=0)
    clients = InProcessClients(SimpleNamespace(trainer=trainer, parts=PARTS, cfg=SimpleNamespace(federation=cfg)))
    state = {"w": np.array([0.5, -1.0], np.float32), "b": np.array([0.25], np.float32)}

    # the paper's Algorithm 1, written out in float64
    x, c, c_i = flat(state), np.zeros(3), [np.zeros(3), np.zeros(3)]
    for plan in (RoundPlan(1, [0, 1], []), RoundPlan(2, [0, 1], [1])):  # round 2: client 1 drops, |S| = 1
        aggregation = strategy.start_round(plan.round, state)
        np.testing.assert_allclose(flat(aggregation.control), c, rtol=1e-5, atol=1e-6)  # c goes down
        ys, deltas = {}, {}
        for i in plan.training:
            y, mean_g = local_path(x, PARTS[i], c, c_i[i], optimizer)
            option_ii = c_i[i] - c + (x - y) / (K * LR)
            if optimizer == "sgd":
                np.testing.assert_allclose(mean_g, option_ii, rtol=1e-9, atol=1e-12)
            else:  # Adam's displacement / (K lr) is about the sign of the step, not the gradient
                assert np.abs(mean_g - option_ii).max() > 0.1
            ys[i], deltas[i] = y, mean_g - c_i[i]
            c_i[i] = mean_g
        sizes = {i: len(PARTS[i]) for i in plan.training}
        x = sum(sizes[i] * ys[i] for i in plan.training) / sum(sizes.values())  # FedAvg, weighted
        c = c + len(plan.training) / N * np.mean([deltas[i] for i in plan.training], axis=0)  # unweighted

        delivery = clients.fit_round(plan, state, aggregation.add, aggregation.control)
        outcome = aggregation.finish(delivery.rejected)
        assert outcome.aggregated and outcome.accepted == plan.training
        state = outcome.state
        np.testing.assert_allclose(flat(state), x, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(flat(strategy.scaffold.c), c, rtol=1e-5, atol=1e-6)
        for i in (0, 1):
            np.testing.assert_allclose(flat(clients.controls.get(i, state)), c_i[i], rtol=1e-5, atol=1e-6)
    assert np.abs(c).min() > 1e-3 and np.abs(c_i[0] - c_i[1]).min() > 1e-3  # nothing vanished
    assert clients.client_state().keys() == {"0/w", "0/b", "1/w", "1/b"}


# ------------------------------------------------------------------ end to end (in process)


def sgd_cfg(csv_data, **federation):  # noqa: F811
    fed = {"rounds": 2, "optimizer": "sgd", "momentum": 0.0, "lr": 0.05, **federation}
    return make_cfg(csv_data, federation=fed, output={"save_model": False})


def checkpoint_state(run, rnd):
    return read_checkpoint(run / "checkpoint" / f"round-{rnd:05d}").state


def test_first_round_with_c_and_c_i_at_zero_is_plain_training_and_then_it_differs(csv_data, tmp_path):  # noqa: F811
    plain = run_experiment(sgd_cfg(csv_data), out=tmp_path / "plain")
    scaffold = run_experiment(sgd_cfg(csv_data, scaffold=True), out=tmp_path / "scaffold")
    p1, s1 = (checkpoint_state(tmp_path / d, 1) for d in ("plain", "scaffold"))
    for k in p1:  # bit for bit: the correction c - c_i is exactly 0
        np.testing.assert_array_equal(s1[k], p1[k], err_msg=k)
    rows_p, rows_s = rows_of(tmp_path / "plain"), rows_of(tmp_path / "scaffold")
    assert [c["train_loss"] for c in rows_s[0]["clients"]] == [c["train_loss"] for c in rows_p[0]["clients"]]
    assert rows_s[1]["train_loss"] != rows_p[1]["train_loss"]  # round 2 starts alike, its steps do not
    p2, s2 = final_state(tmp_path / "plain"), final_state(tmp_path / "scaffold")
    differ = [k for k in p2 if not np.array_equal(s2[k], p2[k])]
    assert any("classifier" in k for k in differ) and any("lora_B" in k for k in differ), differ
    assert scaffold["client_train_state_bytes"] * 3 == plain["client_train_state_bytes"] * 7  # sgd: 3 + 4 copies


RESUME_FED = {"rounds": 3, "clients_per_round": 3, "dropout": 0.25, "local_steps": 2, "scaffold": True}  # adamw


@pytest.fixture(scope="module")
def scaffold_run(csv_data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("scaffold") / "full"
    summary = run_experiment(make_cfg(csv_data, federation=RESUME_FED, output={"save_model": False}), out=out)
    return out, summary


def test_bytes_count_the_control_variates_both_ways(scaffold_run):
    run, summary = scaffold_run
    payload = message_bytes(final_state(run))
    rows = rows_of(run)
    assert sum(r["clients_dropped"] for r in rows) > 0  # reporting < selected somewhere
    for r in rows:
        assert r["bytes_down"] == 2 * payload * r["clients_selected"]
        assert r["bytes_up"] == 2 * payload * r["clients_reported"]
        for c in r["clients"]:
            assert c["bytes_down"] == 2 * payload
            assert c["bytes_up"] == (2 * payload if c["status"] == "ok" else 0)
    assert summary["total_bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert summary["total_bytes_down"] == sum(r["bytes_down"] for r in rows)
    assert summary["bytes_per_client_update"] == summary["bytes_per_client_download"] == 2 * payload


def test_resume_with_scaffold_equals_uninterrupted(scaffold_run, csv_data, tmp_path, monkeypatch):  # noqa: F811
    full, summary = scaffold_run
    cfg = make_cfg(csv_data, federation=RESUME_FED, output={"save_model": False})
    real_fit = interrupt_at(monkeypatch, 3)
    with pytest.raises(FedPeftError, match="interrupted after round 2"):
        run_experiment(cfg, out=tmp_path / "cut")
    monkeypatch.setattr(ClientTrainer, "fit", real_fit)
    cut = RunDir(tmp_path / "cut").latest_checkpoint()
    assert cut.round == 2 and cut.client_state and any(np.abs(a).max() > 0 for a in cut.client_state.values())
    assert any(k.startswith("scaffold_c/") for k in cut.server_state)
    resumed = run_experiment(cfg, out=tmp_path / "cut", resume=True)
    assert strip_times(resumed) == strip_times(summary)
    assert strip_times(rows_of(tmp_path / "cut")) == strip_times(rows_of(full))
    a, b = RunDir(full).latest_checkpoint(), RunDir(tmp_path / "cut").latest_checkpoint()
    for got, want in ((a.state, b.state), (a.server_state, b.server_state), (a.client_state, b.client_state)):
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
    # the client control variates are a checkpoint file like the others: hashed, damage is named
    path = b.path / "clients.safetensors"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CheckpointDamaged, match="clients.safetensors: damaged"):
        read_checkpoint(b.path)


# ------------------------------------------------------------------ Flower


def flower_cfg(csv_data, **runtime):  # noqa: F811
    return make_cfg(csv_data, partition={"num_clients": 2}, runtime={"threads": 1, **runtime},
                    federation={"rounds": 2, "clients_per_round": 2, "optimizer": "sgd", "momentum": 0.0,
                                "lr": 0.05, "scaffold": True})


# SCAFFOLD in flower-sim against the in-process runtime (c, and each node's c_i across rounds):
# tests/test_lora_aggregation.py::test_fedex_with_scaffold_runs_the_same_in_flower_simulation


@pytest.fixture(scope="module")
def flower_exp(csv_data):  # noqa: F811
    cfg = flower_cfg(csv_data, round_timeout=0.3, connect_timeout=5)
    return cfg, build_experiment(cfg)


def test_a_node_keeps_its_c_i_in_context_state_across_messages(flower_exp):
    cfg, exp = flower_exp
    FakeGrid(1, None)  # sets the task identity a Flower process has
    state = exp.initial_state()
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    c = {k: np.full_like(v, 0.01) for k, v in state.items()}
    kept = []
    for rnd in (1, 2):
        config = ConfigRecord({"round": rnd, "partition-id": 1, CONFIG_KEY: cfg.to_toml()})
        msg = Message(RecordDict({"arrays": state_to_record(state), "control": state_to_record(c), "config": config}),
                      dst_node_id=7, message_type=MessageType.TRAIN)
        msg.metadata.__dict__["_message_id"] = msg.object_id  # as a pushed message has
        reply = train(msg, context)
        delta = record_to_state(reply.content["control"])
        kept.append(record_to_state(context.state.array_records[CLIENT_CONTROL_KEY]))
        before = kept[-2] if rnd == 2 else {k: np.zeros_like(v) for k, v in state.items()}
        for k in state:  # c_i <- c_i + delta_c_i, stored on the node
            np.testing.assert_array_equal(kept[-1][k], before[k] + delta[k])
    assert any(not np.array_equal(kept[0][k], kept[1][k]) for k in state)


def bad_control(msg, edit):
    state = trained(msg)
    control = edit({k: np.full_like(v, 0.5) for k, v in state.items()})
    records = {"arrays": state_to_record(state), "metrics": MetricRecord({"num-examples": 10})}
    if control is not None:
        records["control"] = control if not isinstance(control, dict) else state_to_record(control)
    return Message(RecordDict(records), reply_to=msg)


def _first_cut(d):
    k = next(iter(d))
    return {**d, k: d[k][..., :1]}


def _broken_layout(d):
    record = state_to_record(d)
    record["layout"] = Array(np.frombuffer(b"[[1]]", np.uint8).copy())
    return record


BAD_CONTROL = {
    "no control record": (lambda d: None, "expected 'arrays', 'control', 'metrics'"),
    "missing name": (lambda d: dict(list(d.items())[1:]), "control variate delta_c: wrong parameter names"),
    "wrong shape": (_first_cut, "control variate delta_c: "),
    "wrong dtype": (lambda d: {k: v.astype(np.float64) for k, v in d.items()}, "control variate delta_c: "),
    "nan": (lambda d: {k: np.full_like(v, np.nan) for k, v in d.items()}, "control variate delta_c: "),
    "does not decode": (_broken_layout, "control variate arrays do not decode"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTROL))
def test_a_malformed_delta_c_is_rejected_and_never_moves_c(flower_exp, case):
    cfg, exp = flower_exp
    edit, reason = BAD_CONTROL[case]
    grid = FakeGrid(2, lambda cid, msg: bad_control(msg, lambda d: d) if cid == 0 else bad_control(msg, edit))
    clients = FlowerClients(grid, cfg.to_toml(), 2, cfg.runtime).connect()
    strategy = FedAvgStrategy(cfg.federation, 2, 0)
    state = exp.initial_state()
    aggregation = strategy.start_round(1, state)
    delivery = clients.fit_round(RoundPlan(1, [0, 1], []), state, aggregation.add, aggregation.control)
    outcome = aggregation.finish(delivery.rejected)
    assert set(outcome.rejected) == {1} and reason in outcome.rejected[1], outcome.rejected
    assert outcome.accepted == [0]
    for k in state:  # c = 0 + |S|/N * client 0's delta = 1/2 * 0.5; the state is client 0's alone
        np.testing.assert_allclose(strategy.scaffold.c[k], np.full_like(state[k], 0.25))
        np.testing.assert_array_equal(outcome.state[k], state[k] + np.float32(0.5))
    assert delivery.bytes_up[0] == 2 * message_bytes(state)  # state + delta_c


def test_a_result_without_delta_c_is_rejected_by_the_strategy(flower_exp):
    _, exp = flower_exp
    state = exp.initial_state()
    strategy = FedAvgStrategy(exp.cfg.federation, 2, 0)
    outcome = strategy.aggregate_round(1, state, [ClientResult(0, state, 10)])
    assert "control variate delta_c: wrong parameter names" in outcome.rejected[0] and not outcome.aggregated


def test_a_resumed_flower_run_restarts_c_i_and_c_at_zero_and_says_so(flower_exp, tmp_path):
    cfg, exp = flower_exp
    state = exp.initial_state()
    strategy = exp.strategy
    strategy.scaffold.c = {k: np.ones_like(v) for k, v in state.items()}
    checkpoint = SimpleNamespace(round=4, client_state=None, path=tmp_path)
    out = io.StringIO()
    flower = FlowerClients(FakeGrid(2, lambda cid, msg: None), cfg.to_toml(), 2, cfg.runtime)
    restore_client_controls(exp, flower, checkpoint, Console(file=out, width=400))
    assert "restart at 0 from round 5" in out.getvalue()
    assert all(not np.any(v) for v in strategy.scaffold.current(state).values())
    # in process the checkpoint's c_i come back and c is kept
    strategy.scaffold.c = {k: np.ones_like(v) for k, v in state.items()}
    local = InProcessClients(exp)
    saved = {f"1/{k}": np.full_like(v, 3.0) for k, v in state.items()}
    restore_client_controls(exp, local, SimpleNamespace(round=4, client_state=saved, path=tmp_path), Console(file=out))
    assert all(np.all(v == 1) for v in strategy.scaffold.c.values())
    assert all(np.all(v == 3) for v in local.controls.get(1, state).values())
    assert all(not np.any(v) for v in local.controls.get(0, state).values())
    with pytest.raises(FedPeftError, match="holds no client control variates"):
        restore_client_controls(exp, local, SimpleNamespace(round=4, client_state=None, path=tmp_path), Console(file=out))

