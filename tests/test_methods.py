"""Every method on every tiny model family: what trains, what is exchanged, what is saved."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedpeft.config import Config
from fedpeft.errors import ConfigError
from fedpeft.federation.costs import param_counts
from fedpeft.methods import get_method_class, get_state
from fedpeft.methods.adapter import add_adapters
from fedpeft.methods.prompt import add_visual_prompt

from conftest import TINY_FAMILIES

METHODS = ["full", "head", "bias", "adapter", "lora", "prompt", "layers"]
PEFT_METHODS = ["adapter", "lora", "prompt"]
MATRIX = [(m, f) for m in METHODS for f in TINY_FAMILIES]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (conftest)


def prepared(tiny, method, family):
    loaded = tiny(family)
    m = get_method_class(method)()
    return loaded, m, m.prepare(loaded.model, loaded.info)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def train_steps(model, batch, steps=3, lr=1e-2):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # no decay: only gradients move weights
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()


def strip_peft(name):
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def is_head(name, info):
    return any(strip_peft(name).startswith(h + ".") for h in info.head_names)


@pytest.mark.parametrize("method,family", MATRIX)
def test_gradients_reach_exactly_the_trainable_parameters(tiny, batch_for, method, family):
    loaded, m, model = prepared(tiny, method, family)
    model.train()
    model(**batch_for(loaded)).loss.backward()
    total = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            total += p.grad.abs().sum().item()
        else:
            assert p.grad is None, name
    assert total > 0


@pytest.mark.parametrize("method,family", MATRIX)
def test_exchanged_names(tiny, method, family):
    loaded, m, model = prepared(tiny, method, family)
    info = loaded.info
    names = m.exchanged_names(model)
    all_names = [n for n, _ in model.named_parameters()]
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}
    heads = [n for n in names if is_head(n, info)]
    body = [n for n in names if not is_head(n, info)]
    assert heads, "the head always trains"
    if method == "full":
        assert set(names) == set(all_names)
    elif method == "head":
        assert not body
    elif method == "bias":
        assert set(body) == {n for n in all_names if n.endswith("bias") and not is_head(n, info)}
    elif method == "adapter":
        assert body and all(".adapter." in n for n in body)
        assert len(body) == 4 * info.num_layers  # down/up x weight/bias per block
    elif method == "lora":
        assert body and all("lora_" in n for n in body)
    elif method == "prompt":
        assert len(body) == 1 and "prompt" in body[0]
    elif method == "layers":  # k unset: every block + what sits above them; never the embeddings
        from fedpeft.models import transformer_blocks

        blocks = transformer_blocks(model, info.num_layers)
        in_blocks = {n for n in all_names if blocks.index_of(n) is not None}
        assert in_blocks <= set(names) and len(in_blocks) < len(names)
        assert not any("embed" in n or n.startswith(("transformer.wte", "transformer.wpe")) for n in names)
        assert set(all_names) - set(names) == {n for n in all_names if "embed" in n or ".wte." in n or ".wpe." in n}
    if method == "lora" or (method == "prompt" and info.modality == "text"):
        # peft trains a copy of the head; the original stays frozen and is not exchanged
        assert all(".modules_to_save.default." in n for n in heads)
        assert not any("original_module" in n for n in names)


@pytest.mark.parametrize("method,family", MATRIX)
def test_training_changes_exactly_the_exchanged_parameters(tiny, batch_for, method, family):
    loaded, m, model = prepared(tiny, method, family)
    names = m.exchanged_names(model)
    others = [n for n, _ in model.named_parameters() if n not in set(names)]
    before, frozen_before = get_state(model, names), get_state(model, others)
    train_steps(model, batch_for(loaded))
    after, frozen_after = get_state(model, names), get_state(model, others)
    unchanged = [n for n in names if np.array_equal(before[n], after[n])]
    assert not unchanged
    assert all(np.array_equal(frozen_before[n], frozen_after[n]) for n in others)


@pytest.mark.parametrize("method,family", [(m, f) for m in ("adapter", "lora") for f in TINY_FAMILIES])
def test_prepared_model_starts_as_the_pretrained_one(tiny, batch_for, method, family):
    reference = tiny(family)
    batch = batch_for(reference)
    expected = logits(reference.model, batch)
    _, _, model = prepared(tiny, method, family)
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # peft 0.21 on transformers 5
@pytest.mark.parametrize("method,family", MATRIX)
def test_save_pretrained_reloads_without_fedpeft(tiny, batch_for, tmp_path, method, family):
    loaded, m, model = prepared(tiny, method, family)
    batch = batch_for(loaded)
    train_steps(model, batch, steps=2)
    state = get_state(model, m.exchanged_names(model))
    # save from a model that no longer holds the state: save_pretrained must write `state`
    stale = copy.deepcopy(model)
    with torch.no_grad():
        for p in stale.parameters():
            if p.requires_grad:
                p.add_(1.0)
    m.save_pretrained(stale, tmp_path, state)
    expected = logits(model, batch)

    # a user reloads the same pre-trained model; for `full` even a different one must not matter
    base = tiny(family, seed=1 if method == "full" else 0).model
    if (tmp_path / "adapter_config.json").exists():
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(base, tmp_path)
    else:
        from safetensors.torch import load_file

        if method == "adapter":
            add_adapters(base, base.config.model_type, bottleneck=64)
        elif method == "prompt":
            add_visual_prompt(base, num_virtual_tokens=10)
        tensors = load_file(tmp_path / "exchanged.safetensors")
        missing, unexpected = base.load_state_dict(tensors, strict=False)
        assert not unexpected
        assert not missing or method != "full"
        reloaded = base
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", PEFT_METHODS + ["head", "bias"])
def test_trainable_fraction_is_small(tiny, method):
    loaded, _, model = prepared(tiny, method, "tiny-bert")
    trainable, total = param_counts(model)
    assert 0 < trainable / total < 0.02


def test_deepcopy_keeps_hooks(tiny, batch_for):
    for method in ("adapter", "prompt"):
        loaded, m, model = prepared(tiny, method, "tiny-vit")
        train_steps(model, batch_for(loaded))
        batch = batch_for(loaded)
        torch.testing.assert_close(logits(copy.deepcopy(model), batch), logits(model, batch))


@pytest.mark.parametrize(
    "table,message",
    [
        ({"name": "adapter", "bottleneck": 0}, "method.bottleneck"),
        ({"name": "adapter", "activation": "tanh"}, "method.activation"),
        ({"name": "lora", "r": 0}, "method.r"),
        ({"name": "lora", "dropout": 1.5}, "method.dropout"),
        ({"name": "lora", "target_modules": []}, "method.target_modules"),
        ({"name": "prompt", "num_virtual_tokens": 0}, "method.num_virtual_tokens"),
        ({"name": "layers", "k": -1}, "method.k"),
        ({"name": "layers", "k": 1.5}, "method.k"),
    ],
)
def test_options_are_validated(table, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"data": {"name": "x"}, "method": table})


def test_options_become_config_keys():
    table = {"name": "lora", "r": 4, "target_modules": ["query"]}
    cfg = Config.from_dict({"data": {"name": "x"}, "method": table})
    assert cfg.method.options.r == 4 and cfg.method.options.target_modules == ["query"]
    assert cfg.to_dict()["method"] == {**table, "alpha": 16, "dropout": 0.0, "freeze_a": False, "aggregation": "fedavg"}


def test_lora_unknown_targets_are_a_config_error(tiny):
    loaded = tiny("tiny-bert")
    lora = get_method_class("lora")
    with pytest.raises(ConfigError, match="method.target_modules"):
        lora(lora.Options(target_modules=["nope"])).prepare(loaded.model, loaded.info)


def encoded_split(loaded, batch_for, n=8):
    """An EncodedSplit of ``n`` synthetic rows, as the data package would hand it over."""
    from fedpeft.data import EncodedSplit

    batch = batch_for(loaded, n=n)
    labels = batch.pop("labels")
    features = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    return EncodedSplit(features, labels, padding_side=getattr(loaded.processor, "padding_side", "right"))


@pytest.mark.parametrize("method,family", MATRIX)
def test_one_federated_round_changes_exactly_the_exchanged_state(tiny, batch_for, method, family):
    """One FedAvg round of two clients moves every exchanged tensor and nothing else, and the
    reported bytes are the exchanged tensors' nbytes plus their names."""
    from fedpeft.config import FederationConfig
    from fedpeft.federation.client import ClientTrainer
    from fedpeft.federation.costs import message_bytes
    from fedpeft.federation.strategy import FedAvgStrategy
    from fedpeft.history import round_row
    from fedpeft.runtime.rounds import Delivery

    loaded, m, model = prepared(tiny, method, family)
    names = m.exchanged_names(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in set(names)}
    cfg = FederationConfig(clients_per_round=2, local_steps=2, batch_size=4, lr=1e-2)
    trainer = ClientTrainer(model, names, encoded_split(loaded, batch_for), cfg, seed=0)
    strategy = FedAvgStrategy(cfg, num_clients=2, seed=0)
    parts = [np.arange(0, 4), np.arange(4, 8)]

    start = get_state(model, names)
    plan = strategy.plan_round(1)
    results = [trainer.fit(c, parts[c], start, 1) for c in plan.training]
    outcome = strategy.aggregate_round(1, start, results)

    assert outcome.aggregated and set(outcome.state) == set(names)
    unchanged = [n for n in names if np.array_equal(outcome.state[n], start[n])]
    assert not unchanged, f"{method}/{family}: exchanged tensors not moved by a round: {unchanged[:3]}"
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"{method}/{family}: frozen {n} changed"
    expected = sum(a.nbytes + len(k.encode()) for k, a in start.items())
    sizes = {r.client: message_bytes(r.state) for r in results}
    row = round_row(plan, Delivery(results, bytes_up=sizes), outcome, start, None, {"wall_s": 1.0, "client_compute_s": 1.0}, None)
    assert row["bytes_down"] == 2 * expected
    assert row["bytes_up"] == sum(
        sum(a.nbytes + len(k.encode()) for k, a in r.state.items()) for r in results
    ) == 2 * expected
