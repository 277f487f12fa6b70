"""A client's training costs predicted from the prepared model and the config, without training.

:func:`predict` gives, per client and round: peak training memory (a breakdown), FLOPs per
sample / step / round, upload and download bytes, trainable parameters, and the same per model
part (``below`` the blocks, each block, ``above``) so that a planner can price "train only the
top ``k`` blocks" for every ``k`` from two traces (:func:`top_blocks_memory`).

What it models
--------------
Everything follows from the model's ``requires_grad`` flags, the config and the batch shape
``(B, L)`` = (``federation.batch_size``, ``model.max_length``; images: the model's image size),
so any method, including one that freezes the bottom blocks, is priced with no change here.

- ``weights``: every parameter and buffer (tied tensors once).
- ``gradients``: one per trainable parameter.
- ``optimizer``: AdamW's two moments, or SGD's momentum buffer (none with ``momentum = 0``);
  SCAFFOLD adds 4 copies of the trainable part (as :func:`~fedpeft.federation.costs.train_state_bytes`).
- ``inputs``: the batch's tensors.
- ``activations``: what autograd saves for backward, from the shape-only trace
  (:func:`fedpeft.budgets.trace.trace_saved`): exact for the traced graph.
- ``forward_peak`` / ``backward_peak``: the same trace runs forward and backward on fake tensors
  under a simulated allocator (a storage is live from the op that creates it until its last
  tensor dies), so the temporaries of frozen parts (attention scores, FFN intermediates), the
  gradients of activations and the parameter gradients as backward makes them are all counted.
- ``step_peak``: the optimizer step holds every gradient plus its temporaries (AdamW: 2 tensors
  the size of the largest trainable parameter, ``sqrt(v) / c`` in torch's single-tensor CPU
  path; SGD: 1 with weight decay, else 0); clipping works in place.

``peak = weights + optimizer + scaffold + inputs + max(forward, backward, step peak)``, the
steady state of the second and later steps of a round (the first step has no optimizer state
yet during its forward and backward, so it peaks no higher).

Tolerance, checked against a real step measured by torch's profiler
(:func:`fedpeft.budgets.measure.measure_step`, ``tests/test_costmodel.py``): activations within
10 % and peak within 25 %, on every tiny family and method (measured: within 0.5 % and 0.1 %,
the peak byte-exact up to a few dozen bytes); MiniLM in ``benchmarks/costmodel.py``. What the
profiler sees is what torch asks its allocator for.

bfloat16 weights (``model.dtype``) are traced as what they are (2-byte tensors). Gradient
checkpointing (``model.gradient_checkpointing``): the trace runs the checkpointed graph, so
``forward_peak``, ``backward_peak`` and the peak (the simulated allocator sees the recomputed
forward in backward) match a measured step; ``activations`` then counts only what autograd
saves outside the checkpointed blocks (a lower bound: the blocks' inputs that checkpointing
keeps are in the peaks, not in it), and :func:`top_blocks_memory`, which sums it per block,
refuses such a model.

Not modelled: allocator fragmentation and caching (CPU malloc, CUDA's caching allocator),
Python objects, the tokenizer and data pipeline, the evaluation pass, mixed precision
(autocast), and the smaller real lengths of dynamically padded batches (the
prediction is at ``model.max_length``, an upper bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fedpeft.budgets.trace import ABOVE, BELOW, batch_bytes, synthetic_batch, trace_saved
from fedpeft.errors import ConfigError
from fedpeft.models import ModelInfo, above_block_names, transformer_blocks

ADAMW_TEMPORARIES = 2  # param-sized temporaries of one AdamW update (torch's single-tensor CPU path)
BACKWARD_TEMPORARIES = 2  # largest-saved-tensor-sized buffers backward holds on top (grad + temp)


@dataclass
class PartCosts:
    """One part of the model: ``"below"`` (embeddings, prompts), a block ``"0"``..``"n-1"``, ``"above"``."""

    name: str
    param_bytes: int  # every parameter of the part
    trainable_bytes: int  # its trainable parameters (= its gradients)
    activation_bytes: int  # what its forward saves for backward (under the traced flags)


@dataclass
class MemoryBreakdown:
    """Peak training memory of one client, in bytes (see the module docstring for each term)."""

    weights: int
    gradients: int
    optimizer: int
    scaffold: int
    inputs: int
    activations: int
    forward_peak: int  # on top of the persistent part: activations + forward temporaries
    backward_peak: int  # on top of the persistent part: activations + gradients + temporaries
    step_peak: int  # on top of the persistent part: gradients + optimizer temporaries

    @property
    def persistent(self) -> int:
        """Held during the whole step: weights, optimizer (and SCAFFOLD) state, the batch."""
        return self.weights + self.optimizer + self.scaffold + self.inputs

    @property
    def peak(self) -> int:
        return self.persistent + max(self.forward_peak, self.backward_peak, self.step_peak)

    def as_dict(self) -> dict[str, int]:
        keys = ("weights", "gradients", "optimizer", "scaffold", "inputs", "activations", "forward_peak",
                "backward_peak", "step_peak")
        return {**{k: getattr(self, k) for k in keys}, "peak": self.peak}


@dataclass
class ClientCosts:
    """Predicted costs of one client's local training; see :func:`predict`.

    ``flops_per_sample`` is forward + backward of one row at ``seq_len`` (exact, from
    :class:`~fedpeft.federation.costs.TrainingFlops`); FLOPs are linear in the rows of a batch.
    """

    memory: MemoryBreakdown
    parts: list[PartCosts]
    batch_size: int
    seq_len: int
    flops_per_sample: int
    trainable_params: int
    upload_bytes: int  # per round: the exchanged part (+ SCAFFOLD's delta c_i)
    download_bytes: int  # per round: the global state (+ SCAFFOLD's c)
    local_epochs: float = 1.0
    local_steps: int | None = None
    optimizer: str = "adamw"
    temporaries: dict[str, int] = field(default_factory=dict)  # {"forward", "backward", "optimizer"}: allowances, bytes

    @property
    def flops_per_step(self) -> int:
        return self.batch_size * self.flops_per_sample

    def samples_per_round(self, n_samples: int) -> int:
        """Rows a client with ``n_samples`` rows processes in a round (as
        :meth:`~fedpeft.federation.client.ClientTrainer.batch_order` draws them)."""
        bs = min(self.batch_size, n_samples)
        steps = self.local_steps or max(1, math.ceil(self.local_epochs * n_samples / self.batch_size))
        per_epoch = math.ceil(n_samples / bs)
        epoch = [bs] * (per_epoch - 1) + [n_samples - bs * (per_epoch - 1)]  # last batch is short
        full, rest = divmod(steps, per_epoch)
        return full * n_samples + sum(epoch[:rest])

    def flops_per_round(self, n_samples: int) -> int:
        """FLOPs of a round for a client with ``n_samples`` rows (every batch at ``seq_len``)."""
        return self.samples_per_round(n_samples) * self.flops_per_sample


def _memory(parts: list[PartCosts], weights: int, optimizer: int, scaffold: int, inputs: int,
            forward_temp: int, backward_temp: int, optimizer_temp: int) -> MemoryBreakdown:
    """The breakdown from per-part activations and gradients (parts in forward order)."""
    grads = sum(p.trainable_bytes for p in parts)
    acts = [p.activation_bytes for p in parts]
    # backward runs the parts top down; on part j it holds the activations of parts <= j and
    # the gradients of parts >= j
    backward = max(sum(acts[: j + 1]) + sum(p.trainable_bytes for p in parts[j:]) for j in range(len(parts)))
    return MemoryBreakdown(weights, grads, optimizer, scaffold, inputs, sum(acts), sum(acts) + forward_temp,
                           backward + backward_temp, grads + optimizer_temp)


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _name_bytes(model: nn.Module, names: list[str], exchange_dtype: str = "float32") -> int:
    """:func:`~fedpeft.federation.costs.message_bytes` of these parameters, without copying them:
    each floating value at ``exchange_dtype``'s size (a state crosses as float32 or bfloat16)."""
    from fedpeft.federation.precision import EXCHANGE_ITEMSIZE

    params = dict(model.named_parameters())
    return sum(params[n].numel() * (EXCHANGE_ITEMSIZE[exchange_dtype] if params[n].is_floating_point()
                                    else params[n].element_size()) + len(n.encode("utf-8")) for n in names)


