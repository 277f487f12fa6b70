"""Sample-level differential privacy: DP-SGD (Abadi et al. 2016, https://arxiv.org/abs/1607.00133)
on every client's rows (``privacy.mode = "sample"``).

Each local step draws a Poisson batch (every row of the client independently with probability
``q = B / n``, ``B = min(federation.batch_size, n)``, ``n`` the client's rows: Opacus's
``UniformWithReplacementSampler``), computes every row's gradient of the trainable part, clips
each to L2 norm ``C = privacy.max_grad_norm`` (one norm over every trainable parameter), sums
them, adds ``N(0, (z C)^2)`` per coordinate and divides by the expected batch size ``B``; the
optimizer steps on that. An empty batch is a noise-only step.

Per-sample gradients come from one of two engines (:data:`ENGINES`, chosen per method):

* ``opacus``: Opacus's ``GradSampleModule`` hooks on the trainable modules (``head``, ``bias``,
  ``adapter``, ``lora``, ``layers``; above a frozen prefix's cut too);
* ``loop``: one forward and backward pass per row (exact for any module, ``B`` times slower):
  ``full`` (BERT's / GPT-2's position embeddings are looked up once for a batch of 1 and
  broadcast, so Opacus's per-sample gradient of them is a batch sum) and ``prompt`` (peft computes
  the prompt embedding once and repeats it over the batch: the same problem).

The hook (:class:`SampleDPHook`) is what :class:`~fedpeft.federation.client.ClientTrainer` calls
for its batches and gradients when ``trainer.sample_dp`` is set; :class:`SampleDPTrainer` wraps
the trainer, installs the hook and keeps each client's accountant (:class:`SampleAccountant`:
its steps and ``q``, checkpointed as ``clients.safetensors``). The epsilon of client ``k`` after
``s`` steps is the RDP accountant's (:func:`fedpeft.privacy.accountant.epsilon`) for ``(q_k, z, s)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedpeft.errors import ConfigError

if TYPE_CHECKING:
    from fedpeft.config import Config

NamedArrays = dict[str, np.ndarray]

NOISE_TAG = 0xD95  # seeds: (seed, round, client, NOISE_TAG) a client's DP-SGD noise in one round
STEPS_KEY, RATE_KEY = "privacy_steps/", "privacy_q/"  # checkpoint keys: <key><client>
LOOP_METHODS = ("full", "prompt")  # per-sample gradients by a loop of single-row passes (module docstring)
REFUSED_METHODS = {"sfprompt": "its split trainer sends activations and receives their gradients "
                               "for a whole batch; per-sample clipping of that protocol is not built"}


def sampling_rate(batch_size: int, rows: int) -> float:
    """``q = min(batch_size, rows) / rows`` (1 for a client with at most ``batch_size`` rows)."""
    return min(batch_size, rows) / rows


@dataclass(frozen=True)
class SampleDP:
    """DP-SGD settings as :func:`plan_sample_dp` resolves them."""

    noise_multiplier: float  # z
    max_grad_norm: float  # C
    delta: float
    batch_size: int  # B (configured): the expected batch size is min(B, client's rows)
    seed: int
    engine: str  # opacus | loop

    def summary(self) -> dict[str, Any]:
        return {"privacy": "sample", "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.max_grad_norm, "sampling": "poisson", "per_sample_grads": self.engine}


def plan_sample_dp(cfg: "Config", sizes: list[int], steps_per_round: list[int]) -> SampleDP | None:
    """The :class:`SampleDP` of ``cfg.privacy`` (None unless ``mode = "sample"``).

    With ``target_epsilon`` the noise multiplier is the smallest for which *every* client's
    epsilon after ``federation.rounds`` rounds of its ``steps_per_round`` local steps at its rate
    ``q_k`` is at most the target: the worst case of a client selected in every round.

    Raises
    ------
    ConfigError
        For a method that is refused (:data:`REFUSED_METHODS`), a target that cannot be met, or a
        delta not below ``1 / rows`` of the smallest client.
    """
    p = cfg.privacy
    if p.mode != "sample":
        return None
    method = cfg.method.name
    if method in REFUSED_METHODS:
        raise ConfigError(f'privacy.mode = "sample" with method.name = "{method}": {REFUSED_METHODS[method]}')
    smallest = min(sizes)
    if not p.delta < 1 / smallest:
        raise ConfigError(f"privacy.delta = {p.delta:g} must be < 1 / {smallest} (the rows of the smallest client) "
                          'with privacy.mode = "sample": a larger delta allows releasing a row outright')
    from fedpeft.privacy.accountant import MAX_NOISE_MULTIPLIER, noise_for_epsilon

    if p.noise_multiplier is not None:
        z = p.noise_multiplier
    else:
        rounds = cfg.federation.rounds
        pairs = sorted({(sampling_rate(cfg.federation.batch_size, n), s * rounds) for n, s in zip(sizes, steps_per_round)})
        try:
            z = max(noise_for_epsilon(p.target_epsilon, q, steps, p.delta) for q, steps in pairs)
        except ValueError as exc:
            raise ConfigError(f'privacy.target_epsilon = {p.target_epsilon:g} (mode = "sample", the client selected in '
                              f"every round): {exc}; raise target_epsilon or delta, or lower federation.rounds, "
                              "local_steps / local_epochs or batch_size") from None
    if z > MAX_NOISE_MULTIPLIER:
        raise ConfigError(f"privacy.noise_multiplier {z:g} is above {MAX_NOISE_MULTIPLIER:g}: the noise would drown every step")
    return SampleDP(z, p.max_grad_norm, p.delta, cfg.federation.batch_size, cfg.runtime.seed,
                    "loop" if method in LOOP_METHODS else "opacus")


# ----------------------------------------------------------------------------- the gradient step


def row_mean_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A causal LM's DP-SGD loss: ``mean_i l_i``, ``l_i`` the mean next-token cross-entropy over
    row ``i``'s response tokens (labels ``-100`` elsewhere), so every row weighs the same whatever
    its response length (the model's own loss is the mean over the batch's tokens, which would
    make one row's gradient depend on the other rows' lengths).

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM; logits ``(B, P + L, V)`` (``P`` virtual tokens first, if any).
    batch : dict of str to torch.Tensor
        Model inputs and ``labels`` ``(B, L)``.

    Returns
    -------
    torch.Tensor
        The scalar loss, float32.
    """
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    logits = logits[:, -labels.shape[1]:]  # drop virtual tokens (prompt tuning): they have no label
    target = labels[:, 1:]  # the token each position predicts
    tokens = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
        ignore_index=-100, reduction="none").view(target.shape)  # (B, L - 1)
    counted = (target != -100).to(tokens.dtype)
    return ((tokens * counted).sum(1) / counted.sum(1).clamp_min(1.0)).mean()


