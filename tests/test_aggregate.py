"""FedAvg and update validation against simple known answers."""

import numpy as np
import pytest

from fedpeft.config import FederationConfig
from fedpeft.errors import UpdateRejected
from fedpeft.federation.aggregate import RunningFedAvg, fedavg, validate_update
from fedpeft.federation.strategy import ClientResult, FedAvgStrategy


def _states(rng, n, shapes):
    return [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(n)]


@pytest.mark.parametrize("n", [1, 2, 5])
def test_fedavg_equals_np_average(n):
    rng = np.random.default_rng(n)
    shapes = {"a.weight": (3, 4), "a.bias": (4,), "scalar": ()}
    states = _states(rng, n, shapes)
    weights = rng.integers(1, 100, size=n)
    out = fedavg(list(zip(states, weights)))
    assert set(out) == set(shapes)
    for k in shapes:
        expected = np.average(np.stack([s[k] for s in states]), axis=0, weights=weights)
        np.testing.assert_allclose(out[k], expected, rtol=1e-6, atol=1e-7)
        assert out[k].dtype == np.float32 and out[k].shape == shapes[k]


def test_fedavg_is_pure_and_order_invariant():
    rng = np.random.default_rng(0)
    states = _states(rng, 3, {"w": (5,)})
    copies = [{k: v.copy() for k, v in s.items()} for s in states]
    a = fedavg([(s, w) for s, w in zip(states, [1, 2, 3])])
    b = fedavg([(s, w) for s, w in zip(states[::-1], [3, 2, 1])])
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)
    for s, c in zip(states, copies):
        np.testing.assert_array_equal(s["w"], c["w"])


def test_fedavg_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        fedavg([])
    with pytest.raises(ValueError, match="positive"):
        fedavg([({"w": np.zeros(2)}, 0)])
    with pytest.raises(ValueError, match="same names"):
        fedavg([({"w": np.zeros(2)}, 1), ({"v": np.zeros(2)}, 1)])


def test_running_fedavg_equals_np_average_of_whoever_has_reported():
    """Sequential aggregation: after each arrival the running aggregate is the weighted average of
    the results folded in so far, and a bad result leaves it untouched."""
    rng = np.random.default_rng(7)
    states = _states(rng, 4, {"w": (3, 2), "b": (2,)})
    weights = [5, 1, 12, 3]
    running = RunningFedAvg()
    for k, (state, weight) in enumerate(zip(states, weights), start=1):
        running.add(state, weight)
        for name in ("w", "b"):
            expected = np.average(np.stack([s[name] for s in states[:k]]), axis=0, weights=weights[:k])
            np.testing.assert_allclose(running.result()[name], expected, rtol=1e-6, atol=1e-7)
        with pytest.raises(ValueError, match="shape"):
            running.add({"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}, 1)
        assert running.count == k and running.weight == sum(weights[:k])
    with pytest.raises(ValueError, match="at least one"):
        RunningFedAvg().result()


REF = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


@pytest.mark.parametrize(
    "update, reason",
    [
        ({"w": REF["w"]}, "missing b"),
        ({**REF, "x": np.zeros(1, np.float32)}, "unexpected x"),
        ({**REF, "w": np.zeros((3, 2), np.float32)}, r"w: shape \(3, 2\)"),
        ({**REF, "b": np.zeros(3, np.float64)}, "b: dtype float64"),
        ({**REF, "b": np.array([0, np.nan, np.inf], np.float32)}, "b: 2 non-finite"),
        ({**REF, "b": [0.0, 0.0, 0.0]}, "expected a numpy array"),
    ],
)
def test_validate_update_names_the_problem(update, reason):
    with pytest.raises(UpdateRejected, match=reason):
        validate_update(update, REF)


def test_validate_update_size_limit_and_accepts_good():
    validate_update({k: v + 1 for k, v in REF.items()}, REF)
    with pytest.raises(UpdateRejected, match="exceeds"):
        validate_update(REF, REF, max_bytes=10)


def test_strategy_rejects_bad_clients_and_keeps_state_when_too_few():
    cfg = FederationConfig(min_clients=2)
    strat = FedAvgStrategy(cfg, num_clients=4, seed=0)
    good = ClientResult(0, {k: v + 1 for k, v in REF.items()}, 10)
    nan = ClientResult(1, {**REF, "b": np.full(3, np.nan, np.float32)}, 10)
    out = strat.aggregate_round(1, REF, [good, nan])
    assert not out.aggregated and out.state is REF
    assert 1 in out.rejected and "non-finite" in out.rejected[1]
    assert "min_clients=2" in out.message
    out = strat.aggregate_round(1, REF, [good, ClientResult(2, {k: v + 3 for k, v in REF.items()}, 30)])
    assert out.aggregated
    np.testing.assert_allclose(out.state["w"], np.full((2, 3), 2.5))


def test_plan_round_sampling_and_dropout_are_seeded():
    cfg = FederationConfig(clients_per_round=0.5, dropout=0.5)
    a = FedAvgStrategy(cfg, num_clients=20, seed=3)
    b = FedAvgStrategy(cfg, num_clients=20, seed=3)
    plans = [a.plan_round(r) for r in range(1, 30)]
    assert [(p.selected, p.dropped) for p in plans] == [(q.selected, q.dropped) for q in (b.plan_round(r) for r in range(1, 30))]
    assert all(len(p.selected) == 10 and len(set(p.selected)) == 10 for p in plans)
    dropped = sum(len(p.dropped) for p in plans) / sum(len(p.selected) for p in plans)
    assert 0.35 < dropped < 0.65
    assert len({tuple(p.selected) for p in plans}) > 20  # rounds differ
    assert FedAvgStrategy(FederationConfig(clients_per_round=3), 20, 0).plan_round(1).selected.__len__() == 3
    assert FedAvgStrategy(FederationConfig(clients_per_round=50), 20, 0).clients_per_round() == 20


def test_in_process_round_folds_results_as_they_arrive_and_keeps_no_states():
    """Server memory does not grow with the number of clients: each state is folded into the
    running aggregate on arrival; the delivery keeps only sample counts, metrics and bytes."""
    import tracemalloc
    from types import SimpleNamespace

    from fedpeft.federation.strategy import RoundPlan
    from fedpeft.runtime.local import InProcessClients

    size, clients = 250_000, 16  # 1 MB float32 state per client, 16 MB if all were kept
    ref = {"w": np.zeros(size, np.float32)}

    def fit(cid, part, state, rnd):
        return ClientResult(cid, {"w": np.full(size, cid, np.float32)}, int(part))

    exp = SimpleNamespace(trainer=SimpleNamespace(fit=fit), parts=list(range(1, clients + 1)),
                          cfg=SimpleNamespace(federation=FederationConfig()))
    aggregation = FedAvgStrategy(FederationConfig(), clients, 0).start_round(1, ref)
    tracemalloc.start()
    try:
        delivery = InProcessClients(exp).fit_round(RoundPlan(1, list(range(clients)), []), ref, aggregation.add)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    outcome = aggregation.finish(delivery.rejected)
    assert peak < 6 * size * 4, f"peak {peak / 1e6:.1f} MB: states were kept instead of folded in"
    assert [r.client for r in delivery.results] == list(range(clients)) and all(not r.state for r in delivery.results)
    assert delivery.bytes_up == {c: size * 4 + 1 for c in range(clients)}
    expected = np.average(np.arange(clients, dtype=np.float64), weights=np.arange(1, clients + 1))
    np.testing.assert_allclose(outcome.state["w"], np.full(size, expected), rtol=1e-6)
