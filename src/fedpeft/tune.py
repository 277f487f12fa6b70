"""Choose each method's learning rates on a cheap proxy of the federated run (issue 12).

Under label skew the best local learning rate, and even the ranking of methods, do not carry over
from one dataset to another, so ``fedpeft tune CONFIG --methods lora,bias`` chooses them for
CONFIG's own data and federation. The proxy is CONFIG itself (model, training rows, partition,
clients per round, local training) run for few rounds (``rounds``, default 2, never more than
CONFIG's) with ``data.validation_fraction``: each run evaluates on a seeded slice of the train
split and never reads the test split (choosing on test would be tuning on test). A candidate's
score is its validation macro-F1 after the proxy's last round, averaged over seeds; a tie goes to
the lower validation loss. A causal LM (``task.kind = "causal-lm"``) has no macro-F1: its score is
the validation token loss (``eval_loss``, lower is better: it moves in every round, where exact
match stays at 0 until a model is nearly right), a tie going to the higher exact match
(:data:`CAUSAL_LM`).

Each method's candidates are ``federation.lr`` from :data:`DEFAULT_LRS`, crossed with
``federation.server_lr`` from :data:`DEFAULT_SERVER_LRS` when ``federation.server_optimizer`` is
not fedavg. ``--grid key=v1,v2`` replaces the axis of that key, or adds an axis. With
``halving`` (successive halving) every candidate runs 1 round, then the better half of each
method's candidates continue to 2 rounds, then 4, and so on up to ``rounds``.

When a method's best ``federation.lr`` lies on the edge of its default grid, the grid is extended
there by half a decade (:func:`next_lr`), at most :data:`MAX_EXTENSIONS` times per method: the
new candidate runs the full proxy and is chosen if it scores better (a user ``--grid`` of
``federation.lr`` is taken as given and never extended).

Every proxy run is a sweep run folder under ``out`` (:mod:`fedpeft.sweep`). Running tune again
skips finished candidates and resumes killed ones. A failed candidate is reported and the others
go on.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fedpeft.config import Config, load_config
from fedpeft.errors import ConfigError
from fedpeft.results import RunDir
from fedpeft.sweep import SweepRun, default_execute, parse_grid, plan_sweep, run_planned
from fedpeft.tune_report import grid_table, plot_tuning, tune_markdown, write_tuning  # noqa: F401 - public here too

LOW_LRS, ADAPTER_LRS, FULL_LRS = "1e-3,3e-3,1e-2,3e-2", "3e-4,1e-3,3e-3,1e-2", "1e-5,3e-5,1e-4,3e-4"
DEFAULT_LRS = {"head": LOW_LRS, "bias": LOW_LRS, "prompt": LOW_LRS, "lora": ADAPTER_LRS,
               "adapter": ADAPTER_LRS, "full": FULL_LRS}  # log-spaced, half a decade apart
DEFAULT_SERVER_LRS = {"fedavgm": "0.3,1", "fedadagrad": "1e-3,1e-2,1e-1", "fedadam": "1e-3,1e-2,1e-1",
                      "fedyogi": "1e-3,1e-2,1e-1"}  # around Flower's defaults (1, 0.1, 0.1, 0.01)
MAX_EXTENSIONS = 2  # half-decade steps past an edge of a method's default lr grid
METRICS = ("macro_f1", "accuracy", "loss", "mb")  # a classification candidate's, at the round it was scored


def _finite(value: float | None, worst: float) -> float:
    """``value``, or ``worst`` for a missing or diverged (nan, inf) one."""
    return value if value is not None and math.isfinite(value) else worst


@dataclass(frozen=True)
class Objective:
    """What a task's candidates are scored by.

    Attributes
    ----------
    metrics : tuple of str
        The metrics-row keys a candidate keeps (means over seeds; the first is the score), then ``mb``.
    headers : tuple of str
        Their column names in ``tune.md``.
    description : str
        The score in words (``tune.json``, ``tune.md``).
    """

    metrics: tuple[str, ...]
    headers: tuple[str, ...]
    description: str

    def rank(self, m: dict[str, float]) -> tuple[float, float]:
        """Sort key of a candidate's metrics, best first."""
        if self is CAUSAL_LM:
            return _finite(m["eval_loss"], math.inf), -_finite(m["exact_match"], 0.0)
        return -m["macro_f1"], _finite(m["loss"], math.inf)


CLASSIFICATION = Objective(METRICS, ("val macro-F1", "val accuracy", "val loss", "MB up + down"),
                           "validation macro-F1 after the last proxy round, mean over seeds; ties: lower validation loss")
CAUSAL_LM = Objective(("eval_loss", "exact_match", "rouge_l", "mb"),
                      ("val token loss", "val exact match", "val ROUGE-L", "MB up + down"),
                      "validation token loss (eval_loss, lower is better) after the last proxy round, mean over seeds; "
                      "ties: higher validation exact match")


@dataclass
class Candidate:
    """One grid point of one method: its proxy runs (one per seed) and their mean metrics."""

    settings: list[tuple[str, str]]  # ("method.name", method) first, then the tuned keys
    runs: list[str]  # run folder names under the tune folder
    rounds: int = 0  # the proxy round it was last scored at (0: never)
    metrics: dict[str, float] = field(default_factory=dict)  # objective.metrics, means over seeds
    error: str | None = None  # why it could not be scored
    objective: Objective = CLASSIFICATION  # CAUSAL_LM for task.kind = "causal-lm"

    @property
    def method(self) -> str:
        return self.settings[0][1]

    @property
    def lr(self) -> float:
        return float(dict(self.settings)["federation.lr"])

    def rank(self) -> tuple[float, float]:
        """Sort key, best first: higher macro-F1, then lower loss (causal LM: lower token loss,
        then higher exact match)."""
        return self.objective.rank(self.metrics)


