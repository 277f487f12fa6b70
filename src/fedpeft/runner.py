"""Run one experiment on the runtime its config names (``runtime.kind``).

Importing this module imports no torch: submitting to a Flower deployment (``kind = "flower"``)
needs neither torch nor the model on the submitting machine, as the ServerApp runs where the
SuperLink is. :func:`fedpeft.experiment.run_experiment` is this function.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from fedpeft.config import Config


def run_experiment(
    cfg: "Config", out: str | Path | None = None, resume: bool = False, console: "Console | None" = None
) -> dict[str, Any]:
    """Run (or resume) an experiment into ``out`` on ``cfg.runtime.kind`` and return its summary.

    Peak RSS is measured from here (see :func:`~fedpeft.federation.costs.reset_peak_rss`), so
    runs made one after another in one process (a sweep, a benchmark) each report their own peak.
    """
    if cfg.runtime.kind == "flower":
        from fedpeft.runtime.flower.launch import run_flower_deployment

        return run_flower_deployment(cfg, out, resume, console)
    from fedpeft.experiment import run_with_clients
    from fedpeft.federation.costs import reset_peak_rss

    gc.collect()  # what a previous run in this process left is not this run's
    reset_peak_rss()
    if cfg.runtime.kind == "flower-sim":
        from fedpeft.runtime.flower.launch import run_flower_simulation

        return run_flower_simulation(cfg, out, resume, console)
    from fedpeft.runtime.local import InProcessClients

    return run_with_clients(cfg, out, resume, console, InProcessClients)
