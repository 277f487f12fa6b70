"""Grid sweeps: many runs of one config, each in its own folder, restartable.

``fedpeft sweep CONFIG --grid method.name=head,lora --grid federation.rounds=1,10 --seeds 0,1``
runs the cartesian product of the grid for every seed. A grid entry may tie several keys
together so that they move in step, e.g. one-shot against multi-round at equal total local
epochs (Wang et al. 2024, https://arxiv.org/abs/2412.04650)::

    --grid federation.rounds+federation.local_epochs=1+10,10+1

Every run writes to ``OUT/<key=value__...__seed=N>``. Re-running the same command skips runs that
finished (their ``summary.json`` says so: :func:`is_finished`), resumes runs that were killed,
interrupted or failed after a finished round, and starts the rest afresh (also runs that failed
before finishing a round).
A run that fails is reported and the sweep goes on; finished runs are never touched.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedpeft.config import Config, load_config
from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.results import RunDir, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class SweepRun:
    name: str  # folder name under the sweep folder
    overrides: list[str]  # "section.key=value" for this run (grid point + seed)
    cfg: Config
    settings: list[tuple[str, str]]  # its grid point: (key, value) in grid order, seed excluded


def parse_grid(entry: str) -> list[list[tuple[str, str]]]:
    """``"a.b=1,2"`` -> ``[[("a.b", "1")], [("a.b", "2")]]``; tied keys ``"a.b+c.d=1+2,3+4"``
    give one point per comma-separated group, each setting every tied key."""
    if "=" not in entry:
        raise ConfigError(f"--grid {entry!r}: expected section.key=value1,value2,...")
    keys_text, values_text = entry.split("=", 1)
    keys = [k.strip() for k in keys_text.split("+")]
    if not all("." in k for k in keys):
        raise ConfigError(f"--grid {entry!r}: keys must be section.key")
    points = []
    for group in values_text.split(","):
        values = [v.strip() for v in group.split("+")] if len(keys) > 1 else [group.strip()]
        if len(values) != len(keys) or any(v == "" for v in values):
            raise ConfigError(f"--grid {entry!r}: {group!r} must give {len(keys)} value(s) joined by '+'")
        points.append(list(zip(keys, values)))
    return points


def expand_grid(grid: list[str]) -> list[list[tuple[str, str]]]:
    """The cartesian product of every ``--grid`` entry: a list of (key, value) settings per point."""
    axes = [parse_grid(entry) for entry in grid]
    keys = [k for axis in axes for k, _ in axis[0]]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--grid: a key is given twice ({', '.join(keys)})")
    return [[kv for part in combo for kv in part] for combo in itertools.product(*axes)] if axes else [[]]


def run_name(settings: list[tuple[str, str]], seed: int) -> str:
    parts = [f"{key}={value}".replace("/", "_") for key, value in settings]
    return "__".join([*parts, f"seed={seed}"])


def plan_sweep(config: str | Path, grid: list[str], sets: list[str], seeds: list[int]) -> list[SweepRun]:
    """Every run of the sweep, each config built and validated before anything runs."""
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    runs = []
    for settings in expand_grid(grid):
        for seed in seeds:
            overrides = [*sets, *(f"{k}={v}" for k, v in settings), f"runtime.seed={seed}"]
            try:
                cfg = load_config(config, overrides)
            except ConfigError as exc:
                raise ConfigError(f"sweep run {run_name(settings, seed)}: {exc}") from exc
            runs.append(SweepRun(run_name(settings, seed), overrides, cfg, settings))
    return runs


def read_summary(path: Path) -> dict[str, Any] | None:
    """The ``summary.json`` of the run folder ``path``, or None if it is missing or unreadable.

    Parameters
    ----------
    path : Path
        A run folder.

    Returns
    -------
    dict or None
        The summary; None when there is none, or when it cannot be parsed as a JSON object (a
        hand-edited or cut copy): such a run is treated as not finished, never as an error.
    """
    try:
        return RunDir(path).read_summary()
    except FedPeftError:  # missing or damaged: the reader says which
        return None


def is_finished(summary: dict[str, Any] | None, rounds: int) -> bool:
    """Whether a run with this summary finished all ``rounds`` rounds.

    Parameters
    ----------
    summary : dict or None
        The run's summary (None: missing or unreadable).
    rounds : int
        The rounds the run must have completed.

    Returns
    -------
    bool
        With a ``status`` key, True only if it is ``"finished"`` and ``rounds_completed`` counts
        ``rounds`` rounds: a run killed after writing its last round's row and summary but before
        its final summary (e.g. while saving the model) still says ``"running"`` and is not
        finished. Without ``status`` (summaries written before it existed), True if
        ``rounds_completed`` counts ``rounds`` rounds.
    """
    if summary is None:
        return False
    done = summary.get("rounds_completed")
    all_rounds = isinstance(done, int) and done >= rounds
    if "status" in summary:
        return summary["status"] == "finished" and all_rounds
    return all_rounds


def run_status(path: Path, rounds: int) -> str:
    """What a sweep does with the run folder ``path``.

    Parameters
    ----------
    path : Path
        The run's folder (it need not exist).
    rounds : int
        The rounds the sweep asks of this run.

    Returns
    -------
    str
        ``finished`` (see :func:`is_finished`: skip it), ``partial`` (not finished but some round
        finished, whatever its summary says or if it cannot be read: resume; resuming a run whose
        last round is checkpointed only writes its final summary and model) or ``new`` (no round finished
        there yet, e.g. a run that failed while loading: start afresh).
    """
    if is_finished(read_summary(path), rounds):
        return "finished"
    return "partial" if RunDir(path).read_metrics() else "new"


def clear_unfinished(path: Path) -> None:
    """Remove what a run that finished no round left behind (nothing finished is lost)."""
    run = RunDir(path)
    for leftover in (run.config, run.metrics, run.summary, run.partition):
        leftover.unlink(missing_ok=True)
    if run.checkpoint.is_dir():
        shutil.rmtree(run.checkpoint)


def run_or_resume(cfg: Config, folder: Path) -> dict[str, Any]:
    """Run ``cfg`` into ``folder`` as a sweep does (skip it finished, resume it killed after a
    round, start afresh otherwise); the run's summary. For scripts that run one folder at a time
    (benchmarks/)."""
    status = run_status(folder, cfg.federation.rounds)
    if status != "finished":
        if status == "new":
            clear_unfinished(folder)
        default_execute(cfg, folder, status == "partial")
    return RunDir(folder).read_summary()


def finished_summary(folder: Path) -> dict[str, Any] | None:
    """The summary of a run folder whose run finished, else None (missing, unreadable, running)."""
    summary = read_summary(folder)
    return summary if summary and summary.get("status") == "finished" else None


def default_execute(cfg: Config, folder: Path, resume: bool) -> dict:
    """Run one experiment of a sweep: :func:`~fedpeft.experiment.run_experiment` into ``folder``."""
    from fedpeft.experiment import run_experiment

    return run_experiment(cfg, out=folder, resume=resume)


def run_sweep(
    config: str | Path,
    out: str | Path,
    grid: list[str],
    sets: list[str] | None = None,
    seeds: list[int] | None = None,
    execute: Callable[[Config, Path, bool], dict] | None = None,
) -> dict[str, str]:
    """Run every run of the sweep into ``out``; return ``{run name: outcome}``.

    ``outcome`` is ``skipped`` (already finished), ``resumed``, ``ran`` or ``failed: reason``.
    ``execute(cfg, folder, resume)`` runs one experiment (default: :func:`default_execute`).
    """
    sets, seeds = sets or [], seeds or [0]
    runs = plan_sweep(config, grid, sets, seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"config": str(config), "grid": grid, "sets": sets, "seeds": seeds,
            "runs": {r.name: r.overrides for r in runs}}
    write_text_atomic(out / "sweep.json", json.dumps(plan, indent=2) + "\n")
    return run_planned(runs, out, execute or default_execute)


def run_planned(runs: list[SweepRun], out: Path, execute: Callable[[Config, Path, bool], dict]) -> dict[str, str]:
    """Run each of ``runs`` into ``out / run.name``: skip finished ones, resume killed ones.

    Parameters
    ----------
    runs : list of SweepRun
        Planned runs (:func:`plan_sweep`), or a selection of them.
    out : Path
        The sweep folder (it exists).
    execute : callable
        ``execute(cfg, folder, resume)`` runs one experiment.

    Returns
    -------
    dict of str to str
        Run name -> ``skipped``, ``resumed``, ``ran`` or ``failed: reason``; a failure does not
        stop the others.
    """
    outcomes: dict[str, str] = {}
    for i, run in enumerate(runs, 1):
        folder = out / run.name
        status = run_status(folder, run.cfg.federation.rounds)
        if status == "finished":
            outcomes[run.name] = "skipped"
            log.info("[%d/%d] %s: finished before, skipped", i, len(runs), run.name)
            continue
        log.info("[%d/%d] %s: %s", i, len(runs), run.name, "resuming" if status == "partial" else "running")
        if status == "new":
            clear_unfinished(folder)
        try:
            execute(run.cfg, folder, status == "partial")
            outcomes[run.name] = "resumed" if status == "partial" else "ran"
        except (FedPeftError, RuntimeError, ValueError, OSError) as exc:
            outcomes[run.name] = f"failed: {exc}"
            log.error("%s failed: %s", run.name, exc)
    return outcomes
