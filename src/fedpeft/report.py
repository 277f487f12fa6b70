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
from fedpeft.results import RunDir, write_text_atomic
from fedpeft.sweep import is_finished, read_summary

# not settings that make runs different experiments (a different data.fingerprint does: other data)
IGNORED_KEYS = {"runtime.seed", "runtime.progress", "runtime.threads", "output.dir", "output.save_model",
                "data.cache_dir"}
PLOTS = ("accuracy_vs_round.png", "accuracy_vs_mb.png", "frontier.png")
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
    rows: list[list[str]]  # the table's cells, in the order of COLUMNS
    notes: list[str]  # markdown lines on unfinished runs and duplicate seeds (empty: none)


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
                      read_summary(run), RunDir(run).read_metrics()))
    return list(groups.values())


def _value(value: object) -> str:
    """A config value as a label shows it: 8.0 as 8, 0.003 as 0.003."""
    return format(value, "g") if isinstance(value, float) else str(value)


COLUMNS = ["run", "seeds", "finished", "accuracy (mean ± std)", "macro-F1 (mean ± std)", "classes predicted",
           "MB up / round", "MB down / round", "MB up total",
           "MB down total", "client GFLOPs total", "client train state MB", "peak RSS MB", "wall s"]


def table_rows(groups: list[Group]) -> list[list[str]]:
    """One row of formatted cells per group, in the order of :data:`COLUMNS`, best accuracy first
    (groups without a finished run last)."""

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    rows = []
    for g in sorted(groups, key=_best_first):
        rows.append([
            g.label,
            str(len(g.runs)),
            finished_cell(g),
            mean_std(g, "final_accuracy"),
            mean_std(g, "final_macro_f1"),
            "-" if not g.values("predicted_classes") else "/".join(str(v) for v in g.values("predicted_classes")),
            num(g.mean("mb_up_per_round"), ".4g"),
            num(g.mean("mb_down_per_round"), ".4g"),
            num(_scaled(g.mean("total_bytes_up"), 1e6), ".4g"),
            num(_scaled(g.mean("total_bytes_down"), 1e6), ".4g"),
            num(_scaled(g.mean("client_flops_total"), 1e9), ".4g"),
            num(_scaled(g.mean("client_train_state_bytes"), 1e6), ".4g"),
            num(g.mean("peak_rss_mb"), ".0f"),
            num(g.mean("wall_s"), ".1f"),
        ])
    return rows


def mean_std(group: Group, key: str) -> str:
    """``0.512 ± 0.031`` over the group's finished runs, ``-`` when none has ``key``."""
    mean = group.mean(key)
    return "-" if mean is None else f"{mean:.3f} ± {group.std(key):.3f}"


def _best_first(group: Group) -> tuple[bool, float]:
    """Sort key: higher mean accuracy first, groups without one last."""
    accuracy = group.mean("final_accuracy")
    return accuracy is None, -(accuracy or 0.0)


def finished_cell(group: Group) -> str:
    """``all`` when every seed of ``group`` finished, else e.g. ``2 of 3``."""
    done = len(group.finished)
    return "all" if done == len(group.runs) else f"{done} of {len(group.runs)}"


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
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
    rows, extra = table_rows(groups), notes(groups, root)
    plot_all(groups, root)
    text = [f"# fedpeft report: {root}", "",
            f"{len(runs)} runs in {len(groups)} groups. Runs that differ only in their seed are one group; "
            "`seeds` counts its distinct seeds and `finished` how many of them finished (`all`, or e.g. "
            "`2 of 3`): a run is finished when its summary.json says `status = \"finished\"` (a summary "
            "without a status: when it completed every round). Every number is a mean over the finished "
            "runs only (`-` when none finished); accuracy is the final global test accuracy, mean ± std. "
            "The round and MB plots draw each unfinished run on its own, as a thin dashed line of its "
            "group's colour; the frontier shows finished runs only.", "",
            markdown_table(rows), *extra]
    text += [f"![{name}]({name})" for name in PLOTS]
    path = root / "report.md"
    write_text_atomic(path, "\n".join(text) + "\n")
    return Report(path, rows, extra)