def predict(model: nn.Module, info: ModelInfo, cfg, names: list[str] | None = None,
            download_names: list[str] | None = None, batch_size: int | None = None,
            seq_len: int | None = None) -> ClientCosts:
    """Predict a client's training costs from the prepared model and the config.

    Parameters
    ----------
    model : nn.Module
        The prepared model (``Method.prepare``); its ``requires_grad`` flags say what trains.
        Nothing about it changes (the trace swaps in fake tensors and restores them; the FLOPs
        probe restores gradients and the random state).
    info : ModelInfo
        From :func:`fedpeft.models.load_model`.
    cfg : Config
        Uses ``federation.batch_size, optimizer, momentum, weight_decay, scaffold, local_epochs,
        local_steps`` and ``model.max_length``.
    names, download_names : list of str, optional
        The exchanged parameter names (default: the trainable ones) and the global state's
        (default: ``names``; FedEx-LoRA adds base weights).
    batch_size, seq_len : int, optional
        Override the config's batch shape (a planner's what-if).

    Returns
    -------
    ClientCosts
    """
    fed = cfg.federation
    B = batch_size or fed.batch_size
    L = seq_len or cfg.model.max_length
    saved = trace_saved(model, info, B, L)
    blocks = transformer_blocks(model, info.num_layers)
    parts = {k: PartCosts(k, 0, 0, v) for k, v in saved.by_part.items()}
    above = set(above_block_names(model, blocks))
    for name, p in model.named_parameters():  # named_parameters gives tied tensors once
        i = blocks.index_of(name)
        part = parts[str(i) if i is not None else (ABOVE if name in above else BELOW)]
        part.param_bytes += p.numel() * p.element_size()
        part.trainable_bytes += p.numel() * p.element_size() if p.requires_grad else 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    largest = max((p.numel() * p.element_size() for p in trainable), default=0)
    if fed.optimizer == "adamw":
        opt, opt_temp = 2 * grads, ADAMW_TEMPORARIES * largest
    else:
        opt, opt_temp = (grads if fed.momentum else 0), (largest if fed.weight_decay else 0)
    weights = _storage_bytes([*model.parameters(), *model.buffers()])
    with torch.device("meta"):
        inputs = batch_bytes(synthetic_batch(model, info, B, L))
    # kept for reference: what the forward holds beyond its saved tensors, and backward's allowance
    fwd_temp, back_temp = max(0, saved.forward_peak - saved.total), BACKWARD_TEMPORARIES * saved.largest
    memory = replace(_memory(list(parts.values()), weights, opt, 4 * grads if fed.scaffold else 0, inputs,
                             fwd_temp, back_temp, opt_temp),
                     forward_peak=saved.forward_peak, backward_peak=saved.backward_peak)  # simulated: exact-er
    names = names if names is not None else [n for n, p in model.named_parameters() if p.requires_grad]
    copies = 2 if fed.scaffold else 1
    dtype = fed.exchange_dtype
    up = copies * _name_bytes(model, names, dtype)
    down = _name_bytes(model, download_names or names, dtype) + (copies - 1) * _name_bytes(model, names, dtype)
    return ClientCosts(memory, list(parts.values()), B, L, _flops_per_sample(model, info, L), sum(p.numel() for p in trainable),
                       up, down, fed.local_epochs, fed.local_steps, fed.optimizer,
                       {"forward": fwd_temp, "backward": back_temp, "optimizer": opt_temp})


