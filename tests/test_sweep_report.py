"""Sweeps (grid expansion, skip finished, resume killed, failures) and reports (numbers, plots)."""

import json

import numpy as np
import pytest
import tomli_w

from fedpeft.errors import ConfigError
from fedpeft.report import find_runs, group_runs, pareto_frontier, write_report
from fedpeft.sweep import expand_grid, parse_grid, plan_sweep, run_sweep
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
    before = (out / "method.name=head__seed=0" / "summary.json").read_text()
    calls.clear()
    second = run_sweep(base_config, out, grid, seeds=[0, 1], execute=execute)
    assert second["method.name=head__seed=0"] == "skipped"
    assert second["method.name=head__seed=1"] == "resumed"
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
    rows, path = write_report(out)
    summaries = {run.name: json.loads((run / "summary.json").read_text()) for run in find_runs(out)}
    for method in ("head", "lora"):
        mine = [s for name, s in summaries.items() if f"={method}__" in name]
        row = next(r for r in rows if r[0] == f"method={method}")
        accs = [s["final_accuracy"] for s in mine]
        assert row[1] == "2"
        assert row[2] == f"{np.mean(accs):.3f} ± {np.std(accs):.3f}"
        assert row[3] == f"{np.mean([s['mb_up_per_round'] for s in mine]):.4g}"
        assert row[5] == f"{np.mean([s['total_bytes_up'] for s in mine]) / 1e6:.4g}"
        assert row[7] == f"{np.mean([s['client_flops_total'] for s in mine]) / 1e9:.4g}"
        assert f"| {' | '.join(row)} |" in path.read_text()
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
    assert (out / "report.md").exists() and "| method=head | 1 |" in rep.stdout
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
    from fedpeft.report import Group, _styles

    groups = [Group(f"method={m}, federation.lr={lr}, partition.alpha={a}", summaries=[{"method": m}])
              for m, lr in (("bias", 0.01), ("lora", 0.003)) for a in (0.1, 0.5)]
    styles = _styles(groups)
    by = {(g.summaries[0]["method"], g.label[-3:]): styles[g.label] for g in groups}
    assert by["bias", "0.1"]["color"] == by["bias", "0.5"]["color"] != by["lora", "0.1"]["color"]
    assert by["bias", "0.1"]["marker"] == by["lora", "0.1"]["marker"] != by["bias", "0.5"]["marker"]


def test_labels_show_config_values_as_written():
    from fedpeft.report import _value

    assert [_value(v) for v in (8.0, 0.003, 1e-05, 3, "lora", True)] == ["8", "0.003", "1e-05", "3", "lora", "True"]