@dataclass
class Tuning:
    """What :func:`run_tune` did: the proxy, every candidate, and the choice per method."""

    config: str
    sets: list[str]
    seeds: list[int]
    stages: list[int]  # proxy rounds after which candidates are scored (the last: the proxy's rounds)
    validation_fraction: float
    candidates: list[Candidate]
    choices: dict[str, Candidate]  # method -> its best candidate after the last stage
    objective: Objective = CLASSIFICATION

    def run_commands(self) -> list[str]:
        """One ``fedpeft run`` line per chosen method."""
        return [shlex.join(["fedpeft", "run", self.config, *_set_args([*self.sets, *(f"{k}={_short(v)}" for k, v in c.settings)])])
                for c in self.choices.values()]

    def commands(self) -> list[str]:
        """What to run next: :meth:`run_commands`, then :meth:`sweep_command` (none without a choice)."""
        sweep = self.sweep_command()
        return [*self.run_commands(), *([sweep] if sweep else [])]

    def sweep_command(self) -> str | None:
        """One ``fedpeft sweep`` line running every chosen method (None: no choice)."""
        if not self.choices:
            return None
        keys = "+".join(k for k, _ in next(iter(self.choices.values())).settings)
        points = ",".join("+".join(_short(v) for _, v in c.settings) for c in self.choices.values())
        seeds = ",".join(map(str, self.seeds))
        out = f"runs/{Path(self.config).stem}-tuned"
        return shlex.join(["fedpeft", "sweep", self.config, *_set_args(self.sets), "--grid", f"{keys}={points}",
                           "--seeds", seeds, "--out", out])


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
        Proxy rounds (at most the config's ``federation.rounds``).
    validation_fraction : float
        Share of the train split held out for scoring (``data.validation_fraction``).
    halving : bool
        Successive halving over :func:`halving_stages`.
    execute : callable
        ``execute(cfg, folder, resume)`` runs one experiment.

    Returns
    -------
    Tuning
        The candidates with their scores, and each method's choice (a method whose candidates
        all failed has none).
    """
    sets, seeds, grid = sets or [], seeds or [0], grid or []
    base = load_config(config, sets)
    objective = CAUSAL_LM if base.task.generative else CLASSIFICATION
    stages = halving_stages(min(rounds, base.federation.rounds), halving)
    methods = methods or [base.method.name]
    plans = {(m, r): plan_sweep(config, method_grid(m, base, grid), [*sets, *proxy_sets(validation_fraction, r)], seeds)
             for m in methods for r in stages}  # every run is validated before the first starts
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    candidates, choices = [], {}
    for method in methods:
        alive = _candidates(plans[method, stages[0]], objective)
        candidates += alive
        for stage in stages:
            names = {name for c in alive for name in c.runs}
            outcomes = run_planned([r for r in plans[method, stage] if r.name in names], out, execute)
            for candidate in alive:
                _score(candidate, out, outcomes, stage)
            scored = sorted((c for c in alive if c.error is None), key=Candidate.rank)
            alive = scored[:max(1, math.ceil(len(scored) / 2))]  # the better half goes on (halving)
        if alive:
            choices[method] = alive[0]
        if method in choices and not any(k == "federation.lr" for e in grid for k, _ in parse_grid(e)[0]):
            extra = _extend_past_edges(config, method, choices[method], candidates, out, execute,
                                       [*sets, *proxy_sets(validation_fraction, stages[-1])], seeds, stages[-1])
            candidates += extra
            choices[method] = min([choices[method], *(c for c in extra if c.error is None)], key=Candidate.rank)
    tuning = Tuning(str(config), sets, seeds, stages, validation_fraction, candidates, choices, objective)
    write_tuning(tuning, out)
    return tuning


def next_lr(value: str, up: bool) -> str:
    """Half a decade from ``value`` on the 1-3-10 grid: ``1e-2 -> 3e-2 -> 1e-1`` (``up``), or down."""
    exponent = math.floor(math.log10(float(value)) + 1e-9)
    three = float(value) / 10**exponent > 2  # a 3e-k point
    if up:
        return f"1e{exponent + 1}" if three else f"3e{exponent}"
    return f"1e{exponent}" if three else f"3e{exponent - 1}"


def _extend_past_edges(config, method: str, chosen: "Candidate", candidates: list["Candidate"], out: Path,
                       execute, sets: list[str], seeds: list[int], stage: int) -> list["Candidate"]:
    """While ``method``'s best lr is its highest (lowest) tried, try the next half-decade out."""
    extra: list[Candidate] = []
    for _ in range(MAX_EXTENSIONS):
        tried = sorted({c.lr for c in [*candidates, *extra] if c.method == method})
        if len(tried) < 2 or chosen.lr not in (tried[0], tried[-1]):
            break
        settings = dict(chosen.settings)
        settings["federation.lr"] = next_lr(settings["federation.lr"], up=chosen.lr == tried[-1])
        plan = plan_sweep(config, [f"{k}={v}" for k, v in settings.items()], sets, seeds)
        (candidate,) = _candidates(plan, chosen.objective)
        _score(candidate, out, run_planned(plan, out, execute), stage)
        extra.append(candidate)
        if candidate.error is not None or candidate.rank() >= chosen.rank():
            break
        chosen = candidate
    return extra


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


def _short(value: str) -> str:
    """A number in its short form (3e-3 -> 0.003), as the printed commands show it; other values as they are."""
    try:
        return format(float(value), "g")
    except ValueError:
        return value


def _set_args(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]
