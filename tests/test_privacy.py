"""Client-level DP (DP-FedAvg, [privacy]): clipping, the fixed denominator, the noise, adaptive
clipping against Flower's DP wrappers, the accountant against Opacus and closed forms, config
errors, and a run that reports epsilon and resumes bit-identically."""

import json
import math

import numpy as np
import pytest

from fedpeft.config import FederationConfig
from fedpeft.errors import ConfigError
from fedpeft.experiment import run_experiment
from fedpeft.federation.aggregate import fedavg
from fedpeft.federation.strategy import ClientResult, FedAvgStrategy
from fedpeft.privacy.accountant import epsilon, noise_for_epsilon
from fedpeft.privacy.client_level import (
    ClientDP, LocalDPTrainer, adaptive_clip_update, clip_delta, delta_norm, local_noise_std,
)
from test_runs import csv_data, final_state, make_cfg  # noqa: F401 - fixture reused

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(clients=3, scale=0.5, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    g = {"w": rng.normal(size=(6, 5)).astype(dtype), "b": rng.normal(size=5).astype(dtype)}
    results = [ClientResult(i, {k: (v + rng.normal(scale=scale * (i + 1), size=v.shape)).astype(dtype)
                                for k, v in g.items()}, 10 + 7 * i) for i in range(clients)]
    return g, results


def dp(z=0.0, clip=1e9, m=3, mode="client-central", **kw):
    return ClientDP(mode, z, kw.pop("z_update", z), clip, 1e-5, m, m / 10, 0, **kw)


def strategy(privacy, num_clients=10):
    return FedAvgStrategy(FederationConfig(clients_per_round=privacy.clients_per_round), num_clients, 0,
                          privacy=privacy)


def norm(a, b):
    return delta_norm(a, b)


# ------------------------------------------------------------------ clipping, denominator, noise


def test_no_noise_and_a_huge_clip_is_fedavg_with_equal_weights():
    g, results = inputs()
    out = strategy(dp()).aggregate_round(1, g, results)
    expected = fedavg([(r.state, 1.0) for r in results])  # unweighted: sample counts 10, 17, 24 ignored
    for k in g:
        np.testing.assert_allclose(out.state[k], expected[k], rtol=0, atol=1e-6)
    weighted = fedavg([(r.state, r.num_samples) for r in results])
    assert max(np.abs(out.state[k] - weighted[k]).max() for k in g) > 1e-3  # the weights do matter
    assert out.privacy["noise_std"] == 0 and all(i["aggregation"] == "kept" for i in out.client_info.values())


def test_the_denominator_is_the_clients_per_round_whoever_reported():
    g, results = inputs()
    out = strategy(dp(m=4)).aggregate_round(1, g, results)  # 3 of the 4 expected clients reported
    for k in g:
        total = sum(r.state[k].astype(np.float64) - g[k] for r in results)
        np.testing.assert_allclose(out.state[k], g[k] + total / 4, atol=1e-6)


def test_every_clipped_delta_has_norm_at_most_the_clip_and_the_average_moves_at_most_clip():
    g, results = inputs(clients=5, scale=2.0)
    for res in results:
        delta, before, clipped = clip_delta(res.state, g, 0.7)
        after = math.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))
        assert clipped == (before > 0.7) and after <= 0.7 * (1 + 1e-12)
        assert before == pytest.approx(norm(res.state, g))
    out = strategy(dp(clip=0.7, m=5)).aggregate_round(1, g, results)
    assert norm(out.state, g) <= 0.7 * (1 + 1e-6)
    assert {i["aggregation"] for i in out.client_info.values()} == {"clipped"}
    assert [i["update_norm"] for i in out.client_info.values()] == pytest.approx([norm(r.state, g) for r in results])


def test_server_noise_has_std_z_clip_over_m_and_is_seeded():
    g = {"w": np.zeros((400, 500), np.float64)}
    results = [ClientResult(i, {"w": g["w"].copy()}, 5) for i in range(4)]  # zero deltas: only noise
    a = strategy(dp(z=1.3, clip=2.0, m=4)).aggregate_round(3, g, results)
    noise = a.state["w"].ravel()
    assert noise.std() == pytest.approx(1.3 * 2.0 / 4, rel=0.01) and abs(noise.mean()) < 0.005
    assert a.privacy["noise_std"] == pytest.approx(0.65)
    b = strategy(dp(z=1.3, clip=2.0, m=4)).aggregate_round(3, g, results)
    c = strategy(dp(z=1.3, clip=2.0, m=4)).aggregate_round(4, g, results)
    assert np.array_equal(a.state["w"], b.state["w"]) and not np.array_equal(a.state["w"], c.state["w"])


