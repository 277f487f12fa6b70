"""``bias``: BitFit, every bias term plus the head trains (Ben Zaken et al. 2022).

https://arxiv.org/abs/2106.10199 ; used federated in FedPEFT (https://arxiv.org/abs/2210.01708).
Models without biases (LLaMA-style) leave only the head trainable; as causal LMs (no head) they
have nothing to train, which is a :class:`~fedpeft.errors.ConfigError` when the model is prepared.
"""

from __future__ import annotations

from torch import nn

from fedpeft.errors import ConfigError
from fedpeft.methods.base import Method, freeze_all, trainable_names, unfreeze_head
from fedpeft.methods.registry import register
from fedpeft.models import ModelInfo


@register
class Bias(Method):
    name = "bias"
    paper = "https://arxiv.org/abs/2106.10199"
    causal_lm = "every bias (no head); refused for models without biases (LLaMA, Qwen3, Mistral: nothing would train)"

    def prepare(self, model: nn.Module, info: ModelInfo) -> nn.Module:
        freeze_all(model)
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                p.requires_grad_(True)
        unfreeze_head(model, info)
        if not trainable_names(model):
            raise ConfigError(f"method.name: 'bias' on {type(model).__name__} ({info.family}): the model has no bias "
                              "parameters and no classification head, so nothing would train; use lora or prompt")
        return model
