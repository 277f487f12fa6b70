"""Exact LoRA aggregation: FFA-LoRA (A frozen at a shared seeded init, only B trained and sent)."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedpeft.experiment import build_experiment, run_experiment
from fedpeft.methods.base import get_state
from fedpeft.results import RunDir
from test_runs import csv_data, final_state, make_cfg  # noqa: F401 - csv_data is a fixture


def lora_cfg(csv_data, **method):
    return make_cfg(csv_data, method={"name": "lora", "r": 4, **method}, federation={"rounds": 2, "clients_per_round": 3})


def lora_a(model):
    names = [n for n, _ in model.named_parameters() if ".lora_A." in n]
    return get_state(model, names)


@pytest.mark.parametrize("family", ["tiny-bert", "tiny-gpt2"])
def test_ffa_lora_sends_no_a_and_every_client_holds_the_same_a(csv_data, family):
    cfg = lora_cfg(csv_data, freeze_a=True)
    cfg.model.name = family
    one, two = build_experiment(cfg), build_experiment(cfg)  # e.g. the server and a Flower node
    assert not any(".lora_A." in n for n in one.names) and any(".lora_B." in n for n in one.names)
    a1, a2 = lora_a(one.model), lora_a(two.model)
    assert a1 and all(np.array_equal(a1[k], a2[k]) for k in a1)
    assert not any(p.requires_grad for n, p in one.model.named_parameters() if ".lora_A." in n)
    plain = build_experiment(lora_cfg(csv_data)) if family == "tiny-bert" else None
    if plain is not None:  # the same A as plain LoRA draws: only whether it trains differs
        assert all(np.array_equal(a1[k], lora_a(plain.model)[k]) for k in a1)


def test_ffa_lora_run_keeps_a_and_halves_the_adapter_upload(csv_data, tmp_path):
    ffa = run_experiment(lora_cfg(csv_data, freeze_a=True), out=tmp_path / "ffa")
    plain = run_experiment(lora_cfg(csv_data), out=tmp_path / "plain")
    initial = lora_a(build_experiment(lora_cfg(csv_data, freeze_a=True)).model)
    exported = load_file(str(tmp_path / "ffa" / "model" / "adapter_model.safetensors"))
    saved_a = {k: v for k, v in exported.items() if ".lora_A." in k}
    assert len(saved_a) == len(initial)
    for name, value in initial.items():  # peft names the saved tensors without the adapter name
        key = name.replace(".default.", ".")
        np.testing.assert_array_equal(saved_a[key], value)
    state = final_state(tmp_path / "ffa")
    assert not any(".lora_A." in n for n in state)
    # bytes: plain LoRA sends A (r x in) and B (out x r) of square projections, FFA-LoRA B only
    a_bytes = sum(v.nbytes + len(k.encode()) for k, v in initial.items())
    assert ffa["bytes_per_client_update"] == plain["bytes_per_client_update"] - a_bytes
    assert ffa["total_bytes_up"] < plain["total_bytes_up"]


def test_with_a_shared_a_the_average_of_products_is_the_product_of_averages():
    """Why FFA-LoRA is exact: sum_i w_i B_i A = (sum_i w_i B_i) A, while averaging A and B
    separately is not the average of the products (the error FedAvg on plain LoRA makes)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 16))
    bs, a_s = [rng.normal(size=(8, 4)) for _ in range(3)], [rng.normal(size=(4, 16)) for _ in range(3)]
    w = np.array([5.0, 17.0, 40.0]) / 62.0
    exact_shared = sum(wi * b @ a for wi, b in zip(w, bs))
    np.testing.assert_allclose(sum(wi * b for wi, b in zip(w, bs)) @ a, exact_shared)
    exact = sum(wi * b @ ai for wi, b, ai in zip(w, bs, a_s))
    separate = sum(wi * b for wi, b in zip(w, bs)) @ sum(wi * ai for wi, ai in zip(w, a_s))
    assert np.abs(separate - exact).max() > 0.1


# --- FedEx-LoRA: average A and B, fold the residual into the frozen base weight -----------------

def fedex_cfg(csv_data, family="tiny-bert", **federation):
    cfg = make_cfg(csv_data, method={"name": "lora", "r": 4, "aggregation": "fedex"},
                   federation={"rounds": 3, "clients_per_round": 3, **federation})
    cfg.model.name = family
    return cfg


