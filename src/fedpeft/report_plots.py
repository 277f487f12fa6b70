"""The plots of ``fedpeft report`` (:mod:`fedpeft.report`).

Classification groups: :data:`PLOTS`, test accuracy against the round and against cumulative MB,
and final accuracy against total MB with the accuracy-cost Pareto frontier. Causal-LM groups
(``task.kind = "causal-lm"``): :data:`LM_PLOTS`, the held-out eval loss, perplexity (log), exact
match and ROUGE-L against the round and against cumulative MB (four panels each), and the final
eval loss against total MB with its frontier (lower is better). A folder holding both kinds gets
both sets, each drawn from its own groups.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedpeft.report import Group, Run

PLOTS = ("accuracy_vs_round.png", "accuracy_vs_mb.png", "frontier.png")
LM_PLOTS = ("lm_vs_round.png", "lm_vs_mb.png", "lm_frontier.png")
LM_METRICS = (("eval_loss", "held-out token loss"), ("perplexity", "perplexity (log)"),
              ("exact_match", "exact match"), ("rouge_l", "ROUGE-L"))


def plot_all(groups: list[Group], root: Path) -> list[str]:
    """Write the plots of the groups' tasks into ``root``; the names of the files written.

    One colour per method, one marker (and line style) per setting of the other varying keys, the
    legend beside the axes. A group's line is the mean over its finished runs; each unfinished run
    is drawn on its own, thin and dashed.
    """
    import matplotlib

    matplotlib.use("Agg")
    styles = _styles(groups)
    classifiers = [g for g in groups if g.task != "causal-lm"]
    lms = [g for g in groups if g.task == "causal-lm"]
    written = []
    if classifiers or not lms:
        _plot_classification(classifiers, styles, root)
        written += PLOTS
    if lms:
        _plot_lm(lms, styles, root)
        written += LM_PLOTS
    return written


def _plot_classification(groups: list[Group], styles: dict[str, dict[str, Any]], root: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _plot_curves(ax, groups, styles, x=0)
    _finish(fig, ax, "round", "test accuracy", root / PLOTS[0])

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _plot_curves(ax, groups, styles, x=1)
    ax.set_xscale("log")
    _finish(fig, ax, "cumulative MB up + down (log)", "test accuracy", root / PLOTS[1])

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _plot_frontier(ax, groups, styles, "final_accuracy", higher_is_better=True)
    _finish(fig, ax, "total MB up + down per run (log)", "final test accuracy", root / PLOTS[2])


def _plot_lm(groups: list[Group], styles: dict[str, dict[str, Any]], root: Path) -> None:
    """The causal-LM plots: four metric panels against the round and the MB, and the loss frontier."""
    import matplotlib.pyplot as plt

    for x, name, xlabel in ((0, LM_PLOTS[0], "round"), (1, LM_PLOTS[1], "cumulative MB up + down (log)")):
        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        for ax, (key, ylabel) in zip(axes.flat, LM_METRICS):
            _plot_curves(ax, groups, styles, x=x, metric=key)
            if key == "perplexity":
                ax.set_yscale("log")
            if x == 1:
                ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95))
        fig.tight_layout()
        fig.savefig(root / name, dpi=120, bbox_inches="tight")
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _plot_frontier(ax, groups, styles, "final_eval_loss", higher_is_better=False)
    _finish(fig, ax, "total MB up + down per run (log)", "final held-out token loss (lower is better)", root / LM_PLOTS[2])


def _plot_frontier(ax: Any, groups: list[Group], styles: dict[str, dict[str, Any]], key: str,
                   higher_is_better: bool) -> None:
    """Each group's final ``key`` against its total MB, and the cost frontier."""
    points = [(g.total_mb(), g.mean(key), g.label) for g in groups if g.mean(key) is not None]
    for mb, value, label in points:
        style = styles[label]
        ax.scatter(mb, value, s=40, color=style["color"], marker=style["marker"], label=_short(label))
    sign = 1.0 if higher_is_better else -1.0
    frontier = [(mb, sign * v) for mb, v in pareto_frontier([(mb, sign * v) for mb, v, _ in points])]
    if frontier:
        ax.plot(*zip(*frontier), color="black", lw=1, ls="--", label="frontier")
    ax.set_xscale("log")


def _plot_curves(ax: Any, groups: list[Group], styles: dict[str, dict[str, Any]], x: int,
                 metric: str = "accuracy") -> None:
    """``metric`` against the rounds (``x=0``) or the cumulative MB (``x=1``): per group the mean
    curve of its finished runs, and a thin dashed curve per unfinished run in the group's colour.
    A group is named in the legend by its first line (dashed if none of its runs finished)."""
    for g in groups:
        label = _short(g.label)
        if g.finished:
            curve = _mean_curve(g.finished, metric)
            ax.plot(curve[x], curve[2], label=label, **styles[g.label])
            label = "_nolegend_"
        for run in g.unfinished:
            curve = _mean_curve([run], metric)
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


def _mean_curve(runs: list[Run], metric: str = "accuracy") -> tuple[list[int], list[float], list[float]]:
    """Evaluated rounds, mean cumulative MB (up + down) and mean ``metric`` over ``runs``."""
    by_round: dict[int, list[tuple[float, float]]] = {}
    for run in runs:
        for r in run.metrics:
            if r.get(metric) is not None:
                by_round.setdefault(r["round"], []).append(((r["cum_bytes_up"] + r["cum_bytes_down"]) / 1e6, r[metric]))
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
