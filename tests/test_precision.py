"""bfloat16 weights (``model.dtype``), a bfloat16 exchange (``federation.exchange_dtype``) and
gradient checkpointing (``model.gradient_checkpointing``): rounding as torch rounds, Flower's
records carry bfloat16 bit for bit, bytes counted at 2 per value, runs train and resume
bit-identically, checkpointed gradients equal plain ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import interrupt_and_resume

from fedpeft.config import Config, ModelConfig
from fedpeft.errors import ConfigError
from fedpeft.federation.costs import message_bytes
from fedpeft.federation.precision import bf16_bits, from_bf16_bits, round_bf16, to_exchange

pytestmark = pytest.mark.usefixtures("one_thread")


def torch_bf16_bits(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def edge_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    f32 = np.finfo(np.float32)
    ties = from_bf16_bits(np.arange(0, 2000, 7, dtype=np.uint16) + 0x3F80).view(np.uint32) + np.uint32(0x8000)  # x.5 ulp
    return np.concatenate([
        rng.normal(size=5000).astype(np.float32) * np.float32(10.0) ** rng.integers(-40, 38, 5000).astype(np.float32),
        ties.view(np.float32), -ties.view(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, f32.max, -f32.max, f32.tiny, f32.smallest_subnormal, 3.3895e38,
                  1.00390625, 1.01171875], np.float32),
    ]).astype(np.float32)


def test_rounding_to_bfloat16_is_torchs_bit_for_bit():
    values = edge_values()
    assert np.array_equal(bf16_bits(values), torch_bf16_bits(values))
    nan = np.array([np.nan, -np.nan], np.float32)
    assert np.isnan(from_bf16_bits(bf16_bits(nan))).all() and np.isnan(from_bf16_bits(torch_bf16_bits(nan))).all()
    rounded = round_bf16(values)
    assert rounded.dtype == np.float32 and np.array_equal(bf16_bits(rounded), bf16_bits(values))  # idempotent
    assert np.array_equal(rounded.view(np.uint32) & 0xFFFF, np.zeros(values.size, np.uint32))  # 8 mantissa bits


def test_a_bfloat16_state_crosses_flower_records_bit_exactly():
    from flwr.app import RecordDict

    from fedpeft.runtime.flower.wire import record_to_state, state_to_record, wire_bytes

    rng = np.random.default_rng(1)
    raw = {f"layer{i}.w": rng.normal(size=(64, 32)).astype(np.float32) for i in range(3)}
    raw |= {"edges": edge_values(), "steps": np.arange(4, dtype=np.int64)}
    state = to_exchange(raw, "bfloat16")
    record = state_to_record(state, "bfloat16")
    layout = json.loads(record["layout"].numpy().tobytes())
    assert {d for _, d, _ in layout} == {"bfloat16", np.dtype(np.int64).str}
    assert record["buffer.bfloat16"].numpy().dtype == np.uint16
    back = record_to_state(record, "bfloat16")
    assert list(back) == list(state)
    for name in state:  # bit for bit, the integers untouched
        assert back[name].dtype == state[name].dtype and back[name].shape == state[name].shape
        assert np.array_equal(back[name].view(np.uint8), state[name].view(np.uint8)), name
    # unrounded float32 is rounded as torch rounds it
    direct = record_to_state(state_to_record(raw, "bfloat16"))
    assert np.array_equal(direct["edges"].view(np.uint32), torch.from_numpy(raw["edges"]).bfloat16().float().numpy().view(np.uint32))
    # half the bytes on the wire; a reply in the other dtype than the run's does not decode
    plain = state_to_record(raw)
    assert wire_bytes(RecordDict({"a": record})) < 0.55 * wire_bytes(RecordDict({"a": plain}))
    with pytest.raises(ValueError, match="arrived as bfloat16, but federation.exchange_dtype = 'float32'"):
        record_to_state(record, "float32")
    with pytest.raises(ValueError, match="arrived as <f4, but federation.exchange_dtype = 'bfloat16'"):
        record_to_state(plain, "bfloat16")
    assert message_bytes(state, "bfloat16") == sum(a.size * (2 if a.dtype == np.float32 else 8) + len(n) for n, a in state.items())


def cfg_dict(**sections) -> dict:
    raw = {"model": {"name": "tiny-bert", "max_length": 16}, "data": {"train": "a.csv", "test": "b.csv"}}
    for name, table in sections.items():
        raw[name] = {**raw.get(name, {}), **table}
    return raw


@pytest.mark.parametrize("sections,key,message", [
    ({"model": {"dtype": "float16"}}, "model.dtype", "expected one of 'float32', 'bfloat16'"),
    ({"federation": {"exchange_dtype": "int8"}}, "federation.exchange_dtype", "expected one of"),
    ({"model": {"gradient_checkpointing": 1}}, "model.gradient_checkpointing", "expected bool"),
    ({"method": {"name": "sfprompt"}, "model": {"dtype": "bfloat16"}}, "model.dtype", "sfprompt"),
    ({"method": {"name": "sfprompt"}, "federation": {"exchange_dtype": "bfloat16"}}, "federation.exchange_dtype", "sfprompt"),
    ({"method": {"name": "sfprompt"}, "model": {"gradient_checkpointing": True}}, "model.gradient_checkpointing", "sfprompt"),
    ({"model": {"gradient_checkpointing": True}, "privacy": {"mode": "sample", "max_grad_norm": 1.0,
                                                             "noise_multiplier": 1.0}}, "model.gradient_checkpointing", "Opacus"),
    ({"federation": {"exchange_dtype": "bfloat16"}, "method": {"name": "lora", "aggregation": "fedex"}},
     "federation.exchange_dtype", "fedex"),
    ({"federation": {"exchange_dtype": "bfloat16", "clients_per_round": 2}, "partition": {"num_clients": 2},
      "runtime": {"kind": "flower-sim"}, "privacy": {"secure_aggregation": True}}, "federation.exchange_dtype", "SecAgg"),
])
def test_precision_keys_are_validated_naming_the_key(sections, key, message):
    with pytest.raises(ConfigError, match=rf"^{key}: .*{message}"):
        Config.from_dict(cfg_dict(**sections))


def test_precision_keys_are_saved_with_the_config():
    cfg = Config.from_dict(cfg_dict(model={"dtype": "bfloat16", "gradient_checkpointing": True},
                                    federation={"exchange_dtype": "bfloat16"}))
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg and 'dtype = "bfloat16"' in cfg.to_toml() and 'exchange_dtype = "bfloat16"' in cfg.to_toml()
    assert Config.from_dict(cfg_dict()).model.dtype == "float32"  # the default: runs as before


# ------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def lm_rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    things, colours = ["snow", "grass", "sky", "coal"], ["white", "green", "blue", "black"]
    for split, n in (("train", 32), ("test", 8)):
        rows = [{"prompt": f"the colour of {things[i % 4]}", "response": f"it is {colours[i % 4]}"} for i in range(n)]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def lm_config(root, dtype="float32", exchange="float32", **federation):
    return Config.from_dict({
        "model": {"name": "tiny-llama", "max_length": 16, "dtype": dtype},
        "task": {"kind": "causal-lm", "max_new_tokens": 3, "generation_samples": 4, "saved_generations": 2},
        "data": {"train": str(root / "train.jsonl"), "test": str(root / "test.jsonl")},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj", "lm_head"]},
        "partition": {"num_clients": 2},
        "federation": {"rounds": 2, "clients_per_round": 2, "local_steps": 4, "batch_size": 4, "lr": 3e-2,
                       "exchange_dtype": exchange, "server_optimizer": "fedadam", "server_lr": 0.05, **federation},
        "runtime": {"threads": 1, "progress": False}, "output": {"save_model": False}})


def rows_of(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_bfloat16_run_trains_sends_half_the_bytes_and_resumes_bit_identically(lm_rows, tmp_path, monkeypatch):
    from fedpeft.experiment import build_experiment, run_experiment
    from fedpeft.results import RunDir

    cfg = lm_config(lm_rows, "bfloat16", "bfloat16")
    exp = build_experiment(cfg)
    assert {p.dtype for p in exp.model.parameters()} == {torch.bfloat16}  # LoRA's own weights too
    initial = exp.evaluate(exp.initial_state())
    names = exp.names
    bf16 = run_experiment(cfg, out=tmp_path / "bf16")
    # bytes: every exchanged value at 2 bytes (float32: 4) + its UTF-8 name, per client and direction
    values, name_bytes = sum(p.numel() for n, p in exp.model.named_parameters() if n in names), sum(len(n.encode()) for n in names)
    assert values == bf16["exchanged_params"] > 0
    for r in rows_of(tmp_path / "bf16"):
        assert {c["bytes_up"] for c in r["clients"]} == {c["bytes_down"] for c in r["clients"]} == {2 * values + name_bytes}
    assert bf16["total_bytes_up"] == 2 * 2 * (2 * values + name_bytes)  # 2 rounds x 2 clients
    assert bf16["bytes_per_client_update"] == 2 * values + name_bytes and bf16["exchange_dtype"] == "bfloat16"
    f32 = build_experiment(lm_config(lm_rows)).static_summary()  # float32 weights and exchange: 4 bytes a value
    assert f32["bytes_per_client_update"] == 4 * values + name_bytes
    assert 2 * bf16["full_model_bytes_per_message"] - f32["full_model_bytes_per_message"] == sum(
        len(n.encode()) for n, _ in exp.model.named_parameters())
    # it trains: held-out loss well below the untrained model's
    assert bf16["final_eval_loss"] < initial["eval_loss"] - 1.0, (bf16["final_eval_loss"], initial["eval_loss"])
    # the server aggregates and keeps float32 master weights: the mean of bfloat16 values is not one
    final = RunDir(tmp_path / "bf16").latest_checkpoint().state
    assert all(a.dtype == np.float32 for a in final.values())
    assert any(not np.array_equal(round_bf16(a), a) for a in final.values())
    # an interrupted run resumes to the same bits
    resumed = interrupt_and_resume(monkeypatch, cfg, tmp_path / "cut", 2)
    again = RunDir(tmp_path / "cut").latest_checkpoint().state
    assert all(np.array_equal(final[k], again[k]) for k in final)
    assert resumed["final_eval_loss"] == bf16["final_eval_loss"] and resumed["total_bytes_up"] == bf16["total_bytes_up"]


# ------------------------------------------------------------------ gradient checkpointing and the cost model


def prepared(family, task, method, **model):
    from fedpeft.methods import build_method
    from fedpeft.models import apply_model_options, load_model

    mc = ModelConfig(name=family, max_length=24, **model)
    loaded = load_model(mc, ["a", "b", "c"], 0, task=task)
    torch.manual_seed(0)
    return loaded, apply_model_options(build_method(method).prepare(loaded.model, loaded.info), mc)


def batch_for(loaded, task):
    from test_costmodel import real_batch

    batch = real_batch(loaded, 8, 24)
    if task == "causal-lm":  # per-token labels, the padding masked
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


CHECKPOINTED = [("tiny-bert", "classification", "lora"), ("tiny-vit", "classification", "bias"),
                ("tiny-gpt2", "causal-lm", "full"), ("tiny-llama", "causal-lm", "adapter")]


@pytest.mark.parametrize("family,task,method", CHECKPOINTED)
def test_checkpointed_gradients_equal_the_plain_ones(family, task, method):
    from torch.utils.flop_counter import FlopCounterMode

    grads, flops = {}, {}
    for on in (False, True):
        loaded, model = prepared(family, task, method, gradient_checkpointing=on)
        batch = batch_for(loaded, task) if loaded.info.modality == "text" else {
            "pixel_values": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
            "labels": torch.tensor([0, 1, 2, 0])}
        model.train()  # dropout on: the recomputed forward must replay the same masks
        torch.manual_seed(1)
        with FlopCounterMode(display=False) as counter:
            model(**batch).loss.backward()
        flops[on] = counter.get_total_flops()
        grads[on] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and grads[False]
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert flops[True] > flops[False]  # the blocks' forward ran again in backward


def test_the_cost_model_prices_checkpointing_and_bfloat16_as_measured():
    from fedpeft.budgets import measure_step, predict, top_blocks_memory
    from test_costmodel import config

    cfg = config()
    peaks = {}
    for options in ({}, {"gradient_checkpointing": True}, {"dtype": "bfloat16"}):
        loaded, model = prepared("tiny-llama", "causal-lm", "full", **options)
        predicted = predict(model, loaded.info, cfg).memory.peak
        measured = measure_step(model, batch_for(loaded, "causal-lm"), cfg.federation).peak
        assert abs(predicted / measured - 1) < 0.01, (options, predicted, measured)
        peaks[tuple(options)] = measured
    assert peaks[("gradient_checkpointing",)] < peaks[()] and peaks[("dtype",)] < 0.9 * peaks[()]
    loaded, model = prepared("tiny-bert", "classification", "layers", gradient_checkpointing=True)
    with pytest.raises(ConfigError, match="^model.gradient_checkpointing: top_blocks_memory"):
        top_blocks_memory(model, loaded.info, cfg)


def test_a_checkpointed_run_ends_as_the_plain_one(tmp_path):
    """``layers`` with its frozen-prefix cache below the trained block: the same state and rows."""
    from fedpeft.experiment import run_experiment
    from fedpeft.results import RunDir
    from test_runs import WORDS, make_cfg

    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("test", 12)):
        lines = ["text,label"] + [f"{' '.join(rng.choice(WORDS[w].split(), size=5))},{w}"
                                  for w in (list(WORDS)[i % 3] for i in range(n))]
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    runs = {}
    for on in (False, True):
        cfg = make_cfg(tmp_path, model={"gradient_checkpointing": on}, method={"name": "layers", "k": 1},
                       federation={"rounds": 1}, output={"save_model": False})
        runs[on] = run_experiment(cfg, out=tmp_path / str(on)), RunDir(tmp_path / str(on)).latest_checkpoint().state
    assert all(np.array_equal(runs[True][1][k], runs[False][1][k]) for k in runs[False][1])
    assert runs[True][0]["final_accuracy"] == runs[False][0]["final_accuracy"]
    assert runs[True][0]["client_flops_total"] > runs[False][0]["client_flops_total"]  # the trained block ran twice
