"""The federated round loop, shared by every runtime.

A runtime only decides how the global state reaches the planned clients and how their results
come back (:class:`Delivery`); planning, validation, aggregation, evaluation, metrics, checkpoints
and the summary happen here, the same way for the in-process and the Flower runtimes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedpeft.checkpoint import Checkpoint
from fedpeft.errors import RunInterrupted
from fedpeft.federation.precision import to_exchange
from fedpeft.federation.strategy import AggregateResult, ClientResult, RoundPlan
from fedpeft.history import evaluated_round, round_row, summarize
from fedpeft.methods.base import NamedArrays
from fedpeft.results import RunDir
from fedpeft.tracking import RoundTracker

if TYPE_CHECKING:
    from fedpeft.experiment import Experiment


@dataclass
class Delivery:
    """What came back from the clients of one round (the states themselves went to ``on_result``)."""

    results: list[ClientResult] = field(default_factory=list)  # decoded replies, without their state
    rejected: dict[int, str] = field(default_factory=dict)  # replies unusable before validation
    failed: dict[int, str] = field(default_factory=dict)  # no usable reply: crash, timeout, error
    bytes_up: dict[int, int] = field(default_factory=dict)  # payload bytes received per client
    wire_up: dict[int, int] | None = None  # serialized bytes the transport carried, per client
    wire_down: dict[int, int] | None = None


class Clients(Protocol):
    """A runtime's way to reach clients: train the planned ones from ``state``.

    ``fit_round`` hands every decoded result to ``on_result`` as soon as it arrives (the round
    folds it into the aggregate there) and keeps only ``result.without_state()`` in the delivery;
    under secure aggregation it hands one :class:`AggregateResult` (the clients' mean delta)
    instead, and the delivery's results carry the clients' metrics only;
    ``control`` (SCAFFOLD's ``c``, None without it) travels with ``state``.

    Per-client state (SCAFFOLD's ``c_i``) lives wherever the runtime's clients live:
    ``client_state`` returns what the server's checkpoint must hold (None: the clients keep it
    themselves), ``load_client_state`` restores it on resume and returns False when the runtime
    cannot (its clients' own state did not survive the interruption).
    """

    def fit_round(self, plan: RoundPlan, state: NamedArrays, on_result: Callable[[ClientResult], None],
                  control: NamedArrays | None = None) -> Delivery: ...

    def client_state(self) -> NamedArrays | None: ...

    def load_client_state(self, state: NamedArrays | None) -> bool: ...


def run_rounds(
    exp: "Experiment",
    clients: Clients,
    run_dir: RunDir,
    state: NamedArrays,
    rows: list[dict[str, Any]],
    start_round: int,
    static: dict[str, Any],
    console: Console | None = None,
) -> NamedArrays:
    """Run rounds ``start_round..rounds``; write a row, the summary and checkpoints as they end.

    Every finished round appends its row to ``metrics.jsonl``, then (every
    ``checkpoint_every`` rounds and after the last) writes a checkpoint holding the state and all
    rows so far, then rewrites ``summary.json``. Returns the final global state. On Ctrl-C (or
    SIGTERM, see :mod:`fedpeft.cli`), the last finished round is checkpointed before
    :class:`RunInterrupted` tells the user how to resume.

    On a terminal a live progress bar shows rounds and clients; elsewhere (a log file) a short
    line reports finished clients, at most one every :data:`LOG_EVERY_S` seconds.
    """
    fed = exp.cfg.federation
    console = console or Console(stderr=True)
    show = exp.cfg.runtime.progress and console.is_terminal
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, transient=True,
    )
    done = start_round - 1
    log_clients = ClientLog(console, fed.rounds) if not show else None

    def checkpoint(rnd: int, state: NamedArrays) -> None:
        extra = {"started_at": static.get("started_at")}
        run_dir.save_checkpoint(Checkpoint(rnd, state, rows[:rnd], exp.cfg.to_toml(), extra,
                                           server_state=exp.strategy.state_dict(),
                                           client_state=clients.client_state()))

    tracker = RoundTracker(run_dir, exp.cfg.output.tensorboard)
    with progress if show else nullcontext(), tracker:
        rounds_task = progress.add_task("rounds", total=fed.rounds, completed=done)
        clients_task = progress.add_task("clients", total=0)
        try:
            for rnd in range(start_round, fed.rounds + 1):
                t0 = time.perf_counter()
                plan = exp.strategy.plan_round(rnd)
                progress.reset(clients_task, total=len(plan.training), description=f"round {rnd} clients")
                aggregation = exp.strategy.start_round(rnd, state)

                def on_result(res: ClientResult | AggregateResult) -> None:
                    aggregation.add(res)  # sequential aggregation: folded in as it arrives
                    for client in res.clients if isinstance(res, AggregateResult) else [res.client]:
                        progress.advance(clients_task)
                        if log_clients is not None:
                            log_clients.finished(plan, client)

                # what the clients receive: the global state (and c) in federation.exchange_dtype
                dtype = fed.exchange_dtype
                delivery = clients.fit_round(plan, to_exchange(state, dtype), on_result, to_exchange(aggregation.control, dtype))
                compute_s = sum(r.metrics.get("compute_s", 0.0) for r in delivery.results)
                outcome = aggregation.finish(delivery.rejected)
                if plan.selected and set(plan.infeasible) == set(plan.selected):
                    outcome = replace(outcome, message=(
                        f"round {rnd}: every selected client ({', '.join(map(str, plan.selected))}) is infeasible "
                        "under its [budgets] profile: nothing trained, the global state is unchanged"))
                eval_metrics, eval_s = None, 0.0
                if evaluated_round(rnd, fed.eval_every, fed.rounds):
                    t_eval = time.perf_counter()
                    eval_metrics, generations = exp.evaluate_and_sample(outcome.state)
                    if generations:  # causal-lm: what the model says, for a reader
                        run_dir.write_generations(rnd, generations)
                    eval_s = time.perf_counter() - t_eval
                timings = {"wall_s": time.perf_counter() - t0, "client_compute_s": compute_s, "eval_s": eval_s}
                row = round_row(plan, delivery, outcome, state, eval_metrics, timings, rows[-1] if rows else None,
                                aggregation.control, exp.strategy.download_bytes(plan, state, aggregation.control),
                                exp.attackers, exp.assignment.labels if exp.assignment is not None else None,
                                generative=exp.cfg.task.generative)
                rows.append(row)
                run_dir.append_metrics(row)
                tracker.log(row)
                state, done = outcome.state, rnd
                if rnd % fed.checkpoint_every == 0 or rnd == fed.rounds:
                    checkpoint(rnd, state)
                run_dir.write_json(run_dir.summary, summarize(rows, static))
                progress.advance(rounds_task)
                console.print(format_row(row, fed.rounds), soft_wrap=True)
        except KeyboardInterrupt:
            if done >= start_round and done % fed.checkpoint_every:
                checkpoint(done, state)
            raise RunInterrupted(
                f"interrupted after round {done}; continue with: fedpeft run --resume {run_dir.path}"
            ) from None
    return state


LOG_EVERY_S = 10.0  # without a terminal: at most one "clients finished" line this often


class ClientLog:
    """Progress for a log file: ``round 3/8: 5/8 clients done (41 s)``, at most every LOG_EVERY_S."""

    def __init__(self, console: Console, rounds: int) -> None:
        self.console, self.rounds = console, rounds
        self.last = time.monotonic()
        self.round, self.count, self.round_start = 0, 0, self.last

    def finished(self, plan: RoundPlan, client: int) -> None:
        now = time.monotonic()
        if plan.round != self.round:
            self.round, self.count, self.round_start = plan.round, 0, now
        self.count += 1
        if now - self.last >= LOG_EVERY_S and self.count < len(plan.training):
            self.last = now
            self.console.print(
                f"round {plan.round}/{self.rounds}: {self.count}/{len(plan.training)} clients done "
                f"(client {client}, {now - self.round_start:.0f} s)", soft_wrap=True, highlight=False,
            )


def format_row(row: dict[str, Any], rounds: int) -> str:
    """One human line per round for the console log."""
    acc = "" if row["accuracy"] is None else f"acc {row['accuracy']:.4f}  f1 {row['macro_f1']:.4f}  "
    if row.get("perplexity") is not None:  # causal-lm
        em, rouge = row["exact_match"], row["rouge_l"]
        acc = f"loss {row['eval_loss']:.4f}  ppl {row['perplexity']:.4g}  " + (
            "" if em is None else f"em {em:.3f}  rougeL {rouge:.3f}  ")
    note = "" if row["aggregated"] else "  [yellow]not aggregated[/]"
    failed = f"  [red]{row['clients_failed']} failed[/]" if row.get("clients_failed") else ""
    if row.get("clients_infeasible"):
        failed += f"  [yellow]{len(row['clients_infeasible'])} infeasible[/]"
    return (
        f"round {row['round']}/{rounds}  {acc}clients {row['clients_reported']}/{row['clients_selected']}  "
        f"up {row['bytes_up'] / 1e6:.3f} MB  down {row['bytes_down'] / 1e6:.3f} MB  "
        f"{row['wall_s']:.1f}s{note}{failed}"
    )
