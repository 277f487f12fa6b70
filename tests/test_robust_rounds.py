"""Robust aggregation inside a round: norm bounding, the rules, who was kept, clipped or excluded,
and the whole run (in process and flower-sim) under a simulated attack."""

import json

import numpy as np
import pytest

from fedpeft.config import FederationConfig
from fedpeft.errors import ConfigError
from fedpeft.experiment import run_experiment
from fedpeft.federation.strategy import ClientResult, FedAvgStrategy
from test_runs import csv_data, make_cfg  # noqa: F401 - fixture reused

pytestmark = pytest.mark.usefixtures("one_thread")


def round_inputs(seed=0, clients=8, attacker_scale=1000.0):
    """A global state and ``clients`` honest results (small random deltas); client 3 also sent
    as ``global + attacker_scale * delta``."""
    rng = np.random.default_rng(seed)
    g = {"w": rng.normal(size=(6, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    honest = [ClientResult(i, {k: (v + rng.normal(scale=0.01, size=v.shape)).astype(np.float32) for k, v in g.items()},
                           int(rng.integers(10, 30))) for i in range(clients)]
    attacked = list(honest)
    bad = honest[3]
    attacked[3] = ClientResult(3, {k: (g[k] + attacker_scale * (v.astype(np.float64) - g[k])).astype(np.float32)
                                   for k, v in bad.state.items()}, bad.num_samples)
    return g, honest, attacked


def aggregate(g, results, **federation):
    strategy = FedAvgStrategy(FederationConfig(**federation), num_clients=len(results), seed=0)
    return strategy.aggregate_round(1, g, results)


def distance(a, b):
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


def test_one_huge_update_moves_the_mean_but_not_the_robust_rules():
    g, honest, attacked = round_inputs()
    clean = aggregate(g, honest).state
    spread = max(distance(r.state, clean) for r in honest)  # the farthest honest client from the clean mean
    assert distance(aggregate(g, attacked).state, clean) > 50 * spread  # plain mean: ruined
    for federation in ({"aggregator": "median"}, {"aggregator": "trimmed_mean", "trim_fraction": 0.2},
                       {"aggregator": "krum", "byzantine": 1}, {"aggregator": "multikrum", "byzantine": 1},
                       {"max_update_norm": 0.1}):
        outcome = aggregate(g, attacked, **federation)
        assert outcome.aggregated
        assert distance(outcome.state, clean) < spread, federation


def test_each_client_norm_and_status_is_recorded():
    g, honest, attacked = round_inputs()
    norms = [distance(r.state, g) for r in attacked]
    outcome = aggregate(g, attacked, max_update_norm=0.1)
    for i, r in enumerate(attacked):
        assert outcome.client_info[i]["update_norm"] == pytest.approx(norms[i], rel=1e-6)
    assert [outcome.client_info[i]["aggregation"] for i in range(8)] == ["clipped" if n > 0.1 else "kept" for n in norms]
    assert outcome.buffer_bytes == 0  # mean: a running sum, no held updates
    krum = aggregate(g, attacked, aggregator="multikrum", byzantine=1)
    assert krum.client_info[3]["aggregation"] == "excluded"
    assert sum(i["aggregation"] == "kept" for i in krum.client_info.values()) == 7
    per_client = sum(v.nbytes for v in g.values())  # float32 deltas, one per accepted client
    assert krum.buffer_bytes == 8 * per_client


def test_norm_bounding_clips_the_delta_to_the_limit():
    g, _, attacked = round_inputs()
    attacked = [attacked[3]]
    limit = 0.5 * distance(attacked[0].state, g)
    out = aggregate(g, attacked, max_update_norm=limit).state
    assert distance(out, g) == pytest.approx(limit, rel=1e-5)
    direction = {k: (attacked[0].state[k] - g[k]) for k in g}
    for k in g:  # the same direction, half the length
        np.testing.assert_allclose(out[k] - g[k], 0.5 * direction[k], rtol=1e-4, atol=1e-6)


def test_a_server_optimizer_steps_on_the_robust_average():
    from fedpeft.federation.robust import coordinate_median

    g, _, attacked = round_inputs()
    median = coordinate_median([{k: r.state[k].astype(np.float64) - g[k] for k in g} for r in attacked])
    cfg = FederationConfig(aggregator="median", server_optimizer="fedadam", server_lr=0.05)
    expected = cfg.build_server_optimizer().step(g, {k: (g[k] + median[k]).astype(np.float32) for k in g})
    got = FedAvgStrategy(cfg, 8, 0).aggregate_round(1, g, attacked).state
    for k in g:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_a_round_with_too_few_updates_for_the_rule_is_not_aggregated():
    g, honest, _ = round_inputs()
    outcome = aggregate(g, honest[:3], aggregator="krum", byzantine=1)  # krum needs k > 2f + 2
    assert not outcome.aggregated and "krum" in outcome.message and outcome.state is g


def test_rules_the_round_cannot_meet_are_config_errors(csv_data):
    with pytest.raises(ConfigError, match="federation.aggregator = 'krum' with 4 clients per round"):
        make_cfg(csv_data, partition={"num_clients": 8}, federation={"clients_per_round": 4, "aggregator": "krum",
                                                                      "byzantine": 2})
    with pytest.raises(ConfigError, match="federation.aggregator = 'bulyan'"):
        make_cfg(csv_data, partition={"num_clients": 8}, federation={"clients_per_round": 6, "aggregator": "bulyan",
                                                                      "byzantine": 1})
    with pytest.raises(ConfigError, match="federation.trim_fraction"):
        make_cfg(csv_data, federation={"aggregator": "median", "trim_fraction": 0.1})
    with pytest.raises(ConfigError, match="federation.byzantine"):
        make_cfg(csv_data, federation={"aggregator": "median", "byzantine": 1})
    with pytest.raises(ConfigError, match="scaffold"):
        make_cfg(csv_data, federation={"aggregator": "median", "scaffold": True})
    with pytest.raises(ConfigError, match="fedex"):
        make_cfg(csv_data, method={"name": "lora", "aggregation": "fedex"}, federation={"aggregator": "median"})
    with pytest.raises(ConfigError, match="max_update_norm"):
        make_cfg(csv_data, federation={"max_update_norm": 0.0})


def attacked_cfg(csv_data, **runtime):
    return make_cfg(csv_data, partition={"num_clients": 5}, runtime={"threads": 1, **runtime},
                    method={"name": "bias"},
                    federation={"rounds": 2, "clients_per_round": 5, "aggregator": "multikrum", "byzantine": 1},
                    attack={"kind": "scale", "fraction": 0.2, "scale": 100.0})


def test_an_attacked_run_records_who_attacked_and_what_the_rule_did_in_every_runtime(csv_data, tmp_path):
    from test_flower import assert_same_run

    summary = run_experiment(attacked_cfg(csv_data), out=tmp_path / "local")
    rows = [json.loads(line) for line in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    (bad,) = rows[0]["clients_attacking"]
    for row in rows:
        assert row["clients_attacking"] == [bad]
        by_id = {c["id"]: c for c in row["clients"]}
        assert by_id[bad]["aggregation"] == "excluded" and row["clients_excluded"] == 1
        assert by_id[bad]["update_norm"] > 10 * max(c["update_norm"] for c in row["clients"] if c["id"] != bad)
    assert summary["aggregation_buffer_bytes_max"] > 0 and summary["clients_excluded_total"] == 2
    run_experiment(attacked_cfg(csv_data, kind="flower-sim"), out=tmp_path / "sim")
    assert_same_run(tmp_path / "local", tmp_path / "sim")
    sim_rows = [json.loads(line) for line in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_attacking"] for r in sim_rows] == [r["clients_attacking"] for r in rows]
    assert [[c.get("aggregation") for c in r["clients"]] for r in sim_rows] == [[c.get("aggregation") for c in r["clients"]] for r in rows]


def test_round_rows_and_the_summary_count_clipped_and_excluded_clients():
    from fedpeft.federation.strategy import RoundPlan
    from fedpeft.history import round_row, summarize
    from fedpeft.runtime.rounds import Delivery

    g, _, attacked = round_inputs()
    plan = RoundPlan(1, list(range(8)), [])
    delivery = Delivery(results=[r.without_state() for r in attacked])
    timings = {"wall_s": 1.0, "client_compute_s": 1.0}
    clipped = aggregate(g, attacked, max_update_norm=0.1)
    row = round_row(plan, delivery, clipped, g, None, timings, None)
    expected = [i for i in range(8) if clipped.client_info[i]["aggregation"] == "clipped"]
    assert expected and row["clients_clipped"] == len(expected) and row["clients_excluded"] == 0
    assert [c["id"] for c in row["clients"] if c["aggregation"] == "clipped"] == expected
    assert all(c["update_norm"] == clipped.client_info[c["id"]]["update_norm"] for c in row["clients"])
    krum = round_row(plan, delivery, aggregate(g, attacked, aggregator="krum", byzantine=1), g, None, timings, row)
    assert krum["clients_excluded"] == 7 and krum["aggregation_buffer_bytes"] > 0
    summary = summarize([row, krum], {})
    assert summary["clients_clipped_total"] == len(expected) and summary["clients_excluded_total"] == 7
    assert summary["aggregation_buffer_bytes_max"] == krum["aggregation_buffer_bytes"]
