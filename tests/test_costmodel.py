"""The cost model (fedpeft.budgets.predict) against measurement on real training steps.

The reference is independent of the model's trace: torch's profiler records every allocation
of a real step (measure_step), on real tensors and a real (padded) batch. Tolerances are those
the docs state: activations within 10 %, peak within 25 %, and the part above the persistent
memory (activations, temporaries, gradients) within 25 % too, so the weights cannot hide an error.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedpeft.budgets import measure_step, predict, top_blocks_memory
from fedpeft.budgets.trace import trace_module
from fedpeft.config import Config
from fedpeft.federation.client import ClientTrainer
from fedpeft.federation.costs import message_bytes
from fedpeft.methods import build_method, get_state
from fedpeft.models import transformer_blocks

from conftest import TINY_FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["full", "head", "bias", "adapter", "lora", "prompt"]
ACT_TOL, PEAK_TOL = 0.10, 0.25


def config(batch_size=8, max_length=24, **fed):
    cfg = Config()
    cfg.federation.batch_size, cfg.model.max_length = batch_size, max_length
    for k, v in fed.items():
        setattr(cfg.federation, k, v)
    return cfg


def real_batch(loaded, rows, length, seed=0):
    """A real batch as EncodedSplit.batch gives it: row 0 padded (3 tokens), decoders on the left."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (rows,), generator=gen)
    if loaded.info.modality == "image":
        size = loaded.model.config.image_size
        return {"pixel_values": torch.randn(rows, 3, size, size, generator=gen), "labels": labels}
    ids = torch.randint(100, 2000, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    decoder = loaded.info.family in ("gpt2", "llama")
    mask[0, :3] = 0 if decoder else 1
    mask[0, -3:] = 1 if decoder else 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if decoder:
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch


def prepared(tiny, family, method):
    loaded = tiny(family)
    return loaded, build_method(method).prepare(loaded.model, loaded.info)


def check(costs, measured, label=""):
    mem = costs.memory
    assert measured.after_forward > 0 and measured.peak > measured.baseline, label
    assert abs(mem.activations / measured.after_forward - 1) <= ACT_TOL, (label, mem.activations, measured.after_forward)
    assert abs(mem.peak / measured.peak - 1) <= PEAK_TOL, (label, mem.peak, measured.peak)
    dynamic, measured_dynamic = mem.peak - mem.persistent, measured.peak - measured.baseline
    assert abs(dynamic / measured_dynamic - 1) <= PEAK_TOL, (label, dynamic, measured_dynamic)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_prediction_matches_a_measured_training_step(tiny, family, method):
    loaded, model = prepared(tiny, family, method)
    cfg = config()
    costs = predict(model, loaded.info, cfg)
    measured = measure_step(model, real_batch(loaded, 8, 24), cfg.federation)
    check(costs, measured, (family, method))
    assert costs.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_sgd_and_scaffold_state(tiny):
    loaded, model = prepared(tiny, "tiny-bert", "lora")
    sgd = config(optimizer="sgd", momentum=0.9, weight_decay=0.01)
    check(predict(model, loaded.info, sgd), measure_step(model, real_batch(loaded, 8, 24), sgd.federation), "sgd")
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    plain = predict(model, loaded.info, config(optimizer="sgd", momentum=0.0)).memory
    adamw = predict(model, loaded.info, config(scaffold=True)).memory
    assert (plain.optimizer, adamw.optimizer, adamw.scaffold) == (0, 2 * trainable, 4 * trainable)


@pytest.mark.parametrize("family", ["tiny-bert", "tiny-gpt2"])
def test_memory_grows_with_batch_size_and_length_as_measured(tiny, family):
    loaded, model = prepared(tiny, family, "lora")
    shapes = [(4, 16), (8, 16), (4, 32)]
    predicted, measured = [], []
    for rows, length in shapes:
        cfg = config(rows, length)
        predicted.append(predict(model, loaded.info, cfg).memory)
        measured.append(measure_step(model, real_batch(loaded, rows, length), cfg.federation))
    for i in (1, 2):
        grow_pred = predicted[i].activations - predicted[0].activations
        grow_meas = measured[i].after_forward - measured[0].after_forward
        assert grow_pred > 0 and abs(grow_pred / grow_meas - 1) <= ACT_TOL, shapes[i]
        assert predicted[i].peak > predicted[0].peak and measured[i].peak > measured[0].peak
    # activations are linear in the rows; the length adds the quadratic attention scores
    assert predicted[1].activations == pytest.approx(2 * predicted[0].activations, rel=0.02)
    assert predicted[2].activations > 2 * predicted[0].activations


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_head_saves_least_and_full_most(tiny, family):
    acts = {}
    for method in ("head", "bias", "lora", "full"):
        loaded, model = prepared(tiny, family, method)
        acts[method] = predict(model, loaded.info, config()).memory.activations
    assert acts["head"] < acts["lora"] < acts["full"]
    assert acts["head"] <= acts["bias"] < acts["full"]  # LLaMA has no biases: bias == head


class MLP(nn.Module):
    """x (B, 4) -> Linear(4, 8) -> ReLU -> Linear(8, 3) -> cross-entropy."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, labels):
        return SimpleNamespace(loss=nn.functional.cross_entropy(self.fc2(torch.relu(self.fc1(x))), labels))


def test_saved_bytes_of_a_small_mlp_by_hand():
    """By hand, float32, B rows: fc1 saves its input x (the batch: an input, not counted);
    relu saves its output h (B, 8) = 32 B bytes, which fc2 saves too (the same storage);
    log_softmax saves its output (B, 3) = 12 B; nll_loss saves the labels (an input) and its
    0-dim total weight (4 bytes). Weights are never counted. With fc1 frozen the same is saved
    (fc2 needs h for its weight gradient; relu's input then needs no gradient, so relu saves
    nothing of its own, and h was one storage anyway); with both frozen there is no graph."""
    model = MLP()
    for rows in (1, 5, 32):
        batch = lambda: {"x": torch.zeros(rows, 4), "labels": torch.zeros(rows, dtype=torch.long)}
        assert trace_module(model, batch).total == 32 * rows + 12 * rows + 4
        model.fc1.requires_grad_(False)
        assert trace_module(model, batch).total == 32 * rows + 12 * rows + 4  # h saved by fc2 alone
        model.fc2.requires_grad_(False)
        assert trace_module(model, batch).total == 0  # nothing trains: no graph
        model.requires_grad_(True)


def test_the_trace_changes_nothing(tiny, batch_for):
    loaded, model = prepared(tiny, "tiny-bert", "prompt")  # peft shares the word embeddings
    batch = batch_for(loaded)
    model.train()
    model(**batch).loss.backward()
    before = {n: (p.detach().clone(), p.grad.clone() if p.grad is not None else None, p.requires_grad)
              for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    model.eval()
    predict(model, loaded.info, config())
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    for n, p in model.named_parameters():
        value, grad, flag = before[n]
        assert type(p) is nn.Parameter and torch.equal(p, value) and p.requires_grad == flag, n
        assert (grad is None and p.grad is None) or torch.equal(p.grad, grad), n
    model(**batch).loss.backward()  # the real model still runs


@pytest.mark.parametrize("family", ["tiny-bert", "tiny-vit"])
def test_flops_per_step_and_round_match_a_counted_real_step(tiny, family):
    loaded, model = prepared(tiny, family, "lora")
    cfg = config(8, 24, local_epochs=2.5)
    costs = predict(model, loaded.info, cfg)
    batch = real_batch(loaded, 8, 24)
    batch.pop("attention_mask", None)  # every token real: the step is at the full length
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    assert costs.flops_per_step == counter.get_total_flops() > 0
    # a round: ClientTrainer's own batch order for a client of n rows
    trainer = SimpleNamespace(cfg=cfg.federation)
    for n in (3, 8, 21):
        steps = ClientTrainer.num_steps(trainer, n)
        order = ClientTrainer.batch_order(trainer, np.arange(n), steps, torch.Generator().manual_seed(0))
        assert costs.flops_per_round(n) == sum(len(b) for b in order) * costs.flops_per_sample, n


def test_bytes_are_the_exchanged_state(tiny):
    loaded, model = prepared(tiny, "tiny-gpt2", "adapter")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    state = message_bytes(get_state(model, names))
    costs = predict(model, loaded.info, config())
    assert costs.upload_bytes == costs.download_bytes == state
    scaffold = predict(model, loaded.info, config(scaffold=True))
    assert scaffold.upload_bytes == scaffold.download_bytes == 2 * state


def freeze_below(model, info, k):
    """What a `layers` method does: the top k blocks + what is above them train, the rest not."""
    blocks = transformer_blocks(model, info.num_layers)
    for name, p in model.named_parameters():
        i = blocks.index_of(name)
        p.requires_grad_(i is not None and i >= info.num_layers - k or
                         i is None and any(h in name for h in (*info.head_names, "pooler", "ln_f", "norm.")))


@pytest.mark.parametrize("family", ["tiny-bert", "tiny-llama", "tiny-vit"])
def test_top_k_blocks_priced_with_no_change(tiny, family):
    """A method that trains only the top k blocks plugs in: predict on its flags matches the
    measurement, and top_blocks_memory (two traces for every k) is within the tolerance."""
    loaded, model = prepared(tiny, family, "full")
    cfg = config()
    by_k = top_blocks_memory(model, loaded.info, cfg)
    assert all(p.requires_grad for p in model.parameters())  # its flags are restored
    batch = real_batch(loaded, 8, 24)
    saved = []
    for k in range(loaded.info.num_layers + 1):
        freeze_below(model, loaded.info, k)
        measured = measure_step(model, batch, cfg.federation)
        check(predict(model, loaded.info, cfg), measured, k)
        check(SimpleNamespace(memory=by_k[k]), measured, ("top_blocks_memory", k))
        saved.append(measured.after_forward)
    assert saved == sorted(saved) and saved[0] < saved[-1]


@pytest.mark.integration  # the real MiniLM: 8-16 s here; deselect with -m "not integration"
def test_minilm_lora_at_batch_32_by_64(tiny):
    """The real packaged MiniLM once (lora; every method: benchmarks/costmodel.py)."""
    loaded = tiny("minilm", labels=[f"l{i}" for i in range(77)])
    model = build_method("lora").prepare(loaded.model, loaded.info)
    cfg = config(32, 64)
    costs = predict(model, loaded.info, cfg)
    measured = measure_step(model, real_batch(loaded, 32, 64), cfg.federation)
    check(costs, measured, "minilm")
    assert costs.memory.activations > 100 * 2**20  # hundreds of MiB: not a tiny model by mistake
