"""The frozen-prefix cache (``runtime.frozen_cache_mb``): running a model from block ``j`` on cached
hidden states, rows of one length batched together = each row alone bit for bit, bit-identical runs
with and without the cache, the memory bound, FLOPs, no cache for methods that train every block,
config checks."""

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
from fedpeft.data import EncodedSplit
from fedpeft.federation.frozen_cache import FrozenCache, _assemble, compute_rows, row_lengths
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


def prepared_prefix(loaded, method):
    name, options = METHODS[method]
    model = build_method(name, options).prepare(loaded.model, loaded.info).eval()
    blocks = transformer_blocks(model, loaded.info.num_layers)
    return FrozenPrefix(model, blocks, cut_index(model, blocks))


def synthetic_split(loaded, lengths, seed=0):
    """An EncodedSplit of random rows with ``lengths`` tokens, padded as fedpeft pads them (images:
    random pixels, one row per entry of ``lengths``)."""
    gen = torch.Generator().manual_seed(seed)
    config = loaded.model.config
    labels = torch.randint(0, config.num_labels, (len(lengths),), generator=gen)
    if loaded.info.modality == "image":
        size = config.image_size
        return EncodedSplit({"pixel_values": torch.randn(len(lengths), config.num_channels, size, size, generator=gen)},
                            labels)
    side = getattr(loaded.processor, "padding_side", "right")
    width = max(lengths) + 2  # every row padded (as to max_length)
    ids = torch.randint(3, config.vocab_size, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, width - n :] = 1
        else:
            mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, int(getattr(config, "pad_token_id", None) or 0))
    return EncodedSplit({"input_ids": ids, "attention_mask": mask}, labels, side)


def alone(prefix, split, row):
    """A row's prefix computed alone: a batch of that row, trimmed to its own tokens."""
    one = split.batch([row])
    return prefix.compute({k: v for k, v in one.items() if k != "labels"})[0]


