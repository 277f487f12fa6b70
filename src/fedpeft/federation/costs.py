"""Exact communication cost, measured client FLOPs and memory.

Message size
    A message is a named state. Its size is the tensor payload plus the UTF-8 parameter names:
    ``sum(a.nbytes) + sum(len(name.encode()))``, every floating value at the exchange dtype's size
    (``federation.exchange_dtype``: 4 bytes, or 2 for bfloat16). That is what any transport must carry at the
    least; framing (safetensors header, gRPC) adds a few hundred bytes per message and is
    reported by the Flower runtime separately.
FLOPs
    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls and attention, forward
    + backward; the optimizer does no matmuls). A transformer step on a batch of ``B`` rows of
    ``L`` tokens costs exactly ``B * (c0 + c1 * L + c2 * L**2)``: :class:`TrainingFlops` measures
    ``c0, c1, c2`` once per model on synthetic one-row batches, so every client's count is exact,
    and the same in every process, runtime and resumed run.
Memory
    Peak resident memory of the process, and the bytes a client needs to hold its trainable
    state during training (parameters + gradients + two AdamW moments).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Mapping
from fractions import Fraction

import numpy as np
import torch
from torch import nn

from fedpeft.federation.precision import EXCHANGE_ITEMSIZE, value_bytes


def message_bytes(state: Mapping[str, np.ndarray], exchange_dtype: str = "float32") -> int:
    """Bytes of one message carrying ``state``: tensor payload + UTF-8 names; floating values at
    ``exchange_dtype``'s size (:func:`fedpeft.federation.precision.value_bytes`)."""
    return sum(value_bytes(a, exchange_dtype) + len(name.encode("utf-8")) for name, a in state.items())


SECAGG_VALUE_BYTES = 8  # SecAgg+ (Flower): an update is a masked vector of 64-bit integers, one per value


def secagg_update_bytes(state: Mapping[str, np.ndarray]) -> int:
    """Bytes of one SecAgg+ update of ``state`` (``privacy.secure_aggregation``): its values as one
    flat masked vector of 64-bit integers, without names (:mod:`fedpeft.runtime.flower.secagg`)."""
    return SECAGG_VALUE_BYTES * sum(int(np.size(a)) for a in state.values())


def model_message_bytes(model: nn.Module, exchange_dtype: str = "float32") -> int:
    """What one message would cost if it carried every parameter (the full-FedAvg equivalent),
    each value at ``exchange_dtype``'s size (a bfloat16 model's state crosses as float32 unless
    the exchange is bfloat16 too: :func:`fedpeft.methods.base.get_state`)."""
    itemsize = EXCHANGE_ITEMSIZE[exchange_dtype]
    return sum(p.numel() * (itemsize if p.is_floating_point() else p.element_size()) + len(name.encode("utf-8"))
               for name, p in model.named_parameters())


_FITTED: dict[tuple, tuple] = {}  # (what is measured, structure_key, input names) -> (coeffs, exact form?, per-row FLOPs)


