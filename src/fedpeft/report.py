"""Reports over many runs: which method gives the best accuracy for my budget?

``fedpeft report DIR`` reads every run folder below ``DIR`` (``summary.json`` + ``config.toml``
+ ``metrics.jsonl``), groups runs that differ only in their seed, and writes:

- ``DIR/report.md``: one row per group: its distinct seeds, how many of them finished, accuracy
  and macro-F1 mean +- std (under label skew accuracy alone hides a collapse to a few classes),
  the number of classes each run's final model predicts, MB up and down per round and in total, client FLOPs, client training-state memory,
  peak RSS, wall time; then notes on unfinished runs and on duplicate seeds;
- ``DIR/accuracy_vs_round.png``, ``DIR/accuracy_vs_mb.png`` (cumulative MB up + down, log
  scale) and ``DIR/frontier.png`` (final accuracy against total MB per group, with the
  accuracy-cost Pareto frontier).

Causal-LM runs (``task.kind = "causal-lm"``) have no accuracy: their rows show the final held-out
token loss, perplexity, exact match and ROUGE-L instead (best first: lowest loss), and their plots
are ``lm_vs_round.png``, ``lm_vs_mb.png`` and ``lm_frontier.png`` (:mod:`fedpeft.report_plots`).
A folder holding both kinds gets both column sets (``-`` where a metric does not apply) and both
sets of plots: classification groups first, by accuracy, then causal-LM groups, by loss.

Every number in the table is read from, or averaged over, the finished runs' own
``summary.json`` (:func:`fedpeft.sweep.is_finished`). Two runs of a group with the same seed (a
copied folder, the same run twice) count once: a finished one is kept, else the first by path.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.config import Config, flatten_config
from fedpeft.errors import FedPeftError
from fedpeft.report_plots import PLOTS, _styles, pareto_frontier, plot_all
from fedpeft.results import RunDir, write_text_atomic
from fedpeft.sweep import is_finished, read_summary

__all__ = ["COLUMNS", "LM_COLUMNS", "PLOTS", "Report", "_styles", "find_runs", "group_runs", "markdown_table",
           "pareto_frontier", "table_columns", "table_rows", "write_report"]

# not settings that make runs different experiments (a different data.fingerprint does: other data)
IGNORED_KEYS = {"runtime.seed", "runtime.progress", "runtime.threads", "output.dir", "output.save_model",
                "data.cache_dir"}
DEFAULTS = Config()  # what a key missing from a hand-written config.toml means


@dataclass
class Run:
    """One run folder as the report reads it."""

    path: Path
    method: str
    seed: int
    rounds: int  # the rounds its config asks for
    summary: dict[str, Any] | None  # None: summary.json cannot be read
    metrics: list[dict[str, Any]] = field(default_factory=list)
    task: str = "classification"  # task.kind

    @property
    def finished(self) -> bool:
        return is_finished(self.summary, self.rounds)

    def state(self) -> str:
        """How far an unfinished run got: ``running, 3 of 5 rounds`` (``3 of 5 rounds`` without a status)."""
        if self.summary is None:
            return "summary.json unreadable"
        rounds = f"{self.summary.get('rounds_completed', 0)} of {self.rounds} rounds"
        return f"{self.summary['status']}, {rounds}" if "status" in self.summary else rounds


@dataclass
class Group:
    """Runs whose configs differ only in their seed."""

    label: str  # the config keys that set this group apart from the others
    runs: list[Run] = field(default_factory=list)  # one per distinct seed, the first added
    duplicates: list[tuple[Run, Run]] = field(default_factory=list)  # (left out, kept run of its seed)

    def add(self, run: Run) -> None:
        """Keep ``run``, or record it as a duplicate if a run with its seed is already kept.

        Of two runs with one seed the finished one is kept (the first added if both or neither
        finished), so a killed copy never hides a finished run.
        """
        kept = next((r for r in self.runs if r.seed == run.seed), None)
        if kept is None:
            self.runs.append(run)
        elif run.finished and not kept.finished:
            self.runs[self.runs.index(kept)] = run
            self.duplicates.append((kept, run))
        else:
            self.duplicates.append((run, kept))

    @property
    def task(self) -> str:
        """``task.kind`` of the group's runs (one group never mixes tasks: task.kind differs)."""
        return self.runs[0].task if self.runs else "classification"

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.finished]

    @property
    def unfinished(self) -> list[Run]:
        return [r for r in self.runs if not r.finished]

    def values(self, key: str) -> list[float]:
        """``key`` of every finished run's summary that has it."""
        return [r.summary[key] for r in self.finished if r.summary.get(key) is not None]

    def mean(self, key: str) -> float | None:
        values = self.values(key)
        return float(np.mean(values)) if values else None

    def std(self, key: str) -> float | None:
        values = self.values(key)
        return float(np.std(values)) if values else None

    def total_mb(self) -> float:
        return (self.mean("total_bytes_up") + self.mean("total_bytes_down")) / 1e6


