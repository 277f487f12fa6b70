"""The proxy runs of :mod:`fedpeft.tune`: every method's candidates as sweep run folders,
scored on validation rows; successive halving, ties at the top run longer, the grid extended past
its edges."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpeft.config import Config, load_config
from fedpeft.errors import ConfigError
from fedpeft.results import RunDir
from fedpeft.sweep import SweepRun, default_execute, parse_grid, plan_sweep, run_planned
from fedpeft.tune.candidates import (
    CAUSAL_LM,
    CLASSIFICATION,
    Candidate,
    Objective,
    Tie,
    Tuning,
)
from fedpeft.tune.report import write_tuning

LOW_LRS, ADAPTER_LRS, FULL_LRS = "1e-3,3e-3,1e-2,3e-2", "3e-4,1e-3,3e-3,1e-2", "1e-5,3e-5,1e-4,3e-4"
DEFAULT_LRS = {"head": LOW_LRS, "bias": LOW_LRS, "prompt": LOW_LRS, "lora": ADAPTER_LRS,
               "adapter": ADAPTER_LRS, "full": FULL_LRS}  # log-spaced, half a decade apart
DEFAULT_SERVER_LRS = {"fedavgm": "0.3,1", "fedadagrad": "1e-3,1e-2,1e-1", "fedadam": "1e-3,1e-2,1e-1",
                      "fedyogi": "1e-3,1e-2,1e-1"}  # around Flower's defaults (1, 0.1, 0.1, 0.01)
MAX_EXTENSIONS = 2  # half-decade steps past an edge of a method's default lr grid


def method_grid(method: str, base: Config, grid: list[str]) -> list[str]:
    """The sweep grid of ``method``'s candidates: its default lr (and server lr) axes, unless an
    entry of ``grid`` gives that key, then ``grid``.

    Raises
    ------
    ConfigError
        For an unknown method, ``method.name`` in ``grid`` (methods are chosen with
        ``--methods``), or a method without a default lr grid when ``grid`` gives none.
    """
    from fedpeft.methods import method_names

    if method not in method_names():
        raise ConfigError(f"--methods: unknown method {method!r}; known methods: {', '.join(method_names())}")
    given = {key for entry in grid for key, _ in parse_grid(entry)[0]}
    if "method.name" in given:
        raise ConfigError("--grid: give the methods with --methods, not method.name")
    axes = {"federation.lr": DEFAULT_LRS.get(method)}
    if base.federation.server_optimizer != "fedavg":
        axes["federation.server_lr"] = DEFAULT_SERVER_LRS[base.federation.server_optimizer]
    if axes["federation.lr"] is None and "federation.lr" not in given:
        raise ConfigError(f"method {method!r} has no default learning rates: give --grid federation.lr=v1,v2,...")
    return [f"method.name={method}", *(f"{k}={v}" for k, v in axes.items() if k not in given), *grid]


def proxy_sets(validation_fraction: float, rounds: int) -> list[str]:
    """The overrides that make a run a proxy run of ``rounds`` rounds."""
    return [f"data.validation_fraction={validation_fraction}", f"federation.rounds={rounds}",
            "federation.eval_every=1", "federation.checkpoint_every=1", "output.save_model=false"]


def halving_stages(rounds: int, halving: bool) -> list[int]:
    """``[rounds]``, or with ``halving`` 1, 2, 4, ... below ``rounds``, then ``rounds``."""
    stages, stage = [], 1
    while halving and stage < rounds:
        stages.append(stage)
        stage *= 2
    return [*stages, rounds]


def run_tune(
    config: str | Path,
    out: str | Path,
    methods: list[str] | None = None,
    grid: list[str] | None = None,
    sets: list[str] | None = None,
    seeds: list[int] | None = None,
    rounds: int = 2,
    validation_fraction: float = 0.2,
    halving: bool = False,
    execute: Callable[[Config, Path, bool], dict] = default_execute,
) -> Tuning:
    """Run every method's proxy candidates into ``out``, choose the best per method, and write
    ``tune.json``, ``tune.md`` and ``tune.png`` there.

    Parameters
    ----------
    config : str or Path
        The experiment config (TOML) to tune for.
    out : str or Path
        The tune folder: one run folder per candidate and seed, and the outputs.
    methods : list of str, optional
        Methods to tune (default: the config's ``method.name``).
    grid, sets : list of str, optional
        ``--grid`` entries (replace or add axes: :func:`method_grid`) and ``--set`` overrides of
        the experiment (repeated in the printed commands).
    seeds : list of int, optional
        One proxy run per seed and candidate (default ``[0]``).
    rounds : int
        Proxy rounds (at most the config's ``federation.rounds``). Candidates tied at the top
        then run longer, up to the config's ``federation.rounds`` (:meth:`_Proxy.settle`).
    validation_fraction : float
        Share of the train split held out for scoring (``data.validation_fraction``).
    halving : bool
        Successive halving over :func:`halving_stages`.
    execute : callable
        ``execute(cfg, folder, resume)`` runs one experiment.

    Returns
    -------
    Tuning
        The candidates with their scores (each at the round it was scored at), the ties run
        longer, and each method's choice (a method whose candidates all failed has none).
    """
    sets, seeds, grid = sets or [], seeds or [0], grid or []
    base = load_config(config, sets)
    objective = CAUSAL_LM if base.task.generative else CLASSIFICATION
    cap = base.federation.rounds
    stages = halving_stages(min(rounds, cap), halving)
    methods = methods or [base.method.name]
    plans = {(m, r): plan_sweep(config, method_grid(m, base, grid), [*sets, *proxy_sets(validation_fraction, r)], seeds)
             for m in methods for r in {*stages, cap}}  # every run (ties: up to cap) validated before the first starts
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    proxy = _Proxy(config, sets, seeds, validation_fraction, out, execute, cap)
    candidates, choices = [], {}
    for method in methods:
        alive = _candidates(plans[method, stages[0]], objective)
        candidates += alive
        for stage in stages:
            proxy.run(alive, stage)
            if stage < stages[-1]:  # successive halving: the better half goes on
                scored = sorted((c for c in alive if c.error is None), key=Candidate.rank)
                alive = scored[:max(1, math.ceil(len(scored) / 2))]
        chosen = proxy.settle(alive)
        if chosen is not None and not any(k == "federation.lr" for e in grid for k, _ in parse_grid(e)[0]):
            extra, chosen = _extend_past_edges(proxy, chosen, candidates)
            candidates += extra
        if chosen is not None:
            choices[method] = chosen
    tuning = Tuning(str(config), sets, seeds, stages, validation_fraction, candidates, choices, objective, cap, proxy.ties)
    write_tuning(tuning, out)
    return tuning


@dataclass
class _Proxy:
    """Runs and scores candidates' proxy runs at a given number of rounds, and settles ties."""

    config: str | Path
    sets: list[str]
    seeds: list[int]
    validation_fraction: float
    out: Path
    execute: Callable[[Config, Path, bool], dict]
    cap: int  # the config's federation.rounds
    ties: list[Tie] = field(default_factory=list)

    def plan(self, settings: list[tuple[str, str]], rounds: int) -> list[SweepRun]:
        """The runs (one per seed) of the grid point ``settings`` for ``rounds`` proxy rounds. Run
        folder names do not depend on the rounds: a longer plan resumes the same folders."""
        sets = [*self.sets, *proxy_sets(self.validation_fraction, rounds)]
        return plan_sweep(self.config, [f"{k}={v}" for k, v in settings], sets, self.seeds)

    def run(self, candidates: list[Candidate], rounds: int) -> None:
        """Run (resume: only the missing rounds; skip: finished) and score ``candidates`` at ``rounds``."""
        outcomes = run_planned([r for c in candidates for r in self.plan(c.settings, rounds)], self.out, self.execute)
        for candidate in candidates:
            _score(candidate, self.out, outcomes, rounds)

    def settle(self, group: list[Candidate]) -> Candidate | None:
        """The best of ``group`` (candidates of one method scored at the same round), ties at the
        top run longer: while the best ties with another (:meth:`Candidate.ties`) and runs less
        than the cap, the tied ones (only they) run to twice the rounds, at most the cap, and are
        scored again; a tie left at the cap goes to the tie-break. None: every one failed."""
        ranked = sorted((c for c in group if c.error is None), key=Candidate.rank)
        while len(ranked) > 1 and ranked[0].ties(ranked[1]):
            tied, at = [c for c in ranked if ranked[0].ties(c)], ranked[0].rounds
            longer = min(2 * at, self.cap) if at < self.cap else None
            self.ties.append(Tie(ranked[0].method, at, tied, ranked[0].metrics[ranked[0].objective.metrics[0]], longer))
            if longer is None:
                break
            self.run(tied, longer)
            ranked = sorted((c for c in tied if c.error is None), key=Candidate.rank)
        return ranked[0] if ranked else None


def next_lr(value: str, up: bool) -> str:
    """Half a decade from ``value`` on the 1-3-10 grid: ``1e-2 -> 3e-2 -> 1e-1`` (``up``), or down."""
    exponent = math.floor(math.log10(float(value)) + 1e-9)
    three = float(value) / 10**exponent > 2  # a 3e-k point
    if up:
        return f"1e{exponent + 1}" if three else f"3e{exponent}"
    return f"1e{exponent}" if three else f"3e{exponent - 1}"


def _extend_past_edges(proxy: _Proxy, chosen: Candidate, candidates: list[Candidate]) -> tuple[list[Candidate], Candidate | None]:
    """While the chosen lr is the highest (lowest) its method tried, try the next half-decade out,
    run to the rounds the chosen one was scored at (a tie between them runs both longer:
    :meth:`_Proxy.settle`). The new candidates, and the choice (None: every contender failed)."""
    extra: list[Candidate] = []
    for _ in range(MAX_EXTENSIONS):
        tried = sorted({c.lr for c in [*candidates, *extra] if c.method == chosen.method})
        if len(tried) < 2 or chosen.lr not in (tried[0], tried[-1]):
            break
        settings = dict(chosen.settings)
        settings["federation.lr"] = next_lr(settings["federation.lr"], up=chosen.lr == tried[-1])
        (candidate,) = _candidates(proxy.plan(list(settings.items()), chosen.rounds), chosen.objective)
        proxy.run([candidate], chosen.rounds)
        extra.append(candidate)
        best = proxy.settle([chosen, candidate])
        if best is not candidate:
            return extra, best
        chosen = candidate
    return extra, chosen


def _candidates(runs: list[SweepRun], objective: Objective) -> list[Candidate]:
    """The runs grouped by grid point, in plan order."""
    by_point: dict[tuple, Candidate] = {}
    for run in runs:
        by_point.setdefault(tuple(run.settings), Candidate(run.settings, [], objective=objective)).runs.append(run.name)
    return list(by_point.values())


def _score(candidate: Candidate, out: Path, outcomes: dict[str, str], stage: int) -> None:
    """Set ``candidate``'s metrics at round ``stage`` from its runs' rows, or its error."""
    failed = [outcomes[name] for name in candidate.runs if outcomes[name].startswith("failed")]
    keys = candidate.objective.metrics[:-1]
    rows = [_evaluated_row(out / name, stage, keys[0]) for name in candidate.runs]
    if failed or None in rows:
        candidate.error = failed[0].removeprefix("failed: ") if failed else f"no evaluated round {stage}"
        return
    values = {k: [math.nan if r.get(k) is None else r[k] for r in rows] for k in keys}
    values["mb"] = [(r["cum_bytes_up"] + r["cum_bytes_down"]) / 1e6 for r in rows]
    candidate.rounds, candidate.metrics = stage, {k: float(np.mean(v)) for k, v in values.items()}


def _evaluated_row(folder: Path, stage: int, score: str) -> dict | None:
    return next((r for r in RunDir(folder).read_metrics() if r["round"] == stage and r.get(score) is not None), None)