class _Honest:
    """A trainer stand-in: every client sends ``global + 3`` (delta norm 3 * sqrt(size))."""

    def fit(self, client, indices, global_state, rnd, controls=None, names=None):
        return ClientResult(client, {k: v + 3.0 for k, v in global_state.items()}, 8)


def test_client_local_clips_then_adds_z_clip_over_sqrt_m():
    g = {"w": np.zeros(200_000, np.float64)}
    trainer = LocalDPTrainer(_Honest(), dp(z=2.0, clip=1.0, m=4, mode="client-local"))
    sent = trainer.fit(1, np.arange(3), g, 1).state["w"]
    clipped = 1.0 / math.sqrt(g["w"].size)  # the delta (all 3s) scaled to norm 1, per coordinate
    assert local_noise_std(2.0, 1.0, 4) == 1.0
    assert (sent - clipped).std() == pytest.approx(1.0, rel=0.01)  # z C / sqrt(m) = 2 * 1 / 2
    # m clients' noise summed: std z C, the mean's z C / m, as the central mechanism's
    total = sum(trainer.fit(c, np.arange(3), g, 1).state["w"] for c in range(4)) - 4 * clipped
    assert total.std() == pytest.approx(2.0, rel=0.01)
    assert np.array_equal(sent, trainer.fit(1, np.arange(3), g, 1).state["w"])  # seeded by (seed, round, client)


# ------------------------------------------------------------------ against Flower's DP wrappers


def _flower_round(wrapper, global_state, clients):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    class Grid:
        def get_node_ids(self):
            return list(range(101, 101 + len(clients)))

    def record(state):
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()})

    instructions = list(wrapper.configure_train(1, record(global_state), ConfigRecord(), Grid()))
    replies = [Message(RecordDict({"arrays": record(s), "metrics": MetricRecord({"num-examples": 1})}), reply_to=m)
               for m, s in zip(instructions, clients)]
    arrays, _ = wrapper.aggregate_train(1, replies)
    return {k: a.numpy() for k, a in arrays.items()}


@pytest.mark.parametrize("clip", [0.3, 1.5, 1e6])
def test_fixed_clipping_matches_flowers_server_side_wrapper(clip, flower_identity):
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    g, results = inputs(clients=4, dtype=np.float64)
    theirs = _flower_round(DifferentialPrivacyServerSideFixedClipping(
        FedAvg(fraction_train=1.0, min_available_nodes=4), 0.0, clip, 4), g, [r.state for r in results])
    ours = strategy(dp(clip=clip, m=4)).aggregate_round(1, g, results).state
    for k in g:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-12, atol=1e-12)


def test_noise_std_matches_flowers_fixed_clipping_statistically(flower_identity):
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    g = {"w": np.zeros(100_000)}
    same = [{"w": g["w"] + 1e-9} for _ in range(4)]  # Flower divides by the delta's norm: not 0
    np.random.seed(0)
    theirs = _flower_round(DifferentialPrivacyServerSideFixedClipping(
        FedAvg(fraction_train=1.0, min_available_nodes=4), 0.8, 0.5, 4), g, same)["w"]
    ours = strategy(dp(z=0.8, clip=0.5, m=4)).aggregate_round(1, g, [ClientResult(i, s, 1) for i, s in
                                                                       enumerate(same)]).state["w"]
    assert ours.std() == pytest.approx(theirs.std(), rel=0.02) == pytest.approx(0.1, rel=0.02)


