"""In-process runtime (the default): every simulated client trains in turn on one shared model.

Fast and deterministic: one frozen backbone serves all clients, a client's state is only its
exchanged part, and nothing is serialized. Costs are counted exactly as a transport would carry
them (see :mod:`fedpeft.federation.costs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedpeft.federation.costs import message_bytes
from fedpeft.federation.strategy import ClientResult, RoundPlan
from fedpeft.methods.base import NamedArrays
from fedpeft.runtime.rounds import Delivery

if TYPE_CHECKING:
    from fedpeft.experiment import Experiment


class InProcessClients:
    """Trains each planned client in turn with the experiment's shared :class:`ClientTrainer`."""

    def __init__(self, exp: "Experiment") -> None:
        self.exp = exp

    def fit_round(self, plan: RoundPlan, state: NamedArrays, on_result: Callable[[ClientResult], None]) -> Delivery:
        delivery = Delivery()
        for cid in plan.training:
            res = self.exp.trainer.fit(cid, self.exp.parts[cid], state, plan.round)
            delivery.bytes_up[cid] = message_bytes(res.state)
            on_result(res)  # folded into the round's aggregate here; the state is not kept
            delivery.results.append(res.without_state())
        return delivery
