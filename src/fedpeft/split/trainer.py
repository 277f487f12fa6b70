"""A client's SFPrompt round: EL2N pruning, local-loss update, split training with a body server.

SFPrompt (Cao, Zhu, Gong 2024, https://arxiv.org/abs/2407.17533). :class:`SplitTrainer` has the
interface runtimes call (:meth:`ClientTrainer.fit` -> :class:`ClientResult`); a client's round:

(a) pruning (``method.prune``): every row is scored by EL2N through the shortcut
    ``tail(head(x))`` (eval mode, no gradient) and the ``ceil(prune_keep * n)`` highest kept;
(b) local-loss update (``method.local_loss``): ``local_loss_steps`` optimizer steps of the prompts
    and the tail through the shortcut, no server traffic;
(c) split training on the kept rows for ``federation.local_epochs`` / ``local_steps``: head
    forward -> server body -> tail + loss -> gradient at the body's output -> server backward ->
    gradient at the cut -> head backward -> one optimizer step. Dropout in each batch's head
    and tail passes is seeded per ``(seed, round, client, batch, pass)``
    (:func:`~fedpeft.split.session.pass_seed`), so a client that runs its head again from the
    same parameters (a Flower ClientApp between messages: :mod:`fedpeft.split.session`) gets the
    same activations.

Costs in the result's metrics: ``flops`` (= ``client_flops``: head + tail, forward and backward,
every phase, measured by :class:`~torch.utils.flop_counter.FlopCounterMode` around the
client-side work only), ``server_flops`` (body forward + backward), ``activation_bytes_up`` /
``activation_bytes_down`` (:class:`~fedpeft.split.protocol.Traffic`), ``client_flops_pct_of_full``
(``client_flops`` over full fine-tuning's training FLOPs on the same training batches, those of
phases b and c, by :class:`~fedpeft.federation.costs.TrainingFlops` of an unsplit, unprompted
copy with every parameter trainable), ``kept_rows``, and ``recompute_flops`` (head passes a
restored session ran again: 0 in process; not part of ``flops``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fedpeft.config import FederationConfig
from fedpeft.data import EncodedSplit
from fedpeft.errors import ConfigError
from fedpeft.federation.client import ClientTrainer
from fedpeft.federation.costs import TrainingFlops
from fedpeft.federation.strategy import ClientResult
from fedpeft.methods.base import NamedArrays
from fedpeft.split.model import SplitModel
from fedpeft.split.protocol import BodyServer, InProcessBodyServer
from fedpeft.split.pruning import el2n_scores
from fedpeft.split.session import SplitSession


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
        """One client's SFPrompt round (module docstring); ``controls`` and ``names`` must be None.

        Drives a :class:`~fedpeft.split.session.SplitSession` against :attr:`server`, one batch
        after another; the result's metrics add the server's counts for this client
        (:func:`body_metrics`)."""
        if controls is not None or names is not None:
            raise ValueError("sfprompt trains every exchanged name and takes no SCAFFOLD controls")
        server_start, traffic_start = getattr(self.server, "flops", 0), _traffic(self.server)
        session = SplitSession.begin(self, client, indices, global_state, rnd)
        while not session.done:
            request = session.request
            reply = self.server.forward(request, session.forward_request())
            session.on_cut_grad(self.server.backward(request, session.on_body_output(reply)))
        res = session.result()
        res.metrics.update(body_metrics(self.server, server_start, traffic_start))
        return res

    def full(self, batch: dict[str, torch.Tensor]) -> int:
        """Full fine-tuning's training FLOPs of ``batch`` (0 without :attr:`full_flops`)."""
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

    def shortcut_step(self, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
        """One local-loss step: prompts + tail through ``tail(head(x))``, no server."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.split.shortcut(batch).loss
        loss.backward()
        self.clip_and_step(optimizer)
        return float(loss.detach())

    def clip_and_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        optimizer.step()


def body_metrics(server: Any, flops_start: int = 0, traffic_start: tuple[int, int] = (0, 0)) -> dict[str, float]:
    """What ``server`` (an :class:`~fedpeft.split.protocol.InProcessBodyServer`) counted since
    ``flops_start`` / ``traffic_start``: ``server_flops``, ``activation_bytes_up`` / ``_down``."""
    up, down = _traffic(server)
    return {"server_flops": float(getattr(server, "flops", 0) - flops_start),
            "activation_bytes_up": float(up - traffic_start[0]),
            "activation_bytes_down": float(down - traffic_start[1])}


def _traffic(server: Any) -> tuple[int, int]:
    traffic = getattr(server, "traffic", None)
    return (0, 0) if traffic is None else (traffic.up, traffic.down)
