"""``head``: only the classification head trains (linear probing; FedPEFT's "Head-tuning").

Sun et al. 2022, FedPEFT: https://arxiv.org/abs/2210.01708
"""

from __future__ import annotations

from torch import nn

from fedpeft.methods.base import Method, freeze_all, unfreeze_head
from fedpeft.methods.registry import register
from fedpeft.models import ModelInfo


@register
class Head(Method):
    name = "head"
    paper = "https://arxiv.org/abs/2210.01708"
    causal_lm_refused = (
        "a causal LM has no task head: its output layer is the vocabulary projection (vocab x hidden, tied to "
        "the input embeddings in GPT-2 and many others), neither small nor task-specific; use lora, prompt, "
        "bias, adapter or layers")

    def prepare(self, model: nn.Module, info: ModelInfo) -> nn.Module:
        freeze_all(model)
        unfreeze_head(model, info)
        return model
