"""Server optimizers: the server's step after FedAvg, as pure steps with checkpointable state.

Adaptive Federated Optimization (Reddi et al. 2021, https://arxiv.org/abs/2003.00295): the
server treats ``delta = fedavg(clients) - global`` as a pseudo-gradient and moves the global
state by an optimizer's step on it, ``new_global = global + server_opt(delta)``. FedAvgM is the
same with server momentum (Hsu et al. 2019, https://arxiv.org/abs/1909.06335).

Each optimizer computes what Flower's Message-API strategy of the same name computes (flwr 1.42,
``flwr.serverapp.strategy``: ``FedAvgM``, ``FedAdagrad``, ``FedAdam``, ``FedYogi``), with Flower's
defaults and meanings: ``server_lr`` is Flower's ``eta`` (FedAvgM: ``server_learning_rate``);
Flower's client-side ``eta_l`` has no server-side role. Where Flower differs from the paper, this
module follows Flower:

- ``v`` starts at 0, not at ``v_{-1} >= tau^2`` as in the paper's Algorithm 2 (``m`` at 0 in both).
- FedAdam scales its rate by a bias correction the paper does not have,
  ``server_lr * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))`` for the ``t``-th step (Flower's
  ``server_round + 1``: one more than Kingma & Ba's ``t``), with ``tau`` left uncorrected.
- FedAdagrad has no momentum in Flower (``beta_1`` fixed at 0); here ``beta_1`` defaults to 0
  and may be set, as in the paper.
- FedAvgM's buffer starts at the first delta and then is ``momentum * m + delta`` (PyTorch SGD,
  no dampening). Flower's default momentum is 0, so ``fedavgm`` by default is ``fedavg``.
- Flower computes in each array's own dtype (float32 models in float32) and its FedAdam returns
  float64 arrays for float32 input. Here deltas and moments are float64, and every result array
  keeps its input's dtype: float64 states match Flower to ~1e-12 relative, float32 states to
  float32 rounding.
- Flower counts FedAdam's ``t`` in rounds; here each name counts its own steps, which is the
  same when every update carries every name. An update may carry a subset of the names: only
  those are stepped, a name never seen before starts fresh, the others keep their moments.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import numpy as np

from fedpeft.federation.aggregate import NamedArrays


class ServerOptimizer:
    """The interface of every server optimizer (:meth:`step`, :meth:`state_dict`,
    :meth:`load_state_dict`), and by itself ``fedavg``: ``new = global + server_lr * delta``,
    with ``server_lr == 1`` the FedAvg result itself (the same arrays).

    ``slots`` names the per-parameter moments an optimizer keeps (float64, one per name).
    """

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = _check("server_lr", server_lr, 0.0, np.inf, low_open=True)
        self.slots: tuple[str, ...] = ()
        self.steps = 0  # step() calls
        self._moments: dict[str, dict[str, np.ndarray]] = {}  # name -> slot -> float64 array
        self._counts: dict[str, int] = {}  # name -> steps that carried it (when slots are kept)

    def step(self, global_state: Mapping[str, np.ndarray], average: Mapping[str, np.ndarray]) -> NamedArrays:
        """The new global state after one round.

        Parameters
        ----------
        global_state
            The global state the clients started the round from.
        average
            ``fedavg`` of the clients' results: the names of ``global_state`` or a subset of them,
            each with the same shape and dtype.

        Returns
        -------
        dict
            Every name of ``global_state`` in its order and dtype: the names in ``average``
            stepped, the others ``global_state``'s own arrays.
        """
        for name, value in average.items():
            if name not in global_state:
                raise ValueError(f"server optimizer: {name} is in the average but not in the global state")
            ref = np.asarray(global_state[name])
            value = np.asarray(value)
            if value.shape != ref.shape or value.dtype != ref.dtype:
                raise ValueError(
                    f"server optimizer: {name} is {value.dtype}{list(value.shape)} in the average, "
                    f"{ref.dtype}{list(ref.shape)} in the global state"
                )
            moments = self._moments.get(name, {})
            if any(m.shape != ref.shape for m in moments.values()):
                raise ValueError(f"server optimizer: {name} has shape {ref.shape}, its moments another")
        out = dict(global_state)
        for name, value in average.items():
            if self._plain():
                out[name] = value
                continue
            x = np.asarray(global_state[name])
            delta = np.asarray(value).astype(np.float64) - x.astype(np.float64)
            t = self._counts.get(name, 0) + 1
            update, moments = self._update(delta, self._moments.get(name, {}), t)
            out[name] = np.asarray(x.astype(np.float64) + update).astype(x.dtype)
            if self.slots:
                self._moments[name] = {slot: np.asarray(m) for slot, m in moments.items()}  # 0-d: no scalars
                self._counts[name] = t
        self.steps += 1
        return out

    def state_dict(self) -> NamedArrays:
        """``step`` (0-d int64: step() calls), per stepped name ``step/<name>`` (0-d int64) and
        ``<slot>/<name>`` (float64). Arrays are not copied; the optimizer never changes them."""
        state = {"step": np.asarray(self.steps, dtype=np.int64)}
        for name, moments in self._moments.items():
            state[f"step/{name}"] = np.asarray(self._counts[name], dtype=np.int64)
            state.update({f"{slot}/{name}": moments[slot] for slot in self.slots})
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the optimizer's state with a :meth:`state_dict` output (e.g. read back from a
        checkpoint); the hyper-parameters stay the constructor's."""
        if "step" not in state or np.asarray(state["step"]).shape != ():
            raise ValueError(_NOT_0D.format("'step'"))
        per_name: dict[str, dict[str, np.ndarray]] = {}
        for key, value in state.items():
            if key == "step":
                continue
            kind, sep, name = key.partition("/")
            if not sep or kind not in ("step", *self.slots):
                raise ValueError(f"server optimizer state: unexpected {key!r} for {self.name} (keeps {self.slots})")
            per_name.setdefault(name, {})[kind] = np.asarray(value)
        for name, entries in per_name.items():
            if set(entries) != {"step", *self.slots}:
                raise ValueError(f"server optimizer state: {name} needs step/{name} and {self.slots}")
            if entries["step"].shape != ():
                raise ValueError(_NOT_0D.format(f"step/{name}"))
        self.steps = int(state["step"])
        self._counts = {name: int(entries["step"]) for name, entries in per_name.items()}
        self._moments = {
            name: {slot: np.array(entries[slot], dtype=np.float64) for slot in self.slots}  # a copy
            for name, entries in per_name.items()
        }

    def _plain(self) -> bool:
        return self.server_lr == 1.0

    def _update(self, delta: np.ndarray, moments: dict[str, np.ndarray], t: int) -> tuple[np.ndarray, dict]:
        """The step to add to the global array (float64) and the name's new moments."""
        return self.server_lr * delta, {}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={getattr(self, k)!r}" for k in inspect.signature(type(self)).parameters)
        return f"{self.name}({options})"


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019): ``m = delta`` at first, then ``server_momentum * m +
    delta``; ``new = global + server_lr * m``. Flower's defaults: lr 1, momentum 0."""

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.0) -> None:
        super().__init__(server_lr)
        self.server_momentum = _check("server_momentum", server_momentum, 0.0, 1.0)
        self.slots = ("m",) if self.server_momentum > 0 else ()

    def _plain(self) -> bool:
        return self.server_lr == 1.0 and not self.slots

    def _update(self, delta, moments, t):
        if not self.slots:
            return self.server_lr * delta, {}
        m = delta if "m" not in moments else self.server_momentum * moments["m"] + delta
        return self.server_lr * m, {"m": m}


