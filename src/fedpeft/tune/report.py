"""The report of :func:`fedpeft.tune.run_tune`: ``tune.json``, ``tune.md`` (the grid table, the
ties run longer, the choices, the commands) and ``tune.png`` (score against learning rate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fedpeft.results import write_text_atomic
from fedpeft.tune.candidates import TIE_TOLERANCE

if TYPE_CHECKING:
    from fedpeft.tune.candidates import Candidate, Tuning


def write_tuning(tuning: Tuning, out: Path) -> None:
    """``tune.json`` (machine-readable), ``tune.md`` (table, choices, commands) and ``tune.png``."""
    record = {
        "config": tuning.config, "sets": tuning.sets, "seeds": tuning.seeds,
        "proxy": {"rounds": tuning.stages[-1], "stages": tuning.stages, "validation_fraction": tuning.validation_fraction,
                  "score": tuning.objective.description, "tie_tolerance": TIE_TOLERANCE[tuning.objective.metrics[0]],
                  "max_rounds": tuning.max_rounds},
        "candidates": [{"method": c.method, "settings": dict(c.settings[1:]), "runs": c.runs, "rounds": c.rounds,
                        **c.metrics, "error": c.error} for c in tuning.candidates],
        "ties": [{"method": t.method, "round": t.round, "score": t.score, "extended_to": t.extended_to,
                  "candidates": [dict(c.settings[1:]) for c in t.candidates]} for t in tuning.ties],
        "choices": {m: dict(c.settings[1:]) for m, c in tuning.choices.items()},
        "commands": {"run": tuning.run_commands(), "sweep": tuning.sweep_command()},
    }
    write_text_atomic(out / "tune.json", json.dumps(record, indent=2) + "\n")
    write_text_atomic(out / "tune.md", tune_markdown(tuning))
    plot_tuning(tuning, out / "tune.png")


def tie_notes(tuning: Tuning) -> list[str]:
    """One line per tie at the top: which candidates tied, and whether they ran longer or the
    tie-break chose (at the cap: the config's ``federation.rounds``)."""
    score, notes = tuning.objective.headers[0], []
    for tie in tuning.ties:
        what = (f"ran them to round {tie.extended_to}" if tie.extended_to else
                f"at the config's federation.rounds, so the tie-break ({tuning.objective.tie_break}) chose "
                f"{tie.candidates[0].point}")
        notes.append(f"{tie.method}: {len(tie.candidates)} candidates tied at round {tie.round} ({score} "
                     f"{tie.score:.4g}; {'; '.join(c.point for c in tie.candidates)}): {what}")
    return notes


def _tie_note(tuning: Tuning, candidate: Candidate) -> str:
    """Where ``candidate`` tied at the top: ``tied at round 2 -> 4, 4 -> 5``."""
    steps = [f"{t.round} -> {t.extended_to}" if t.extended_to else f"{t.round}: tie-break"
             for t in tuning.ties if any(c is candidate for c in t.candidates)]
    return f"tied at round {', '.join(steps)}" if steps else ""


def grid_table(tuning: Tuning) -> str:
    """Every candidate as a markdown row, by method then best first; the chosen ones in bold, and
    where one tied at the top (it then ran longer, its row shows the longer run)."""
    lines = [f"| method | candidate | {' | '.join(tuning.objective.headers)} | scored at round | note |",
             "|---|---|---|---|---|---|---|---|"]
    for c in sorted(tuning.candidates, key=lambda c: (c.method, -c.rounds, c.rank() if c.metrics else (0, 0))):
        cells = [f"{c.metrics[k]:.4g}" for k in tuning.objective.metrics] if c.metrics else ["-"] * 4
        chosen = tuning.choices.get(c.method) is c
        note = "**chosen**" if chosen else f"failed: {c.error}".replace("|", "\\|") if c.error else ""
        note = "; ".join(filter(None, [note, _tie_note(tuning, c)]))
        lines.append(f"| {c.method} | {c.point} | {' | '.join(cells)} | {c.rounds or '-'} | {note} |")
    return "\n".join(lines) + "\n"


def tune_markdown(tuning: Tuning) -> str:
    """The whole report: the proxy, :func:`grid_table`, the plot and the commands."""
    halving = f" (successive halving after rounds {', '.join(map(str, tuning.stages[:-1]))})" if len(tuning.stages) > 1 else ""
    commands = "\n".join(tuning.commands()) or "(no method has a choice)"
    longer = (f" (candidates tied at the top: up to {tuning.max_rounds}, the config's federation.rounds)"
              if tuning.max_rounds > tuning.stages[-1] else "")
    ties = "".join(f"- {note}\n" for note in tie_notes(tuning))
    ties = f"Ties at the top (tied candidates run longer; scored at round: the round of each row's score):\n\n{ties}\n" if ties else ""
    return (
        f"# fedpeft tune: {tuning.config}\n\n"
        f"Proxy: the config{' with ' + ' '.join(tuning.sets) if tuning.sets else ''} for {tuning.stages[-1]} rounds"
        f"{halving}{longer}, evaluated on a held-out "
        f"{tuning.validation_fraction:g} of the train split (data.validation_fraction; the test split is never read); "
        f"seeds {', '.join(map(str, tuning.seeds))}. Score: {tuning.objective.description}.\n\n"
        f"{grid_table(tuning)}\n{ties}![score against learning rate](tune.png)\n\n## Commands\n\n```bash\n{commands}\n```\n"
    )


def plot_tuning(tuning: Tuning, path: Path) -> None:
    """The score (validation macro-F1; causal LM: token loss) against ``federation.lr`` (log), one
    line per method and other settings;
    hollow markers: candidates stopped early by halving; squares: tied candidates run longer (scored
    at a later round); a star: the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score, ylabel = tuning.objective.metrics[0], tuning.objective.headers[0].replace("val ", "validation ")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[str, list[Candidate]] = {}
    for c in sorted((c for c in tuning.candidates if c.metrics), key=lambda c: c.lr):
        rest = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in c.settings[1:] if k != "federation.lr")
        lines.setdefault(c.method + (f", {rest}" if rest else ""), []).append(c)
    for label, group in lines.items():
        (line,) = ax.plot([c.lr for c in group], [c.metrics[score] for c in group], marker="o", label=label)
        for c in group:
            if c.rounds < tuning.stages[-1]:
                ax.plot(c.lr, c.metrics[score], marker="o", color="white", markeredgecolor=line.get_color())
            elif c.rounds > tuning.stages[-1]:
                ax.plot(c.lr, c.metrics[score], marker="s", color=line.get_color())
            if tuning.choices.get(c.method) is c:
                ax.plot(c.lr, c.metrics[score], marker="*", markersize=14, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("federation.lr (log)")
    longer = any(c.rounds > tuning.stages[-1] for c in tuning.candidates)
    ax.set_ylabel(f"{ylabel} after round {tuning.stages[-1]}" + (" (squares: later, ties)" if longer else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
