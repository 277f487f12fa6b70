"""``adapter``: a bottleneck adapter after each block's feed-forward output, plus the head.

Houlsby et al. 2019, *Parameter-Efficient Transfer Learning for NLP*,
https://arxiv.org/abs/1902.00751 ; used federated in FedPEFT (Sun et al. 2022,
https://arxiv.org/abs/2210.01708).

Each transformer block gets its own adapter ``h + up(act(down(h)))`` on the output of its
feed-forward network (before dropout, residual and LayerNorm where the block has them). ``up`` is
zero-initialised, so the prepared model computes exactly what the pre-trained one did; ``down``
is random, so ``up`` receives a gradient at the first step and ``down`` from the second on.

The adapter is registered as a child module named ``adapter`` of the hooked feed-forward module
and applied by a forward hook (a module-level function, so ``copy.deepcopy`` and pickling work).
The base model's own parameter names are untouched; the new ones are
``<ffn module>.adapter.down.{weight,bias}`` and ``<ffn module>.adapter.up.{weight,bias}``:

==========  =====================================================
family      hooked module (``{i}`` = block index)
==========  =====================================================
BERT-like   ``bert.encoder.layer.{i}.output.dense``
ViT         ``vit.layers.{i}.mlp`` (transformers 5; 4.x: ``vit.encoder.layer.{i}.output.dense``)
GPT-2       ``transformer.h.{i}.mlp``
LLaMA-like  ``model.layers.{i}.mlp``
==========  =====================================================

A saved ``exchanged.safetensors`` loads into a plain ``transformers`` model after
:func:`add_adapters` rebuilt the structure (see ``docs/methods.md``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from fedpeft.errors import ConfigError
from fedpeft.methods.base import Method, NamedArrays, freeze_all, unfreeze_head
from fedpeft.methods.registry import register
from fedpeft.models import ModelInfo

log = logging.getLogger(__name__)

# Where a block's feed-forward output is, tried in order; a pattern is used when it matches
# exactly one module per block. Covers BERT/RoBERTa/ELECTRA/ViT-4.x, GPT-2 and LLaMA/ViT-5 style.
FFN_PATTERNS = (
    r"(^|\.)encoder\.layer\.\d+\.output\.dense$",
    r"(^|\.)h\.\d+\.mlp$",
    r"(^|\.)layers\.\d+\.mlp$",
)
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


@dataclass
class AdapterOptions:
    """Options of ``method.name = "adapter"``.

    Attributes
    ----------
    bottleneck : int
        Width of the down-projection; clamped to the model's hidden size.
    activation : {"gelu", "relu"}
        Non-linearity between the two projections.
    """

    bottleneck: int = 64
    activation: Literal["gelu", "relu"] = "gelu"

    def validate(self) -> None:
        if self.bottleneck < 1:
            raise ConfigError(f"method.bottleneck: must be >= 1, got {self.bottleneck}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"method.activation: expected one of {', '.join(map(repr, ACTIVATIONS))}, "
                f"got {self.activation!r}"
            )


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))`` with a random ``down`` and a zero ``up`` (identity at init)."""

    def __init__(self, hidden: int, bottleneck: int, activation: str = "gelu",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden)
        with torch.no_grad():
            # Same distribution as nn.Linear's default (kaiming-uniform, a=sqrt(5)), but seeded.
            bound = 1.0 / hidden**0.5
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


