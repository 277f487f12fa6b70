"""The body-server protocol of split training (SFPrompt), independent of any transport.

SFPrompt (Cao, Zhu, Gong 2024, https://arxiv.org/abs/2407.17533): the server holds the frozen body
of the model; a client sends it the head's activations and gets the body's output back, then
sends the gradient at the body's output and gets the gradient at the cut back, which its head
(the soft prompts) needs. The server computes no parameter gradient: the body stays frozen.

Messages are named tensors plus a small JSON-able ``meta`` (:class:`Message`), so a transport
(a later part: Flower messages) only serializes ``tensors`` and ``meta``. Every exchange is keyed
by a request id (one per batch) that the client chooses:

======================  =====================================================  ================
call                    client -> server (up)                                  server -> client
======================  =====================================================  ================
``forward(id, msg)``    ``hidden`` ``(B, L, H)``; ``context.*``: the block     ``hidden``
                        inputs (masks, position ids, rotary ``cos``/``sin``)   ``(B, L, H)``
``backward(id, msg)``   ``grad`` ``(B, L, H)``: d loss / d body output         ``grad``
                                                                               ``(B, L, H)``
``release(id)``         nothing (the server drops the request's graph)         nothing
======================  =====================================================  ================

:class:`InProcessBodyServer` calls the body directly and counts every tensor that crosses
(:class:`Traffic`: payload bytes, ``numel * element_size``; names and ``meta`` are framing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedpeft.split.model import BlockInputs, SplitModel


@dataclass
class Message:
    """One message: named tensors and JSON-able metadata (what a transport would serialize)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Tensor payload bytes (``sum(numel * element_size)``)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _flatten(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as a JSON-able spec; its tensors go into ``tensors`` under dotted names."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value
        return {"tensor": name}
    if isinstance(value, (tuple, list)):
        return {"seq": [_flatten(v, f"{name}.{i}", tensors) for i, v in enumerate(value)],
                "tuple": isinstance(value, tuple)}
    return {"value": value}  # None, bool, int, float, str


def _unflatten(spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in spec:
        return tensors[spec["tensor"]]
    if "seq" in spec:
        items = [_unflatten(s, tensors) for s in spec["seq"]]
        return tuple(items) if spec["tuple"] else items
    return spec["value"]


def forward_message(hidden: torch.Tensor, context: BlockInputs) -> Message:
    """The client's forward request: ``hidden`` ``(B, L, H)`` (detached) and the block inputs as
    ``context.args.<i>`` / ``context.kwargs.<name>[.<j>]`` tensors, their structure in ``meta``."""
    tensors = {"hidden": hidden.detach()}
    ctx: dict[str, torch.Tensor] = {}
    spec = {"args": [_flatten(v, f"context.args.{i}", ctx) for i, v in enumerate(context.args)],
            "kwargs": {k: _flatten(v, f"context.kwargs.{k}", ctx) for k, v in context.kwargs.items()}}
    tensors.update({k: v.detach() for k, v in ctx.items()})
    return Message(tensors, {"context": spec})


def context_of(message: Message) -> BlockInputs:
    """The :class:`BlockInputs` a forward request carries (inverse of :func:`forward_message`)."""
    spec = message.meta["context"]
    return BlockInputs(tuple(_unflatten(s, message.tensors) for s in spec["args"]),
                       {k: _unflatten(s, message.tensors) for k, s in spec["kwargs"].items()})


class BodyServer(Protocol):
    """What a client needs from the server that holds the body (any transport)."""

    def forward(self, request: str, message: Message) -> Message:
        """Body output ``{"hidden": (B, L, H)}`` for a :func:`forward_message`; keeps what the
        backward of ``request`` needs."""
        ...

    def backward(self, request: str, message: Message) -> Message:
        """``{"grad": d loss / d hidden_at_cut (B, L, H)}`` for ``{"grad": d loss / d body output}``;
        ends ``request``."""
        ...

    def release(self, request: str) -> None:
        """Forget ``request`` without a backward (forward-only use)."""
        ...


@dataclass
class Traffic:
    """Tensor payload bytes that crossed between a client and the body server, by kind.

    ``up`` (client -> server) = ``hidden_up + context_up + grad_up``; ``down`` (server -> client)
    = ``hidden_down + grad_down``.
    """

    hidden_up: int = 0  # head outputs (activations at the cut)
    context_up: int = 0  # the block inputs sent with them (attention mask, position ids, rotary)
    grad_up: int = 0  # gradients at the body's output
    hidden_down: int = 0  # body outputs
    grad_down: int = 0  # gradients at the cut

    @property
    def up(self) -> int:
        return self.hidden_up + self.context_up + self.grad_up

    @property
    def down(self) -> int:
        return self.hidden_down + self.grad_down


class InProcessBodyServer:
    """A :class:`BodyServer` calling the body of ``split`` in this process.

    The body runs in eval mode (frozen, no dropout) with gradients enabled only with respect to
    its input: the backward propagates through it to the cut and gives no parameter any
    gradient. Counts the payload of every message (:attr:`traffic`) and the body's FLOPs
    (:attr:`flops`, forward + backward, by :class:`~torch.utils.flop_counter.FlopCounterMode`).
    """

    def __init__(self, split: SplitModel) -> None:
        self.split = split
        self.traffic = Traffic()
        self.flops = 0
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # request -> (input leaf, output)

    def reset_counters(self) -> None:
        self.traffic, self.flops = Traffic(), 0

    def forward(self, request: str, message: Message) -> Message:
        from torch.utils.flop_counter import FlopCounterMode

        if request in self._pending:
            raise ValueError(f"request {request!r} is already pending")
        hidden = message.tensors["hidden"]
        self.traffic.hidden_up += hidden.numel() * hidden.element_size()
        self.traffic.context_up += message.nbytes() - hidden.numel() * hidden.element_size()
        leaf = hidden.detach().requires_grad_(True)  # (B, L, H)
        for block in self.split.body_blocks:
            block.eval()
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            out = self.split.body(leaf, context_of(message))  # (B, L, H)
        self.flops += int(counter.get_total_flops())
        self._pending[request] = (leaf, out)
        reply = Message({"hidden": out.detach()})
        self.traffic.hidden_down += reply.nbytes()
        return reply

    def backward(self, request: str, message: Message) -> Message:
        from torch.utils.flop_counter import FlopCounterMode

        try:
            leaf, out = self._pending.pop(request)
        except KeyError:
            raise ValueError(f"no pending forward for request {request!r}") from None
        grad = message.tensors["grad"]  # (B, L, H)
        self.traffic.grad_up += message.nbytes()
        with FlopCounterMode(display=False) as counter:
            (grad_in,) = torch.autograd.grad(out, leaf, grad)  # only w.r.t. the input: body frozen
        self.flops += int(counter.get_total_flops())
        reply = Message({"grad": grad_in})
        self.traffic.grad_down += reply.nbytes()
        return reply

    def release(self, request: str) -> None:
        self._pending.pop(request, None)
