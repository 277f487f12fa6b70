"""task.kind = "causal-lm": instruction data, response-only loss, the method matrix on tiny decoders,
evaluation by generation, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.config import Config, ModelConfig
from fedpeft.errors import ConfigError
from fedpeft.methods import get_method_class, method_names, trainable_names
from fedpeft.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (conftest)

DECODERS = ["tiny-gpt2", "tiny-llama"]
CAUSAL_METHODS = [m for m in method_names() if get_method_class(m).causal_lm_refused is None]
# bias on LLaMA (no biases, no head: nothing trains) is refused when the model is prepared
MATRIX = [(m, f) for m in CAUSAL_METHODS for f in DECODERS if (m, f) != ("bias", "tiny-llama")]


def causal(name: str, seed: int = 0):
    return load_model(ModelConfig(name=name, max_length=32), [], seed, task="causal-lm")


def prepared(method: str, family: str):
    loaded = causal(family)
    m = get_method_class(method)()
    return loaded, m, m.prepare(loaded.model, loaded.info)


def cfg_dict(**sections) -> dict:
    raw = {"model": {"name": "tiny-gpt2", "max_length": 32}, "task": {"kind": "causal-lm"},
           "data": {"train": "train.jsonl", "test": "test.jsonl"}, "method": {"name": "lora"},
           "partition": {"num_clients": 2}}
    for name, table in sections.items():
        raw[name] = {**raw.get(name, {}), **table}
    return raw


# --------------------------------------------------------------------------- task axis and refusals


def test_every_method_says_what_it_does_for_causal_lm():
    for name in method_names():
        cls = get_method_class(name)
        assert bool(cls.causal_lm) != (cls.causal_lm_refused is not None), name
    assert {"head", "sfprompt"} == {m for m in method_names() if get_method_class(m).causal_lm_refused}


@pytest.mark.parametrize("method,message", [
    ("head", "no task head"),
    ("sfprompt", "one label per row"),
])
def test_methods_without_causal_lm_are_refused_when_the_config_is_built(method, message):
    with pytest.raises(ConfigError, match=rf'method.name: "{method}" with task.kind = "causal-lm": .*{message}'):
        Config.from_dict(cfg_dict(method={"name": method}))


def test_bias_on_a_model_without_biases_is_refused_when_prepared():
    loaded = causal("tiny-llama")
    with pytest.raises(ConfigError, match="no bias parameters and no classification head"):
        get_method_class("bias")().prepare(loaded.model, loaded.info)


@pytest.mark.parametrize("sections,key", [
    ({"model": {"name": "tiny-bert"}}, "model.name"),
    ({"model": {"name": "minilm"}}, "model.name"),
    ({"model": {"max_length": 3}}, "model.max_length"),
    ({"runtime": {"kind": "flower-sim"}}, "runtime.kind"),
    ({"runtime": {"kind": "flower"}}, "runtime.kind"),
    ({"partition": {"scheme": "dirichlet"}}, "partition.scheme"),
    ({"partition": {"scheme": "shards"}}, "partition.scheme"),
    ({"federation": {"label_skew": "fedlc"}}, "federation.label_skew"),
    ({"attack": {"kind": "label_flip", "fraction": 0.5}}, "attack.kind"),
    ({"privacy": {"mode": "sample", "max_grad_norm": 1.0, "noise_multiplier": 1.0}}, "privacy.mode"),
    ({"data": {"text_column": "text"}}, "data.text_column"),
    ({"data": {"label_column": "label"}}, "data.label_column"),
    ({"data": {"format": "alpaca", "prompt_column": "q"}}, "data.prompt_column"),
    ({"task": {"max_new_tokens": 0}}, "task.max_new_tokens"),
    ({"task": {"generation_samples": -1}}, "task.generation_samples"),
])
def test_causal_lm_config_errors_name_the_key(sections, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        Config.from_dict(cfg_dict(**sections))


def test_flower_refusal_names_the_runtime():
    with pytest.raises(ConfigError, match='runtime.kind: "flower-sim" with task.kind = "causal-lm" is not built yet'):
        Config.from_dict(cfg_dict(runtime={"kind": "flower-sim"}))


@pytest.mark.parametrize("table,key", [
    ({"data": {"prompt_column": "q"}}, "data.prompt_column"),
    ({"data": {"format": "chat"}}, "data.format"),
    ({"data": {"category_column": "domain"}}, "data.category_column"),
    ({"task": {"max_new_tokens": 8}}, "task.max_new_tokens"),
])
def test_causal_lm_keys_are_errors_for_classification(table, key):
    raw = {"model": {"name": "tiny-bert"}, "data": {"train": "a.csv", "test": "b.csv"}}
    for name, t in table.items():
        raw[name] = {**raw.get(name, {}), **t}
    with pytest.raises(ConfigError, match=rf"^{key}: .*only|^{key}: is read for instruction data only"):
        Config.from_dict(raw)


def test_classification_config_has_no_task_section_and_causal_lm_round_trips():
    plain = Config.from_dict({"data": {"name": "banking77"}})
    assert "task" not in plain.to_dict() and "[task]" not in plain.to_toml()
    cfg = Config.from_dict(cfg_dict(task={"max_new_tokens": 8}, data={"format": "alpaca", "category_column": "c"},
                                    partition={"scheme": "dirichlet"}))
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg and again.task.generation("max_new_tokens") == 8
    assert again.task.generation("generation_samples") == 32


def test_encoder_models_are_refused_as_causal_lms():
    with pytest.raises(ConfigError, match="is no decoder"):
        load_model(ModelConfig(name="tiny-bert"), [], 0, task="causal-lm")


# --------------------------------------------------------------------------- the method matrix


@pytest.mark.parametrize("family", DECODERS)
def test_causal_lm_models_have_their_lm_head_and_no_classifier(family):
    loaded = causal(family)
    assert type(loaded.model).__name__.endswith("ForCausalLM") or type(loaded.model).__name__ == "GPT2LMHeadModel"
    assert loaded.info.task == "causal-lm" and loaded.info.head_names == []
    assert not any(n.startswith(("score", "classifier")) for n, _ in loaded.model.named_parameters())


def expected_names(method: str, family: str, model, info) -> set[str]:
    """The exchanged names each method says it trains on a causal LM, derived from the model."""
    names = [n for n, _ in model.named_parameters()]
    if method == "full":
        return set(names)
    if method == "bias":
        return {n for n in names if n.endswith(".bias")}
    if method == "adapter":
        return {n for n in names if ".adapter." in n}
    if method == "lora":
        return {n for n in names if ".lora_A." in n or ".lora_B." in n}
    if method == "prompt":
        return {"prompt_encoder.default.embedding.weight"}
    if method == "layers":  # every block, the final norm and (LLaMA: untied) the LM head; never the embeddings
        from fedpeft.models import above_block_names, transformer_blocks

        blocks = transformer_blocks(model, info.num_layers)
        return {n for n in names if blocks.index_of(n) is not None} | set(above_block_names(model, blocks))
    raise AssertionError(method)


@pytest.mark.parametrize("method,family", MATRIX)
def test_gradients_only_where_the_method_says(method, family):
    loaded, m, model = prepared(method, family)
    names = set(m.exchanged_names(model))
    assert names == expected_names(method, family, model, loaded.info) == set(trainable_names(model))
    if method == "layers":
        assert not any("embed" in n or ".wte." in n or ".wpe." in n for n in names)
        assert ("lm_head.weight" in names) == (family == "tiny-llama")  # GPT-2's head is tied to wte
    ids = torch.tensor([[5000, 6000, 7000, 8000, 9000, 102]])
    labels = ids.clone()
    labels[0, :3] = -100
    model.train()
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
    for name, p in model.named_parameters():
        if name in names:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert sum(float(p.grad.abs().sum()) for n, p in model.named_parameters() if n in names) > 0
