"""Sweeps (grid expansion, skip finished, resume killed, failures) and reports (numbers, plots,
unfinished runs, duplicate seeds)."""

import json

import numpy as np
import pytest
import tomli_w

from fedpeft.config import Config
from fedpeft.errors import ConfigError
from fedpeft.report import COLUMNS, find_runs, group_runs, pareto_frontier, write_report
from fedpeft.sweep import expand_grid, parse_grid, plan_sweep, run_status, run_sweep
from test_runs import csv_data, make_cfg  # noqa: F401 - fixture reused


@pytest.fixture
def base_config(csv_data, tmp_path):  # noqa: F811
    cfg = make_cfg(csv_data, federation={"rounds": 2, "clients_per_round": 2, "local_steps": 1},
                   output={"save_model": False})
    path = tmp_path / "base.toml"
    path.write_text(tomli_w.dumps(cfg.to_dict()))
    return path


def test_grid_expansion_is_the_cartesian_product_with_tied_keys():
    assert parse_grid("method.name=head,lora") == [[("method.name", "head")], [("method.name", "lora")]]
    points = expand_grid(["method.name=head,lora", "federation.rounds+federation.local_epochs=1+10,10+1"])
    assert len(points) == 4
    assert [("method.name", "lora"), ("federation.rounds", "1"), ("federation.local_epochs", "10")] in points
    assert expand_grid([]) == [[]]
    for bad, words in (("method.name", "expected"), ("rounds=1,2", "section.key"),
                       ("federation.rounds+federation.local_epochs=1+10,10", "2 value"),
                       ("method.name=,lora", "1 value")):
        with pytest.raises(ConfigError, match=words):
            expand_grid([bad])
    with pytest.raises(ConfigError, match="twice"):
        expand_grid(["method.name=head", "method.name=lora"])


def test_plan_sweep_validates_every_run_before_running(base_config):
    runs = plan_sweep(base_config, ["method.name=head,bias"], ["federation.lr=0.02"], [0, 3])
    assert [r.name for r in runs] == ["method.name=head__seed=0", "method.name=head__seed=3",
                                      "method.name=bias__seed=0", "method.name=bias__seed=3"]
    assert [(r.cfg.method.name, r.cfg.runtime.seed, r.cfg.federation.lr) for r in runs][1] == ("head", 3, 0.02)
    with pytest.raises(ConfigError, match="method.name=nope__seed=0.*unknown method"):
        plan_sweep(base_config, ["method.name=head,nope"], [], [0])