def _adapter_hook(module: nn.Module, inputs: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
    """Forward hook: pass the hooked module's output through ``module.adapter``."""
    if isinstance(output, tuple):
        return (module.adapter(output[0]), *output[1:])
    return module.adapter(output)


def ffn_module_names(model: nn.Module, num_layers: int | None = None) -> list[str]:
    """Names of the modules whose output gets an adapter: one per block, in block order.

    Raises
    ------
    ConfigError
        When no known pattern finds exactly one feed-forward module per block.
    """
    num_layers = num_layers or _num_layers(model)
    names = [n for n, _ in model.named_modules()]
    for pattern in FFN_PATTERNS:
        found = [n for n in names if re.search(pattern, n)]
        if found and len(found) == num_layers:
            return found
    raise ConfigError(
        f"method.name: 'adapter' does not know where the feed-forward output is in "
        f"{type(model).__name__} (looked for {', '.join(FFN_PATTERNS)})"
    )


def add_adapters(model: nn.Module, info_or_family: ModelInfo | str, bottleneck: int = 64,
                 activation: str = "gelu", seed: int = 0) -> list[str]:
    """Insert one zero-initialised bottleneck adapter after each block's feed-forward output.

    Works on a plain ``transformers`` model, so it also rebuilds the structure to load a saved
    ``exchanged.safetensors`` into (``model.load_state_dict(tensors, strict=False)``).

    Parameters
    ----------
    model : nn.Module
        A ``*ForSequenceClassification`` / ``*ForImageClassification`` model (modified in place).
    info_or_family : ModelInfo or str
        The :class:`~fedpeft.models.ModelInfo` of the model, or its ``config.model_type``.
    bottleneck : int
        Width of the down-projection (clamped to the hidden size).
    activation : {"gelu", "relu"}
        Non-linearity between the projections.
    seed : int
        Seeds the down-projections, so every process prepares identical adapters.

    Returns
    -------
    list of str
        The names of the new parameters, as in ``model.named_parameters()``.
    """
    if isinstance(info_or_family, ModelInfo):
        hidden, num_layers = info_or_family.hidden_size, info_or_family.num_layers
    else:
        config = model.config
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        num_layers = _num_layers(model)
    if bottleneck > hidden:
        log.info("adapter bottleneck %d > hidden size %d: using %d", bottleneck, hidden, hidden)
        bottleneck = hidden
    generator = torch.Generator().manual_seed(seed)
    new_names = []
    for name in ffn_module_names(model, num_layers):
        module = model.get_submodule(name)
        if hasattr(module, "adapter"):
            raise ValueError(f"{name} already has an adapter")
        ref = next(module.parameters())
        adapter = BottleneckAdapter(hidden, bottleneck, activation, generator)
        module.adapter = adapter.to(ref.device, ref.dtype)
        module.register_forward_hook(_adapter_hook)
        new_names += [f"{name}.adapter.{n}" for n, _ in module.adapter.named_parameters()]
    return new_names


@register
class Adapter(Method):
    """Houlsby bottleneck adapters, one per block, plus the classification head.

    Paper: https://arxiv.org/abs/1902.00751 (federated: https://arxiv.org/abs/2210.01708).

    Unlike FedPEFT's released code, which shares ONE adapter across all blocks with both
    projections zero-initialised (so it can only ever learn a constant bias), each block has its
    own adapter and ``down`` is random, so the adapters learn.
    """

    name = "adapter"
    paper = "https://arxiv.org/abs/1902.00751"
    causal_lm = "one bottleneck adapter per block after its feed-forward output (no head)"
    Options = AdapterOptions

    def prepare(self, model: nn.Module, info: ModelInfo) -> nn.Module:
        freeze_all(model)
        new = set(add_adapters(model, info, self.options.bottleneck, self.options.activation))
        for name, p in model.named_parameters():
            if name in new:
                p.requires_grad_(True)
        unfreeze_head(model, info)
        return model

    def save_pretrained(self, model: nn.Module, directory: Path, state: NamedArrays) -> None:
        """Write ``exchanged.safetensors`` with the adapter shape in its metadata."""
        from safetensors.numpy import save_file

        down = next((v for k, v in state.items() if k.endswith("adapter.down.weight")), None)
        metadata = {"method": self.name, "activation": self.options.activation}
        if down is not None:
            metadata["bottleneck"] = str(down.shape[0])
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: np.ascontiguousarray(v) for k, v in state.items()}
        save_file(tensors, directory / "exchanged.safetensors", metadata=metadata)

    def rebuild_code(self, model: nn.Module) -> str:
        """:func:`add_adapters` with this run's options (the bottleneck is clamped as in training)."""
        opts = self.options
        return ("from fedpeft.methods.adapter import add_adapters\n\n"
                f"add_adapters(model, model.config.model_type, bottleneck={opts.bottleneck}, "
                f'activation="{opts.activation}")')


def _num_layers(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)
