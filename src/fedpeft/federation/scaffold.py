"""SCAFFOLD's control variates over the exchanged part (Karimireddy et al. 2020,
https://arxiv.org/abs/1910.06378, Algorithm 1; option II measured from the gradients).

Every control variate is a named state with the exchanged state's names, shapes and dtypes.
The server keeps ``c``, client ``i`` keeps ``c_i``; both start at 0. In round ``r`` the server
sends ``(x, c)`` to the selected clients ``S``; client ``i`` takes ``K`` local steps from
``y_i = x`` along the corrected gradient ``g_i(y_i) + c - c_i``, then reports

    delta_y_i = y_i - x                                 (sent as its new state y_i)
    delta_c_i = c_i+ - c_i,  c_i+ = mean_k g_i(y_i^k)   (the mean uncorrected local gradient)
    c_i      <- c_i + delta_c_i                         (kept by the client)

and the server, besides the usual FedAvg of the states, moves

    c <- c + |S| / N * mean_{i in S} delta_c_i          (an unweighted mean over S)

``S`` is the round's accepted clients and ``N`` the number of clients. For the paper's plain
SGD (no momentum, clipping or weight decay) ``c_i+`` is option II's
``c_i - c + (x - y_i) / (K * eta_l)`` exactly: that displacement is the mean corrected gradient
``mean_k g_i + c - c_i``. Measured from the gradients rather than from the displacement it stays
a gradient estimate under any local optimizer: with AdamW ``(x - y_i) / (K * eta_l)`` is about
the sign of the mean step (size ~1 per coordinate, not the gradient's), and on banking77 the
option II form made LoRA + AdamW collapse to chance from round 2 (docs/methods.md).
``c_i + delta_c_i`` makes the client keep exactly what the server adds up, so ``c`` stays the
mean of every client's ``c_i`` up to float rounding. The functions here are pure; where ``c_i``
lives is the runtime's business (:class:`ClientControls` in process, the SuperNode's
``context.state`` in Flower).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedpeft.federation.aggregate import NamedArrays, RunningFedAvg

PREFIX = "scaffold_c/"  # the server's c in the strategy's state_dict: scaffold_c/<name>


def zeros_like(state: Mapping[str, np.ndarray]) -> NamedArrays:
    """A control variate at 0: ``state``'s names, shapes and dtypes."""
    return {name: np.zeros_like(value) for name, value in state.items()}


def correction(c: Mapping[str, np.ndarray], c_i: Mapping[str, np.ndarray]) -> NamedArrays:
    """``c - c_i``: what every local step adds to the gradient of each exchanged parameter."""
    return {name: c[name] - c_i[name] for name in c}


def control_delta(
    c_i: Mapping[str, np.ndarray], mean_gradient: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]
) -> NamedArrays:
    """``delta_c_i = mean_k g_i - c_i``: the step that makes ``c_i`` the mean local gradient.

    Parameters
    ----------
    c_i
        The client's control variate it trained with.
    mean_gradient
        The mean over the ``K`` local steps of each exchanged trainable parameter's gradient of
        the local objective (data loss, plus FedProx's term), before SCAFFOLD's correction and
        clipping; a name it lacks (an exchanged entry that is not trained) counts as 0.
    like
        The client's new state: ``delta_c_i`` has its names and dtypes (a global state may also
        hold what clients only receive).
    """
    out: NamedArrays = {}
    for name, value in like.items():
        g = np.asarray(mean_gradient[name], np.float64) if name in mean_gradient else 0.0
        out[name] = np.asarray(g - np.asarray(c_i[name], np.float64), dtype=value.dtype).reshape(value.shape)
    return out


def advance(c_i: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> NamedArrays:
    """The client's new control variate ``c_i + delta_c_i``."""
    return {name: c_i[name] + delta[name] for name in c_i}


class ServerControl:
    """The server's control variate ``c`` and its step ``c <- c + |S|/N * mean_S(delta_c_i)``.

    Parameters
    ----------
    num_clients
        ``N``, every client of the federation (not the clients per round).
    """

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients
        self.c: NamedArrays = {}  # empty until the first round: then 0 like the global state

    def current(self, like: Mapping[str, np.ndarray]) -> NamedArrays:
        """``c`` as sent with the global state ``like`` (0 in its names before the first round)."""
        if not self.c:
            self.c = zeros_like(like)
        return self.c

    def step(self, deltas: RunningFedAvg) -> None:
        """Move ``c`` by ``deltas``: the accepted ``delta_c_i`` of a round, each added with weight 1
        (so ``deltas.result()`` is their unweighted mean and ``deltas.count`` is ``|S|``)."""
        mean, share = deltas.result(), deltas.count / self.num_clients
        self.c = {
            name: (np.asarray(c, np.float64) + share * mean[name].astype(np.float64)).astype(c.dtype)
            for name, c in self.c.items()
        }

    def reset(self) -> None:
        """Back to 0 (when every client's ``c_i`` restarts at 0: ``c`` must be their mean)."""
        self.c = {}

    def state_dict(self) -> NamedArrays:
        return {PREFIX + name: value for name, value in self.c.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Load the ``scaffold_c/<name>`` entries of a :meth:`state_dict`; others are an error."""
        other = sorted(key for key in state if not key.startswith(PREFIX))
        if other:
            raise ValueError(f"SCAFFOLD state: unexpected {other[:5]}")
        self.c = {key[len(PREFIX):]: np.array(value) for key, value in state.items()}


class ClientControls:
    """Every client's ``c_i``, for a runtime that simulates the clients in one process.

    Only the exchanged part is kept, and only for clients that have trained (a client never
    selected is at 0 and costs nothing): with ``B`` bytes of exchanged state, ``n`` clients cost
    ``n * B`` bytes of memory, the same again in each checkpoint.
    """

    def __init__(self) -> None:
        self._by_client: dict[int, NamedArrays] = {}

    def get(self, client: int, like: Mapping[str, np.ndarray]) -> NamedArrays:
        """``c_i`` of ``client`` (0 in the names of ``like`` if it never trained)."""
        c_i = self._by_client.get(client)
        return zeros_like(like) if c_i is None else c_i

    def set(self, client: int, c_i: NamedArrays) -> None:
        self._by_client[client] = c_i

    def __len__(self) -> int:
        return len(self._by_client)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for c_i in self._by_client.values() for a in c_i.values())

    def state_dict(self) -> NamedArrays:
        """``<client>/<name>`` -> array, for a checkpoint (the arrays themselves, not copies)."""
        return {f"{cid}/{name}": a for cid, c_i in sorted(self._by_client.items()) for name, a in c_i.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace every ``c_i`` with those of a :meth:`state_dict` output."""
        by_client: dict[int, NamedArrays] = {}
        for key, value in state.items():
            cid, sep, name = key.partition("/")
            if not sep or not cid.isdigit():
                raise ValueError(f"client control variates: unexpected key {key!r} (expected <client>/<name>)")
            by_client.setdefault(int(cid), {})[name] = np.asarray(value)  # c_i are never changed in place
        self._by_client = by_client
