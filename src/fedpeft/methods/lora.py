"""``lora``: low-rank adapters on the attention projections (via ``peft``), plus the head.

Hu et al. 2021, *LoRA: Low-Rank Adaptation of Large Language Models*,
https://arxiv.org/abs/2106.09685 ; used federated in FedPEFT (https://arxiv.org/abs/2210.01708).

:meth:`Lora.prepare` returns a ``peft.PeftModel``; parameter names are therefore prefixed with
``base_model.model.``. The exchanged (trainable) parameters are

- ``base_model.model.<path>.<target>.lora_A.default.weight`` and ``...lora_B.default.weight``
  (``lora_B`` is zero-initialised by peft, so the prepared model equals the pre-trained one);
  with ``freeze_a`` (FFA-LoRA) only ``lora_B``;
- ``base_model.model.<head>.modules_to_save.default.{weight,bias}``: peft's trainable copy of the
  head (``<head>`` is ``classifier`` or ``score``). The original head,
  ``<head>.original_module.*``, stays frozen and is not exchanged.

The saved ``model/`` folder is a regular peft adapter folder: ``PeftModel.from_pretrained(base,
folder)`` loads it into a plain ``transformers`` model with the same number of labels.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fedpeft.errors import ConfigError
from fedpeft.federation.fedex import AdaptedLayer, FedExLoRA
from fedpeft.methods.base import NamedArrays, Method, set_state, trainable_names
from fedpeft.methods.registry import register
from fedpeft.models import ModelInfo

# Fallback targets for families peft has no default for (e.g. ViT): the attention query and
# value projections, as in the LoRA paper, under the names transformers uses for them.
FALLBACK_TARGETS = (["query", "value"], ["q_proj", "v_proj"])
PEFT_HEAD_NAMES = ("classifier", "score")  # peft adds these itself for SEQ_CLS
AGGREGATIONS = ("fedavg", "fedex")


@dataclass
class LoraOptions:
    """Options of ``method.name = "lora"``.

    Attributes
    ----------
    r : int
        Rank of the update ``B @ A``.
    alpha : int
        Scaling numerator: the update is multiplied by ``alpha / r`` (peft's ``lora_alpha``).
    dropout : float
        Dropout on the LoRA branch input (peft's ``lora_dropout``).
    target_modules : list of str, optional
        Module-name suffixes to adapt; default: peft's mapping for the model type, else the
        attention query/value projections.
    freeze_a : bool
        FFA-LoRA (Sun et al., ICLR 2024, https://arxiv.org/abs/2403.12313): every ``lora_A``
        stays at its initialisation, which every client and the server draw alike from
        ``runtime.seed``; only ``lora_B`` (and the head) trains and is sent. The average of the
        clients' ``B_i A`` is then exactly ``mean(B_i) A``, and the upload is about half.
    aggregation : str
        ``"fedavg"``: average ``A`` and ``B`` separately (not the average of the products
        ``B_i A_i``). ``"fedex"``: FedEx-LoRA (Singhal et al., ACL 2025,
        https://arxiv.org/abs/2410.09432): the same averages, plus the residual
        ``mean(B_i A_i) - mean(B) mean(A)`` folded into every client's frozen base weight, so the
        aggregate is exact (:mod:`fedpeft.federation.fedex`); the download grows by the residual's
        low-rank factors. Needs ``federation.server_optimizer = "fedavg"`` with ``server_lr`` 1.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    freeze_a: bool = False
    aggregation: str = "fedavg"

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"method.r: must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"method.alpha: must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout: must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("method.target_modules: must not be empty (omit it for the default)")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"method.aggregation: unknown {self.aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
        if self.aggregation == "fedex" and self.freeze_a:
            raise ConfigError(
                'method.aggregation = "fedex" with method.freeze_a = true: with A frozen the average is '
                "already exact (the residual is 0); use one of them"
            )


def default_target_modules(model: nn.Module, family: str) -> list[str]:
    """peft's default LoRA targets for ``family``, else query/value projections found in ``model``.

    Raises
    ------
    ConfigError
        When neither peft nor the fallback knows targets that exist in ``model``.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    candidates = [MAPPING[family]] if isinstance(MAPPING.get(family), list) else []
    for targets in candidates + list(FALLBACK_TARGETS):
        if all(t in leaf_names for t in targets):
            return list(targets)
    raise ConfigError(
        f"method.target_modules: no default LoRA targets are known for model type {family!r}; "
        "set method.target_modules, e.g. [\"q_proj\", \"v_proj\"]"
    )


def peft_task_type(info: ModelInfo) -> str | None:
    """``SEQ_CLS`` for text classifiers, ``CAUSAL_LM`` for causal LMs; None (a plain ``PeftModel``)
    for image classifiers."""
    if info.task == "causal-lm":
        return "CAUSAL_LM"
    return "SEQ_CLS" if info.modality == "text" else None


def peft_modules_to_save(info: ModelInfo) -> list[str] | None:
    """The head modules peft must train and save (it adds classifier/score itself for SEQ_CLS)."""
    if info.modality == "text":
        extra = [h for h in info.head_names if h not in PEFT_HEAD_NAMES]
        return extra or None
    return list(info.head_names)


def dedupe_modules_to_save(peft_model: nn.Module) -> None:
    """peft 0.21 lists classifier/score twice in ``modules_to_save``; keep the saved config tidy."""
    for config in peft_model.peft_config.values():
        if getattr(config, "modules_to_save", None):
            config.modules_to_save = list(dict.fromkeys(config.modules_to_save))


def save_peft_folder(model: nn.Module, directory: Path, state: NamedArrays) -> None:
    """Load ``state`` into the peft ``model`` and write a peft adapter folder to ``directory``."""
    set_state(model, state)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence a deprecation warning peft 0.21 triggers in transformers 5 on every wrap."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def _targets_conv1d(model: nn.Module, targets: list[str]) -> bool:
    """True when a target is a GPT-2 style ``Conv1D`` (weights stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    return any(
        isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in targets for name, m in model.named_modules()
    )


@register
class Lora(Method):
    """LoRA on the attention projections (``peft``) plus the classification head.

    Paper: https://arxiv.org/abs/2106.09685 .
    """

    name = "lora"
    paper = "https://arxiv.org/abs/2106.09685"
    Options = LoraOptions
    causal_lm = "LoRA matrices on the attention projections (peft task CAUSAL_LM; no head)"

    def prepare(self, model: nn.Module, info: ModelInfo) -> nn.Module:
        from peft import LoraConfig

        opts = self.options
        targets = list(opts.target_modules or default_target_modules(model, info.family))
        leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in leaf_names and "." not in t]
        if missing:
            raise ConfigError(f"method.target_modules: {type(model).__name__} has no module named {missing}")
        config = LoraConfig(
            task_type=peft_task_type(info),
            r=opts.r,
            lora_alpha=opts.alpha,
            lora_dropout=opts.dropout,
            target_modules=targets,
            modules_to_save=peft_modules_to_save(info),
            fan_in_fan_out=_targets_conv1d(model, targets),
        )
        peft_model = wrap_with_peft(model, config, info)
        if opts.freeze_a:  # FFA-LoRA: A is the shared seeded init, never trained nor sent
            for name, param in peft_model.named_parameters():
                if ".lora_A." in name:
                    param.requires_grad_(False)
        return peft_model

    def residual_fold(self, model: nn.Module) -> FedExLoRA | None:
        """FedEx-LoRA's server side over every adapted layer of ``model`` (None for ``fedavg``)."""
        if self.options.aggregation != "fedex":
            return None
        from peft.tuners.lora import LoraLayer

        layers = [
            AdaptedLayer(f"{name}.base_layer.weight", f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight",
                         float(module.scaling["default"]), bool(module.fan_in_fan_out))
            for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and "default" in module.lora_A
        ]
        return FedExLoRA(layers, self.options.r)

    def save_pretrained(self, model: nn.Module, directory: Path, state: NamedArrays) -> None:
        """Load ``state`` into ``model``, then write a peft adapter folder (``PeftModel.from_pretrained``).

        With FedEx-LoRA the base weights differ from the pre-trained ones, so the adapter is merged
        into a copy of the model and the folder is a plain ``transformers`` model instead.
        """
        if self.options.aggregation == "fedex":
            set_state(model, state)
            directory.mkdir(parents=True, exist_ok=True)
            with quiet_peft():
                merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(str(directory))
            return
        save_peft_folder(model, directory, state)


def wrap_with_peft(model: nn.Module, config: object, info: ModelInfo) -> nn.Module:
    """``get_peft_model`` plus fedpeft's checks: the head's trainable copy must train."""
    from peft import get_peft_model

    with quiet_peft():
        peft_model = get_peft_model(model, config)
    dedupe_modules_to_save(peft_model)
    check_head_trains(peft_model, info)
    return peft_model


def check_head_trains(peft_model: nn.Module, info: ModelInfo) -> None:
    """Guard against a peft change: the head's trainable copy must exist and train."""
    names = trainable_names(peft_model)
    for head in info.head_names:
        if not any(f"{head}.modules_to_save." in n for n in names):
            raise RuntimeError(f"peft did not make the head {head!r} trainable (modules_to_save)")
