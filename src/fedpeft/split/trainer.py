"""A client's SFPrompt round: EL2N pruning, local-loss update, split training with a body server.

SFPrompt (Cao, Zhu, Gong 2024, https://arxiv.org/abs/2407.17533). :class:`SplitTrainer` has the
interface runtimes call (:meth:`ClientTrainer.fit` -> :class:`ClientResult`); a client's round:

(a) pruning (``method.prune``): every row is scored by EL2N through the shortcut
    ``tail(head(x))`` (eval mode, no gradient) and the ``ceil(prune_keep * n)`` highest kept;
(b) local-loss update (``method.local_loss``): ``local_loss_steps`` optimizer steps of the prompts
    and the tail through the shortcut, no server traffic;
(c) split training on the kept rows for ``federation.local_epochs`` / ``local_steps``: head
    forward -> server body -> tail + loss -> gradient at the body's output -> server backward ->
    gradient at the cut -> head backward -> one optimizer step.

Costs in the result's metrics: ``flops`` (= ``client_flops``: head + tail, forward and backward,
every phase, measured by :class:`~torch.utils.flop_counter.FlopCounterMode` around the
client-side work only), ``server_flops`` (body forward + backward), ``activation_bytes_up`` /
``activation_bytes_down`` (:class:`~fedpeft.split.protocol.Traffic`), ``client_flops_pct_of_full``
(``client_flops`` over full fine-tuning's training FLOPs on the same training batches, those of
phases b and c, by :class:`~fedpeft.federation.costs.TrainingFlops` of an unsplit, unprompted
copy with every parameter trainable), and ``kept_rows``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpeft.config import FederationConfig
from fedpeft.data import EncodedSplit
from fedpeft.errors import ConfigError
from fedpeft.federation.client import ClientTrainer, client_seed
from fedpeft.federation.costs import TrainingFlops
from fedpeft.federation.strategy import ClientResult
from fedpeft.methods.base import NamedArrays, get_state, set_state
from fedpeft.split.model import SplitModel
from fedpeft.split.protocol import BodyServer, InProcessBodyServer, Message, forward_message
from fedpeft.split.pruning import el2n_scores, keep_highest


def _counted(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the FLOPs it ran (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


class SplitTrainer(ClientTrainer):
    """SFPrompt's client: trains the prompts and the tail, the body runs on a :class:`BodyServer`.

    Parameters
    ----------
    model, names, train, cfg, seed
        As for :class:`~fedpeft.federation.client.ClientTrainer` (``model`` prepared by
        ``sfprompt``: prompts, tail blocks and above-block modules trainable).
    split : SplitModel
        The model cut at ``method.head_blocks`` / ``method.tail_blocks``.
    options : SFPromptOptions
        ``prune``, ``prune_keep``, ``local_loss``, ``local_loss_steps``.
    full_flops : TrainingFlops, optional
        Full fine-tuning's training FLOPs of a batch (unsplit model, every parameter trained);
        None: ``client_flops_pct_of_full`` is not reported.
    server : BodyServer, optional
        Default: an :class:`InProcessBodyServer` on ``split``.
    """

    def __init__(self, model: nn.Module, names: list[str], train: EncodedSplit, cfg: FederationConfig, seed: int,
                 split: SplitModel, options: Any, full_flops: TrainingFlops | None = None,
                 server: BodyServer | None = None) -> None:
        unsupported = [key for key, on in (
            ("federation.scaffold", cfg.scaffold), ("federation.proximal_mu", cfg.proximal_mu > 0),
            ("federation.label_skew", cfg.label_skew != "none")) if on]
        if unsupported:
            raise ConfigError(f"{', '.join(unsupported)}: not supported with method.name = 'sfprompt' "
                              "(its split training optimizes the model's plain loss)")
        super().__init__(model, names, train, cfg, seed)
        self.split, self.options, self.full_flops = split, options, full_flops
        self.server = server if server is not None else InProcessBodyServer(split)

    def fit(self, client: int, indices: np.ndarray, global_state: NamedArrays, rnd: int,
            controls: tuple[NamedArrays, NamedArrays] | None = None,
            names: list[str] | tuple[str, ...] | None = None) -> ClientResult:
        """One client's SFPrompt round (module docstring); ``controls`` and ``names`` must be None."""
        if controls is not None or names is not None:
            raise ValueError("sfprompt trains every exchanged name and takes no SCAFFOLD controls")
        start = time.perf_counter()
        seed = client_seed(self.seed, rnd, client)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        set_state(self.model, global_state)
        opts = self.options
        server_start, traffic_start = getattr(self.server, "flops", 0), _traffic(self.server)
        client_flops, full_flops = 0, 0
        kept = np.asarray(indices)
        if opts.prune and len(kept):  # (a) EL2N through the shortcut
            scores, flops = _counted(lambda: self.scores(kept))
            client_flops += flops
            kept = keep_highest(kept, scores, opts.prune_keep)
        optimizer = self.make_optimizer()
        self.model.train()
        local_sum, local_steps = 0.0, opts.local_loss_steps if opts.local_loss else 0
        for batch_rows in self.batch_order(kept, local_steps, generator) if local_steps else []:  # (b)
            batch = self.train.batch(batch_rows)
            loss, flops = _counted(lambda: self._shortcut_step(batch, optimizer))
            local_sum, client_flops = local_sum + loss, client_flops + flops
            full_flops += self._full(batch)
        steps, loss_sum, samples = self.num_steps(len(kept)), 0.0, 0
        for i, batch_rows in enumerate(self.batch_order(kept, steps, generator)):  # (c) split training
            batch = self.train.batch(batch_rows)
            loss, flops = self.split_step(batch, optimizer, f"{rnd}/{client}/{i}")
            loss_sum, client_flops, samples = loss_sum + loss, client_flops + flops, samples + len(batch_rows)
            full_flops += self._full(batch)
        self.model.eval()
        traffic = _traffic(self.server)
        metrics = {
            "train_loss": loss_sum / steps,
            "local_loss": local_sum / local_steps if local_steps else 0.0,
            "steps": float(steps),
            "local_loss_steps": float(local_steps),
            "kept_rows": float(len(kept)),
            "samples_processed": float(samples),
            "flops": float(client_flops),  # the client's FLOPs: head + tail, every phase
            "server_flops": float(getattr(self.server, "flops", 0) - server_start),
            "activation_bytes_up": float(traffic[0] - traffic_start[0]),
            "activation_bytes_down": float(traffic[1] - traffic_start[1]),
            "compute_s": time.perf_counter() - start,
        }
        if self.full_flops is not None and full_flops:
            metrics["client_flops_pct_of_full"] = 100.0 * client_flops / full_flops
        return ClientResult(client, get_state(self.model, self.names), int(len(indices)), metrics)

    def _full(self, batch: dict[str, torch.Tensor]) -> int:
        return 0 if self.full_flops is None else self.full_flops(batch)

    @torch.no_grad()
    def scores(self, indices: np.ndarray) -> np.ndarray:
        """EL2N score of each row of ``indices`` through the shortcut, in eval mode: ``(n,)``."""
        training = self.model.training
        self.model.eval()
        out = []
        rows = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        for i in range(0, len(rows), self.cfg.eval_batch_size):
            batch = self.train.batch(rows[i : i + self.cfg.eval_batch_size])
            labels = batch.pop("labels")
            out.append(el2n_scores(self.split.shortcut(batch).logits, labels))
        self.model.train(training)
        return torch.cat(out).numpy()

    def _shortcut_step(self, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
        """One local-loss step: prompts + tail through ``tail(head(x))``, no server."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.split.shortcut(batch).loss
        loss.backward()
        self._clip_and_step(optimizer)
        return float(loss.detach())

    def split_step(self, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                   request: str) -> tuple[float, int]:
        """One split-training step on ``batch`` through the body server; returns (loss, client FLOPs)."""
        optimizer.zero_grad(set_to_none=True)
        self.model.train()
        head, f_head = _counted(lambda: self.split.head(batch))  # hidden (B, L, H)
        reply = self.server.forward(request, forward_message(head.hidden, head.context))
        body_out = reply.tensors["hidden"].detach().requires_grad_(True)  # (B, L, H)

        def tail_backward() -> torch.Tensor:
            loss = self.split.tail(body_out, batch, head.embedded).loss
            loss.backward()
            return loss

        loss, f_tail = _counted(tail_backward)
        grad = self.server.backward(request, Message({"grad": body_out.grad})).tensors["grad"]  # (B, L, H)
        _, f_back = _counted(lambda: head.hidden.backward(grad) if head.hidden.requires_grad else None)
        self._clip_and_step(optimizer)
        return float(loss.detach()), f_head + f_tail + f_back

    def _clip_and_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        optimizer.step()


def _traffic(server: Any) -> tuple[int, int]:
    traffic = getattr(server, "traffic", None)
    return (0, 0) if traffic is None else (traffic.up, traffic.down)
