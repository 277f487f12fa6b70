"""In-process runtime (the default): every simulated client trains in turn on one shared model.

Fast and deterministic: one frozen backbone serves all clients, a client's state is only its
exchanged part, and nothing is serialized. Costs are counted exactly as a transport would carry
them (see :mod:`fedpeft.federation.costs`). With SCAFFOLD the clients' control variates ``c_i``
are kept here, one exchanged-size named state per client that has trained
(:class:`~fedpeft.federation.scaffold.ClientControls`), and go into every checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedpeft.errors import FedPeftError
from fedpeft.federation.costs import message_bytes
from fedpeft.federation.precision import exchange_result
from fedpeft.federation.scaffold import ClientControls, advance
from fedpeft.federation.strategy import ClientResult, RoundPlan
from fedpeft.methods.base import NamedArrays
from fedpeft.runtime.rounds import Delivery

if TYPE_CHECKING:
    from fedpeft.experiment import Experiment


class InProcessClients:
    """Trains each planned client in turn with the experiment's shared :class:`ClientTrainer`."""

    def __init__(self, exp: "Experiment") -> None:
        self.exp = exp
        self.controls: ClientControls | None = None  # SCAFFOLD's c_i, from the first round with c

    def fit_round(self, plan: RoundPlan, state: NamedArrays, on_result: Callable[[ClientResult], None],
                  control: NamedArrays | None = None) -> Delivery:
        delivery = Delivery()
        if control is not None and self.controls is None:
            self.controls = ClientControls()
        dtype = self.exp.cfg.federation.exchange_dtype  # what a result is rounded to as it leaves its client
        for cid in plan.training:
            if control is None:  # plan.assigned: the names this client trains and sends (absent: all)
                assigned = {"names": plan.assigned[cid]} if cid in plan.assigned else {}
                res = exchange_result(self.exp.trainer.fit(cid, self.exp.parts[cid], state, plan.round, **assigned), dtype)
            else:
                c_i = self.controls.get(cid, control)  # zeros in c's names at first
                res = exchange_result(self.exp.trainer.fit(cid, self.exp.parts[cid], state, plan.round,
                                                           controls=(control, c_i)), dtype)
                self.controls.set(cid, advance(c_i, res.control))
            delivery.bytes_up[cid] = message_bytes(res.state, dtype) + message_bytes(res.control, dtype)
            on_result(res)  # folded into the round's aggregate here; the state is not kept
            delivery.results.append(res.without_state())
        return delivery

    def client_state(self) -> NamedArrays | None:
        """Every client's ``c_i`` (``<client>/<name>``) for a checkpoint; with ``privacy.mode =
        "sample"`` every client's DP-SGD accountant (steps, ``q``); None without either."""
        if self.controls is not None:
            return self.controls.state_dict()
        accountant = getattr(self.exp.trainer, "sample_accountant", None)  # fedpeft.privacy.sample_level
        return None if accountant is None else accountant.state_dict()

    def load_client_state(self, state: NamedArrays | None) -> bool:
        """Restore the ``c_i`` of a checkpoint (:meth:`client_state`); always True: they live here."""
        if state is None:
            raise FedPeftError("the checkpoint holds no client control variates (clients.safetensors) "
                               "although federation.scaffold is on")
        self.controls = ClientControls()
        self.controls.load_state_dict(state)
        return True
