"""Reports over many runs: which method gives the best accuracy for my budget?

``fedpeft report DIR`` reads every run folder below ``DIR`` (``summary.json`` + ``config.toml``
+ ``metrics.jsonl``), groups runs that differ only in their seed, and writes:

- ``DIR/report.md``: one row per group: accuracy mean +- std over seeds, MB up and down per round
  and in total, client FLOPs, client training-state memory, peak RSS, wall time;
- ``DIR/accuracy_vs_round.png``, ``DIR/accuracy_vs_mb.png`` (cumulative MB up + down, log
  scale) and ``DIR/frontier.png`` (final accuracy against total MB per group, with the
  accuracy-cost Pareto frontier).

Every number in the table is read from, or averaged over, the runs' own ``summary.json``.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.config import flatten_config
from fedpeft.errors import FedPeftError
from fedpeft.results import RunDir, write_text_atomic

IGNORED_KEYS = {"runtime.seed", "runtime.progress", "runtime.threads", "output.dir", "output.save_model", "data.cache_dir"}
PLOTS = ("accuracy_vs_round.png", "accuracy_vs_mb.png", "frontier.png")


@dataclass
class Group:
    label: str  # the config keys that set this group apart from the others
    runs: list[Path] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[list[dict[str, Any]]] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [s[key] for s in self.summaries if s.get(key) is not None]

    def mean(self, key: str) -> float | None:
        values = self.values(key)
        return float(np.mean(values)) if values else None

    def std(self, key: str) -> float | None:
        values = self.values(key)
        return float(np.std(values)) if values else None

    def total_mb(self) -> float:
        return (self.mean("total_bytes_up") + self.mean("total_bytes_down")) / 1e6


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
    """Group runs whose configs are equal except for seeds and output settings."""
    flat = {run: flatten_config(tomllib.loads((run / "config.toml").read_text())) for run in runs}
    keys = sorted({k for cfg in flat.values() for k in cfg} - IGNORED_KEYS, key=lambda k: (k != "method.name", k))
    # a key varies if the runs that have it disagree (method options exist only for their method)
    varying = [k for k in keys if len({json.dumps(cfg[k]) for cfg in flat.values() if k in cfg}) > 1]
    groups: dict[str, Group] = {}
    for run in runs:
        label = ", ".join(f"{'method' if k == 'method.name' else k}={_value(flat[run][k])}" for k in varying if k in flat[run])
        group = groups.setdefault(label, Group(label or f"method={flat[run].get('method.name')}"))
        folder = RunDir(run)
        group.runs.append(run)
        group.summaries.append(folder.read_summary())
        group.metrics.append(folder.read_metrics())
    return list(groups.values())


def _value(value: object) -> str:
    """A config value as a label shows it: 8.0 as 8, 0.003 as 0.003."""
    return format(value, "g") if isinstance(value, float) else str(value)


COLUMNS = ["run", "seeds", "accuracy (mean ± std)", "MB up / round", "MB down / round", "MB up total",
           "MB down total", "client GFLOPs total", "client train state MB", "peak RSS MB", "wall s"]


def table_rows(groups: list[Group]) -> list[list[str]]:
    """One row of formatted cells per group, in the order of :data:`COLUMNS`."""

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    rows = []
    for g in sorted(groups, key=lambda g: -(g.mean("final_accuracy") or 0.0)):
        acc, sd = g.mean("final_accuracy"), g.std("final_accuracy")
        rows.append([
            g.label,
            str(len(g.runs)),
            "-" if acc is None else f"{acc:.3f} ± {sd:.3f}",
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


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(root: str | Path) -> tuple[list[list[str]], Path]:
    """Write ``report.md`` and the plots into ``root``; return the table rows and the report path."""
    root = Path(root)
    groups = group_runs(find_runs(root))
    rows = table_rows(groups)
    plot_all(groups, root)
    text = [f"# fedpeft report: {root}", "",
            f"{sum(len(g.runs) for g in groups)} runs in {len(groups)} groups (runs that differ only in their seed "
            "are one group; accuracy is the final global test accuracy, mean ± std over seeds).", "",
            markdown_table(rows)]
    text += [f"![{name}]({name})" for name in PLOTS]
    write_text_atomic(root / "report.md", "\n".join(text) + "\n")
    return rows, root / "report.md"


def plot_all(groups: list[Group], root: Path) -> None:
    """The three PNGs of :data:`PLOTS`: one colour per method, one marker (and line style) per
    setting of the other varying keys, the legend beside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = _styles(groups)
    curves = [(g, _mean_curve(g)) for g in groups]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g, (rounds, _, acc) in curves:
        ax.plot(rounds, acc, label=_short(g.label), **styles[g.label])
    _finish(fig, ax, "round", "test accuracy", root / PLOTS[0])

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g, (_, mb, acc) in curves:
        ax.plot(mb, acc, label=_short(g.label), **styles[g.label])
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


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
LINES = ["-", "--", ":", "-."]


def _styles(groups: list[Group]) -> dict[str, dict[str, Any]]:
    """Plot style per group label: colour from the method, marker and line from the rest."""
    import matplotlib.pyplot as plt

    def method(g: Group) -> str:
        return str(g.summaries[0].get("method", "")) if g.summaries else ""

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


def _mean_curve(g: Group) -> tuple[list[int], list[float], list[float]]:
    """Evaluated rounds, mean cumulative MB (up + down) and mean accuracy over the group's seeds."""
    by_round: dict[int, list[tuple[float, float]]] = {}
    for rows in g.metrics:
        for r in rows:
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