@dataclass
class Report:
    """What :func:`write_report` wrote."""

    path: Path  # report.md
    rows: list[list[str]]  # the table's cells, in the order of columns
    notes: list[str]  # markdown lines on unfinished runs and duplicate seeds (empty: none)
    columns: list[str] = field(default_factory=lambda: list(COLUMNS))  # the table's header
    plots: list[str] = field(default_factory=lambda: list(PLOTS))  # the PNG files written


def find_runs(root: str | Path) -> list[Path]:
    """Run folders below ``root`` that hold a summary (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise FedPeftError(f"{root}: no such folder")
    runs = sorted(p.parent for p in root.rglob("summary.json") if (p.parent / "config.toml").exists())
    if not runs:
        raise FedPeftError(f"{root}: no fedpeft runs below (no folder with summary.json and config.toml)")
    return runs


def group_runs(runs: list[Path]) -> list[Group]:
    """Group runs whose configs are equal except for seeds and output settings.

    Parameters
    ----------
    runs : list of Path
        Run folders, in the order that decides which of two runs with one seed is kept (the first).

    Returns
    -------
    list of Group
        The groups, in the order of their first run.
    """
    flat = {run: flatten_config(tomllib.loads((run / "config.toml").read_text())) for run in runs}
    keys = sorted({k for cfg in flat.values() for k in cfg} - IGNORED_KEYS, key=lambda k: (k != "method.name", k))
    # a key varies if the runs that have it disagree (method options exist only for their method)
    varying = [k for k in keys if len({json.dumps(cfg[k]) for cfg in flat.values() if k in cfg}) > 1]
    groups: dict[str, Group] = {}
    for run in runs:
        cfg = flat[run]
        label = ", ".join(f"{'method' if k == 'method.name' else k}={_value(cfg[k])}" for k in varying if k in cfg)
        method = cfg.get("method.name", DEFAULTS.method.name)
        group = groups.setdefault(label, Group(label or f"method={method}"))
        group.add(Run(run, method, cfg.get("runtime.seed", DEFAULTS.runtime.seed),
                      cfg.get("federation.rounds", DEFAULTS.federation.rounds),
                      read_summary(run), RunDir(run).read_metrics(), cfg.get("task.kind", DEFAULTS.task.kind)))
    return list(groups.values())


def _value(value: object) -> str:
    """A config value as a label shows it: 8.0 as 8, 0.003 as 0.003."""
    return format(value, "g") if isinstance(value, float) else str(value)


HEAD_COLUMNS = ["run", "seeds", "finished"]
ACCURACY_COLUMNS = ["accuracy (mean ± std)", "macro-F1 (mean ± std)", "classes predicted"]
LM_METRIC_COLUMNS = ["eval loss (mean ± std)", "perplexity (mean)", "exact match (mean ± std)", "ROUGE-L (mean ± std)"]
COST_COLUMNS = ["MB up / round", "MB down / round", "MB up total", "MB down total", "client GFLOPs total",
                "client train state MB", "peak RSS MB", "wall s"]
COLUMNS = HEAD_COLUMNS + ACCURACY_COLUMNS + COST_COLUMNS  # a report of classification runs
LM_COLUMNS = HEAD_COLUMNS + LM_METRIC_COLUMNS + COST_COLUMNS  # a report of causal-LM runs


def table_columns(groups: list[Group]) -> list[str]:
    """The header for ``groups``: :data:`COLUMNS`, :data:`LM_COLUMNS`, or (both tasks) both metric sets."""
    lm = any(g.task == "causal-lm" for g in groups)
    classification = any(g.task != "causal-lm" for g in groups) or not lm
    return HEAD_COLUMNS + ACCURACY_COLUMNS * classification + LM_METRIC_COLUMNS * lm + COST_COLUMNS


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table_rows(groups: list[Group], columns: list[str] | None = None) -> list[list[str]]:
    """One row of formatted cells per group, in the order of ``columns`` (default
    :func:`table_columns`): classification groups by best accuracy, then causal-LM groups by lowest
    eval loss, groups without a finished run last."""
    columns = columns or table_columns(groups)
    return [[_cells(g)[c] for c in columns] for g in sorted(groups, key=_best_first)]


def _cells(g: Group) -> dict[str, str]:
    """Every column's formatted cell for group ``g`` (``-`` where it has no value)."""
    num = _num
    predicted = g.values("predicted_classes")
    return dict(zip(HEAD_COLUMNS + ACCURACY_COLUMNS + LM_METRIC_COLUMNS + COST_COLUMNS, [
            g.label,
            str(len(g.runs)),
            finished_cell(g),
            mean_std(g, "final_accuracy"),
            mean_std(g, "final_macro_f1"),
            "-" if not predicted else "/".join(str(v) for v in predicted),
            mean_std(g, "final_eval_loss"),
            num(g.mean("final_perplexity"), ".4g"),
            mean_std(g, "final_exact_match"),
            mean_std(g, "final_rouge_l"),
            num(g.mean("mb_up_per_round"), ".4g"),
            num(g.mean("mb_down_per_round"), ".4g"),
            num(_scaled(g.mean("total_bytes_up"), 1e6), ".4g"),
            num(_scaled(g.mean("total_bytes_down"), 1e6), ".4g"),
            num(_scaled(g.mean("client_flops_total"), 1e9), ".4g"),
            num(_scaled(g.mean("client_train_state_bytes"), 1e6), ".4g"),
            num(g.mean("peak_rss_mb"), ".0f"),
            num(g.mean("wall_s"), ".1f"),
    ]))


