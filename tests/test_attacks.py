"""Simulated attacks ([attack]): reproducible by seed, only the chosen clients, as documented."""

import json

import numpy as np
import pytest

from fedpeft.config import AttackConfig
from fedpeft.data.encode import EncodedSplit
from fedpeft.experiment import build_experiment, run_experiment
from fedpeft.federation.attacks import malicious_clients, poison
from fedpeft.federation.client import ClientTrainer
from test_runs import csv_data, make_cfg  # noqa: F401 - fixture reused

pytestmark = pytest.mark.usefixtures("one_thread")


def test_malicious_clients_are_a_seeded_draw_of_the_fraction():
    attack = AttackConfig(kind="scale", fraction=0.25)
    draws = {seed: malicious_clients(attack, 16, seed) for seed in range(6)}
    assert all(len(d) == 4 and len(set(d)) == 4 and all(0 <= c < 16 for c in d) for d in draws.values())
    assert draws[0] == malicious_clients(attack, 16, 0)  # reproducible
    assert len({tuple(d) for d in draws.values()}) > 1  # and it depends on the seed
    assert malicious_clients(AttackConfig(kind="scale", fraction=0.01), 16, 0).__len__() == 1  # at least one
    assert malicious_clients(AttackConfig(), 16, 0) == []


def test_poisoned_states_follow_their_formulas():
    rng = np.random.default_rng(0)
    g = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    y = {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in g.items()}
    for kind, sign in (("scale", 1), ("sign_flip", -1)):
        out = poison(kind, 7.0, g, y, np.random.default_rng(1))
        for k in g:
            np.testing.assert_allclose(out[k], g[k] + sign * 7.0 * (y[k].astype(np.float64) - g[k]), rtol=1e-5, atol=1e-5)
            assert out[k].dtype == np.float32
    noise = [poison("gaussian", 2.0, g, y, np.random.default_rng(5)) for _ in range(2)]
    assert all(np.array_equal(noise[0][k], noise[1][k]) for k in g)  # reproducible by its generator
    offsets = np.concatenate([(noise[0][k] - g[k]).ravel() for k in g])
    assert 1.0 < offsets.std() < 3.5  # N(0, 2^2), whatever the client's own update was


def attack_cfg(csv_data, **attack):
    return make_cfg(csv_data, partition={"num_clients": 4}, federation={"rounds": 2, "clients_per_round": 4},
                    attack=attack, runtime={"threads": 1})


def test_only_the_malicious_client_attacks_and_rows_name_it(csv_data, tmp_path):
    clean = build_experiment(attack_cfg(csv_data))
    exp = build_experiment(attack_cfg(csv_data, kind="scale", fraction=0.25, scale=50.0))
    (bad,) = exp.attackers
    assert exp.attackers == malicious_clients(exp.cfg.attack, 4, 0)
    g = exp.initial_state()
    for cid in range(4):
        honest = clean.trainer.fit(cid, clean.parts[cid], g, 1).state
        sent = exp.trainer.fit(cid, exp.parts[cid], g, 1).state
        for k in g:
            expected = g[k] + 50.0 * (honest[k].astype(np.float64) - g[k]) if cid == bad else honest[k]
            np.testing.assert_allclose(sent[k], expected, rtol=1e-5, atol=1e-5)
    run_experiment(exp.cfg, out=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_attacking"] for r in rows] == [[bad], [bad]]


def test_label_flip_trains_honestly_on_flipped_labels(csv_data):
    exp = build_experiment(attack_cfg(csv_data, kind="label_flip", fraction=0.5))
    clean = build_experiment(attack_cfg(csv_data))
    labels = clean.train.labels
    flipped = EncodedSplit(clean.train.features, clean.data.num_labels - 1 - labels, clean.train.padding_side)
    reference = ClientTrainer(clean.model, clean.names, flipped, clean.cfg.federation, clean.cfg.runtime.seed)
    g = exp.initial_state()
    for cid in range(4):
        sent = exp.trainer.fit(cid, exp.parts[cid], g, 1).state
        expected = (reference if cid in exp.attackers else clean.trainer).fit(cid, clean.parts[cid], g, 1).state
        assert all(np.array_equal(sent[k], expected[k]) for k in g), cid
    assert np.array_equal(exp.trainer.train.labels, labels)  # the honest labels are back after each fit


def test_attack_keys_are_checked():
    from fedpeft.errors import ConfigError

    for bad, key in (({"kind": "scale"}, "attack.fraction"), ({"fraction": 0.5}, "attack.kind"),
                     ({"kind": "label_flip", "fraction": 0.5, "scale": 2.0}, "attack.scale"),
                     ({"kind": "gaussian", "fraction": 1.0}, "attack.fraction")):
        with pytest.raises(ConfigError, match=key):
            AttackConfig(**bad).validate()
