"""``full``: every parameter trains and is exchanged (plain FedAvg, McMahan et al. 2017).

The baseline the PEFT methods are measured against: https://arxiv.org/abs/1602.05629
"""

from __future__ import annotations

from torch import nn

from fedpeft.methods.base import Method
from fedpeft.methods.registry import register
from fedpeft.models import ModelInfo


@register
class Full(Method):
    name = "full"
    paper = "https://arxiv.org/abs/1602.05629"
    causal_lm = "every parameter, the language-model head (tied to the input embeddings in GPT-2) included"

    def prepare(self, model: nn.Module, info: ModelInfo) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
