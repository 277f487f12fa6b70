"""Cut a prepared transformer into head / body / tail (split learning, SFPrompt).

SFPrompt (Cao, Zhu, Gong 2024, https://arxiv.org/abs/2407.17533) keeps on each client a *head*
(the embeddings, soft prompts included, and the first ``head_blocks`` transformer blocks) and a
*tail* (the last ``tail_blocks`` blocks and everything above the block stack: final norm, pooler,
classification head); the server keeps the frozen *body* in between.

How each part runs, for every family (BERT, ViT, GPT-2, LLaMA) alike
    The model's own forward pass is reused, as :mod:`fedpeft.federation.frozen` does, so masks,
    position ids and rotary embeddings are derived by the model itself, in one place:

    head
        ``model(**inputs)`` until block ``head_blocks`` is called: a forward pre-hook on it
        captures the hidden states it receives (``(B, L, H)``, prompts included) and every other
        argument it would get (:class:`BlockInputs`: the attention mask as the model prepared it,
        position ids, LLaMA's rotary ``(cos, sin)``...), then stops the pass. The outputs of the
        modules below the block stack (embeddings) are recorded for the tail.
    body
        Blocks ``head_blocks .. num_blocks - tail_blocks - 1`` called in turn on the hidden states
        with those same arguments (a KV cache is never passed: the body does not generate).
    tail
        ``model(**inputs)`` again, with blocks ``0 .. num_blocks - tail_blocks - 1`` replaced by
        stand-ins returning the given hidden states (:meth:`FrozenPrefix.feeding`) and the modules
        below the block stack replaying their recorded outputs (no patch convolution runs twice),
        so the tail blocks and the classifier see exactly what they would in the whole model and
        the model computes its own loss from ``labels``.

With no prompts, ``tail(body(head(x)))`` is the whole model's output (tests check it for every
family). The *shortcut* ``tail(head(x))`` skips the body (SFPrompt's pruning and local-loss phases).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedpeft.errors import ConfigError
from fedpeft.federation.frozen import FrozenPrefix, _Stop, prefix_modules
from fedpeft.models import Blocks

SPLIT_FAMILIES = ("bert", "vit", "gpt2", "llama")  # families whose split is tested


@dataclass
class BlockInputs:
    """What a block receives besides the hidden states, as the model's forward prepared it.

    ``args`` are the positional arguments after the hidden states (e.g. GPT-2's cache slot and
    causal mask), ``kwargs`` the keyword ones (``attention_mask``, ``position_ids``,
    ``position_embeddings = (cos, sin)``...). Cache objects are dropped (None).
    """

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class HeadOutput:
    """The head's result on a batch.

    Attributes
    ----------
    hidden : torch.Tensor
        ``(B, L, H)``: the hidden states entering block ``head_blocks`` (``L`` includes the soft
        prompts); carries the autograd graph back to the prompts.
    context : BlockInputs
        The other inputs of the blocks above the cut (the body and the tail blocks get the same).
    embedded : dict
        The outputs of the modules below the block stack, by module name, replayed by the tail.
    """

    hidden: torch.Tensor
    context: BlockInputs
    embedded: dict[str, Any]


def _plain(value: Any) -> Any:
    """``value`` without cache objects (a KV cache is never needed: nothing generates)."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return None  # a transformers Cache, or another stateful object


def check_cut(num_blocks: int, head_blocks: int, tail_blocks: int) -> None:
    """Raise ``ConfigError`` (naming the keys) unless the cut leaves at least one body block."""
    if head_blocks < 0:
        raise ConfigError(f"method.head_blocks: must be >= 0, got {head_blocks}")
    if tail_blocks < 0:
        raise ConfigError(f"method.tail_blocks: must be >= 0, got {tail_blocks}")
    if head_blocks + tail_blocks >= num_blocks:
        raise ConfigError(
            f"method.head_blocks = {head_blocks} + method.tail_blocks = {tail_blocks} leave no body block "
            f"on the server: the model has {num_blocks} transformer blocks (their sum must be at most "
            f"{num_blocks - 1})"
        )


