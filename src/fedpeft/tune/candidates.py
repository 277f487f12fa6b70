"""What :mod:`fedpeft.tune` scores and records: the objective of a task (score, tie rule,
tie-break), each candidate, the ties run longer, and the whole tuning with its commands."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

METRICS = ("macro_f1", "accuracy", "loss", "mb")  # a classification candidate's, at the round it was scored
# Scores closer than this tie (means over seeds): the tied candidates run for more rounds before
# the tie-break decides. Macro-F1 is a step function of a few hundred validation predictions:
# candidates that all predict the majority class share it to every digit, and differences below
# 1e-3 are a handful of predictions, noise rather than a ranking. Token loss is a continuous mean
# over every validation token: candidates that trained differently practically never share it
# exactly and any difference is the signal (a tolerance in nats would depend on vocabulary and
# task), so only exact equality ties there.
TIE_TOLERANCE = {"macro_f1": 1e-3, "eval_loss": 0.0}


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
    tie_break : str
        What decides between candidates still tied when they cannot run longer.
    """

    metrics: tuple[str, ...]
    headers: tuple[str, ...]
    description: str
    tie_break: str

    def ties(self, a: dict[str, float], b: dict[str, float]) -> bool:
        """Whether two candidates' metrics tie on the score (:data:`TIE_TOLERANCE`; a missing or
        diverged score ties nothing)."""
        key = self.metrics[0]
        x, y = _finite(a.get(key), math.nan), _finite(b.get(key), math.nan)
        return math.isfinite(x) and math.isfinite(y) and abs(x - y) <= TIE_TOLERANCE[key]

    def rank(self, m: dict[str, float]) -> tuple[float, float]:
        """Sort key of a candidate's metrics, best first."""
        if self is CAUSAL_LM:
            return _finite(m["eval_loss"], math.inf), -_finite(m["exact_match"], 0.0)
        return -m["macro_f1"], _finite(m["loss"], math.inf)


_TIES = ("the candidates tied at the top run twice the rounds (up to the config's federation.rounds) "
         "until they no longer tie, then the tie-break: ")
CLASSIFICATION = Objective(METRICS, ("val macro-F1", "val accuracy", "val loss", "MB up + down"),
                           "validation macro-F1 after the last proxy round, mean over seeds; ties (within "
                           f"{TIE_TOLERANCE['macro_f1']:g}): {_TIES}lower validation loss", "lower validation loss")
CAUSAL_LM = Objective(("eval_loss", "exact_match", "rouge_l", "mb"),
                      ("val token loss", "val exact match", "val ROUGE-L", "MB up + down"),
                      "validation token loss (eval_loss, lower is better) after the last proxy round, mean over seeds; "
                      f"ties (exactly equal): {_TIES}higher validation exact match", "higher validation exact match")


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

    def ties(self, other: Candidate) -> bool:
        """Whether ``other`` ties with this candidate on the score (:meth:`Objective.ties`)."""
        return self.objective.ties(self.metrics, other.metrics)

    @property
    def point(self) -> str:
        """Its tuned settings as text: ``federation.lr=1e-2, ...``."""
        return ", ".join(f"{k}={v}" for k, v in self.settings[1:])


@dataclass
class Tie:
    """Candidates of one method tied at the top when scored at ``round``."""

    method: str
    round: int
    candidates: list[Candidate]  # best first (by the tie-break)
    score: float  # the best one's
    extended_to: int | None  # the rounds they then ran to; None: at the cap, the tie-break chose


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
    max_rounds: int = 0  # the config's federation.rounds: tied candidates run at most this long
    ties: list[Tie] = field(default_factory=list)  # in the order they were found

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


def _short(value: str) -> str:
    """A number in its short form (3e-3 -> 0.003), as the printed commands show it; other values as they are."""
    try:
        return format(float(value), "g")
    except ValueError:
        return value


def _set_args(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]