def effective_weights(model, state):
    """Every adapted layer's weight as the model computes with it: base + peft's own delta
    (``get_delta_weight``: scaling, and the transpose of GPT-2's Conv1D), float64."""
    from peft.tuners.lora import LoraLayer
    from fedpeft.methods.base import set_state

    set_state(model, state)
    return {name: (m.base_layer.weight.detach().double() + m.get_delta_weight("default").detach().double()).numpy()
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def random_clients(exp, global_state, n, seed=0):
    """``n`` client uploads: the global exchanged part moved by random noise (A, B and head)."""
    from fedpeft.federation.strategy import ClientResult

    rng = np.random.default_rng(seed)
    upload = exp.strategy.fedex.upload_view(global_state)
    return [ClientResult(i, {k: (v + rng.normal(scale=0.2, size=v.shape)).astype(v.dtype) for k, v in upload.items()},
                         int(rng.integers(5, 50))) for i in range(n)]


@pytest.mark.parametrize("family", ["tiny-bert", "tiny-gpt2"])
def test_fedex_aggregate_is_the_average_of_the_clients_adapted_weights(csv_data, family):
    """The exactness property: after aggregation, W0' + s B_avg A_avg == sum_i w_i (W0 + s B_i A_i)
    for every adapted layer, measured with peft's own delta weight (not fedex's formula); plain
    FedAvg of the factors misses it."""
    exp = build_experiment(fedex_cfg(csv_data, family))
    glob = exp.initial_state()
    base_names = exp.strategy.fedex.base_names
    assert base_names and all(n.endswith(".base_layer.weight") and n in glob and n not in exp.names for n in base_names)
    for rnd in (1, 2):  # twice: the second round starts from corrected base weights
        clients = random_clients(exp, glob, 3, seed=rnd)
        weights = np.array([c.num_samples for c in clients], float) / sum(c.num_samples for c in clients)
        per_client = [effective_weights(exp.model, {**glob, **c.state}) for c in clients]
        expected = {k: sum(w * pc[k] for w, pc in zip(weights, per_client)) for k in per_client[0]}
        outcome = exp.strategy.aggregate_round(rnd, glob, clients)
        assert outcome.aggregated and outcome.state.keys() == glob.keys()
        got = effective_weights(exp.model, outcome.state)
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=2e-5)
        plain = {**glob, **{k: v for k, v in outcome.state.items() if k not in base_names}}
        off = effective_weights(exp.model, plain)
        assert max(np.abs(off[k] - expected[k]).max() for k in expected) > 1e-3  # separate averaging is not exact
        for name in exp.names:  # A, B and the head: plain FedAvg
            np.testing.assert_allclose(outcome.state[name], sum(w * c.state[name] for w, c in zip(weights, clients)),
                                       rtol=1e-6, atol=1e-6)
        glob = outcome.state
    assert exp.strategy.fedex_accepted == [3, 3]


def test_fedex_rejects_a_client_that_sends_base_weights(csv_data):
    exp = build_experiment(fedex_cfg(csv_data))
    glob = exp.initial_state()
    bad = random_clients(exp, glob, 2)
    bad[1].state.update({n: glob[n] for n in exp.strategy.fedex.base_names[:1]})
    outcome = exp.strategy.aggregate_round(1, glob, bad)
    assert outcome.accepted == [0] and "unexpected" in outcome.rejected[1] and "base_layer" in outcome.rejected[1]


def test_fedex_download_bytes_count_the_residual_factors_each_client_missed(csv_data):
    """Round t: a client receives the factors of every round since it was last selected
    (rank (k + 1) r each, k clients aggregated), or the dense weight when that is smaller."""
    from fedpeft.federation.costs import message_bytes
    from fedpeft.federation.strategy import RoundPlan

    exp = build_experiment(fedex_cfg(csv_data, rounds=4))
    strategy, glob = exp.strategy, exp.initial_state()
    fedex, r = strategy.fedex, 4
    strategy.fedex_accepted = [3, 0, 2]  # round 2 aggregated nothing
    plans = {rnd: strategy.plan_round(rnd).selected for rnd in (1, 2, 3)}
    shared = message_bytes(fedex.upload_view(glob))

    def factor_bytes(ranks):
        total = 0
        for layer in fedex.layers:
            shape = glob[layer.base].shape
            out, inp = shape[::-1] if layer.transpose else shape
            names = len(f"{layer.base}/U".encode()) + len(f"{layer.base}/V".encode())
            sent = sum(k * (out + inp) * 4 + names for k in ranks)
            total += min(sent, glob[layer.base].nbytes + len(layer.base.encode()))
        return total

    down = strategy.download_bytes(RoundPlan(4, [0, 1, 2, 3], []), glob, None)
    for cid in range(4):
        last = max((rnd for rnd, sel in plans.items() if cid in sel), default=None)
        missed = [3, 0, 2] if last is None else [3, 0, 2][last - 1:]
        assert down[cid] == shared + factor_bytes([(k + 1) * r for k in missed if k]), (cid, last)
    assert strategy.download_bytes(RoundPlan(1, [0, 1], []), glob, None) == {0: shared, 1: shared}