def clip_factors(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """``min(1, C / ||g_i||)`` per row (1 for a zero gradient)."""
    return torch.where(norms > clip, clip / norms.clamp_min(1e-30), torch.ones_like(norms))


class SampleDPHook:
    """What a :class:`~fedpeft.federation.client.ClientTrainer` calls with ``trainer.sample_dp`` set:
    :meth:`batch_order` (Poisson batches) and :meth:`backward` (clipped, noised gradients into
    ``.grad``). :meth:`begin` seeds one client's round."""

    def __init__(self, dp: SampleDP) -> None:
        self.dp = dp
        self.noise: torch.Generator | None = None
        self.expected = 1  # the expected batch size of the current client
        self.rate = 1.0
        self._gsm: Any = None  # Opacus GradSampleModule (engine opacus), installed on first use
        self.clipped = 0  # rows whose gradient was clipped, and rows seen, in the current fit
        self.rows = 0

    def begin(self, client: int, rnd: int, rows: int) -> None:
        seed = int(np.random.default_rng([self.dp.seed, rnd, client, NOISE_TAG]).integers(2**62))
        self.noise = torch.Generator().manual_seed(seed)
        self.expected = min(self.dp.batch_size, rows)
        self.rate = sampling_rate(self.dp.batch_size, rows)
        self.clipped = self.rows = 0

    def batch_order(self, indices: np.ndarray, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
        """``steps`` Poisson batches: each row in each independently with probability ``q``."""
        rows = torch.as_tensor(indices, dtype=torch.long)
        return [rows[torch.rand(len(rows), generator=generator) < self.rate] for _ in range(steps)]

    def backward(self, trainer: Any, batch: dict[str, torch.Tensor] | None,
                 counts: torch.Tensor | None = None) -> float:
        """``(sum_i clip_C(g_i) + N(0, (z C)^2)) / B`` into every trainable parameter's ``.grad``;
        returns the batch's mean data loss (0 for an empty batch)."""
        params = trainer.params
        total = [torch.zeros_like(p) for p in params]
        loss = 0.0
        if batch is not None and len(batch["labels"]):
            if self.dp.engine == "loop":
                loss = self._loop(trainer, batch, counts, params, total)
            else:
                loss = self._opacus(trainer, batch, counts, params, total)
        std = self.dp.noise_multiplier * self.dp.max_grad_norm
        with torch.no_grad():
            for p, s in zip(params, total):
                if std > 0:
                    s.add_(torch.normal(0.0, std, size=s.shape, generator=self.noise, dtype=s.dtype))
                p.grad = s.div_(self.expected)
        return loss

    def _loss(self, trainer: Any, batch: dict[str, torch.Tensor], counts: torch.Tensor | None) -> torch.Tensor:
        """The batch's loss as the mean over its rows of one loss per row, so a per-sample gradient
        is the gradient of that row's loss: a classifier's cross-entropy (or the label-skew loss);
        a causal LM's (``(B, L)`` labels) :func:`row_mean_lm_loss`, which for one row is the model's
        own loss (the mean over its response tokens)."""
        if counts is not None:
            return trainer._label_skew_loss(batch, counts)
        if batch["labels"].dim() == 2 and len(batch["labels"]) > 1:  # causal-lm: not the token mean
            return row_mean_lm_loss(trainer.model, batch)
        return trainer.model(**batch).loss

    def _accumulate(self, grads: list[torch.Tensor], total: list[torch.Tensor]) -> None:
        """Clip per-sample gradients (``grads[j]``: ``(n, *shape)``) and add their sum to ``total``."""
        norms = torch.sqrt(sum(g.reshape(len(g), -1).double().pow(2).sum(1) for g in grads))
        factors = clip_factors(norms, self.dp.max_grad_norm)
        self.clipped += int((norms > self.dp.max_grad_norm).sum())
        self.rows += len(norms)
        for g, s in zip(grads, total):
            s.add_(torch.einsum("n,n...->...", factors.to(g.dtype), g))

    def _loop(self, trainer, batch, counts, params, total) -> float:
        n, losses = len(batch["labels"]), []
        for i in range(n):
            row = {k: v[i : i + 1] for k, v in batch.items()}
            loss = self._loss(trainer, row, counts)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            losses.append(float(loss.detach()))
            with torch.no_grad():
                self._accumulate([torch.zeros_like(p)[None] if g is None else g[None] for p, g in zip(params, grads)],
                                 total)
        return sum(losses) / n

    def _opacus(self, trainer, batch, counts, params, total) -> float:
        if self._gsm is None:
            from opacus.grad_sample import GradSampleModule

            self._gsm = GradSampleModule(trainer.model, batch_first=True, loss_reduction="mean", strict=False)
        n = len(batch["labels"])
        for p in params:
            p.grad_sample = None
        # the hooks work only inside this step: evaluation and the FLOPs probe run the plain model
        self._gsm.enable_hooks()
        try:
            loss = self._loss(trainer, batch, counts)
            with warnings.catch_warnings():  # "full backward hook ... no inputs require gradients": the frozen input
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
        finally:
            self._gsm.disable_hooks()
        grads = []
        for (name, p) in zip(_names(trainer), params):
            gs = getattr(p, "grad_sample", None)
            if gs is None or gs.shape[0] != n:
                raise ConfigError(
                    f'privacy.mode = "sample": Opacus computed no per-sample gradient of {name} '
                    f"(got {None if gs is None else tuple(gs.shape)} for a batch of {n}); this method's modules "
                    "are not supported by its hooks")
            grads.append(gs.detach())
            p.grad_sample = None
            p.grad = None
        with torch.no_grad():
            self._accumulate(grads, total)
        return float(loss.detach())

    def clipped_fraction(self) -> float:
        return self.clipped / self.rows if self.rows else 0.0


def _names(trainer: Any) -> list[str]:
    ids = {id(p) for p in trainer.params}
    return [n for n, p in trainer.model.named_parameters() if id(p) in ids]


# ----------------------------------------------------------------------------- the accountant


class SampleAccountant:
    """Each client's DP-SGD history: the steps it took at its rate ``q`` (one client keeps one
    ``q``: its rows and the batch size do not change). A client never trained has spent 0."""

    def __init__(self, dp: SampleDP) -> None:
        self.dp = dp
        self.steps: dict[int, int] = {}
        self.rates: dict[int, float] = {}

    def add(self, client: int, q: float, steps: int) -> None:
        if client in self.rates and self.rates[client] != q:
            raise ValueError(f"client {client}: sampling rate {q} differs from its earlier {self.rates[client]}")
        self.rates[client] = q
        self.steps[client] = self.steps.get(client, 0) + int(steps)

    def epsilon(self, client: int) -> float:
        from fedpeft.privacy.accountant import epsilon

        if client not in self.steps:
            return 0.0
        return epsilon(self.rates[client], self.dp.noise_multiplier, self.steps[client], self.dp.delta)

    def max_epsilon(self) -> float:
        return max((self.epsilon(c) for c in self.steps), default=0.0)

    def client_state(self, client: int) -> NamedArrays:
        """Client ``client``'s entries of :meth:`state_dict` (empty if it never trained): what a
        Flower node keeps for its client between rounds (:mod:`fedpeft.runtime.flower.app`)."""
        if client not in self.steps:
            return {}
        return {f"{STEPS_KEY}{client}": np.asarray(self.steps[client], np.int64),
                f"{RATE_KEY}{client}": np.asarray(self.rates[client], np.float64)}

    def load_client_state(self, client: int, state: Mapping[str, np.ndarray]) -> None:
        """Replace client ``client``'s history with ``state`` (:meth:`client_state`; empty: none).

        Raises
        ------
        ValueError
            When ``state`` holds another client's entries or not both of steps and rate.
        """
        keys = {f"{STEPS_KEY}{client}", f"{RATE_KEY}{client}"}
        if state and set(state) != keys:
            raise ValueError(f"sample-level accountant of client {client}: keys {sorted(state)}, expected {sorted(keys)}")
        self.steps.pop(client, None)
        self.rates.pop(client, None)
        if state:
            self.steps[client] = int(np.asarray(state[f"{STEPS_KEY}{client}"]))
            self.rates[client] = float(np.asarray(state[f"{RATE_KEY}{client}"]))

    def state_dict(self) -> NamedArrays:
        out: NamedArrays = {}
        for c in sorted(self.steps):
            out[f"{STEPS_KEY}{c}"] = np.asarray(self.steps[c], np.int64)
            out[f"{RATE_KEY}{c}"] = np.asarray(self.rates[c], np.float64)
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        steps, rates = {}, {}
        for key, value in state.items():
            for prefix, into, kind in ((STEPS_KEY, steps, int), (RATE_KEY, rates, float)):
                if key.startswith(prefix) and key[len(prefix):].isdigit():
                    into[int(key[len(prefix):])] = kind(np.asarray(value))
                    break
            else:
                raise ValueError(f"sample-level accountant: unexpected key {key!r}")
        if set(steps) != set(rates):
            raise ValueError("sample-level accountant: steps and sampling rates name different clients")
        self.steps, self.rates = steps, rates


class SampleDPTrainer:
    """A :class:`~fedpeft.federation.client.ClientTrainer` that trains with DP-SGD: installs a
    :class:`SampleDPHook` on it, seeds the hook per client and round, and after each fit adds the
    steps to the client's accountant and its ``epsilon`` (spent so far) and
    ``dp_clipped_fraction`` (rows whose gradient was clipped) to the metrics. Everything else is
    the wrapped trainer's."""

    def __init__(self, trainer: Any, dp: SampleDP) -> None:
        if not hasattr(trainer, "_backward") or not hasattr(trainer, "batch_order"):
            raise ConfigError(f'privacy.mode = "sample" needs the standard client trainer, not {type(trainer).__name__}')
        self.trainer, self.dp = trainer, dp
        self.hook = SampleDPHook(dp)
        trainer.sample_dp = self.hook
        self.sample_accountant = SampleAccountant(dp)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trainer, name)

    def fit(self, client: int, indices: np.ndarray, global_state: NamedArrays, rnd: int,
            controls: Any = None, names: Any = None) -> Any:
        if controls is not None:
            raise ValueError('SCAFFOLD with privacy.mode = "sample" is not supported')
        rows = len(indices)
        self.hook.begin(client, rnd, rows)
        res = self.trainer.fit(client, indices, global_state, rnd, controls, names)
        self.sample_accountant.add(client, sampling_rate(self.dp.batch_size, rows), int(res.metrics["steps"]))
        metrics = {**res.metrics, "epsilon": self.sample_accountant.epsilon(client),
                   "dp_clipped_fraction": self.hook.clipped_fraction()}
        return replace(res, metrics=metrics)