class _Adaptive(ServerOptimizer):
    """Reddi et al.'s family: ``m = beta_1 * m + (1 - beta_1) * delta``, a second moment ``v``
    (subclasses), ``new = global + lr_t * m / (sqrt(v) + tau)``. ``m`` is kept only if
    ``beta_1 > 0`` (it is ``delta`` otherwise)."""

    def __init__(self, server_lr: float, beta_1: float, beta_2: float, tau: float) -> None:
        super().__init__(server_lr)
        self.beta_1 = _check("beta_1", beta_1, 0.0, 1.0)
        self.beta_2 = _check("beta_2", beta_2, 0.0, 1.0)
        self.tau = _check("tau", tau, 0.0, np.inf, low_open=True)
        self.slots = ("m", "v") if self.beta_1 > 0 else ("v",)

    def _plain(self) -> bool:
        return False

    def _update(self, delta, moments, t):
        m = delta  # beta_1 == 0
        if self.beta_1 > 0:  # Flower: m starts at 0, beta_1 * 0 + (1 - beta_1) * delta
            m_prev = moments["m"] if "m" in moments else 0.0
            m = self.beta_1 * m_prev + (1 - self.beta_1) * delta
        v = self._second_moment(moments.get("v", np.zeros_like(delta)), delta)
        new = {"m": m, "v": v} if self.beta_1 > 0 else {"v": v}
        return self._lr(t) * m / (np.sqrt(v) + self.tau), new

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _lr(self, t: int) -> float:
        return self.server_lr


