"""fedpeft tune: the proxy chooses each method's learning rate on validation rows of the train
split (never the test split), writes what it chose, prints runnable commands, and re-running it
skips what is done."""

import json
import shlex
import shutil

import pytest
import tomli_w
from typer.testing import CliRunner

from fedpeft.cli import app
from fedpeft.config import DataConfig, load_config
from fedpeft.data import load_data
from fedpeft.errors import ConfigError, DataError
from fedpeft.results import RunDir
from fedpeft.sweep import default_execute, plan_sweep
from fedpeft.tune import halving_stages, method_grid, run_tune
from test_runs import csv_data, make_cfg  # noqa: F401 - fixture reused

GRID = ["federation.lr=1e-7,3e-2"]  # lora and full learn the synthetic task at 3e-2, nothing at 1e-7


class Counting:
    """An ``execute`` for run_tune that records each run (folder name, resume) and can fail some."""

    def __init__(self, fail=lambda cfg: False):
        self.calls, self.fail = [], fail

    def __call__(self, cfg, folder, resume):
        self.calls.append((folder.name, resume))
        if self.fail(cfg):
            raise ValueError("boom")
        return default_execute(cfg, folder, resume)


@pytest.fixture(scope="module")
def poisoned(csv_data, tmp_path_factory):  # noqa: F811
    """The synthetic train split with a test split that no run can read: its label is not in train."""
    root = tmp_path_factory.mktemp("poisoned")
    shutil.copy(csv_data / "train.csv", root / "train.csv")
    (root / "test.csv").write_text("text,label\ngoal rain bank,poison\n")
    return root


def write_config(data_root, path, **federation):
    cfg = make_cfg(data_root, federation={"rounds": 5, "clients_per_round": 4, "local_steps": 8, **federation},
                   runtime={"threads": 1})  # one thread: fastest on shared, busy CPUs
    path.write_text(tomli_w.dumps(cfg.to_dict()))
    return path


