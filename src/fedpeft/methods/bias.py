"""``bias``: BitFit, every bias term plus the head trains (Ben Zaken et al. 2022).

https://arxiv.org/abs/2106.10199 ; used federated in FedPEFT (https://arxiv.org/abs/2210.01708).
Models without biases (LLaMA-style) leave only the head trainable.
"""

from __future__ import annotations

from torch import nn

from fedpeft.methods.base import Method, freeze_all, unfreeze_head
from fedpeft.methods.registry import register
from fedpeft.models import ModelInfo


@register
class Bias(Method):
    name = "bias"
    paper = "https://arxiv.org/abs/2106.10199"

    def prepare(self, model: nn.Module, info: ModelInfo) -> nn.Module:
        freeze_all(model)
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                p.requires_grad_(True)
        unfreeze_head(model, info)
        return model