def test_adaptive_clipping_against_flowers_server_side_adaptive_wrapper(flower_identity):
    """Noise 0 (so the count is exact): the same clipped average as Flower's wrapper; the clip
    step is Flower's geometric update fed Andrew et al.'s fraction of *unclipped* updates, while
    Flower's wrapper feeds it the clipped fraction (it moves the other way: documented)."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg

    g, results = inputs(clients=4, scale=0.2, dtype=np.float64)
    clip, gamma, lr = 3.0, 0.3, 0.2
    norms = [norm(r.state, g) for r in results]
    unclipped = sum(n <= clip for n in norms) / 4
    assert 0 < unclipped < 1, norms
    flower = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(fraction_train=1.0, min_available_nodes=4), 0.0, 4, initial_clipping_norm=clip,
        target_clipped_quantile=gamma, clip_norm_lr=lr)
    theirs = _flower_round(flower, g, [r.state for r in results])
    ours_strategy = strategy(dp(clip=clip, m=4, adaptive=True, target_quantile=gamma, clip_lr=lr))
    out = ours_strategy.aggregate_round(1, g, results)
    for k in g:
        np.testing.assert_allclose(out.state[k], theirs[k], rtol=1e-12, atol=1e-12)
    expected = clip * math.exp(-lr * (unclipped - gamma))  # Andrew et al. 2021, Algorithm 1
    assert ours_strategy.privacy.clip == pytest.approx(expected, rel=1e-12) == adaptive_clip_update(clip, unclipped, gamma, lr)
    twin = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 0.0, 4, initial_clipping_norm=clip,
                                                         target_clipped_quantile=gamma, clip_norm_lr=lr)
    twin._geometric_update(unclipped)
    assert twin.clipping_norm == pytest.approx(expected, rel=1e-12)
    assert flower.clipping_norm == pytest.approx(clip * math.exp(-lr * ((1 - unclipped) - gamma)), rel=1e-12)
    assert out.privacy["clip_norm"] == clip  # the row records the clip this round used


def test_adaptive_clip_is_strategy_state():
    g, results = inputs(clients=4)
    a = strategy(dp(z=0.5, clip=1.0, m=4, adaptive=True, count_stddev=1.0, z_update=0.55))
    a.aggregate_round(1, g, results)
    state = a.state_dict()
    b = strategy(dp(z=0.5, clip=1.0, m=4, adaptive=True, count_stddev=1.0, z_update=0.55))
    b.load_state_dict(state)
    assert b.privacy.clip == a.privacy.clip != 1.0
    with pytest.raises(ValueError, match="adaptive"):
        FedAvgStrategy(FederationConfig(), 10, 0).load_state_dict(state)


# ------------------------------------------------------------------ the accountant


@pytest.mark.parametrize("q,z,steps,delta", [(0.01, 1.1, 100, 1e-5), (0.2, 0.8, 30, 1e-4), (1.0, 2.0, 5, 1e-3),
                                             (0.5, 4.0, 200, 1e-5)])
def test_epsilon_equals_opacus_rdp_accountant(q, z, steps, delta):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=z, sample_rate=q)
    assert epsilon(q, z, steps, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-9)


def test_epsilon_matches_closed_forms():
    """q = 1: the Gaussian mechanism's RDP is alpha / (2 z^2) per step; q < 1 at an integer order:
    Mironov et al. 2019's binomial sum. Converted as Balle et al. 2020 (Opacus's conversion)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    orders = np.asarray(RDPAccountant.DEFAULT_ALPHAS, float)
    z, steps, delta = 1.5, 40, 1e-5
    curve = steps * orders / (2 * z * z)
    eps = curve + np.log1p(-1 / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    assert epsilon(1.0, z, steps, delta) == pytest.approx(float(eps.min()), rel=1e-9)
    q, z = 0.05, 0.9
    for alpha in (2, 3, 5, 8):
        a = sum(math.comb(alpha, k) * (1 - q) ** (alpha - k) * q ** k * math.exp((k * k - k) / (2 * z * z))
                for k in range(alpha + 1))
        assert rdp.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=[alpha])[0] == pytest.approx(
            math.log(a) / (alpha - 1), rel=1e-9)