class SplitModel:
    """A prepared model cut into head, body and tail (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The prepared model (possibly a ``peft`` wrapper); not copied: the three parts share it.
    blocks : Blocks
        Its block stack (:func:`fedpeft.models.transformer_blocks`).
    head_blocks, tail_blocks : int
        Blocks on the client below and above the body; the body keeps at least one.
    """

    def __init__(self, model: nn.Module, blocks: Blocks, head_blocks: int, tail_blocks: int) -> None:
        check_cut(len(blocks), head_blocks, tail_blocks)
        self.model, self.blocks = model, blocks
        self.head_blocks, self.tail_blocks = head_blocks, tail_blocks
        self.tail_start = len(blocks) - tail_blocks  # the first tail block
        self.body_blocks = list(blocks.modules[head_blocks : self.tail_start])
        self._feed = FrozenPrefix(model, blocks, self.tail_start)  # its stand-ins feed the tail
        below = prefix_modules(model, blocks, 0)  # the modules registered below the block stack
        ids = {id(m) for m in below}
        names = {id(m): n for n, m in model.named_modules()}
        parents = {n: n.rsplit(".", 1)[0] if "." in n else "" for n in names.values()}
        by_name = dict(model.named_modules())
        # the topmost of them (e.g. bert.embeddings, transformer.wte/wpe/drop): their outputs replay
        self.embedding_modules = {names[id(m)]: m for m in below
                                  if id(by_name.get(parents[names[id(m)]], model)) not in ids}

    def head(self, inputs: Mapping[str, torch.Tensor]) -> HeadOutput:
        """Run the head on model ``inputs`` (``labels`` are ignored: they stay with the tail)."""
        return self._run_until(inputs, self.head_blocks)

    def embedded(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Only what the tail replays (:attr:`HeadOutput.embedded`): the model's forward pass up to
        block 0. From the same random state it equals the head's (dropout draws in forward order,
        and this pass is the head's first part), so a client that kept no head output can feed its
        tail without running the head blocks again."""
        return self._run_until(inputs, 0).embedded

    def _run_until(self, inputs: Mapping[str, torch.Tensor], block: int) -> HeadOutput:
        """The model's forward pass on ``inputs`` stopped before block ``block``."""
        captured: dict[str, Any] = {}
        embedded: dict[str, Any] = {}

        def at_cut(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured["hidden"] = hidden
            captured["context"] = BlockInputs(_plain(tuple(args[1:])), {k: _plain(v) for k, v in kwargs.items()})
            raise _Stop

        def record(name: str):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                embedded[name] = output
            return hook

        handles = [m.register_forward_hook(record(n)) for n, m in self.embedding_modules.items()]
        handles.append(self.blocks.modules[block].register_forward_pre_hook(at_cut, with_kwargs=True))
        try:
            self.model(**{k: v for k, v in inputs.items() if k != "labels"})
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if "hidden" not in captured:
            raise RuntimeError(f"block {block} did not run in the model's forward pass")
        return HeadOutput(captured["hidden"], captured["context"], embedded)

    def body(self, hidden: torch.Tensor, context: BlockInputs) -> torch.Tensor:
        """The body blocks on ``hidden`` ``(B, L, H)``; returns ``(B, L, H)``."""
        for block in self.body_blocks:
            out = block(hidden, *context.args, **context.kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        return hidden

    def tail(self, hidden: torch.Tensor, inputs: Mapping[str, torch.Tensor], embedded: Mapping[str, Any]) -> Any:
        """The tail on ``hidden`` ``(B, L, H)`` (the body's output, or the head's for the shortcut):
        the model's output (``logits`` ``(B, C)``, and ``loss`` when ``inputs`` has ``labels``)."""
        with self._replaying(embedded), self._feed.feeding(hidden):
            return self.model(**inputs)

    def shortcut(self, inputs: Mapping[str, torch.Tensor]) -> Any:
        """``tail(head(x))``, the body skipped: the client's own model (pruning, local loss)."""
        out = self.head(inputs)
        return self.tail(out.hidden, inputs, out.embedded)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> Any:
        """``tail(body(head(x)))`` in one process (no protocol): the whole model, split."""
        out = self.head(inputs)
        return self.tail(self.body(out.hidden, out.context), inputs, out.embedded)

    @contextmanager
    def _replaying(self, embedded: Mapping[str, Any]) -> Iterator[None]:
        """Within the block, each module below the block stack returns its recorded output
        (detached: the tail's gradient reaches the head only through the hidden states)."""
        for name, module in self.embedding_modules.items():
            value = embedded[name]
            value = value.detach() if isinstance(value, torch.Tensor) else value
            module.forward = lambda *args, _value=value, **kwargs: _value
        try:
            yield
        finally:
            for module in self.embedding_modules.values():
                del module.forward
