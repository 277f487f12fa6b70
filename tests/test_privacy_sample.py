"""Sample-level DP-SGD ([privacy] mode = "sample"): per-sample clipping against a loop of
single-row backward passes, the noise scale, Poisson batches, the per-client accountant against
Opacus's RDPAccountant, resume, every method trains or refuses, config errors."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedpeft.config import ModelConfig
from fedpeft.errors import ConfigError
from fedpeft.experiment import build_experiment, run_experiment
from fedpeft.methods.registry import build_method
from fedpeft.models import load_model
from fedpeft.privacy.sample_level import SampleDP, SampleDPHook
from conftest import make_batch
from test_runs import csv_data, final_state, make_cfg  # noqa: F401 - fixture reused

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE = {"mode": "sample", "max_grad_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-3}


def prepared(family, method):
    loaded = load_model(ModelConfig(name=family), label_names=["a", "b", "c"], seed=0)
    model = build_method(method, None).prepare(loaded.model, loaded.info)
    for m in model.modules():  # no dropout: batched and single-row passes see the same function
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.train()
    return loaded, model


def reference_grad(model, params, batch, clip):
    """sum_i clip(g_i) / n, each g_i from its own single-row forward and backward pass."""
    n = len(batch["labels"])
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    norms = []
    for i in range(n):
        loss = model(**{k: v[i : i + 1] for k, v in batch.items()}).loss
        g = torch.autograd.grad(loss, params, allow_unused=True)
        g = [torch.zeros_like(p) if x is None else x for p, x in zip(params, g)]
        norm = float(torch.sqrt(sum((x.double() ** 2).sum() for x in g)))
        norms.append(norm)
        for t, x in zip(total, g):
            t += x.double() * min(1.0, clip / norm)
    return [t / n for t in total], norms


@pytest.mark.parametrize("family,method,engine", [
    ("tiny-bert", "lora", "opacus"), ("tiny-bert", "bias", "opacus"), ("tiny-gpt2", "adapter", "opacus"),
    ("tiny-bert", "full", "loop"), ("tiny-bert", "prompt", "loop"),
])
def test_per_sample_gradients_are_clipped_before_the_sum(family, method, engine):
    loaded, model = prepared(family, method)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = make_batch(loaded, 4)
    _, norms = reference_grad(model, params, batch, 1e9)
    clip = float(np.median(norms))  # about half the rows are clipped
    expected, _ = reference_grad(model, params, batch, clip)
    hook = SampleDPHook(SampleDP(0.0, clip, 1e-5, 4, 0, engine))
    hook.begin(0, 1, 100)  # expected batch size min(4, 100) = 4 = the batch's rows
    trainer = SimpleNamespace(model=model, params=params)
    hook.backward(trainer, batch)
    for p, e in zip(params, expected):
        assert torch.allclose(p.grad.double(), e, rtol=1e-4, atol=1e-6)
    assert hook.clipped == sum(n > clip for n in norms) >= 1 and hook.rows == 4
    got = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
    assert got <= clip + 1e-6  # the mean of clipped gradients is within the clip too


def test_noise_has_std_z_clip_over_the_expected_batch_size_and_is_seeded():
    z, clip, bs = 1.5, 0.7, 8
    params = [torch.zeros(400, 50, requires_grad=True)]
    trainer = SimpleNamespace(model=None, params=params)
    hook = SampleDPHook(SampleDP(z, clip, 1e-5, bs, 3, "opacus"))
    hook.begin(2, 5, 100)
    hook.backward(trainer, None)  # an empty Poisson batch: noise only
    g = params[0].grad.clone()
    assert float(g.mean()) == pytest.approx(0.0, abs=4 * z * clip / bs / 141)
    assert float(g.std()) == pytest.approx(z * clip / bs, rel=0.02)
    hook.begin(2, 5, 100)
    hook.backward(trainer, None)
    assert torch.equal(params[0].grad, g)  # seeded by (seed, round, client)
    hook.begin(3, 5, 100)
    hook.backward(trainer, None)
    assert not torch.equal(params[0].grad, g)
    hook.begin(2, 5, 5)  # a client with fewer rows than the batch size: divided by its 5 rows
    hook.backward(trainer, None)
    assert float(params[0].grad.std()) == pytest.approx(z * clip / 5, rel=0.02)


def test_poisson_batches_include_each_row_with_probability_q():
    hook = SampleDPHook(SampleDP(1.0, 1.0, 1e-5, 8, 0, "opacus"))
    hook.begin(0, 1, 40)
    batches = hook.batch_order(np.arange(100, 140), 2000, torch.Generator().manual_seed(0))
    sizes = np.array([len(b) for b in batches])
    assert sizes.mean() == pytest.approx(8, rel=0.03) and sizes.min() < 8 < sizes.max()
    rows = torch.cat(batches).numpy()
    assert set(rows) <= set(range(100, 140)) and all(len(set(b.tolist())) == len(b) for b in batches)


def rows_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def opacus_epsilon(z, q, steps, delta):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta)


def test_epsilon_per_client_equals_opacus_and_resume_keeps_the_accountant(csv_data, tmp_path):
    fed = {"rounds": 2, "clients_per_round": 2, "local_steps": 3, "batch_size": 8}
    whole = run_experiment(make_cfg(csv_data, federation=fed, privacy=SAMPLE), out=tmp_path / "whole")
    got = rows_of(tmp_path / "whole")
    steps, q, last = {}, 8 / 30, {}  # iid over 4 clients: 30 rows each
    for r in got:
        for c in r["clients"]:
            steps[c["id"]] = steps.get(c["id"], 0) + int(c["steps"])
            assert c["epsilon"] == pytest.approx(opacus_epsilon(1.0, q, steps[c["id"]], 1e-3), rel=1e-9)
            last[c["id"]] = c["epsilon"]
            assert 0 <= c["dp_clipped_fraction"] <= 1
    assert whole["epsilon"] == max(last.values()) and whole["delta"] == 1e-3 and whole["noise_multiplier"] == 1.0
    assert (whole["privacy"], whole["sampling"], whole["max_grad_norm"]) == ("sample", "poisson", 1.0)
    run_experiment(make_cfg(csv_data, federation={**fed, "rounds": 1}, privacy=SAMPLE), out=tmp_path / "cut")
    resumed = run_experiment(make_cfg(csv_data, federation=fed, privacy=SAMPLE), out=tmp_path / "cut", resume=True)
    eps = [[c["epsilon"] for c in r["clients"]] for r in got]
    assert eps == [[c["epsilon"] for c in r["clients"]] for r in rows_of(tmp_path / "cut")]
    assert resumed["epsilon"] == whole["epsilon"]
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "cut")
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same Poisson batches and noise after resume


def test_target_epsilon_is_met_by_a_client_selected_every_round(csv_data, tmp_path):
    privacy = {"mode": "sample", "max_grad_norm": 1.0, "target_epsilon": 4.0, "delta": 1e-3}
    fed = {"rounds": 2, "clients_per_round": 4, "local_steps": 2}
    summary = run_experiment(make_cfg(csv_data, federation=fed, privacy=privacy), out=tmp_path / "t")
    assert 4.0 * 0.99 <= summary["epsilon"] <= 4.0
    assert summary["epsilon"] == pytest.approx(opacus_epsilon(summary["noise_multiplier"], 8 / 30, 4, 1e-3), rel=1e-9)


@pytest.mark.parametrize("family,method", [
    ("tiny-bert", m) for m in ("full", "head", "bias", "adapter", "lora", "prompt", "layers")
] + [("tiny-gpt2", m) for m in ("full", "lora", "prompt")])
def test_every_method_trains_under_dp_sgd(csv_data, family, method):
    options = {"name": method, **({"k": 1} if method == "layers" else {})}
    fed = {"rounds": 1, "local_steps": 2, "batch_size": 4, "proximal_mu": 0.1}  # FedProx combines
    cfg = make_cfg(csv_data, model={"name": family}, method=options, federation=fed, privacy=SAMPLE)
    exp = build_experiment(cfg, with_test=False)
    state = exp.initial_state()
    res = exp.trainer.fit(0, exp.parts[0], state, 1)
    assert any(not np.array_equal(res.state[k], state[k]) for k in state)
    assert res.metrics["epsilon"] > 0 and res.metrics["steps"] == 2
    assert exp.sample_dp.engine == ("loop" if method in ("full", "prompt") else "opacus")


@pytest.mark.parametrize("sections,key", [
    ({"privacy": {**SAMPLE, "max_grad_norm": 0.0}}, "privacy.max_grad_norm"),
    ({"privacy": {**SAMPLE, "max_grad_norm": -1.0}}, "privacy.max_grad_norm"),
    ({"privacy": {k: v for k, v in SAMPLE.items() if k != "max_grad_norm"}}, "privacy.max_grad_norm"),
    ({"privacy": {**SAMPLE, "clip_norm": 1.0}}, "privacy.clip_norm"),
    ({"privacy": {**SAMPLE, "target_epsilon": 1.0}}, "privacy.target_epsilon"),
    ({"privacy": {"mode": "client-central", "noise_multiplier": 1.0, "clip_norm": 1.0, "max_grad_norm": 1.0}},
     "privacy.max_grad_norm"),
    ({"privacy": SAMPLE, "method": {"name": "sfprompt"}}, "method.name"),
    ({"privacy": SAMPLE, "federation": {"scaffold": True}}, "federation.scaffold"),
])
def test_config_errors_name_the_key(csv_data, sections, key):
    with pytest.raises(ConfigError) as err:
        make_cfg(csv_data, **sections)
    assert str(err.value).startswith(key), str(err.value)


@pytest.mark.parametrize("privacy,key", [
    ({"mode": "sample", "max_grad_norm": 1.0, "target_epsilon": 1e-3, "delta": 1e-3}, "privacy.target_epsilon"),
    ({**SAMPLE, "delta": 0.05}, "privacy.delta"),  # 30 rows per client: delta must be < 1/30
])
def test_build_time_errors_name_the_key(csv_data, privacy, key):
    with pytest.raises(ConfigError) as err:
        build_experiment(make_cfg(csv_data, privacy=privacy), with_test=False)
    assert str(err.value).startswith(key), str(err.value)


# --------------------------------------------------------------------------- causal-lm


def causal_cfg(tmp_path, **sections):
    from fedpeft.config import Config

    rng = np.random.default_rng(0)
    words = "red blue green gold cat dog fox bird card bank money pay".split()
    rows = [{"prompt": f"say {' '.join(rng.choice(words, 1 + i % 3))}", "response": " ".join(rng.choice(words, 1 + i % 4))}
            for i in range(24)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"model": {"name": "tiny-gpt2", "max_length": 16},
           "task": {"kind": "causal-lm", "max_new_tokens": 2, "generation_samples": 2},
           "data": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
           "method": {"name": "lora", "r": 4}, "partition": {"num_clients": 2},
           "federation": {"rounds": 2, "local_steps": 2, "batch_size": 4, "lr": 1e-2},
           "runtime": {"seed": 0, "progress": False}, "output": {"save_model": False}, "privacy": SAMPLE}
    for name, table in sections.items():
        raw[name] = {**raw.get(name, {}), **table}
    return Config.from_dict(raw)


@pytest.mark.parametrize("method,engine", [("lora", "opacus"), ("prompt", "loop")])
def test_causal_lm_per_sample_gradient_is_the_gradient_of_that_rows_mean_response_loss(tmp_path, method, engine):
    """Each row's per-sample gradient equals autograd of the model's own loss on that row alone,
    unpadded (the mean over its response tokens): whatever the other rows' lengths."""
    exp = build_experiment(causal_cfg(tmp_path, method={"name": method}), with_test=False)
    model = exp.model
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = exp.train.batch(torch.arange(5))
    lengths = batch["attention_mask"].sum(1)
    responses = (batch["labels"] != -100).sum(1)
    assert len(set(lengths.tolist())) > 1 and len(set(responses.tolist())) > 1  # ragged rows and responses
    reference = []
    for i, n in enumerate(lengths.tolist()):  # independent: HF's loss on the row cut to its own tokens
        row = {k: v[i : i + 1, :n] for k, v in batch.items()}
        grads = torch.autograd.grad(model(**row).loss, params, allow_unused=True)
        reference.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    hook = SampleDPHook(SampleDP(0.0, 1e9, 1e-5, 5, 0, engine))
    hook.begin(0, 1, 100)
    captured = []
    hook._accumulate = lambda grads, total: captured.append([g.clone() for g in grads])
    hook.backward(SimpleNamespace(model=model, params=params), batch)
    per_sample = [torch.cat([c[j] for c in captured]) for j in range(len(params))]  # (5, *shape) per param
    for i in range(5):
        for j, p in enumerate(params):
            assert torch.allclose(per_sample[j][i], reference[i][j], rtol=1e-4, atol=1e-7), (i, j)


def test_causal_lm_dp_sgd_run_trains_and_spends_opacus_epsilon(tmp_path):
    summary = run_experiment(causal_cfg(tmp_path), out=tmp_path / "run")
    rows = rows_of(tmp_path / "run")
    steps, q = {}, 4 / 12  # iid over 2 clients: 12 rows each, batch 4
    for r in rows:
        assert r["aggregated"] and np.isfinite(r["train_loss"]) and r["eval_loss"] is not None
        for c in r["clients"]:
            steps[c["id"]] = steps.get(c["id"], 0) + int(c["steps"])
            assert c["epsilon"] == pytest.approx(opacus_epsilon(1.0, q, steps[c["id"]], 1e-3), rel=1e-9)
    assert summary["status"] == "finished" and summary["privacy"] == "sample" and summary["epsilon"] > 0
    exp = build_experiment(causal_cfg(tmp_path), with_test=False)
    start, final = exp.initial_state(), final_state(tmp_path / "run")
    assert any(not np.array_equal(start[k], final[k]) for k in start)  # the LoRA factors moved
