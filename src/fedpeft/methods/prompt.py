"""``prompt``: learnable soft-prompt tokens in front of the input, plus the head.

Text models: prompt tuning, Lester et al. 2021, https://arxiv.org/abs/2104.08691, via ``peft``
(``PromptTuningConfig``, task ``SEQ_CLS``). :meth:`Prompt.prepare` returns a ``PeftModel`` whose
exchanged parameters are ``prompt_encoder.default.embedding.weight`` (``num_virtual_tokens x
hidden``) and the head's trainable copy ``base_model.<head>.modules_to_save.default.*``
(``classifier`` for BERT, ``score`` for GPT-2/LLaMA). peft prepends the prompts to
``inputs_embeds`` and extends ``attention_mask`` and ``token_type_ids``; encoder models still
classify from position 0 (BERT's pooler), decoder models from the last position, which is the
last real token because fedpeft pads decoder inputs on the left.

ViT: visual prompt tuning (VPT-shallow), Jia et al. 2022, https://arxiv.org/abs/2203.12119 ; peft
has no prompt tuning for image models, so the prompts are a parameter ``vit.embeddings.prompt``
(``1 x num_virtual_tokens x hidden``) inserted right after the CLS token by a forward hook on the
embeddings module (after position embeddings; the prompts have none). The classifier reads the
CLS token as before. Load a saved ``exchanged.safetensors`` after :func:`add_visual_prompt`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from fedpeft.errors import ConfigError
from fedpeft.methods.base import Method, NamedArrays, freeze_all, unfreeze_head
from fedpeft.methods.lora import peft_modules_to_save, peft_task_type, save_peft_folder, wrap_with_peft
from fedpeft.methods.registry import register
from fedpeft.models import ModelInfo

# fedpeft passes position_ids for left-padded decoder batches; peft's prompt tuning drops them
# (its prompts shift positions anyway) and would warn on every run.
warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")


@dataclass
class PromptOptions:
    """Options of ``method.name = "prompt"``.

    Attributes
    ----------
    num_virtual_tokens : int
        Number of learnable prompt tokens.
    init : {"auto", "vocab", "random"}
        ``vocab``: copies of randomly sampled word embeddings (text only; peft's
        ``SAMPLE_VOCAB``, as recommended by Lester et al.); ``random``: peft's ``N(0, 1)`` for text,
        VPT's uniform Xavier init for ViT; ``auto``: ``vocab`` for text, ``random`` for images.
    """

    num_virtual_tokens: int = 10
    init: Literal["auto", "vocab", "random"] = "auto"

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"method.num_virtual_tokens: must be >= 1, got {self.num_virtual_tokens}")
        if self.init not in ("auto", "vocab", "random"):
            raise ConfigError(f"method.init: expected 'auto', 'vocab' or 'random', got {self.init!r}")


def _prompt_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on the embeddings: insert ``module.prompt`` after the CLS token."""
    prompt = module.prompt.to(output.dtype).expand(output.shape[0], -1, -1)
    return torch.cat((output[:, :1], prompt, output[:, 1:]), dim=1)


def add_visual_prompt(model: nn.Module, num_virtual_tokens: int = 10, seed: int = 0) -> str:
    """Add ``num_virtual_tokens`` learnable prompt tokens after a ViT's CLS token (VPT-shallow).

    Parameters
    ----------
    model : nn.Module
        A ViT-style ``*ForImageClassification`` whose ``<backbone>.embeddings`` returns
        ``(batch, 1 + patches, hidden)`` with the CLS token first (modified in place).
    num_virtual_tokens : int
        Number of prompt tokens.
    seed : int
        Seeds the uniform Xavier init of Jia et al. (``6 / (hidden + 3 * patch**2)``).

    Returns
    -------
    str
        The new parameter's name, e.g. ``"vit.embeddings.prompt"``.
    """
    candidates = [n for n, m in model.named_modules() if n.endswith("embeddings") and hasattr(m, "cls_token")]
    if len(candidates) != 1:
        raise ConfigError(
            f"method.name: 'prompt' needs one embeddings module with a CLS token in {type(model).__name__}"
        )
    name = candidates[0]
    embeddings = model.get_submodule(name)
    if hasattr(embeddings, "prompt"):
        raise ValueError(f"{name} already has a prompt")
    hidden = embeddings.cls_token.shape[-1]
    patch = getattr(model.config, "patch_size", 16)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    bound = math.sqrt(6.0 / float(hidden + 3 * patch * patch))
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.empty(1, num_virtual_tokens, hidden).uniform_(-bound, bound, generator=generator)
    ref = embeddings.cls_token
    embeddings.prompt = nn.Parameter(prompt.to(ref.device, ref.dtype))
    embeddings.register_forward_hook(_prompt_hook)
    return f"{name}.prompt"


@register
class Prompt(Method):
    """Soft prompt tuning (peft for text, own VPT for ViT) plus the classification head.

    Papers: https://arxiv.org/abs/2104.08691 (text), https://arxiv.org/abs/2203.12119 (ViT).
    """

    name = "prompt"
    paper = "https://arxiv.org/abs/2104.08691"
    Options = PromptOptions
    causal_lm = "soft prompt tokens in front of the input (peft prompt tuning, task CAUSAL_LM; no head)"

    def prepare(self, model: nn.Module, info: ModelInfo) -> nn.Module:
        opts = self.options
        if info.modality == "image":
            if opts.init == "vocab":
                raise ConfigError("method.init: 'vocab' needs a text model; use 'auto' or 'random'")
            freeze_all(model)
            model.get_parameter(add_visual_prompt(model, opts.num_virtual_tokens)).requires_grad_(True)
            unfreeze_head(model, info)
            return model
        from peft import PromptTuningConfig

        config = PromptTuningConfig(
            task_type=peft_task_type(info),
            num_virtual_tokens=opts.num_virtual_tokens,
            prompt_tuning_init="RANDOM" if opts.init == "random" else "SAMPLE_VOCAB",
            modules_to_save=peft_modules_to_save(info),
        )
        return wrap_with_peft(model, config, info)

    def save_pretrained(self, model: nn.Module, directory: Path, state: NamedArrays) -> None:
        """Text: a peft adapter folder (state loaded first); ViT: ``exchanged.safetensors``."""
        if hasattr(model, "peft_config"):
            save_peft_folder(model, directory, state)
        else:
            super().save_pretrained(model, directory, state)

    def rebuild_code(self, model: nn.Module) -> str | None:
        """ViT: :func:`add_visual_prompt` with this run's token count; text (peft): None."""
        if hasattr(model, "peft_config"):
            return None
        return ("from fedpeft.methods.prompt import add_visual_prompt\n\n"
                f"add_visual_prompt(model, num_virtual_tokens={self.options.num_virtual_tokens})")
