"""``sfprompt``: split federated prompt tuning (SFPrompt, Cao, Zhu, Gong 2024).

https://arxiv.org/abs/2407.17533 . Each client keeps a head (embeddings + soft prompts + the first
``head_blocks`` blocks) and a tail (the last ``tail_blocks`` blocks + what sits above the block
stack: final norm, pooler, classifier); the server keeps the frozen body. Clients train the
prompts and the tail, which are exchanged and averaged by the strategy (FedAvg); raw data and
labels never leave the client. The prompts are those of ``prompt`` (:mod:`fedpeft.methods.prompt`:
peft prompt tuning for text, VPT-shallow for ViT); the round a client runs (pruning, local loss,
split training) is :class:`fedpeft.split.trainer.SplitTrainer`, selected by :meth:`make_trainer`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpeft.errors import ConfigError
from fedpeft.federation.costs import TrainingFlops
from fedpeft.methods.base import Method, NamedArrays
from fedpeft.methods.layers import above_block_names
from fedpeft.methods.prompt import Prompt, PromptOptions
from fedpeft.methods.registry import register
from fedpeft.models import ModelInfo, transformer_blocks
from fedpeft.split.model import SPLIT_FAMILIES, SplitModel, check_cut


@dataclass
class SFPromptOptions:
    """Options of ``method.name = "sfprompt"``.

    Attributes
    ----------
    head_blocks : int
        Transformer blocks in the client's head (above the embeddings), ``>= 0``.
    tail_blocks : int
        Transformer blocks in the client's tail (below the final norm / pooler / classifier),
        ``>= 0``; ``head_blocks + tail_blocks`` must leave at least one block to the server
        (checked against the model when it is prepared).
    num_prompt_tokens : int
        Soft prompt tokens at the head's input.
    prune : bool
        EL2N pruning of the client's rows before training.
    prune_keep : float
        The share of rows pruning keeps, in ``(0, 1]``: ``ceil(prune_keep * n)``.
    local_loss : bool
        The local-loss update (prompts + tail through the head -> tail shortcut) before split training.
    local_loss_steps : int
        Optimizer steps of the local-loss update, ``>= 0``.
    """

    head_blocks: int = 1
    tail_blocks: int = 1
    num_prompt_tokens: int = 10
    prune: bool = True
    prune_keep: float = 0.5
    local_loss: bool = True
    local_loss_steps: int = 5

    def validate(self) -> None:
        if self.head_blocks < 0:
            raise ConfigError(f"method.head_blocks: must be >= 0, got {self.head_blocks}")
        if self.tail_blocks < 0:
            raise ConfigError(f"method.tail_blocks: must be >= 0, got {self.tail_blocks}")
        if self.num_prompt_tokens < 1:
            raise ConfigError(f"method.num_prompt_tokens: must be >= 1, got {self.num_prompt_tokens}")
        if not 0 < self.prune_keep <= 1:
            raise ConfigError(f"method.prune_keep: must be in (0, 1], got {self.prune_keep}")
        if self.local_loss_steps < 0:
            raise ConfigError(f"method.local_loss_steps: must be >= 0, got {self.local_loss_steps}")


def full_training_flops(model: nn.Module, info: ModelInfo) -> TrainingFlops:
    """Full fine-tuning's training FLOPs of a batch (:class:`TrainingFlops`) for ``model`` as loaded
    (no prompts, unsplit), fitted now on synthetic one-row batches with every parameter trainable
    (the flags are restored after). Only a model that breaks the exact form (measured at each new
    length) keeps a copy of itself for later batches."""
    config = model.config
    if info.modality == "image":
        size = config.image_size
        batch = {"pixel_values": torch.zeros(1, config.num_channels, size, size)}
    else:
        token = (int(getattr(config, "pad_token_id", None) or 0) + 1) % config.vocab_size  # not the pad id
        batch = {"input_ids": torch.full((1, 4), token), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
        if getattr(config, "type_vocab_size", 0):
            batch["token_type_ids"] = torch.zeros(1, 4, dtype=torch.long)
    batch["labels"] = torch.zeros(1, dtype=torch.long)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        model.train()
        flops = TrainingFlops(model)
        flops(batch)  # fits the coefficients now
        if flops._coeffs is None:  # the form broke: later lengths need this model as loaded
            flops.model = copy.deepcopy(model)
        else:
            flops.model = None
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return flops


TAIL_FILE = "tail.safetensors"  # text export: the trained tail + above-block modules, plain names


@register
class SFPrompt(Method):
    """Split federated prompt tuning: prompts + tail on the client, the frozen body on the server.

    Paper: https://arxiv.org/abs/2407.17533 .
    """

    name = "sfprompt"
    paper = "https://arxiv.org/abs/2407.17533"
    causal_lm_refused = ("its split protocol and EL2N pruning are built on one label per row (a classifier's "
                         "logits); not built for causal-lm yet: use prompt for soft prompts")
    Options = SFPromptOptions

    def prepare(self, model: nn.Module, info: ModelInfo) -> nn.Module:
        opts = self.options
        if info.family not in SPLIT_FAMILIES:
            raise ConfigError(f"method.name: 'sfprompt' splits {', '.join(SPLIT_FAMILIES)} models; "
                              f"{info.family!r} is not supported")
        check_cut(info.num_layers, opts.head_blocks, opts.tail_blocks)
        self.full_flops = full_training_flops(model, info)
        prepared = Prompt(PromptOptions(num_virtual_tokens=opts.num_prompt_tokens)).prepare(model, info)
        blocks = transformer_blocks(prepared, info.num_layers)
        tail_start = info.num_layers - opts.tail_blocks
        above = set(above_block_names(prepared, blocks))
        for name, param in prepared.named_parameters():
            index = blocks.index_of(name)
            in_tail = index is not None and index >= tail_start
            # above the blocks: pooler, final norm (the head is Prompt's; peft's frozen original stays)
            if in_tail or (name in above and ".original_module." not in name
                           and not any(part in info.head_names for part in name.split("."))):
                param.requires_grad_(True)
        self.split = SplitModel(prepared, blocks, opts.head_blocks, opts.tail_blocks)
        return prepared

    def make_trainer(self, model: nn.Module, names: list[str], train, cfg, seed: int, blocks=None,
                     frozen_cache_mb: float = 0.0):
        """A :class:`~fedpeft.split.trainer.SplitTrainer` on the model cut by :meth:`prepare`
        (``blocks`` and ``frozen_cache_mb`` do not apply: nothing frozen runs on the client twice)."""
        from fedpeft.split.trainer import SplitTrainer

        return SplitTrainer(model, names, train, cfg, seed, self.split, self.options, self.full_flops)

    def save_pretrained(self, model: nn.Module, directory: Path, state: NamedArrays) -> None:
        """What plain ``transformers`` (+ ``peft``) load: the global model is the prompts, the tail
        blocks and the modules above them (pooler, final norm, head) over the frozen body.

        Text (peft prompt tuning): a peft adapter folder (the prompts; the head as peft's module
        to save) and :data:`TAIL_FILE`, the tail blocks and the modules above them under their
        plain ``transformers`` names, loaded into the base model before the adapter wraps it.
        ViT: ``exchanged.safetensors`` (names as in the model), loaded after
        :func:`~fedpeft.methods.prompt.add_visual_prompt` (:meth:`rebuild_code`).
        """
        if not hasattr(model, "peft_config"):
            Method.save_pretrained(self, model, directory, state)
            return
        from safetensors.numpy import save_file

        from fedpeft.methods.lora import save_peft_folder

        save_peft_folder(model, directory, state)
        plain = {n for n, _ in model.get_base_model().named_parameters()
                 if ".modules_to_save." not in n and ".original_module." not in n}
        tail = {n.removeprefix("base_model."): v for n, v in state.items() if n.removeprefix("base_model.") in plain}
        in_adapter = [n for n in state if n.startswith("prompt_encoder.") or ".modules_to_save." in n]
        left = sorted(set(state) - set(in_adapter) - {f"base_model.{n}" for n in tail})
        if left:  # every exchanged tensor is in the export, or it says which is not
            raise ValueError(f"sfprompt export: no place for {', '.join(left[:5])}")
        save_file({k: np.ascontiguousarray(v) for k, v in tail.items()}, directory / TAIL_FILE)

    def rebuild_code(self, model: nn.Module) -> str | None:
        """ViT: :func:`~fedpeft.methods.prompt.add_visual_prompt` with this run's prompt tokens;
        text (a peft adapter folder): None."""
        if hasattr(model, "peft_config"):
            return None
        return ("from fedpeft.methods.prompt import add_visual_prompt\n\n"
                f"add_visual_prompt(model, num_virtual_tokens={self.options.num_prompt_tokens})")