def test_fedex_run_resumes_exactly_and_exports_a_merged_model_with_its_logits(csv_data, tmp_path):
    import json
    import torch
    from transformers import AutoModelForSequenceClassification

    from fedpeft.experiment import Experiment  # noqa: F401
    from fedpeft.results import RunDir

    cfg = fedex_cfg(csv_data)
    full = run_experiment(cfg, out=tmp_path / "full")
    short = fedex_cfg(csv_data, rounds=2)
    run_experiment(short, out=tmp_path / "part")
    resumed = run_experiment(cfg, out=tmp_path / "part", resume=True)
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "part")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    rows = [RunDir(tmp_path / p).read_metrics() for p in ("full", "part")]
    assert [r["cum_bytes_down"] for r in rows[0]] == [r["cum_bytes_down"] for r in rows[1]]
    assert full["final_accuracy"] == resumed["final_accuracy"]
    # the base weights moved, and the download grew beyond the upload by the residuals
    exp = build_experiment(cfg)
    initial = exp.initial_state()
    assert any(not np.array_equal(a[n], initial[n]) for n in exp.strategy.fedex.base_names)
    per_client = [c for r in rows[0][1:] for c in r["clients"]]
    assert all(full["bytes_per_client_update"] < c["bytes_down"] <= full["bytes_per_client_download"] for c in per_client)
    assert full["bytes_per_client_download"] == sum(v.nbytes + len(k.encode()) for k, v in initial.items())
    # export: a plain transformers model (merged), no peft needed, with fedpeft's logits
    folder = tmp_path / "full" / "model"
    assert not (folder / "adapter_config.json").exists() and (folder / "model.safetensors").is_file()
    card = (folder / "README.md").read_text()
    assert "ForSequenceClassification.from_pretrained(model_dir)" in card and "PeftModel" not in card
    assert not (folder / "base").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    from fedpeft.methods.base import set_state
    set_state(exp.model, a)
    batch = exp.test.batch(torch.arange(8))
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, exp.model(**batch).logits, rtol=1e-5, atol=1e-5)
    assert json.loads((folder / "fedpeft.json").read_text())["method_options"]["aggregation"] == "fedex"


def test_fedex_config_errors_name_the_keys(csv_data):
    from fedpeft.errors import ConfigError

    with pytest.raises(ConfigError, match="server_optimizer"):
        make_cfg(csv_data, method={"name": "lora", "aggregation": "fedex"}, federation={"server_optimizer": "fedadam"})
    with pytest.raises(ConfigError, match="freeze_a"):
        make_cfg(csv_data, method={"name": "lora", "aggregation": "fedex", "freeze_a": True})
    with pytest.raises(ConfigError, match="valid: fedavg, fedex"):
        make_cfg(csv_data, method={"name": "lora", "aggregation": "mean"})


def test_fedex_with_scaffold_runs_the_same_in_flower_simulation(csv_data, tmp_path):
    """The corrected base weights travel in the TRAIN message's arrays (dense on the wire:
    ``wire_bytes_down`` holds them, the payload counts the low-rank residuals); SCAFFOLD's c and
    c_i cover the exchanged part only."""
    import json

    from test_flower import assert_same_run

    def cfg(**runtime):
        return make_cfg(csv_data, partition={"num_clients": 2}, runtime={"threads": 1, **runtime},
                        method={"name": "lora", "r": 4, "aggregation": "fedex"},
                        federation={"rounds": 2, "clients_per_round": 2, "optimizer": "sgd", "momentum": 0.0,
                                    "lr": 0.05, "scaffold": True})

    run_experiment(cfg(), out=tmp_path / "local")
    run_experiment(cfg(kind="flower-sim"), out=tmp_path / "sim")
    assert_same_run(tmp_path / "local", tmp_path / "sim")  # round 2 uses each node's c_i of round 1
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary["total_wire_bytes_down"] > summary["total_bytes_down"]
    local, sim = (RunDir(tmp_path / d).latest_checkpoint() for d in ("local", "sim"))
    c_local = {k: v for k, v in local.server_state.items() if k.startswith("scaffold_c/")}
    assert c_local and not any("base_layer" in k for k in c_local)
    assert c_local.keys() == {k for k in sim.server_state if k.startswith("scaffold_c/")}
    for k, v in c_local.items():
        np.testing.assert_allclose(sim.server_state[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert local.client_state and sim.client_state is None  # on the nodes, not in the server's checkpoint