def _flops_per_sample(model: nn.Module, info: ModelInfo, seq_len: int) -> int:
    """Exact training FLOPs of one row at ``seq_len`` (TrainingFlops' probe on synthetic rows)."""
    from fedpeft.federation.costs import TrainingFlops

    return TrainingFlops(model)(probe_batch(model, info, 1, seq_len))


def probe_batch(model: nn.Module, info: ModelInfo, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A real batch of the cost model's shape: :func:`~fedpeft.budgets.trace.synthetic_batch` with
    a real token id in every position (no padding) and positions ``0 .. L-1``."""
    batch = synthetic_batch(model, info, batch_size, seq_len)
    if "input_ids" in batch:
        batch["input_ids"].fill_(100)  # any real token id
        if "position_ids" in batch:
            batch["position_ids"] = torch.arange(seq_len).expand(batch_size, seq_len)
    return batch


def top_blocks_memory(model: nn.Module, info: ModelInfo, cfg, batch_size: int | None = None,
                      seq_len: int | None = None) -> list[MemoryBreakdown]:
    """Peak memory when only the top ``k`` blocks and everything above them train (the head,
    final norm, pooler), everything below frozen, for every ``k = 0 .. n`` (list index ``k``).

    Two shape-only traces, whatever ``n``: one with every block trained, one with every block
    frozen (the model's flags are set for them and restored). Per part they give what it saves
    when trained, and its forward working set trained and frozen; for each ``k`` the forward
    peak is the worst part's ``saved by the trained parts before it + carried in + its working
    set``, backward holds the activations of the parts not yet differentiated and the gradients
    made so far (+ ``2 x`` the largest saved tensor), the optimizer step all gradients and its
    temporaries. ``predict`` on a model with those flags set is the exact reference (measured:
    ``tests/test_costmodel.py``).
    """
    fed = cfg.federation
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ConfigError("model.gradient_checkpointing: top_blocks_memory sums what each block saves for backward, "
                          "which checkpointed blocks recompute instead; price each k with predict() on the flagged "
                          "model, or set gradient_checkpointing = false")
    B, L = batch_size or fed.batch_size, seq_len or cfg.model.max_length
    blocks = transformer_blocks(model, info.num_layers)
    n = info.num_layers
    named = list(model.named_parameters())
    above = set(above_block_names(model, blocks))
    part_of = {name: (str(i) if (i := blocks.index_of(name)) is not None else
                      ABOVE if name in above else BELOW) for name, _ in named}
    flags = {name: p.requires_grad for name, p in named}
    try:
        traces = {}
        for label, trained in (("trained", set(map(str, range(n))) | {ABOVE}), ("frozen", {ABOVE})):
            for name, p in named:
                p.requires_grad_(part_of[name] in trained)
            traces[label] = trace_saved(model, info, B, L)
    finally:
        for name, p in named:
            p.requires_grad_(flags[name])
    on, off = traces["trained"], traces["frozen"]
    order = [BELOW, *map(str, range(n)), ABOVE]
    sizes: dict[str, list[int]] = {part: [] for part in order}
    for name, p in named:
        sizes[part_of[name]].append(p.numel() * p.element_size())
    weights = _storage_bytes([*model.parameters(), *model.buffers()])
    with torch.device("meta"):
        inputs = batch_bytes(synthetic_batch(model, info, B, L))
    out = []
    for k in range(n + 1):
        trained = {str(i) for i in range(n - k, n)} | {ABOVE}
        grads = {part: sum(sizes[part]) if part in trained else 0 for part in order}
        acts = {part: (on if k > 0 else off).by_part[part] if part in trained else 0 for part in order}
        forward, before = 0, 0
        for part in order:
            trace = on if part in trained and k > 0 else off  # k = 0: above is the lowest trained part
            forward = max(forward, before + trace.carried_by_part[part] + trace.forward_by_part[part])
            before += acts[part]
        backward = max(sum(acts[q] for q in order[: j + 1]) + sum(grads[q] for q in order[j:])
                       for j in range(len(order)))
        backward += BACKWARD_TEMPORARIES * (on.largest if k > 0 else off.largest)
        total_grads = sum(grads.values())
        largest = max((b for part in trained for b in sizes[part]), default=0)
        if fed.optimizer == "adamw":
            opt, opt_temp = 2 * total_grads, ADAMW_TEMPORARIES * largest
        else:
            opt, opt_temp = (total_grads if fed.momentum else 0), (largest if fed.weight_decay else 0)
        out.append(MemoryBreakdown(weights, total_grads, opt, 4 * total_grads if fed.scaffold else 0, inputs,
                                   sum(acts.values()), forward, max(forward, backward), total_grads + opt_temp))
    return out
