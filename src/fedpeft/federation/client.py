"""Client-side local training and global evaluation on one shared, prepared model.

A :class:`ClientTrainer` owns one model whose frozen backbone is shared by every simulated client:
a client's whole state is its exchanged part, loaded in before training and read out after.
The same trainer serves the in-process runtime (all clients in turn) and a Flower ClientApp
(one client per process).

A method whose trainable part starts above some transformer block (``head``, ``layers``) has a
frozen prefix: it runs in eval mode, rows of one length batched together, and its output is kept
per ``(client, cut)`` in a memory-bounded cache (``runtime.frozen_cache_mb``,
:mod:`fedpeft.federation.frozen`) for the life of the trainer, so later epochs and rounds skip it.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from fedpeft.config import FederationConfig
from fedpeft.data import EncodedSplit
from fedpeft.errors import DataError
from fedpeft.federation import label_skew, scaffold
from fedpeft.federation.assignment import Assignment
from fedpeft.federation.costs import TrainingFlops
from fedpeft.federation.frozen import FrozenPrefix, cut_index, state_digest
from fedpeft.federation.frozen_cache import FrozenCache
from fedpeft.federation.strategy import ClientResult
from fedpeft.methods.base import NamedArrays, get_state, set_state
from fedpeft.models import Blocks


def client_seed(seed: int, rnd: int, client: int) -> int:
    """The torch seed of one client's training in one round (data order, dropout)."""
    return int(np.random.default_rng([seed, rnd, client, 0xC11E]).integers(2**62))


