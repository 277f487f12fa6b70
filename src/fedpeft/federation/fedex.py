"""FedEx-LoRA: exact aggregation of LoRA by folding the averaging residual into the base weight.

Singhal et al., *Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation
Models*, ACL 2025, https://arxiv.org/abs/2410.09432 .

Averaging the factors separately is not averaging the updates: with FedAvg weights ``w_i``
(summing to 1), ``mean(B) mean(A) != sum_i w_i B_i A_i``. FedEx-LoRA keeps FedAvg of ``A`` and
``B`` and adds the residual to every client's frozen base weight of that layer::

    W0 <- W0 + s * (sum_i w_i B_i A_i - B_avg A_avg)        # (out, in); s = alpha / r

so that ``W0 + s * B_avg A_avg`` after the round equals ``W0 + s * sum_i w_i B_i A_i``: the
average of the clients' adapted weights, exactly. The residual has rank at most ``(k + 1) r`` for
``k`` aggregated clients: it travels as the factors ``U = [w_1 B_1 .. w_k B_k, -B_avg]``
(out x (k+1)r) and ``V = [A_1; ..; A_k; A_avg]`` ((k+1)r x in), so a client downloads, per adapted
layer, the factors of every round since it was last selected, or the dense corrected weight when
that is smaller (:meth:`FedExLoRA.download_bytes`).

The server keeps the corrected base weights in the global state (their names are
:attr:`FedExLoRA.base_names`); clients train from them and upload only the LoRA factors and the
head, as with plain LoRA. The aggregation here is sequential: one float64 running sum of
``w_i B_i A_i`` per layer, never the list of client states.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

NamedArrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class AdaptedLayer:
    """One LoRA-adapted linear layer, by the names of its parameters in the exchanged state."""

    base: str  # the frozen base weight: (out, in), or (in, out) for a fan_in_fan_out Conv1D
    a: str  # lora_A: (r, in)
    b: str  # lora_B: (out, r)
    scale: float  # peft's scaling: alpha / r
    transpose: bool  # the base weight is stored (in, out) (GPT-2 Conv1D, fan_in_fan_out)

    def residual_bytes(self, rank: int, out_in: tuple[int, int], itemsize: int) -> int:
        """Bytes of one round's residual factors ``U`` (out, rank) and ``V`` (rank, in), with names."""
        out, inp = out_in
        return rank * (out + inp) * itemsize + len(f"{self.base}/U".encode()) + len(f"{self.base}/V".encode())


class FedExLoRA:
    """The server side of FedEx-LoRA for a model's :class:`AdaptedLayer` list.

    Parameters
    ----------
    layers : list of AdaptedLayer
        Every adapted layer (from :meth:`fedpeft.methods.lora.Lora.residual_fold`).
    rank : int
        The LoRA rank ``r``.
    """

    def __init__(self, layers: list[AdaptedLayer], rank: int) -> None:
        if not layers:
            raise ValueError("FedEx-LoRA needs at least one LoRA-adapted layer")
        self.layers, self.rank = layers, rank
        self.base_names = [layer.base for layer in layers]

    def upload_view(self, state: Mapping[str, np.ndarray]) -> NamedArrays:
        """``state`` without the base weights: what clients train and send."""
        skip = set(self.base_names)
        return {k: v for k, v in state.items() if k not in skip}

    def start_round(self) -> "FedExRound":
        return FedExRound(self)

    def download_bytes(self, global_state: Mapping[str, np.ndarray], accepted_since: list[int]) -> int:
        """Bytes that bring one client's base weights up to date.

        ``accepted_since`` holds, for every round whose residual the client has not received yet,
        the number of clients that round aggregated (0: no residual). Per layer the cheaper of the
        rounds' residual factors (rank ``(k + 1) r`` each) and the dense corrected weight.
        """
        total = 0
        for layer in self.layers:
            base = np.asarray(global_state[layer.base])
            out_in = base.shape[::-1] if layer.transpose else base.shape
            factors = sum(layer.residual_bytes((k + 1) * self.rank, out_in, base.itemsize) for k in accepted_since if k)
            dense = base.nbytes + len(layer.base.encode())
            total += min(factors, dense)
        return total


class FedExRound:
    """One round's running sums: ``sum_i w_i B_i A_i`` per layer (float64) and the weight."""

    def __init__(self, fedex: FedExLoRA) -> None:
        self.fedex = fedex
        self.products: dict[str, np.ndarray] = {}  # base name -> sum_i w_i B_i @ A_i, (out, in)
        self.weight = 0.0
        self.count = 0

    def add(self, state: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold in one accepted client state (already validated) with its FedAvg weight."""
        w = float(weight)
        for layer in self.fedex.layers:
            product = np.asarray(state[layer.b], np.float64) @ np.asarray(state[layer.a], np.float64)
            if layer.base in self.products:
                self.products[layer.base] += w * product
            else:
                self.products[layer.base] = w * product
        self.weight += w
        self.count += 1

    def fold(self, global_state: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray]) -> NamedArrays:
        """The new base weights: ``W0 + s * (sum_i w_i B_i A_i - B_avg A_avg)``, in W0's dtype.

        ``averaged`` is the FedAvg of the accepted states (the ``A_avg`` and ``B_avg`` the
        clients will train from next).
        """
        out: NamedArrays = {}
        for layer in self.fedex.layers:
            mean_product = self.products[layer.base] / self.weight
            avg = np.asarray(averaged[layer.b], np.float64) @ np.asarray(averaged[layer.a], np.float64)
            residual = layer.scale * (mean_product - avg)  # (out, in)
            base = np.asarray(global_state[layer.base])
            out[layer.base] = (base.astype(np.float64) + (residual.T if layer.transpose else residual)).astype(base.dtype)
        return out