@pytest.mark.parametrize("family", ["tiny-bert", "tiny-vit", "tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("method", list(METHODS))
def test_rows_of_one_length_computed_together_get_the_bits_they_have_alone(tiny, family, method):
    # the batched prefix rests on this: at a fixed sequence length (>= 4 tokens) the CPU kernels
    # give a row the same bits whatever the batch size (a group of 1 vs groups of 3 and 16); rows
    # of 1-3 tokens (a single row's matmuls then have < 4 rows: another kernel) are run alone
    loaded = tiny(family)
    prefix = prepared_prefix(loaded, method)
    text = loaded.info.modality == "text"
    lengths = [1] * 3 + [2] * 3 + [3] * 3 + [4] * 16 + [5] * 16 + [13] * 16 if text else [1] * 16
    split = synthetic_split(loaded, lengths)
    rows = list(range(len(lengths)))
    for chunk in (3, 16):
        outs, computed = compute_rows(prefix, split, rows, row_lengths(split, rows), chunk)
        sizes = {}
        for b in computed:
            n = b["input_ids"].shape[1] if text else 99
            sizes.setdefault(n, []).append(len(b["labels"]))
        for n, got in sizes.items():
            count = lengths.count(n) if text else 16
            assert got == ([1] * count if n < 4 else [min(chunk, count - s) for s in range(0, count, chunk)])
        for row in rows:
            expected = alone(prefix, split, row)
            assert outs[row].shape == expected.shape
            assert torch.equal(outs[row], expected), (chunk, row, lengths[row])
        if loaded.info.modality == "text":  # equal-length rows: no padding, positions 0..n-1
            for batch in computed:
                assert bool(batch["attention_mask"].all())
                if "position_ids" in batch:
                    n = batch["input_ids"].shape[1]
                    assert torch.equal(batch["position_ids"], torch.arange(n).expand_as(batch["position_ids"]))


@pytest.mark.parametrize("family", ["tiny-bert", "tiny-vit", "tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("budget_mb", [0, 0.002, 64])
def test_the_cache_batched_by_length_gives_each_batch_the_row_alone_outputs(tiny, family, budget_mb):
    loaded = tiny(family)
    prefix = prepared_prefix(loaded, "head")
    text = loaded.info.modality == "text"
    lengths = [3, 7, 3, 5, 7, 7, 2, 5, 3, 9, 7, 3] if text else [1] * 12
    split = synthetic_split(loaded, lengths, seed=1)
    cache = FrozenCache(budget_mb)
    order = torch.tensor([4, 0, 7, 1, 9, 2, 11, 5, 3, 10, 8, 6, 0, 5, 3, 8])  # two batches' worth and a repeat
    filled = cache.fill((0, prefix.cut), "", prefix, split, order, chunk=4)
    entry = cache.entries[(0, prefix.cut)]
    # the rows that fit, plus at most the first one when it told the bytes per token and did not fit
    probe_lost = sum(len(b["labels"]) for b in filled) - len(entry.rows)
    assert probe_lost in (0, 1) and (probe_lost == 0 or int(order[0]) not in entry.rows)
    assert max((len(b["labels"]) for b in filled), default=0) <= 4
    if budget_mb == 64:
        assert len(cache.entries[(0, prefix.cut)].rows) == 12
    elif budget_mb == 0.002:  # text: some rows fit (an image row does not)
        assert 0 < len(entry.rows) < 12 if text else not entry.rows
        fit, used = [], 0  # as a lazy fill stores them: each row that fits, in first-use order
        for r in dict.fromkeys(int(r) for r in order):
            nbytes = alone(prefix, split, r).numel() * 4
            if used + nbytes <= cache.budget:
                fit, used = fit + [r], used + nbytes
        assert sorted(entry.rows) == sorted(fit)
        assert cache.used <= cache.budget
    flops = sum(prefix.flops(b) for b in filled)
    for rows in (order[:6], order[6:12], order[12:]):
        batch = split.batch(rows)
        hidden, computed = cache.hidden((0, prefix.cut), "", prefix, split, rows, batch)
        expected = _assemble([alone(prefix, split, int(r)) for r in rows], batch, split.padding_side)
        assert torch.equal(hidden, expected)
        flops += sum(prefix.flops(b) for b in computed)
        for b in computed:  # the batch's missing rows of one length run together
            assert len({int(n) for n in b["attention_mask"].sum(-1)} if text else {0}) == 1
    # FLOPs: the sum of each computed row's prefix forward at its own length
    recomputed = [int(r) for rows in (order[:6], order[6:12], order[12:]) for r in rows if int(r) not in entry.rows]
    ran = list(entry.rows) + recomputed + [int(order[0])] * probe_lost
    assert flops == sum(prefix.flops(split.batch([r])) for r in ran)


@pytest.mark.integration
def test_minilm_rows_of_one_length_computed_together_get_the_bits_they_have_alone(shared_data_dir):
    import pandas as pd

    from fedpeft.config import ModelConfig
    from fedpeft.models import load_model

    loaded = load_model(ModelConfig(name="minilm", max_length=64), label_names=[f"l{i}" for i in range(77)], seed=0)
    texts = pd.read_csv(shared_data_dir / "banking77" / "train.csv")["text"].tolist()[:96]
    enc = loaded.processor(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    split = EncodedSplit({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                         torch.zeros(len(texts), dtype=torch.long))
    for method in METHODS:
        prefix = prepared_prefix(loaded, method)
        rows = list(range(len(texts)))
        lengths = row_lengths(split, rows)
        outs, computed = compute_rows(prefix, split, rows, lengths, 32)
        assert max(len(b["labels"]) for b in computed) > 4  # real groups, not single rows
        assert len(set(lengths.values())) > 10
        for row in rows:
            assert torch.equal(outs[row], alone(prefix, split, row)), (method, row, lengths[row])


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


@pytest.mark.parametrize("family", ["tiny-bert", "tiny-gpt2"])
def test_step_and_prefix_flops_are_memoised_apart(csv_data, family):  # noqa: F811
    """A training step's FLOPs and its frozen prefix's forward FLOPs are fitted on the same model
    structure but are different counts: the memo must keep them apart (it once handed the first
    one fitted, the prefix's in a client round, to both, so a cached round counted 0 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    exp = build_experiment(cache_cfg(csv_data, family, "layers-1", 64))
    prefix = exp.trainer.prefix(None, exp.parts[0])
    batch = exp.train.batch(exp.parts[0][:4])
    forward = prefix.flops(batch)  # fitted first, as in a client's round (the cache is filled before the steps)
    step = exp.trainer.flops(batch)
    exp.model.train()
    with FlopCounterMode(display=False) as counter:
        exp.model(**batch).loss.backward()
    exp.model.zero_grad(set_to_none=True)
    assert step == counter.get_total_flops() > forward > 0
