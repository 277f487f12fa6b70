"""The interface every fine-tuning method implements, and named-state helpers.

A method answers two questions about a model: which parameters train, and which are sent to
the server. Everything the federation exchanges is a *named state*: a ``dict`` from parameter
name (as in ``model.named_parameters()`` of the prepared model) to a NumPy array. Never a
positional list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedpeft.models import ModelInfo

NamedArrays = dict[str, np.ndarray]


@dataclass
class NoOptions:
    """For methods without options."""


class Method:
    """A fine-tuning method: prepares a model so that exactly its parameters train.

    Subclasses set ``name`` (the registry key), ``Options`` (a dataclass of the method's config
    keys, validated by :mod:`fedpeft.config`), ``paper`` (a link), and implement :meth:`prepare`.
    Every method says what it does for ``task.kind = "causal-lm"``: ``causal_lm`` (what trains
    there) or ``causal_lm_refused`` (why it refuses that task: a ``ConfigError`` when the config is
    built, naming ``method.name``).
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    paper: ClassVar[str] = ""
    causal_lm: ClassVar[str] = ""  # task.kind = "causal-lm": what trains (and is exchanged) there
    causal_lm_refused: ClassVar[str | None] = None  # or: why the method refuses causal-lm

    def __init__(self, options: object | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def prepare(self, model: nn.Module, info: ModelInfo) -> nn.Module:
        """Freeze/augment ``model`` in place and return the module to train and evaluate.

        The returned module may be a wrapper (e.g. a ``peft.PeftModel``). After this call,
        ``requires_grad`` is True for exactly the method's trainable parameters; the
        classification head always trains (a causal LM has none: ``info.head_names`` is empty).
        """
        raise NotImplementedError

    def exchanged_names(self, model: nn.Module) -> list[str]:
        """Names of the parameters sent between clients and server (default: the trainable ones)."""
        return trainable_names(model)

    def assignment(self, model: nn.Module, num_clients: int) -> Any:
        """Which exchanged names each client trains and sends
        (:class:`~fedpeft.federation.assignment.Assignment`), or None (the default): every client
        trains every exchanged name. Called after :meth:`prepare` on the prepared model."""
        return None

    def residual_fold(self, model: nn.Module) -> Any:
        """A server-side fold that changes frozen weights after aggregation (FedEx-LoRA's
        :class:`~fedpeft.federation.fedex.FedExLoRA`), or None (the default): the global state is
        then exactly the exchanged part."""
        return None

    def make_trainer(self, model: nn.Module, names: list[str], train: Any, cfg: Any, seed: int,
                     blocks: Any = None, frozen_cache_mb: float = 0.0) -> Any:
        """The client trainer runtimes call (``fit`` -> ``ClientResult``) for the prepared ``model``:
        the default :class:`~fedpeft.federation.client.ClientTrainer`; a method with its own client
        round (``sfprompt``'s split training) returns its own."""
        from fedpeft.federation.client import ClientTrainer

        return ClientTrainer(model, names, train, cfg, seed, blocks, frozen_cache_mb)

    def save_pretrained(self, model: nn.Module, directory: Path, state: NamedArrays) -> None:
        """Write the trainable part so that plain ``transformers``/``peft`` can load it.

        The default writes ``exchanged.safetensors`` (the named state); methods wrapping a
        ``peft`` model write a peft adapter folder instead.
        """
        from safetensors.numpy import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, directory / "exchanged.safetensors")

    def rebuild_code(self, model: nn.Module) -> str | None:
        """Python that adds this method's own modules to a plain ``transformers`` model.

        The model card of an export (:mod:`fedpeft.export`) shows these lines: they run on
        ``model``, the base model loaded with plain ``transformers``, before
        ``exchanged.safetensors`` is loaded into it.

        Returns
        -------
        str or None
            The lines, or None (the default) when the plain model already has every saved
            parameter.
        """
        return None


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze_head(model: nn.Module, info: ModelInfo) -> None:
    for head in info.head_names:
        for p in getattr(model, head).parameters():
            p.requires_grad_(True)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_state(model: nn.Module, names: list[str]) -> NamedArrays:
    """Copy the named parameters out of ``model`` as float arrays (a snapshot, not a view);
    bfloat16 parameters (``model.dtype``) as float32, exactly (NumPy has no bfloat16)."""
    params = dict(model.named_parameters())
    return {n: _array(params[n]) for n in names}


def _array(param: torch.Tensor) -> np.ndarray:
    value = param.detach().cpu()
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy().copy()


@torch.no_grad()
def set_state(model: nn.Module, state: NamedArrays) -> None:
    """Copy ``state`` into the model's parameters of the same names (shapes must match)."""
    params = dict(model.named_parameters())
    for name, value in state.items():
        param = params[name]
        param.copy_(torch.from_numpy(np.asarray(value)).to(param.dtype))