class ClientTrainer:
    """Trains a client's exchanged state from the global one on that client's rows."""

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        train: EncodedSplit,
        cfg: FederationConfig,
        seed: int,
        blocks: Blocks | None = None,
        frozen_cache_mb: float = 0.0,
    ) -> None:
        self.model = model
        self.names = names
        self.train = train
        self.cfg = cfg
        self.seed = seed
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # as prepared
        self._flops: dict[frozenset[str] | None, TrainingFlops] = {}  # per assigned set: backward differs
        self.blocks = blocks  # the block stack; None: no frozen prefix is ever cut off
        self.frozen = FrozenCache(frozen_cache_mb)
        self._prefixes: dict[frozenset[str] | None, FrozenPrefix | None] = {}  # per assigned set
        # [privacy] mode = "sample": the DP-SGD hook (fedpeft.privacy.sample_level.SampleDPHook) that
        # draws the batches and writes the clipped, noised gradients; None: plain training
        self.sample_dp = None
        self._use(None)

    def prefix(self, assigned: frozenset[str] | None, indices: np.ndarray) -> FrozenPrefix | None:
        """The frozen prefix under the current ``requires_grad`` (``assigned``'s), or None: no block
        at the bottom is frozen, or its output depends on a trainable parameter (probed on the
        client's first row, once per assigned set, in eval mode with the random state untouched)."""
        if assigned not in self._prefixes:
            cut = 0 if self.blocks is None else cut_index(self.model, self.blocks)
            prefix = FrozenPrefix(self.model, self.blocks, cut) if cut > 0 else None
            if prefix is not None and len(indices) > 0:
                probe = self.train.batch(np.asarray(indices[:1]))
                probe.pop("labels")
                training = self.model.training
                self.model.eval()
                with torch.random.fork_rng(devices=[]):
                    if prefix.depends_on_training(probe):
                        prefix = None
                self.model.train(training)
            self._prefixes[assigned] = prefix
        return self._prefixes[assigned]

    def _use(self, assigned: frozenset[str] | None) -> None:
        """Train the prepared trainable parameters, less the exchanged ones not in ``assigned``
        (None: all of them): ``requires_grad`` off for those, so no autograd graph is built
        through them, nor through anything below them that nothing trainable needs."""
        exchanged = set(self.names)
        for n, p in self.trainable:
            p.requires_grad_(assigned is None or n in assigned or n not in exchanged)
        self.params = [p for _, p in self.trainable if p.requires_grad]
        # the name of each trainable parameter that is exchanged (SCAFFOLD corrects those), else None
        self.param_names = [n if n in exchanged else None for n, p in self.trainable if p.requires_grad]
        if assigned not in self._flops:
            self._flops[assigned] = TrainingFlops(self.model)  # measured lazily, with this requires_grad
        self.flops = self._flops[assigned]  # exact FLOPs of a batch from its shape

    def num_steps(self, num_samples: int) -> int:
        if self.cfg.local_steps is not None:
            return self.cfg.local_steps
        return max(1, math.ceil(self.cfg.local_epochs * num_samples / self.cfg.batch_size))

    def batch_order(self, indices: np.ndarray, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
        """``steps`` batches of row ids: reshuffled epochs over the client's rows.

        Raises
        ------
        DataError
            When ``steps > 0`` batches are asked of no rows (:func:`fedpeft.data.partition`
            refuses a partition that leaves a client empty, so a run never gets here).
        """
        rows = torch.as_tensor(indices, dtype=torch.long)
        if steps <= 0:
            return []
        if len(rows) == 0:
            raise DataError(f"no training rows to draw {steps} batch(es) from: a client needs at least one row")
        bs = min(self.cfg.batch_size, len(rows))
        per_epoch = math.ceil(len(rows) / bs)
        batches: list[torch.Tensor] = []
        while len(batches) < steps:
            perm = rows[torch.randperm(len(rows), generator=generator)]
            batches.extend(perm[i * bs : (i + 1) * bs] for i in range(per_epoch))
        return batches[:steps]

    def make_optimizer(self) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(
                self.params, lr=self.cfg.lr, momentum=self.cfg.momentum,
                weight_decay=self.cfg.weight_decay,
            )
        return torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def fit(
        self,
        client: int,
        indices: np.ndarray,
        global_state: NamedArrays,
        rnd: int,
        controls: tuple[NamedArrays, NamedArrays] | None = None,
        names: list[str] | tuple[str, ...] | None = None,
    ) -> ClientResult:
        """Local training of ``client`` in round ``rnd``; returns its new exchanged state.

        ``names`` (the client's assignment, :mod:`fedpeft.federation.assignment`; None: every
        exchanged name): only those exchanged parameters train, and only they are returned. The
        others stay frozen for this client (``requires_grad`` off, restored afterwards), so blocks
        below the lowest assigned one build no graph and keep no activations for backward.

        ``indices`` must hold at least one row (:class:`~fedpeft.errors.DataError` otherwise:
        :func:`fedpeft.data.partition` already refuses a partition with an empty client, naming it).

        ``train_loss`` is the mean data loss over the steps: the model's cross-entropy, or the
        ``federation.label_skew`` loss; FedProx's proximal term is not included.

        ``controls = (c, c_i)`` trains with SCAFFOLD (Karimireddy et al. 2020,
        https://arxiv.org/abs/1910.06378): every step adds ``c - c_i`` to the gradient of each
        exchanged parameter (before clipping and the optimizer step), and the result carries
        ``control = delta_c_i = mean_k g_k - c_i``, the mean uncorrected gradient of the steps
        less ``c_i`` (option II's value for plain SGD, a gradient for any optimizer:
        :mod:`fedpeft.federation.scaffold`); the caller keeps ``c_i + delta_c_i`` as the
        client's new ``c_i`` (:func:`~fedpeft.federation.scaffold.advance`).
        """
        if len(indices) == 0:  # the partition refuses empty clients; this guards library use
            raise DataError(f"client {client} has no training rows: nothing to train on (round {rnd}); "
                            "give every client at least one row")
        assigned = None if names is None else frozenset(names)
        if assigned is not None:
            Assignment({client: tuple(names)}).check(list(self.names))  # names may come off the wire
            if controls is not None:
                raise ValueError("SCAFFOLD with an assignment of part of the exchanged state is not supported")
        self._use(assigned)
        try:
            return self._fit(client, indices, global_state, rnd, controls,
                             list(self.names) if names is None else [n for n in self.names if n in assigned],
                             self.prefix(assigned, indices))
        finally:
            self._use(None)

    def _fit(self, client: int, indices: np.ndarray, global_state: NamedArrays, rnd: int,
             controls: tuple[NamedArrays, NamedArrays] | None, names: list[str],
             prefix: FrozenPrefix | None = None) -> ClientResult:
        start = time.perf_counter()
        seed = client_seed(self.seed, rnd, client)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        set_state(self.model, global_state)
        self.model.train()
        if prefix is not None:
            prefix.eval_mode()  # no dropout below the cut, cached or not: the prefix is deterministic
            params = dict(self.model.named_parameters())
            key = (client, prefix.cut)  # frozen but exchanged names below the cut invalidate the entry
            digest = state_digest(global_state, [n for n in global_state if not params[n].requires_grad])
        optimizer = self.make_optimizer()
        steps = self.num_steps(len(indices))
        # FedProx anchor: the trainable parameters as loaded from the global state
        anchor = [p.detach().clone() for p in self.params] if self.cfg.proximal_mu > 0 else None
        counts = self.client_class_counts(indices) if self.cfg.label_skew != "none" else None
        correction = None if controls is None else self._correction(*controls)
        # SCAFFOLD: the sum of each corrected parameter's uncorrected gradients over the steps
        grad_sum = None if correction is None else [None if d is None else torch.zeros_like(d) for d in correction]
        loss_sum, flops, samples, computed_rows = 0.0, 0, 0, 0
        make_order = self.batch_order if self.sample_dp is None else self.sample_dp.batch_order
        order = make_order(indices, steps, generator)
        if prefix is not None and order:  # fill the cache ahead, rows of one length batched together
            computed = self.frozen.fill(key, digest, prefix, self.train, torch.cat(order), self.cfg.batch_size)
            flops += sum(prefix.flops(group) for group in computed)
            computed_rows += sum(len(group["labels"]) for group in computed)
        for batch_rows in order:
            if len(batch_rows) == 0:  # a Poisson batch (privacy mode "sample") without rows: a noise-only step
                loss_sum += self._step(None, optimizer, anchor, counts, correction, grad_sum)
                continue
            batch = self.train.batch(batch_rows)
            if prefix is None:
                loss_sum += self._step(batch, optimizer, anchor, counts, correction, grad_sum)
                flops += self.flops(batch)
            else:
                hidden, computed = self.frozen.hidden(key, digest, prefix, self.train, batch_rows, batch)
                with prefix.feeding(hidden):
                    loss_sum += self._step(batch, optimizer, anchor, counts, correction, grad_sum)
                # spent: the step without the prefix's forward, plus the rows whose prefix ran now
                flops += self.flops(batch) - prefix.flops(batch) + sum(prefix.flops(group) for group in computed)
                computed_rows += sum(len(group["labels"]) for group in computed)
            samples += len(batch_rows)
        self.model.eval()
        state = get_state(self.model, names)
        metrics = {
            "train_loss": loss_sum / steps,
            "steps": float(steps),
            "samples_processed": float(samples),
            "flops": float(flops),
            "compute_s": time.perf_counter() - start,
            "frozen_rows_computed": float(computed_rows),  # rows whose frozen prefix ran (not cached)
            "frozen_cache_bytes": float(0 if prefix is None else self.frozen.bytes_of(key)),
        }
        control = {} if controls is None else scaffold.control_delta(controls[1], self._mean(grad_sum, steps), state)
        return ClientResult(client, state, int(len(indices)), metrics, control)

    def _correction(self, c: NamedArrays, c_i: NamedArrays) -> list[torch.Tensor | None]:
        """SCAFFOLD's ``c - c_i`` as one tensor per trainable parameter (None: not exchanged)."""
        diff = scaffold.correction(c, c_i)
        return [
            None if n is None else torch.from_numpy(np.asarray(diff[n])).to(p.dtype)
            for n, p in zip(self.param_names, self.params)
        ]

    def _mean(self, sums: list[torch.Tensor | None], steps: int) -> NamedArrays:
        """``sums / steps`` by exchanged name (float64), for the parameters SCAFFOLD corrects."""
        return {n: s.double().numpy() / steps for n, s in zip(self.param_names, sums) if s is not None}

    def client_class_counts(self, indices: np.ndarray) -> torch.Tensor:
        """The client's number of training rows per class (label ids ``0..max``); used on the
        client only, never sent. The losses pad it to the model's number of classes."""
        rows = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return torch.bincount(self.train.labels[rows])

    def _step(
        self,
        batch: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        anchor: list[torch.Tensor] | None = None,
        counts: torch.Tensor | None = None,
        correction: list[torch.Tensor | None] | None = None,
        grad_sum: list[torch.Tensor | None] | None = None,
    ) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = self._backward(batch, anchor, counts)
        if correction is not None:  # SCAFFOLD: g + c - c_i, clipped and stepped like any gradient
            with torch.no_grad():
                for p, d, total in zip(self.params, correction, grad_sum):
                    if d is not None:
                        if p.grad is not None:
                            total.add_(p.grad)
                        p.grad = d.clone() if p.grad is None else p.grad.add_(d)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        optimizer.step()
        return loss

    def _backward(
        self,
        batch: dict[str, torch.Tensor],
        anchor: list[torch.Tensor] | None = None,
        counts: torch.Tensor | None = None,
    ) -> float:
        """Gradients of the local objective into ``.grad``; returns the data loss.

        The data loss is the model's own loss, or with ``counts`` (the client's rows per class) the
        ``federation.label_skew`` loss on the logits. With ``anchor`` (the global values of
        ``self.params``) FedProx's ``mu/2 * ||w - w_global||^2`` is added through its gradient,
        ``mu * (w - w_global)``, so it builds no graph; it is clipped with the rest. With
        ``self.sample_dp`` (DP-SGD) the data gradient is the hook's clipped and noised one (``batch``
        None: an empty Poisson batch, noise only); FedProx's term is added to it unclipped.
        """
        if self.sample_dp is not None:  # DP-SGD: per-sample clipped, summed, noised, over the batch size
            value = self.sample_dp.backward(self, batch, counts)
        else:
            loss = self.model(**batch).loss if counts is None else self._label_skew_loss(batch, counts)
            loss.backward()
            value = float(loss.detach())
        if anchor is not None:
            mu = self.cfg.proximal_mu
            with torch.no_grad():
                for p, p0 in zip(self.params, anchor):
                    if p.grad is None:
                        p.grad = mu * (p - p0)
                    else:
                        p.grad.add_(p - p0, alpha=mu)
        return value

    def _label_skew_loss(self, batch: dict[str, torch.Tensor], counts: torch.Tensor) -> torch.Tensor:
        labels = batch["labels"]
        logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        num_classes = logits.shape[-1]
        counts = torch.nn.functional.pad(counts, (0, max(0, num_classes - len(counts))))[:num_classes]
        if self.cfg.label_skew == "fedlc":
            tau = label_skew.FEDLC_TAU if self.cfg.fedlc_tau is None else self.cfg.fedlc_tau
            return label_skew.fedlc_loss(logits, labels, counts, tau)
        if self.cfg.label_skew == "fedrs":
            alpha = label_skew.FEDRS_ALPHA if self.cfg.fedrs_alpha is None else self.cfg.fedrs_alpha
            return label_skew.fedrs_loss(logits, labels, counts, alpha)
        raise ValueError(f"federation.label_skew: unknown {self.cfg.label_skew!r}")


@torch.no_grad()
def evaluate(model: nn.Module, split: EncodedSplit, batch_size: int, num_labels: int) -> dict[str, float]:
    """Accuracy, macro-F1, mean cross-entropy and the number of distinct classes predicted
    (``predicted_classes``: 1 means the model collapsed to a single class) on ``split``."""
    model.eval()
    preds, loss_sum = [], 0.0
    order = torch.arange(len(split))
    for i in range(0, len(split), batch_size):
        batch = split.batch(order[i : i + batch_size])
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        preds.append(logits.argmax(-1))
    y_pred = torch.cat(preds).numpy()
    y_true = split.labels.numpy()
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": macro_f1(y_true, y_pred, num_labels),
        "loss": loss_sum / len(split),
        "predicted_classes": int(len(np.unique(y_pred))),
    }


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> float:
    """Unweighted mean F1 over the classes present in ``y_true`` or ``y_pred``."""
    cm = np.bincount(y_true * num_labels + y_pred, minlength=num_labels**2).reshape(num_labels, num_labels)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[present].mean()) if present.any() else 0.0
