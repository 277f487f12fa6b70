"""Per-client assignment: which of the exchanged names each client trains and sends.

By default every client trains and uploads the whole exchanged part. A method may assign a client
a subset (:meth:`fedpeft.methods.base.Method.assignment`; ``layers`` gives a client the names of
its last ``k_i`` blocks plus what sits above them). The assignment is fixed for the run and a
function of the config, so a resumed run repeats it. Every runtime reads it from the
:class:`~fedpeft.federation.strategy.RoundPlan` (``plan.assigned``), the client trains exactly
those names (:meth:`~fedpeft.federation.client.ClientTrainer.fit`), and the round validates each
update against its client's names and averages each name over the clients that carried it
(:class:`~fedpeft.federation.strategy.RoundAggregation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Assignment:
    """Client id -> the exchanged names it trains and sends; a client not listed: every name.

    Attributes
    ----------
    names : dict
        Client id -> its names (a strict subset of the exchanged ones), in the model's order.
    labels : dict
        Client id -> what the method chose for it, written into that client's entry of every round
        row (``layers``: ``{"k": 1}``).
    """

    names: dict[int, tuple[str, ...]]
    labels: dict[int, dict[str, Any]] = field(default_factory=dict)

    def of(self, client: int) -> tuple[str, ...] | None:
        """The names ``client`` trains, or None for every exchanged name."""
        return self.names.get(client)

    def check(self, exchanged: list[str]) -> None:
        """Raise ``ValueError`` unless every assigned name is an exchanged one."""
        known = set(exchanged)
        for client, names in self.names.items():
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(f"client {client} is assigned names that are not exchanged: {unknown[:5]}")
