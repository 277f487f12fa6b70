"""``layers``: each client trains only the last transformer blocks (CAFF, Pfeiffer et al. 2024).

Pfeiffer, Khalili, Henkel, Boehm, Rapp, *Efficient Federated Finetuning of Tiny Transformers with
Resource-Constrained Devices*, 2024, https://arxiv.org/abs/2411.07826 . A device trains the last
``k`` blocks of the pre-trained transformer and everything above them (final norm, pooler,
classification head); the embeddings and the blocks below stay frozen, build no autograd graph
and keep no activations for backward, so memory and backward FLOPs fall with ``k``. The server
averages each parameter over the clients that trained it (weighted by samples) and a block nobody
trained keeps its global value (:class:`~fedpeft.federation.strategy.RoundAggregation`).

The prepared model trains, and the federation exchanges, the union any client may train: the last
``k`` blocks (``method.k``; all blocks when unset) and the *above-block* parameters, i.e. those
registered after the block stack (``bert.pooler``, ``vit.layernorm``, GPT-2 ``transformer.ln_f``,
LLaMA ``model.norm``, and the head). Each client is assigned the names of its own last ``k_i``
blocks plus the above-block parameters (:meth:`Layers.assignment`): it trains and uploads only
those, and downloads the whole exchanged state (its forward pass runs through every block).

Without ``[budgets]`` every client has ``k_i = method.k``. With it, ``k_i`` is the deepest suffix
that fits client ``i``'s device profile (memory, FLOPs and upload per round), decided once per run
by :func:`fedpeft.budgets.clients.plan_clients` and handed to :meth:`Layers.assignment`; a client
whom not even ``k = 0`` fits is infeasible and never trains.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedpeft.errors import ConfigError
from fedpeft.federation.assignment import Assignment
from fedpeft.methods.base import Method, freeze_all
from fedpeft.methods.registry import register
from fedpeft.models import ModelInfo, above_block_names, transformer_blocks


@dataclass
class LayersOptions:
    """Options of ``method.name = "layers"``.

    Attributes
    ----------
    k : int, optional
        How many of the last transformer blocks a client trains, from 0 (only what sits above the
        blocks: final norm, pooler, head) to the model's number of blocks; unset: every block.
        Checked against the model when it is prepared.
    """

    k: int | None = None

    def validate(self) -> None:
        if self.k is not None and self.k < 0:
            raise ConfigError(f"method.k: must be >= 0 (0 trains only what sits above the blocks), got {self.k}")


@register
class Layers(Method):
    """The last ``k`` transformer blocks plus what sits above them (CAFF).

    Paper: https://arxiv.org/abs/2411.07826 .
    """

    name = "layers"
    paper = "https://arxiv.org/abs/2411.07826"
    causal_lm = ("the last k blocks + what is registered above them: the final norm, and the LM head when it is "
                 "not tied to the input embeddings (LLaMA; GPT-2's tied head stays frozen with the embeddings)")
    Options = LayersOptions

    def depth(self, info: ModelInfo) -> int:
        """``method.k`` checked against the model (every block when unset).

        Raises
        ------
        ConfigError
            When ``method.k`` is above the model's number of blocks.
        """
        k = self.options.k
        if k is None:
            return info.num_layers
        if k > info.num_layers:
            raise ConfigError(f"method.k: the model has {info.num_layers} transformer blocks, got k = {k}")
        return k

    def prepare(self, model: nn.Module, info: ModelInfo) -> nn.Module:
        k = self.depth(info)
        self._blocks, self._num_blocks, self._k = transformer_blocks(model, info.num_layers), info.num_layers, k
        freeze_all(model)
        params = dict(model.named_parameters())
        for name in self.names_for_depth(model, k):
            params[name].requires_grad_(True)
        return model

    def names_for_depth(self, model: nn.Module, k: int) -> list[str]:
        """The names a client of depth ``k`` trains, in the model's order: its last ``k`` blocks'
        parameters and the above-block ones."""
        blocks = self._blocks
        lowest = len(blocks) - k
        above = set(above_block_names(model, blocks))
        return [n for n, _ in model.named_parameters()
                if n in above or (blocks.index_of(n) is not None and blocks.index_of(n) >= lowest)]

    def assignment(self, model: nn.Module, num_clients: int, depths: list[int] | None = None) -> Assignment | None:
        """Each client's names from its depth ``k_i``; None when every client trains the whole
        exchanged part (each depth is ``method.k``).

        Parameters
        ----------
        model : nn.Module
            The prepared model.
        num_clients : int
            ``partition.num_clients``.
        depths : list of int, optional
            ``k_i`` per client, from the client budgets
            (:func:`fedpeft.budgets.clients.plan_clients`: the deepest suffix that fits each
            client's profile); default ``method.k`` for every client (no ``[budgets]``).

        Raises
        ------
        ConfigError
            When a depth is outside ``0..k``, naming the client.
        """
        k = self._k
        depths = [k] * num_clients if depths is None else list(depths)
        if len(depths) != num_clients:
            raise ConfigError(f"method.k: {len(depths)} client depths for partition.num_clients = {num_clients}")
        bad = {c: d for c, d in enumerate(depths) if not 0 <= d <= k}
        if bad:
            raise ConfigError(f"method.k: client depths {bad} are outside 0..{k} (the blocks the model trains)")
        if all(d == k for d in depths):
            return None
        by_depth = {d: tuple(self.names_for_depth(model, d)) for d in set(depths) if d != k}
        return Assignment({c: by_depth[d] for c, d in enumerate(depths) if d != k},
                          {c: {"k": d} for c, d in enumerate(depths)})