class FedAdagrad(_Adaptive):
    """``v = v + delta^2``. Flower's defaults: lr 0.1, tau 1e-3, no momentum (beta_1 0)."""

    name = "fedadagrad"

    def __init__(self, server_lr: float = 0.1, tau: float = 1e-3, beta_1: float = 0.0) -> None:
        super().__init__(server_lr, beta_1, 0.0, tau)

    def _second_moment(self, v, delta):
        return v + delta**2


class FedAdam(_Adaptive):
    """``v = beta_2 * v + (1 - beta_2) * delta^2``, rate bias-corrected as Flower does (module
    docstring). Flower's defaults: lr 0.1, beta_1 0.9, beta_2 0.99, tau 1e-3."""

    name = "fedadam"

    def __init__(self, server_lr: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(server_lr, beta_1, beta_2, tau)

    def _second_moment(self, v, delta):
        return self.beta_2 * v + (1 - self.beta_2) * delta**2

    def _lr(self, t):
        return self.server_lr * np.sqrt(1 - np.power(self.beta_2, t + 1.0)) / (1 - np.power(self.beta_1, t + 1.0))


class FedYogi(_Adaptive):
    """``v = v - (1 - beta_2) * delta^2 * sign(v - delta^2)``. Flower's defaults: lr 0.01,
    beta_1 0.9, beta_2 0.99, tau 1e-3."""

    name = "fedyogi"

    def __init__(self, server_lr: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(server_lr, beta_1, beta_2, tau)

    def _second_moment(self, v, delta):
        return v - (1.0 - self.beta_2) * delta**2 * np.sign(v - delta**2)


_NOT_0D = (
    "server optimizer state: {} must be a 0-d array (save state_dict() arrays as they are: "
    "np.ascontiguousarray makes 0-d arrays 1-d)"
)

SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    c.name: c for c in (ServerOptimizer, FedAvgM, FedAdagrad, FedAdam, FedYogi)
}


def build_server_optimizer(name: str, **options: float) -> ServerOptimizer:
    """The server optimizer ``name`` (a key of :data:`SERVER_OPTIMIZERS`) with ``options``
    overriding its defaults, e.g. ``build_server_optimizer("fedadam", server_lr=0.01)``."""
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {name!r}; valid: {', '.join(SERVER_OPTIMIZERS)}")
    cls = SERVER_OPTIMIZERS[name]
    valid = list(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"server optimizer {name} takes {', '.join(valid)}; got {', '.join(unknown)}")
    return cls(**options)


def _check(key: str, value: float, low: float, high: float, low_open: bool = False) -> float:
    value = float(value)
    if not (low < value if low_open else low <= value) or not value < high:
        raise ValueError(f"{key} must be in {'(' if low_open else '['}{low}, {high}), got {value}")
    return value
