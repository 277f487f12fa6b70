"""Fine-tuning methods, one module each, registered by name.

=========  ==========================================================  =======================
name       trains (and exchanges)                                      module
=========  ==========================================================  =======================
full       every parameter (plain FedAvg baseline)                      :mod:`.full`
head       the classification head only                                 :mod:`.head`
bias       every bias + head (BitFit)                                   :mod:`.bias`
adapter    a bottleneck adapter after each block's FFN + head           :mod:`.adapter`
lora       LoRA matrices (via ``peft``) + head                          :mod:`.lora`
prompt     soft prompt tokens (``peft`` for text, own for ViT) + head   :mod:`.prompt`
layers     the last k blocks + what sits above them (CAFF)              :mod:`.layers`
sfprompt   soft prompts + tail blocks; the body on a server (split)    :mod:`.sfprompt`
=========  ==========================================================  =======================
"""

from fedpeft.methods import adapter, bias, full, head, layers, lora, prompt, sfprompt  # noqa: F401  (registers them)
from fedpeft.methods.base import Method, NamedArrays, get_state, set_state, trainable_names
from fedpeft.methods.registry import build_method, get_method_class, method_names, register

__all__ = [
    "Method",
    "NamedArrays",
    "build_method",
    "get_method_class",
    "get_state",
    "method_names",
    "register",
    "set_state",
    "trainable_names",
]
