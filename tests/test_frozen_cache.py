"""The frozen-prefix cache (``runtime.frozen_cache_mb``): running a model from block ``j`` on cached
hidden states, bit-identical runs with and without the cache, the memory bound, FLOPs, no cache for
methods that train every block, config checks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from test_runs import csv_data, final_state, make_cfg  # noqa: F401 - fixture reused

from fedpeft.config import Config
from fedpeft.errors import ConfigError
from fedpeft.experiment import build_experiment, run_experiment
from fedpeft.federation.frozen import FrozenPrefix, cut_index
from fedpeft.federation.frozen_cache import _assemble
from fedpeft.methods import build_method
from fedpeft.methods.layers import LayersOptions
from fedpeft.models import transformer_blocks
from fedpeft.results import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (conftest)

METHODS = {"head": ("head", None), "layers-1": ("layers", LayersOptions(k=1))}


@pytest.mark.parametrize("family", ["tiny-bert", "tiny-vit", "tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("method", list(METHODS))
def test_the_upper_part_run_on_per_row_prefix_outputs_gives_the_models_logits(tiny, batch_for, family, method):
    loaded = tiny(family)
    name, options = METHODS[method]
    model = build_method(name, options).prepare(loaded.model, loaded.info).eval()
    blocks = transformer_blocks(model, loaded.info.num_layers)
    prefix = FrozenPrefix(model, blocks, cut_index(model, blocks))
    assert prefix.cut == (2 if name == "head" else 1)
    batch = batch_for(loaded, n=4)
    batch.pop("labels")
    side = getattr(loaded.processor, "padding_side", "right")
    if side == "left":  # as EncodedSplit.batch: positions skip the left padding
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    rows = []
    with torch.no_grad():
        expected = model(**batch).logits
        for b in range(4):  # each row alone, trimmed to its own tokens
            one = {k: v[b : b + 1] for k, v in batch.items()}
            if "attention_mask" in one:
                used = one["attention_mask"][0].nonzero().flatten()
                one = {k: v[:, int(used[0]) : int(used[-1]) + 1] for k, v in one.items()}
            rows.append(prefix.compute(one)[0])
        if "attention_mask" in batch:
            assert len({r.shape[0] for r in rows}) > 1  # rows of different lengths, padded on `side`
        with prefix.feeding(_assemble(rows, batch, side)):
            got = model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not prefix.depends_on_training({k: v[:1] for k, v in batch.items()})


def cache_cfg(csv_data, family, method, cache_mb, **fed):  # noqa: F811
    name, options = METHODS[method]
    raw = make_cfg(csv_data, model={"name": family}).to_dict()
    raw["method"] = {"name": name, **({} if options is None else {"k": options.k})}
    raw["federation"] = {**{k: v for k, v in raw["federation"].items() if k != "local_steps"},
                         "rounds": 2, "local_epochs": 2, "clients_per_round": 4, **fed}
    raw["runtime"]["frozen_cache_mb"] = cache_mb
    raw["output"] = {"save_model": False}
    return Config.from_dict(raw)


def client_entries(run):
    return [c for r in RunDir(run).read_metrics() for c in r["clients"]]


@pytest.mark.parametrize("family, method", [("tiny-bert", "head"), ("tiny-bert", "layers-1"),
                                            ("tiny-gpt2", "head"), ("tiny-gpt2", "layers-1")])
def test_runs_with_and_without_the_cache_end_bit_identical(csv_data, tmp_path, family, method):  # noqa: F811
    # dropout is on above the cut (the config's default 0.1): same masks with and without the cache
    run_experiment(cache_cfg(csv_data, family, method, 64), out=tmp_path / "cached")
    run_experiment(cache_cfg(csv_data, family, method, 0), out=tmp_path / "plain")
    cached, plain = final_state(tmp_path / "cached"), final_state(tmp_path / "plain")
    assert sorted(cached) == sorted(plain)
    for name in cached:
        assert np.array_equal(cached[name], plain[name]), name
    with_cache, without = client_entries(tmp_path / "cached"), client_entries(tmp_path / "plain")
    # 4 clients x 30 rows, 2 epochs x 2 rounds: each row's prefix runs once with the cache, 4 times without
    assert [c["frozen_rows_computed"] for c in with_cache] == [30] * 4 + [0] * 4
    assert [c["frozen_rows_computed"] for c in without] == [60] * 8
    assert all(c["frozen_cache_bytes"] > 0 for c in with_cache) and all(c["frozen_cache_bytes"] == 0 for c in without)
    # the FLOPs spent: fewer with the cache, the most saved in round 2 (no prefix forward at all)
    assert [c["train_loss"] for c in with_cache] == [c["train_loss"] for c in without]
    for cached_c, plain_c in zip(with_cache, without):
        assert cached_c["flops"] < plain_c["flops"]
    assert sum(c["flops"] for c in with_cache[4:]) < sum(c["flops"] for c in with_cache[:4])


def test_a_cache_too_small_recomputes_the_rows_beyond_it_same_result_and_says_so_once(csv_data, tmp_path, caplog):  # noqa: F811
    run_experiment(cache_cfg(csv_data, "tiny-bert", "layers-1", 0), out=tmp_path / "plain")
    with caplog.at_level(logging.WARNING, logger="fedpeft.federation.frozen_cache"):
        summary = run_experiment(cache_cfg(csv_data, "tiny-bert", "layers-1", 0.01), out=tmp_path / "tiny")
    warnings = [r for r in caplog.records if "frozen-prefix cache full" in r.getMessage()]
    assert len(warnings) == 1 and "runtime.frozen_cache_mb = 0.01" in warnings[0].getMessage()
    plain, tiny = final_state(tmp_path / "plain"), final_state(tmp_path / "tiny")
    assert all(np.array_equal(plain[n], tiny[n]) for n in plain)
    entries = client_entries(tmp_path / "tiny")
    assert 0 < summary["frozen_cache_bytes_max"] <= 0.01 * 2**20
    computed = sum(c["frozen_rows_computed"] for c in entries)
    assert 120 < computed < 480  # some rows cached (computed once), the rest every time


@pytest.mark.parametrize("method", [{"name": "bias"}, {"name": "lora", "r": 2}, {"name": "full"},
                                    {"name": "prompt", "num_virtual_tokens": 2}, {"name": "layers"}])
def test_methods_that_train_below_every_frozen_block_get_no_prefix(csv_data, method):  # noqa: F811
    exp = build_experiment(make_cfg(csv_data, method=method))
    assert exp.trainer.prefix(None, exp.parts[0]) is None  # prompt: the probe sees the trainable prompt
    res = exp.trainer.fit(0, exp.parts[0], exp.initial_state(), 1)
    assert res.metrics["frozen_cache_bytes"] == 0 and res.metrics["frozen_rows_computed"] == 0


def test_a_layers_client_below_blocks_others_train_recomputes_when_they_change(csv_data, monkeypatch, tmp_path):  # noqa: F811
    from test_layers import force_depths

    # k = 2 prepared, client depths 1: block 0 (exchanged, frozen for them) changes each round
    force_depths(monkeypatch, [2, 1, 1, 1])
    cfg = cache_cfg(csv_data, "tiny-bert", "layers-1", 64)
    raw = cfg.to_dict()
    raw["method"]["k"] = 2
    run_experiment(Config.from_dict(raw), out=tmp_path / "run")
    computed = [c["frozen_rows_computed"] for c in client_entries(tmp_path / "run")]
    assert computed == [0, 30, 30, 30] * 2  # client 0 cuts at 0 (no prefix); the others recompute in round 2


def test_frozen_cache_mb_must_be_non_negative(csv_data):  # noqa: F811
    with pytest.raises(ConfigError, match="runtime.frozen_cache_mb: must be >= 0"):
        make_cfg(csv_data, runtime={"frozen_cache_mb": -1})