@pytest.fixture(scope="module")
def tuned(poisoned, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    config = write_config(poisoned, root / "base.toml")
    execute = Counting()
    tuning = run_tune(config, root / "out", ["lora", "full"], GRID, rounds=2, execute=execute)
    return config, root / "out", tuning, execute.calls


def test_tune_picks_the_good_lr_of_each_method_and_writes_it(tuned):
    config, out, tuning, calls = tuned
    assert sorted(calls) == sorted((f"method.name={m}__federation.lr={lr}__seed=0", False)
                                   for m in ("lora", "full") for lr in ("1e-7", "3e-2"))
    assert {m: c.lr for m, c in tuning.choices.items()} == {"lora": 3e-2, "full": 3e-2}
    record = json.loads((out / "tune.json").read_text())
    assert record["choices"] == {"lora": {"federation.lr": "3e-2"}, "full": {"federation.lr": "3e-2"}}
    assert record["proxy"]["rounds"] == 2 and record["proxy"]["validation_fraction"] == 0.2
    for c in record["candidates"]:  # each score is its proxy run's own round-2 validation row
        (row,) = [r for r in RunDir(out / c["runs"][0]).read_metrics() if r["round"] == 2]
        assert (c["macro_f1"], c["accuracy"], c["loss"]) == (row["macro_f1"], row["accuracy"], row["loss"])
        assert c["mb"] == (row["cum_bytes_up"] + row["cum_bytes_down"]) / 1e6 > 0 and c["error"] is None
    md = (out / "tune.md").read_text()
    assert "| lora | federation.lr=3e-2 |" in md and md.count("**chosen**") == 2
    assert all(command in md for command in tuning.commands())
    png = (out / "tune.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_the_proxy_never_reads_the_test_split(tuned, poisoned, csv_data):  # noqa: F811
    config, out, tuning, _ = tuned
    with pytest.raises(DataError, match="poison"):  # what reading it does: any run stops
        load_data(load_config(config).data, seed=0)
    summary = json.loads((out / tuning.choices["lora"].runs[0] / "summary.json").read_text())
    assert summary["test_samples"] == 24 and "24 held-out train rows" in summary["data"]
    # the validation slice comes off the end of the train shuffle: with room for it, a proxy run
    # trains on exactly the rows a normal run does
    files = {"train": str(csv_data / "train.csv"), "test": str(csv_data / "test.csv"), "max_train_samples": 90}
    normal, proxy = (load_data(DataConfig(**files, validation_fraction=f), seed=3) for f in (None, 0.2))
    assert proxy.train["text"] == normal.train["text"] and len(proxy.test) == 18  # 0.2 of the 90 rows
    assert proxy.fingerprint != normal.fingerprint  # the proxy's covers the train split alone


def test_cli_prints_commands_that_load_as_valid_configs(tuned):
    config, out, _, _ = tuned
    result = CliRunner().invoke(app, ["tune", str(config), "--methods", "lora,full", "--grid", GRID[0], "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("fedpeft ")]
    runs, sweeps = [w for w in lines if w[1] == "run"], [w for w in lines if w[1] == "sweep"]
    assert len(runs) == 2 and len(sweeps) == 1
    for words in runs:
        cfg = load_config(words[2], [w for prev, w in zip(words, words[1:]) if prev == "--set"])
        assert (cfg.method.name in ("lora", "full"), cfg.federation.lr, cfg.federation.rounds) == (True, 0.03, 5)
    sweep = sweeps[0]
    planned = plan_sweep(sweep[2], [sweep[sweep.index("--grid") + 1]], [], [0])
    assert {(r.cfg.method.name, r.cfg.federation.lr) for r in planned} == {("lora", 0.03), ("full", 0.03)}


def test_rerunning_skips_finished_candidates_and_resumes_a_killed_one(tuned):
    config, out, tuning, _ = tuned
    killed = out / tuning.choices["full"].runs[0]
    summary = json.loads((killed / "summary.json").read_text())
    (killed / "summary.json").write_text(json.dumps({**summary, "status": "running", "rounds_completed": 1}))
    execute = Counting()
    again = run_tune(config, out, ["lora", "full"], GRID, rounds=2, execute=execute)
    assert execute.calls == [(killed.name, True)]
    assert {m: c.metrics for m, c in again.choices.items()} == {m: c.metrics for m, c in tuning.choices.items()}


def test_server_lr_is_tuned_with_a_server_optimizer_and_a_failed_candidate_does_not_stop_the_others(poisoned, tmp_path):
    config = write_config(poisoned, tmp_path / "adam.toml", server_optimizer="fedadam")
    execute = Counting(fail=lambda cfg: cfg.federation.server_lr == 1e-3)
    tuning = run_tune(config, tmp_path / "out", ["lora"], ["federation.lr=3e-2"], rounds=2, halving=True, execute=execute)
    by_server_lr = {dict(c.settings)["federation.server_lr"]: c for c in tuning.candidates}
    assert set(by_server_lr) == {"1e-3", "1e-2", "1e-1"}  # the default server lr axis of fedadam
    assert by_server_lr["1e-3"].error == "boom"
    # successive halving: the better of the two that ran goes on to round 2 (a resumed run)
    first, second = sorted((by_server_lr["1e-2"], by_server_lr["1e-1"]), key=lambda c: -c.rounds)
    assert (first.rounds, second.rounds) == (2, 1) and tuning.choices["lora"] is first
    assert [resume for _, resume in execute.calls] == [False, False, False, True]
    assert execute.calls[-1][0] == first.runs[0]
    server_lr = dict(first.settings)["federation.server_lr"]
    assert f"--set federation.server_lr={float(server_lr):g}" in tuning.run_commands()[0]
    assert "failed: boom" in (tmp_path / "out" / "tune.md").read_text()


def test_grids_and_stages(poisoned, tmp_path):
    base = load_config(write_config(poisoned, tmp_path / "c.toml"))
    assert method_grid("bias", base, []) == ["method.name=bias", "federation.lr=1e-3,3e-3,1e-2,3e-2"]
    assert method_grid("full", base, ["federation.lr=1e-4", "federation.local_epochs=1,2"]) == [
        "method.name=full", "federation.lr=1e-4", "federation.local_epochs=1,2"]
    with pytest.raises(ConfigError, match="--methods"):
        method_grid("lora", base, ["method.name=head"])
    assert [halving_stages(r, True) for r in (1, 2, 5)] == [[1], [1, 2], [1, 2, 4, 5]]
    assert halving_stages(5, False) == [5]


def test_a_best_lr_on_the_edge_of_the_default_grid_extends_the_grid_there(poisoned, tmp_path, monkeypatch):
    """lora's default grid cut to two points: the better one is an edge, so tune tries half a decade
    beyond it, and again while the new point keeps winning, at most MAX_EXTENSIONS times; the
    choice is the best scored candidate of all."""
    from fedpeft import tune

    monkeypatch.setitem(tune.DEFAULT_LRS, "lora", "3e-4,1e-3")
    config = write_config(poisoned, tmp_path / "base.toml")
    execute = Counting()
    tuning = run_tune(config, tmp_path / "out", ["lora"], rounds=2, execute=execute)
    first, second, *extra = tuning.candidates
    assert (first.lr, second.lr) == (3e-4, 1e-3) and 1 <= len(extra) <= tune.MAX_EXTENSIONS
    edge = min((first, second), key=tune.Candidate.rank)
    walk = [edge.settings[1][1]]
    for _ in extra:
        walk.append(tune.next_lr(walk[-1], up=edge is second))
    assert [c.settings[1][1] for c in extra] == walk[1:]
    for before, after in zip([edge, *extra], extra[:-1]):  # a step out follows only a win
        assert after.rank() < before.rank()
    best = min(tuning.candidates, key=tune.Candidate.rank)
    assert tuning.choices["lora"] is best
    record = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert [c["settings"]["federation.lr"] for c in record["candidates"]] == ["3e-4", "1e-3", *walk[1:]]
    assert len(execute.calls) == 2 + len(extra)


def test_next_lr_walks_the_half_decade_grid():
    from fedpeft.tune import next_lr

    assert [next_lr(v, True) for v in ("1e-2", "3e-2", "3e-4")] == ["3e-2", "1e-1", "1e-3"]
    assert [next_lr(v, False) for v in ("1e-2", "3e-2", "1e-5")] == ["3e-3", "1e-2", "3e-6"]
