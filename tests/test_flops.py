"""Client FLOPs are exact: the shape formula of TrainingFlops equals torch's FLOP counter on real
training steps, for every tiny model family and method, and its probe changes nothing."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedpeft.federation.costs import TrainingFlops
from fedpeft.methods import build_method, method_names
from test_runs import csv_data, make_cfg  # noqa: F401 - fixture reused

FAMILIES = ["tiny-bert", "tiny-gpt2", "tiny-llama", "tiny-vit"]
SHAPES = [(3, 5), (7, 17), (2, 40), (1, 1)]  # (rows, tokens)


def text_batch(family, rows, length):
    ids = torch.randint(100, 2000, (rows, length), generator=torch.Generator().manual_seed(rows * length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(rows, dtype=torch.long)}
    if family in ("tiny-gpt2", "tiny-llama"):  # left-padded decoders get position ids (EncodedSplit.batch)
        batch["position_ids"] = torch.arange(length).expand(rows, length)
    return batch


def counted_step(model, optimizer, batch):
    """FLOPs of one real training step (forward, backward, clipping, AdamW) by torch's counter."""
    with FlopCounterMode(display=False) as counter:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
    return counter.get_total_flops()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", [m for m in method_names() if m != "sfprompt"])  # split: tests/test_split.py
def test_shape_formula_equals_the_flop_counter_on_real_steps(tiny, family, method):
    loaded = tiny(family)
    model = build_method(method).prepare(loaded.model, loaded.info)
    model.train()
    flops = TrainingFlops(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for rows, length in SHAPES:
        if loaded.info.modality == "image":
            size = model.config.image_size if hasattr(model, "config") else 32
            batch = {"pixel_values": torch.randn(rows, 3, size, size), "labels": torch.zeros(rows, dtype=torch.long)}
        else:
            batch = text_batch(family, rows, length)
        assert flops(batch) == counted_step(model, optimizer, batch) > 0, (rows, length)
    assert flops._exact_form


def test_the_probe_changes_no_parameter_gradient_or_random_state(tiny, batch_for):
    loaded = tiny("tiny-bert")
    model = build_method("lora").prepare(loaded.model, loaded.info)
    model.train()
    batch = batch_for(loaded, n=4)
    model(**batch).loss.backward()  # gradients the probe must leave alone
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    rng = torch.get_rng_state()
    assert TrainingFlops(model)(batch) > 0
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert (p.grad is None) == (n not in grads) and (p.grad is None or torch.equal(p.grad, grads[n])), n


def test_a_model_outside_the_form_is_measured_per_length(tiny):
    """A model whose cost is not quadratic in the length (here: cubic) falls back to measuring."""
    loaded = tiny("tiny-bert")
    model = build_method("head").prepare(loaded.model, loaded.info)

    class Cubic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.w = model, torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids, labels, **kw):
            rows, n = input_ids.shape
            extra = (torch.ones(rows, n, n * n) @ torch.ones(n * n, 1)).sum() * self.w  # 2 rows n^3
            out = self.inner(input_ids=input_ids, labels=labels, **kw)
            out.loss = out.loss + 0 * extra
            return out

    cubic = Cubic().train()  # training FLOPs: the probe counts in train mode
    flops = TrainingFlops(cubic)
    optimizer = torch.optim.AdamW([p for p in cubic.parameters() if p.requires_grad], lr=1e-3)
    for rows, length in [(2, 6), (3, 9), (1, 2)]:
        batch = text_batch("tiny-bert", rows, length)
        assert flops(batch) == counted_step(cubic, optimizer, batch)
    assert not flops._exact_form


@pytest.mark.parametrize("privacy", [{}, {"privacy": {"mode": "sample", "max_grad_norm": 1.0, "noise_multiplier": 1.0}}])
def test_a_run_probes_each_structure_once_cost_model_and_trainer_alike(csv_data, tmp_path, monkeypatch, privacy):  # noqa: F811
    """The cost model (summary.json's predicted FLOPs) and the clients' trainer price one structure
    with one probe (lengths 1..4); DP-SGD's Opacus hooks, installed by the first step, neither make
    it a new structure nor count in the plain-training FLOPs (docs/methods.md)."""
    from fedpeft.experiment import run_experiment
    from fedpeft.federation import costs

    monkeypatch.setattr(costs, "_FITTED", {})  # this process has probed nothing yet
    probed = []
    real = costs.TrainingFlops._measure
    monkeypatch.setattr(costs.TrainingFlops, "_measure", lambda self, batch: probed.append(
        tuple(batch["input_ids"].shape)) or real(self, batch))
    cfg = make_cfg(csv_data, federation={"rounds": 2, "clients_per_round": 2, "local_steps": 2},
                   output={"save_model": False}, **privacy)
    summary = run_experiment(cfg, out=tmp_path / "run")
    assert summary["client_flops_total"] > 0
    assert probed == [(1, 1), (1, 2), (1, 3), (1, 4)]
