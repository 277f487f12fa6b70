"""Exact LoRA aggregation: FFA-LoRA (A frozen at a shared seeded init, only B trained and sent)."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedpeft.experiment import build_experiment, run_experiment
from fedpeft.methods.base import get_state
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