def plot_all(groups: list[Group], root: Path) -> None:
    """The three PNGs of :data:`PLOTS`: one colour per method, one marker (and line style) per
    setting of the other varying keys, the legend beside the axes. A group's line is the mean over
    its finished runs; each unfinished run is drawn on its own, thin and dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = _styles(groups)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _plot_curves(ax, groups, styles, x=0)
    _finish(fig, ax, "round", "test accuracy", root / PLOTS[0])

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _plot_curves(ax, groups, styles, x=1)
    ax.set_xscale("log")
    _finish(fig, ax, "cumulative MB up + down (log)", "test accuracy", root / PLOTS[1])

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = [(g.total_mb(), g.mean("final_accuracy"), g.label) for g in groups if g.mean("final_accuracy") is not None]
    for mb, acc, label in points:
        style = styles[label]
        ax.scatter(mb, acc, s=40, color=style["color"], marker=style["marker"], label=_short(label))
    frontier = pareto_frontier([(mb, acc) for mb, acc, _ in points])
    if frontier:
        ax.plot(*zip(*frontier), color="black", lw=1, ls="--", label="frontier")
    ax.set_xscale("log")
    _finish(fig, ax, "total MB up + down per run (log)", "final test accuracy", root / PLOTS[2])


def _plot_curves(ax: Any, groups: list[Group], styles: dict[str, dict[str, Any]], x: int) -> None:
    """Accuracy against the rounds (``x=0``) or the cumulative MB (``x=1``): per group the mean
    curve of its finished runs, and a thin dashed curve per unfinished run in the group's colour.
    A group is named in the legend by its first line (dashed if none of its runs finished)."""
    for g in groups:
        label = _short(g.label)
        if g.finished:
            curve = _mean_curve(g.finished)
            ax.plot(curve[x], curve[2], label=label, **styles[g.label])
            label = "_nolegend_"
        for run in g.unfinished:
            curve = _mean_curve([run])
            ax.plot(curve[x], curve[2], label=label, **UNFINISHED, color=styles[g.label]["color"])
            label = "_nolegend_"
    if any(g.unfinished for g in groups):
        ax.plot([], [], label="unfinished run", **UNFINISHED, color="grey")


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
LINES = ["-", ":", "-."]  # not "--": dashes mark unfinished runs
UNFINISHED = {"linestyle": "--", "linewidth": 0.8, "marker": ".", "markersize": 5}  # a dot: one round shows


def _styles(groups: list[Group]) -> dict[str, dict[str, Any]]:
    """Plot style per group label: colour from the method, marker and line from the rest."""
    import matplotlib.pyplot as plt

    def method(g: Group) -> str:
        return g.runs[0].method if g.runs else ""

    def parts(g: Group) -> dict[str, str]:
        return dict(p.split("=", 1) for p in g.label.split(", ") if "=" in p)

    # keys set by the method (e.g. a learning rate tied to it with '+') do not pick the marker
    keys = {k for g in groups for k in parts(g) if k != "method"}
    tied = {k for k in keys if all(len({parts(g).get(k) for g in groups if method(g) == m}) == 1
                                   for m in {method(g) for g in groups})}

    def rest(g: Group) -> str:
        return ", ".join(f"{k}={v}" for k, v in parts(g).items() if k != "method" and k not in tied)

    methods = sorted({method(g) for g in groups})
    others = sorted({rest(g) for g in groups})
    palette = plt.get_cmap("tab10").colors
    return {
        g.label: {
            "color": palette[methods.index(method(g)) % len(palette)],
            "marker": MARKERS[others.index(rest(g)) % len(MARKERS)],
            "linestyle": LINES[others.index(rest(g)) // len(MARKERS) % len(LINES)],
        }
        for g in groups
    }


def _short(label: str) -> str:
    """A legend label: each key by its last part (federation.clients_per_round -> clients_per_round)."""
    return ", ".join(part.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + part.split("=", 1)[1] if "=" in part else part
                     for part in label.split(", "))


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, accuracy) points that no cheaper-or-equal point beats in accuracy, by cost."""
    frontier: list[tuple[float, float]] = []
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not frontier or acc > frontier[-1][1]:
            frontier.append((cost, acc))
    return frontier


def _mean_curve(runs: list[Run]) -> tuple[list[int], list[float], list[float]]:
    """Evaluated rounds, mean cumulative MB (up + down) and mean accuracy over ``runs``."""
    by_round: dict[int, list[tuple[float, float]]] = {}
    for run in runs:
        for r in run.metrics:
            if r.get("accuracy") is not None:
                by_round.setdefault(r["round"], []).append(((r["cum_bytes_up"] + r["cum_bytes_down"]) / 1e6, r["accuracy"]))
    rounds = sorted(by_round)
    return rounds, [float(np.mean([v[0] for v in by_round[r]])) for r in rounds], [float(np.mean([v[1] for v in by_round[r]])) for r in rounds]


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _scaled(value: float | None, unit: float) -> float | None:
    return None if value is None else value / unit