def test_noise_for_epsilon_meets_the_target_closely():
    z = noise_for_epsilon(3.0, 0.25, 20, 1e-5)
    assert epsilon(0.25, z, 20, 1e-5) <= 3.0
    assert epsilon(0.25, z * 0.97, 20, 1e-5) > 3.0  # not much more noise than needed
    with pytest.raises(ValueError, match="cannot be met"):
        noise_for_epsilon(1e-4, 1.0, 1000, 1e-5)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("sections,key", [
    ({"privacy": {"mode": "sample", "max_grad_norm": 1.0}}, "privacy.target_epsilon"),
    ({"privacy": {"mode": "client-central", "noise_multiplier": 1.0, "clip_norm": 1.0, "secure_aggregation": True}},
     "privacy.secure_aggregation"),
    ({"privacy": {"mode": "client-central", "clip_norm": 1.0}}, "privacy.target_epsilon"),
    ({"privacy": {"mode": "client-central", "noise_multiplier": 1.0, "target_epsilon": 3.0, "clip_norm": 1.0}},
     "privacy.target_epsilon"),
    ({"privacy": {"mode": "client-central", "noise_multiplier": 1.0, "clip_norm": 0.0}}, "privacy.clip_norm"),
    ({"privacy": {"mode": "client-central", "noise_multiplier": 1.0}}, "privacy.clip_norm"),
    ({"privacy": {"mode": "client-central", "noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 0.0}}, "privacy.delta"),
    ({"privacy": {"mode": "client-central", "noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 0.3}}, "privacy.delta"),
    ({"privacy": {"mode": "client-central", "target_epsilon": 1e-3, "clip_norm": 1.0}}, "privacy.target_epsilon"),
    ({"privacy": {"mode": "none", "clip_norm": 1.0}}, "privacy.mode"),
    ({"privacy": {"mode": "client-central", "noise_multiplier": 1.0, "clip_norm": 1.0, "clip_norm_lr": 0.1}},
     "privacy.clip_norm_lr"),
    ({"privacy": {"mode": "client-central", "noise_multiplier": 1.0, "adaptive_clip": True}},
     "privacy.clipped_count_stddev"),  # 2 clients per round: sigma_b = 0.1 < z / 2
    ({"privacy": {"mode": "client-local", "noise_multiplier": 1.0, "adaptive_clip": True}}, "privacy.adaptive_clip"),
    ({"privacy": {"mode": "client-central", "noise_multiplier": 1.0, "clip_norm": 1.0},
      "federation": {"aggregator": "median"}}, "federation.aggregator"),
    ({"privacy": {"mode": "client-central", "noise_multiplier": 1.0, "clip_norm": 1.0},
      "federation": {"max_update_norm": 1.0}}, "federation.max_update_norm"),
    ({"privacy": {"mode": "client-central", "noise_multiplier": 1.0, "clip_norm": 1.0},
      "federation": {"scaffold": True}}, "federation.scaffold"),
    ({"privacy": {"mode": "client-central", "noise_multiplier": 1.0, "clip_norm": 1.0},
      "method": {"aggregation": "fedex"}}, "method.aggregation"),
])
def test_config_errors_name_the_key(csv_data, sections, key):
    with pytest.raises(ConfigError) as err:
        make_cfg(csv_data, **sections)
    assert str(err.value).startswith(key), str(err.value)


# ------------------------------------------------------------------ runs


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_dp_run_reports_epsilon_and_resumes_bit_identically(csv_data, tmp_path):
    privacy = {"mode": "client-central", "noise_multiplier": 0.5, "clip_norm": 0.3, "adaptive_clip": True,
               "clipped_count_stddev": 1.0}
    whole = run_experiment(make_cfg(csv_data, privacy=privacy), out=tmp_path / "whole")
    got = rows(tmp_path / "whole")
    q = 2 / 4
    assert [r["epsilon"] for r in got] == pytest.approx([epsilon(q, 0.5, r, 1e-5) for r in (1, 2, 3)], rel=1e-12)
    assert got[0]["epsilon"] < got[1]["epsilon"] < got[2]["epsilon"]
    assert whole["epsilon"] == got[-1]["epsilon"] and whole["delta"] == 1e-5 and whole["noise_multiplier"] == 0.5
    assert whole["clip_norms"] == [r["clip_norm"] for r in got] and got[0]["clip_norm"] == 0.3
    assert len(set(whole["clip_norms"])) == 3  # the clip moved every round
    z_update = (0.5 ** -2 - 2.0 ** -2) ** -0.5
    assert [r["noise_std"] for r in got] == pytest.approx([z_update * r["clip_norm"] / 2 for r in got])
    run_experiment(make_cfg(csv_data, privacy=privacy, federation={"rounds": 2}), out=tmp_path / "cut")
    resumed = run_experiment(make_cfg(csv_data, privacy=privacy), out=tmp_path / "cut", resume=True)
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "cut")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    strip = ("wall_s", "client_compute_s", "eval_s", "other_s", "peak_rss_mb")
    same = [{k: v for k, v in r.items() if k not in strip and k != "clients"} for r in got]
    assert same == [{k: v for k, v in r.items() if k not in strip and k != "clients"} for r in rows(tmp_path / "cut")]
    assert resumed["epsilon"] == whole["epsilon"] and resumed["clip_norms"] == whole["clip_norms"]


def test_without_privacy_the_summary_says_so(csv_data, tmp_path):
    summary = run_experiment(make_cfg(csv_data, federation={"rounds": 1}), out=tmp_path / "plain")
    assert (summary["privacy"], summary["epsilon"], summary["delta"], summary["noise_multiplier"]) == (
        "none", None, None, None)
    assert "epsilon" not in rows(tmp_path / "plain")[0]