class TrainingFlops:
    """Training FLOPs (forward + backward) of a batch, an exact function of the batch's shape.

    Every op :class:`~torch.utils.flop_counter.FlopCounterMode` counts in a transformer is a
    matmul over the batch rows: per row it costs a constant (head, pooler), a term linear in the
    sequence length ``L`` (projections, FFN, LoRA, the head of every token; a causal LM's
    vocabulary projection of every token) and one quadratic in ``L`` (attention scores); soft
    prompts only shift ``L``. A causal LM's labels are ``(B, L)`` (its cross-entropy costs no
    matmul, whatever positions are masked); a classifier's ``(B,)``. So a text batch of shape ``(B, L)``
    costs ``B * (c0 + c1 * L + c2 * L**2)`` and an image batch ``B * c0``. The coefficients are
    measured once, on synthetic one-row batches of 1, 2 and 3 tokens, and checked on a fourth
    length; a model that breaks the form is measured at each new length instead. Measured once
    per process for each model structure (:func:`fedpeft.models.structure_key` of ``model`` when
    this object is made) and set of batch inputs: the cost model's probe and a client's
    trainer share one measurement. The probe runs
    forward and backward only (no optimizer step), in train mode (each module's mode restored
    after), clears the gradients it made and leaves the random state as it was, so it changes
    nothing about training.

    Parameters
    ----------
    model : nn.Module
        The prepared model; its trainable parameters get (and lose) gradients during the probe.
    """

    def __init__(self, model: nn.Module) -> None:
        from fedpeft.models import structure_key

        self.model = model
        # the structure as built (requires_grad as set now), before any hooks a trainer installs
        # later (DP-SGD's per-sample hooks, disabled outside its own steps): one memo entry for it
        self._structure = structure_key(model)
        self._coeffs: tuple[Fraction, ...] | None = None  # (c0, c1, c2); image: (c0,)
        self._per_row: dict[int, int] = {}  # L -> measured FLOPs of one row (form broken)
        self._exact_form = True

    def __call__(self, batch: dict[str, torch.Tensor]) -> int:
        """FLOPs of one training step on ``batch`` (model inputs + ``labels``)."""
        rows = int(batch["labels"].shape[0])
        if self._coeffs is None and self._exact_form:
            self._fit(batch)
        if "input_ids" not in batch:
            return rows * int(self._coeffs[0])
        length = int(batch["input_ids"].shape[1])
        if not self._exact_form:
            if length not in self._per_row:
                self._per_row[length] = self._measure(_one_row(batch, length))
            return rows * self._per_row[length]
        c0, c1, c2 = self._coeffs
        return rows * int(c0 + c1 * length + c2 * length * length)

    def _fit(self, batch: dict[str, torch.Tensor]) -> None:
        """The coefficients, measured or, for a model of the same structure, remembered."""
        key = (*self.measures(), self._structure, tuple(sorted(batch)))
        if key not in _FITTED:
            if "input_ids" not in batch:
                _FITTED[key] = ((Fraction(self._measure(_one_row(batch, None))),), True, {})
            else:
                _FITTED[key] = self._fit_text(batch)
        self._coeffs, self._exact_form, self._per_row = _FITTED[key]  # per_row: shared, grows

    def measures(self) -> tuple:
        """What :meth:`_measure` counts, beside the model's structure: part of the memo key, so a
        subclass measuring something else on the same model (a frozen prefix's forward) keeps its
        own coefficients. Here: a training step (forward + backward)."""
        return ("step",)

    def _fit_text(self, batch: dict[str, torch.Tensor]) -> tuple:
        f1, f2, f3, f4 = (self._measure(_one_row(batch, n)) for n in (1, 2, 3, 4))
        c2 = Fraction(f3 - 2 * f2 + f1, 2)
        c1 = f2 - f1 - 3 * c2
        c0 = f1 - c1 - c2
        if c0 + 4 * c1 + 16 * c2 == f4:
            return (c0, c1, c2), True, {}
        return None, False, {1: f1, 2: f2, 3: f3, 4: f4}

    def _measure(self, batch: dict[str, torch.Tensor]) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        params = [p for p in self.model.parameters() if p.requires_grad]
        saved = [p.grad for p in params]  # backward would add into them in place
        for p in params:
            p.grad = None
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.train()  # training FLOPs (eval-mode attention may take a path the counter misses)
        try:
            with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
                self.model(**batch).loss.backward()
        finally:
            for m, training in modes:
                m.training = training
            for p, grad in zip(params, saved):
                p.grad = grad
        return int(counter.get_total_flops())


def _one_row(batch: dict[str, torch.Tensor], length: int | None) -> dict[str, torch.Tensor]:
    """A synthetic batch of one row shaped like ``batch``'s rows, text cut or padded to ``length``
    (per-token labels, causal-lm, as many as its tokens: its own ids, every one a target)."""
    out = {"labels": batch["labels"][:1]}
    for name, value in batch.items():
        if name == "labels":
            continue
        if length is None or value.dim() != 2:
            out[name] = value[:1]
        elif name == "input_ids":
            out[name] = value[:1, -1:].expand(1, length).clone()  # any real token id
        elif name == "attention_mask":
            out[name] = torch.ones(1, length, dtype=value.dtype)
        elif name == "position_ids":
            out[name] = torch.arange(length, dtype=value.dtype).unsqueeze(0)
        else:
            out[name] = torch.zeros(1, length, dtype=value.dtype)  # e.g. token_type_ids
    if out["labels"].dim() == 2 and length is not None:  # (1, L) labels of a causal LM
        out["labels"] = out["input_ids"].clone()
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process since start or :func:`reset_peak_rss`, in MiB."""
    try:
        with open("/proc/self/status") as f:  # Linux: VmHWM, which reset_peak_rss can reset
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # never resets
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement at the current RSS, so that several runs in one process
    (a sweep) each report their own peak. Linux only (``/proc/self/clear_refs``); returns whether
    it worked (elsewhere the peak stays the process's maximum so far)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def train_state_bytes(model: nn.Module, optimizer: str = "adamw", scaffold: bool = False) -> int:
    """Bytes a client holds for its trainable part: params + grads (+ 2 moments for AdamW), and
    with SCAFFOLD 4 more copies: ``c``, ``c_i``, the correction ``c - c_i`` and the running sum of
    the gradients that gives the new ``c_i`` (the exchanged part is the trainable one for every
    method)."""
    copies = (4 if optimizer == "adamw" else 3) + (4 if scaffold else 0)  # sgd: params, grads, momentum
    return copies * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