def mean_std(group: Group, key: str) -> str:
    """``0.512 ± 0.031`` over the group's finished runs, ``-`` when none has ``key``."""
    mean = group.mean(key)
    return "-" if mean is None else f"{mean:.3f} ± {group.std(key):.3f}"


def _best_first(group: Group) -> tuple[bool, bool, float]:
    """Sort key: groups with a result first, classification (higher mean accuracy first) before
    causal LM (lower mean eval loss first)."""
    if group.task == "causal-lm":
        loss = group.mean("final_eval_loss")
        return loss is None, True, loss or 0.0
    accuracy = group.mean("final_accuracy")
    return accuracy is None, False, -(accuracy or 0.0)


def finished_cell(group: Group) -> str:
    """``all`` when every seed of ``group`` finished, else e.g. ``2 of 3``."""
    done = len(group.finished)
    return "all" if done == len(group.runs) else f"{done} of {len(group.runs)}"


def markdown_table(rows: list[list[str]], columns: list[str] | None = None) -> str:
    """``rows`` under the header ``columns`` (default :data:`COLUMNS`) as a markdown table."""
    columns = columns or COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def notes(groups: list[Group], root: Path) -> list[str]:
    """Markdown lines naming every unfinished run and every duplicate seed (none: no lines).

    Parameters
    ----------
    groups : list of Group
        The report's groups.
    root : Path
        The report's folder: runs are named by their path relative to it.
    """

    def name(run: Run) -> str:
        return f"`{run.path.relative_to(root).as_posix()}`"

    unfinished = [f"- {name(r)} ({g.label}, seed {r.seed}): {r.state()}" for g in groups for r in g.unfinished]
    duplicates = [f"- {name(dup)} repeats seed {dup.seed} of {name(kept)} ({g.label})"
                  for g in groups for dup, kept in g.duplicates]
    lines = []
    if unfinished:
        lines += ["Unfinished runs, left out of every mean (resume one with `fedpeft run --resume DIR`, or "
                  "re-run its sweep):", "", *unfinished, ""]
    if duplicates:
        lines += ["Duplicate seeds, each counted once (a finished run is kept, else the first by path; the others are left out):",
                  "", *duplicates, ""]
    return lines


def write_report(root: str | Path) -> Report:
    """Write ``report.md`` and the plots into ``root``.

    Parameters
    ----------
    root : str or Path
        A folder holding run folders (e.g. a sweep's ``--out``).

    Returns
    -------
    Report
        The table rows, the notes on unfinished runs and duplicate seeds, and the report's path.
    """
    root = Path(root)
    runs = find_runs(root)
    groups = group_runs(runs)
    columns = table_columns(groups)
    rows, extra = table_rows(groups, columns), notes(groups, root)
    plots = plot_all(groups, root)
    text = [f"# fedpeft report: {root}", "",
            f"{len(runs)} runs in {len(groups)} groups. Runs that differ only in their seed are one group; "
            "`seeds` counts its distinct seeds and `finished` how many of them finished (`all`, or e.g. "
            "`2 of 3`): a run is finished when its summary.json says `status = \"finished\"` (a summary "
            "without a status: when it completed every round). Every number is a mean over the finished "
            "runs only (`-` when none finished); accuracy is the final global test accuracy, mean ± std "
            "(causal-LM runs: the final held-out token loss, perplexity, greedy exact match and ROUGE-L). "
            "The round and MB plots draw each unfinished run on its own, as a thin dashed line of its "
            "group's colour; the frontier shows finished runs only.", "",
            markdown_table(rows, columns), *extra]
    text += [f"![{name}]({name})" for name in plots]
    path = root / "report.md"
    write_text_atomic(path, "\n".join(text) + "\n")
    return Report(path, rows, extra, columns, plots)


def _scaled(value: float | None, unit: float) -> float | None:
    return None if value is None else value / unit