def test_sweep_skips_finished_resumes_killed_and_reports_failures(base_config, tmp_path):
    out = tmp_path / "sweep"
    calls = []

    def execute(cfg, folder, resume):
        calls.append((folder.name, resume))
        if cfg.method.name == "bias" and cfg.runtime.seed == 1:
            raise ValueError("boom")
        from fedpeft.experiment import run_experiment

        return run_experiment(cfg, out=folder, resume=resume)

    grid = ["method.name=head,bias"]
    first = run_sweep(base_config, out, grid, seeds=[0, 1], execute=execute)
    assert first == {"method.name=head__seed=0": "ran", "method.name=head__seed=1": "ran",
                     "method.name=bias__seed=0": "ran", "method.name=bias__seed=1": "failed: boom"}
    assert json.loads((out / "sweep.json").read_text())["grid"] == grid
    # kill a finished run after its first round: drop its last metrics row and rewrite its summary
    killed = out / "method.name=head__seed=1"
    summary = json.loads((killed / "summary.json").read_text())
    (killed / "summary.json").write_text(json.dumps({**summary, "rounds_completed": 1}))
    # kill a run after its last round's row and summary, before its final summary
    unsaved = out / "method.name=bias__seed=0"
    summary = json.loads((unsaved / "summary.json").read_text())
    (unsaved / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    before = (out / "method.name=head__seed=0" / "summary.json").read_text()
    calls.clear()
    second = run_sweep(base_config, out, grid, seeds=[0, 1], execute=execute)
    assert second["method.name=head__seed=0"] == "skipped"
    assert second["method.name=head__seed=1"] == second["method.name=bias__seed=0"] == "resumed"
    assert second["method.name=bias__seed=1"].startswith("failed")
    assert ("method.name=head__seed=1", True) in calls and all(n != "method.name=head__seed=0" for n, _ in calls)
    assert (out / "method.name=head__seed=0" / "summary.json").read_text() == before
    # a run that failed before finishing a round left only its config: it starts afresh, even
    # after the base config changed
    assert not (out / "method.name=bias__seed=1" / "metrics.jsonl").exists()
    (out / "method.name=bias__seed=1").mkdir(exist_ok=True)
    (out / "method.name=bias__seed=1" / "config.toml").write_text("[federation]\nrounds = 9\n")
    third = run_sweep(base_config, out, grid, seeds=[0, 1], execute=lambda cfg, folder, resume: calls.append(resume))
    assert third["method.name=bias__seed=1"] == "ran" and calls[-1] is False


def test_report_numbers_equal_the_runs_summaries_and_plots_are_written(base_config, tmp_path):
    out = tmp_path / "sweep"
    outcomes = run_sweep(base_config, out, ["method.name=head,lora"], seeds=[0, 1])
    assert set(outcomes.values()) == {"ran"}
    report = write_report(out)
    summaries = {run.name: json.loads((run / "summary.json").read_text()) for run in find_runs(out)}
    for method in ("head", "lora"):
        mine = [s for name, s in summaries.items() if f"={method}__" in name]
        row = cells(report.rows, f"method={method}")
        accs = [s["final_accuracy"] for s in mine]
        assert (row["seeds"], row["finished"]) == ("2", "all")
        assert row["accuracy (mean ± std)"] == f"{np.mean(accs):.3f} ± {np.std(accs):.3f}"
        f1s = [s["final_macro_f1"] for s in mine]
        assert row["macro-F1 (mean ± std)"] == f"{np.mean(f1s):.3f} ± {np.std(f1s):.3f}"
        assert row["classes predicted"] == "/".join(str(s["predicted_classes"]) for s in mine)
        assert all(1 <= s["predicted_classes"] <= s["num_labels"] for s in mine)
        assert row["MB up / round"] == f"{np.mean([s['mb_up_per_round'] for s in mine]):.4g}"
        assert row["MB up total"] == f"{np.mean([s['total_bytes_up'] for s in mine]) / 1e6:.4g}"
        assert row["client GFLOPs total"] == f"{np.mean([s['client_flops_total'] for s in mine]) / 1e9:.4g}"
        assert f"| {' | '.join(row.values())} |" in report.path.read_text()
    assert report.notes == []
    for name in ("accuracy_vs_round.png", "accuracy_vs_mb.png", "frontier.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_groups_join_seeds_and_name_what_differs(base_config, tmp_path):
    run_sweep(base_config, tmp_path, ["federation.lr=0.01,0.02"], seeds=[0, 1])
    groups = group_runs(find_runs(tmp_path))
    assert sorted(g.label for g in groups) == ["federation.lr=0.01", "federation.lr=0.02"]
    assert all(len(g.runs) == 2 for g in groups)


def test_pareto_frontier_keeps_only_undominated_points():
    points = [(10.0, 0.5), (1.0, 0.3), (5.0, 0.2), (100.0, 0.5), (50.0, 0.7), (1.0, 0.1)]
    assert pareto_frontier(points) == [(1.0, 0.3), (10.0, 0.5), (50.0, 0.7)]


def test_report_on_a_folder_without_runs_says_so(tmp_path):
    from fedpeft.errors import FedPeftError

    with pytest.raises(FedPeftError, match="no fedpeft runs"):
        write_report(tmp_path)
    with pytest.raises(FedPeftError, match="no such folder"):
        write_report(tmp_path / "missing")


def test_cli_sweep_then_report(base_config, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "fedpeft.cli", "sweep", str(base_config), "--out", str(out),
           "--grid", "method.name=head", "--set", "federation.rounds=1", "--seeds", "0"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "ran" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert "skipped" in again.stdout
    rep = subprocess.run([sys.executable, "-m", "fedpeft.cli", "report", str(out)], capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    assert (out / "report.md").exists() and "| method=head | 1 | all |" in rep.stdout
    assert f"wrote {out / 'report.md'} and accuracy_vs_round.png" in rep.stderr.splitlines()[-1]
    bad = subprocess.run([*cmd[:-1], "zero"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--seeds" in bad.stderr and "Traceback" not in bad.stderr


def documented_sweeps():
    """Every ``fedpeft sweep`` command written in the header of an example config."""
    import shlex
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml")):
        header = "\n".join(line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#"))
        for command in header.replace("\\\n", " ").splitlines():
            if command.startswith("fedpeft sweep"):
                yield pytest.param(path, shlex.split(command)[2:], id=path.stem)


@pytest.mark.parametrize("path, argv", list(documented_sweeps()))
def test_documented_preset_sweeps_plan_valid_runs(path, argv):
    assert argv[0] == f"examples/{path.name}"
    grid = [argv[i + 1] for i, a in enumerate(argv) if a == "--grid"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    seeds = [int(s) for a, s in zip(argv, argv[1:]) if a == "--seeds" for s in s.split(",")] or [0]
    runs = plan_sweep(path, grid, sets, seeds)
    assert len(runs) == len(expand_grid(grid)) * len(seeds) > 1


def test_options_of_other_methods_do_not_split_groups(tmp_path):
    configs = {"a": {"method": {"name": "lora", "r": 8}, "runtime": {"seed": 0}},
               "b": {"method": {"name": "lora", "r": 8}, "runtime": {"seed": 1}},
               "c": {"method": {"name": "bias"}, "runtime": {"seed": 0}}}
    for name, cfg in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.toml").write_text(tomli_w.dumps(cfg))
        (tmp_path / name / "summary.json").write_text(json.dumps({"final_accuracy": 0.5}))
    groups = group_runs(find_runs(tmp_path))
    assert sorted((g.label, len(g.runs)) for g in groups) == [("method=bias", 1), ("method=lora", 2)]


def test_plot_styles_colour_by_method_and_mark_the_other_settings_alike():
    """Readable plots of a method x setting grid: one colour per method, and the same setting
    (here alpha) the same marker for every method; a key tied to the method (lr) is ignored."""
    from pathlib import Path

    from fedpeft.report import Group, Run, _styles

    groups = [Group(f"method={m}, federation.lr={lr}, partition.alpha={a}", runs=[Run(Path(m), m, 0, 1, {})])
              for m, lr in (("bias", 0.01), ("lora", 0.003)) for a in (0.1, 0.5)]
    styles = _styles(groups)
    by = {(g.runs[0].method, g.label[-3:]): styles[g.label] for g in groups}
    assert by["bias", "0.1"]["color"] == by["bias", "0.5"]["color"] != by["lora", "0.1"]["color"]
    assert by["bias", "0.1"]["marker"] == by["lora", "0.1"]["marker"] != by["bias", "0.5"]["marker"]


def test_labels_show_config_values_as_written():
    from fedpeft.report import _value

    assert [_value(v) for v in (8.0, 0.003, 1e-05, 3, "lora", True)] == ["8", "0.003", "1e-05", "3", "lora", "True"]


def cells(rows, label):
    """The report row of the group ``label``, by column name."""
    return dict(zip(COLUMNS, next(r for r in rows if r[0] == label)))


def fake_run(folder, method="head", seed=0, accuracy=0.5, rounds=2, completed=None, status="finished"):
    """A run folder as fedpeft writes it, without training: config.toml, metrics.jsonl (accuracy
    rising to ``accuracy`` at round ``rounds``) and summary.json; ``status=None`` writes a summary
    of a fedpeft that had no status key yet."""
    completed = rounds if completed is None else completed
    folder.mkdir(parents=True)
    Config.from_dict({"data": {"name": "banking77"}, "method": {"name": method}, "runtime": {"seed": seed},
                      "federation": {"rounds": rounds}}).save(folder / "config.toml")
    rows = [{"round": r, "accuracy": accuracy * r / rounds, "cum_bytes_up": 1e6 * r, "cum_bytes_down": 2e6 * r}
            for r in range(1, completed + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"method": method, "rounds": rounds, "rounds_completed": completed,
               "final_accuracy": rows[-1]["accuracy"] if rows else None,
               "total_bytes_up": 1e6 * completed, "total_bytes_down": 2e6 * completed}
    if status is not None:
        summary["status"] = status
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.mark.parametrize("summary, rounds, metrics, expected", [
    ({"status": "finished", "rounds_completed": 2}, 2, True, "finished"),
    ({"status": "finished", "rounds_completed": 2}, 3, True, "partial"),  # the sweep asks for more rounds
    # killed after the last round's row and summary, before the final summary: resume finishes it
    ({"status": "running", "rounds_completed": 2}, 2, True, "partial"),
    ({"status": "interrupted", "rounds_completed": 1}, 2, True, "partial"),
    ({"status": "failed", "rounds_completed": 1}, 2, True, "partial"),
    ({"status": "failed", "rounds_completed": 0}, 2, False, "new"),
    ({"rounds_completed": 2}, 2, True, "finished"),  # written before summaries had a status
    ({"rounds_completed": 1}, 2, True, "partial"),
    ("{\"status\": \"fini", 2, True, "partial"),  # unreadable: resume, never a traceback
    ("[2]", 2, True, "partial"),
    ({"status": "finished", "rounds_completed": None}, 2, True, "partial"),
    ("{", 2, False, "new"),
    (None, 2, True, "partial"),
    (None, 2, False, "new"),
])
def test_run_status_trusts_the_summary_status_and_reads_old_summaries(tmp_path, summary, rounds, metrics, expected):
    if summary is not None:
        (tmp_path / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    if metrics:
        (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    assert run_status(tmp_path, rounds) == expected


@pytest.fixture
def mixed_runs(tmp_path):
    """head: seeds 0, 1 finished and seed 2 killed; lora: finished (one summary without status);
    bias: nothing finished (interrupted, and an old summary one round short); one unreadable summary."""
    fake_run(tmp_path / "head0", seed=0, accuracy=0.4)
    fake_run(tmp_path / "head1", seed=1, accuracy=0.6)
    fake_run(tmp_path / "head2", seed=2, accuracy=0.9, completed=1, status="running")
    fake_run(tmp_path / "lora0", "lora", seed=0, accuracy=0.3)
    fake_run(tmp_path / "lora1", "lora", seed=1, accuracy=0.3, status=None)
    fake_run(tmp_path / "bias0", "bias", seed=0, completed=1, status="interrupted")
    fake_run(tmp_path / "bias1", "bias", seed=1, completed=1, status=None)
    (fake_run(tmp_path / "bias2", "bias", seed=2) / "summary.json").write_text("{")
    return tmp_path


def test_report_means_finished_runs_only_and_marks_groups_with_unfinished_ones(mixed_runs):
    report = write_report(mixed_runs)
    head, lora, bias = (cells(report.rows, f"method={m}") for m in ("head", "lora", "bias"))
    assert (head["seeds"], head["finished"], head["accuracy (mean ± std)"]) == ("3", "2 of 3", "0.500 ± 0.100")
    assert head["MB up total"] == "2"  # the killed run's 1 MB is not in the mean
    assert (lora["seeds"], lora["finished"], lora["accuracy (mean ± std)"]) == ("2", "all", "0.300 ± 0.000")
    assert (bias["seeds"], bias["finished"]) == ("3", "0 of 3")
    assert {bias[c] for c in COLUMNS[3:]} == {"-"}
    assert report.rows[-1][0] == "method=bias"  # no finished run: last
    text = report.path.read_text()
    assert "| method=head | 3 | 2 of 3 | 0.500 ± 0.100 |" in text
    for note in ("- `head2` (method=head, seed 2): running, 1 of 2 rounds",
                 "- `bias0` (method=bias, seed 0): interrupted, 1 of 2 rounds",
                 "- `bias1` (method=bias, seed 1): 1 of 2 rounds",
                 "- `bias2` (method=bias, seed 2): summary.json unreadable"):
        assert note in report.notes and note in text
    assert "mean over the finished runs only" in text and "dashed" in text


def test_plots_draw_each_unfinished_run_dashed_in_its_groups_colour(mixed_runs, monkeypatch):
    import fedpeft.report_plots as report_module

    drawn = {}
    finish = report_module._finish

    def keep_lines(fig, ax, xlabel, ylabel, path):
        drawn[path.name] = [(line.get_label(), line.get_linestyle(), line.get_color()) for line in ax.get_lines()]
        finish(fig, ax, xlabel, ylabel, path)

    monkeypatch.setattr(report_module, "_finish", keep_lines)
    write_report(mixed_runs)
    for name in ("accuracy_vs_round.png", "accuracy_vs_mb.png"):
        lines = drawn[name]
        dashed = [line for line in lines if line[1] == "--"]
        assert len(dashed) == 4 + 1  # head2, bias0-2, and the legend's "unfinished run"
        assert [label for label, style, _ in lines if style != "--"] == ["method=head", "method=lora"]
        head_colour = next(c for label, _, c in lines if label == "method=head")
        assert ("_nolegend_", "--", head_colour) in dashed
        assert ("method=bias", "--") in [line[:2] for line in dashed]  # named by its first dashed line
    assert "method=bias" not in [label for label, _, _ in drawn["frontier.png"]]


def test_duplicate_seeds_count_once_keeping_the_first_run_by_path(tmp_path):
    fake_run(tmp_path / "a", seed=0, accuracy=0.2)
    fake_run(tmp_path / "b" / "copy", seed=0, accuracy=0.8)
    fake_run(tmp_path / "c", seed=1, accuracy=0.4)
    (group,) = group_runs(find_runs(tmp_path))
    assert [r.path.name for r in group.runs] == ["a", "c"]
    assert [(dup.path.name, kept.path.name) for dup, kept in group.duplicates] == [("copy", "a")]
    report = write_report(tmp_path)
    row = cells(report.rows, "method=head")
    assert (row["seeds"], row["finished"], row["accuracy (mean ± std)"]) == ("2", "all", "0.300 ± 0.100")
    assert "- `b/copy` repeats seed 0 of `a` (method=head)" in report.notes
    assert "a finished run is kept, else the first by path" in report.path.read_text()


def test_a_killed_copy_never_hides_the_finished_run_of_its_seed(tmp_path):
    fake_run(tmp_path / "a-killed", seed=0, accuracy=0.2, completed=1, status="running")
    fake_run(tmp_path / "b-done", seed=0, accuracy=0.8)
    (group,) = group_runs(find_runs(tmp_path))
    assert [r.path.name for r in group.runs] == ["b-done"]
    assert [(dup.path.name, kept.path.name) for dup, kept in group.duplicates] == [("a-killed", "b-done")]
    row = cells(write_report(tmp_path).rows, "method=head")
    assert (row["seeds"], row["finished"], row["accuracy (mean ± std)"]) == ("1", "all", "0.800 ± 0.000")


def fake_lm_run(folder, method="lora", seed=0, loss=2.0, rounds=2):
    """A causal-LM run folder (task.kind = "causal-lm") without training: the loss falls to
    ``loss`` at round ``rounds``; exact match and ROUGE-L rise."""
    folder.mkdir(parents=True)
    Config.from_dict({"model": {"name": "tiny-gpt2"}, "task": {"kind": "causal-lm"},
                      "data": {"train": "train.jsonl", "test": "test.jsonl"}, "partition": {"scheme": "iid"},
                      "method": {"name": method}, "runtime": {"seed": seed}, "federation": {"rounds": rounds}}
                     ).save(folder / "config.toml")
    rows = [{"round": r, "accuracy": None, "macro_f1": None, "eval_loss": loss + rounds - r,
             "perplexity": float(np.exp(loss + rounds - r)), "exact_match": 0.1 * r, "rouge_l": 0.2 * r,
             "cum_bytes_up": 1e5 * r, "cum_bytes_down": 1e5 * r} for r in range(1, rounds + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    last = rows[-1]
    summary = {"status": "finished", "task": "causal-lm", "method": method, "rounds": rounds, "rounds_completed": rounds,
               "final_accuracy": None, "final_macro_f1": None, **{f"final_{k}": last[k] for k in
                                                                  ("eval_loss", "perplexity", "exact_match", "rouge_l")},
               "total_bytes_up": last["cum_bytes_up"], "total_bytes_down": last["cum_bytes_down"]}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def drawn(monkeypatch):
    """The labels of every line and scatter the report's plots draw, by file name."""
    import fedpeft.report_plots as plots_module

    labels, finish = {}, plots_module._finish

    def keep_labels(fig, ax, xlabel, ylabel, path):
        labels[path.name] = {line.get_label() for line in ax.get_lines()} | {c.get_label() for c in ax.collections}
        finish(fig, ax, xlabel, ylabel, path)

    monkeypatch.setattr(plots_module, "_finish", keep_labels)
    return labels


def test_report_of_causal_lm_runs_shows_their_metrics_in_place_of_accuracy(tmp_path, drawn):
    from fedpeft.report import LM_COLUMNS

    for seed, loss in ((0, 2.0), (1, 3.0)):
        fake_lm_run(tmp_path / f"lora{seed}", seed=seed, loss=loss)
    fake_lm_run(tmp_path / "prompt0", "prompt", loss=1.5)
    report = write_report(tmp_path)
    assert report.columns == LM_COLUMNS and report.plots == ["lm_vs_round.png", "lm_vs_mb.png", "lm_frontier.png"]
    assert [r[0] for r in report.rows] == ["method=prompt", "method=lora"]  # lowest loss first
    lora = dict(zip(LM_COLUMNS, report.rows[1]))
    assert lora["eval loss (mean ± std)"] == "2.500 ± 0.500"
    assert lora["perplexity (mean)"] == f"{np.mean([np.exp(2.0), np.exp(3.0)]):.4g}"
    assert lora["exact match (mean ± std)"] == "0.200 ± 0.000" and lora["ROUGE-L (mean ± std)"] == "0.400 ± 0.000"
    assert lora["MB up total"] == "0.2"
    for name in report.plots:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert not (tmp_path / "accuracy_vs_round.png").exists()
    assert {"method=lora", "method=prompt"} <= drawn["lm_frontier.png"]
    text = report.path.read_text()
    assert "| eval loss (mean ± std) |" in text and "accuracy (mean ± std)" not in text and "![lm_vs_mb.png]" in text


def test_a_folder_of_classification_and_causal_lm_runs_reports_both(tmp_path, drawn):
    fake_run(tmp_path / "head0", accuracy=0.4)
    fake_run(tmp_path / "bias0", "bias", accuracy=0.6)
    fake_lm_run(tmp_path / "lora0", loss=2.0)
    fake_lm_run(tmp_path / "killed", "prompt", loss=1.0, rounds=3)
    (tmp_path / "killed" / "summary.json").write_text(json.dumps({"status": "running", "rounds_completed": 2}))
    report = write_report(tmp_path)
    assert "accuracy (mean ± std)" in report.columns and "eval loss (mean ± std)" in report.columns
    assert len(report.plots) == 6 and all((tmp_path / p).is_file() for p in report.plots)
    rows = {r[0].split("method=")[1].split(",")[0]: dict(zip(report.columns, r)) for r in report.rows}
    assert [r[0].split("method=")[1].split(",")[0] for r in report.rows] == ["bias", "head", "lora", "prompt"]
    assert rows["bias"]["accuracy (mean ± std)"] == "0.600 ± 0.000" and rows["bias"]["eval loss (mean ± std)"] == "-"
    assert rows["lora"]["eval loss (mean ± std)"] == "2.000 ± 0.000" and rows["lora"]["accuracy (mean ± std)"] == "-"
    assert rows["prompt"]["finished"] == "0 of 1" and rows["prompt"]["eval loss (mean ± std)"] == "-"
    assert not any("lora" in label or "prompt" in label for label in drawn["frontier.png"])
    assert not any("head" in label or "bias" in label for label in drawn["lm_frontier.png"])
    assert any("killed" in note for note in report.notes)
