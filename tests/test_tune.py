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


class Scripted:
    """A fake ``execute`` that writes a believable proxy run folder (a metrics row per round, a
    finished summary) from scripted validation scores ``{lr: {round: (macro_f1, loss)}}``.
    Resumed, it writes only the rounds after the folder's last row; every row records which call
    wrote it."""

    def __init__(self, scores):
        self.scores, self.calls = scores, []

    def __call__(self, cfg, folder, resume):
        run = RunDir(folder)
        rows = run.read_metrics()
        assert resume == bool(rows), "a fresh run into a folder holding rows, or a resume of nothing"
        self.calls.append((folder.name, resume, cfg.federation.rounds))
        folder.mkdir(parents=True, exist_ok=True)
        for r in range(len(rows) + 1, cfg.federation.rounds + 1):
            f1, loss = self.scores[cfg.federation.lr][r]
            rows.append({"round": r, "macro_f1": f1, "accuracy": f1, "loss": loss, "cum_bytes_up": 1e6 * r,
                         "cum_bytes_down": 1e6 * r, "call": len(self.calls)})
        run.write_metrics(rows)
        run.summary.write_text(json.dumps({"status": "finished", "rounds_completed": cfg.federation.rounds}))
        return {}


def scripted(round_2, later=None):
    """Scores of the four bias lrs: ``round_2[lr]`` at rounds 1 and 2, ``later[lr]`` from round 3 on."""
    later = later or round_2
    return {lr: {r: (round_2 if r <= 2 else later)[lr] for r in range(1, 9)} for lr in round_2}


BIAS = ["bias"]
COLLAPSED = {1e-3: (0.156, 0.70), 3e-3: (0.1565, 0.60), 1e-2: (0.156, 0.65), 3e-2: (0.100, 0.50)}


def test_a_tie_at_the_top_runs_only_the_tied_candidates_longer_and_the_longer_run_decides(poisoned, tmp_path):
    """ag_news in docs/results.md: after 2 proxy rounds three lrs share macro-F1 0.156 (within
    TIE_TOLERANCE), so only they resume their folders to round 4; there 1e-2 wins, which round 2
    would not have chosen (3e-3 has the highest macro-F1, by 5e-4, and the lowest loss)."""
    config = write_config(poisoned, tmp_path / "c.toml", rounds=8)
    execute = Scripted(scripted(COLLAPSED, {1e-3: (0.25, 0.6), 3e-3: (0.60, 0.4), 1e-2: (0.62, 0.45), 3e-2: (0.9, 0.1)}))
    tuning = run_tune(config, tmp_path / "out", BIAS, rounds=2, execute=execute)
    by_lr = {c.lr: c for c in tuning.candidates}
    assert tuning.choices["bias"] is by_lr[1e-2] and by_lr[1e-2].metrics["macro_f1"] == 0.62
    assert {lr: c.rounds for lr, c in by_lr.items()} == {1e-3: 4, 3e-3: 4, 1e-2: 4, 3e-2: 2}
    assert by_lr[3e-2].metrics["macro_f1"] == 0.100  # not tied: never run past round 2 (its 0.9 unseen)
    resumed = [(name, rounds) for name, resume, rounds in execute.calls if resume]
    assert sorted(resumed) == sorted((f"method.name=bias__federation.lr={lr}__seed=0", 4) for lr in ("1e-3", "3e-3", "1e-2"))
    assert len(execute.calls) == 4 + 3
    for lr in (1e-3, 3e-3, 1e-2):  # rounds 1-2 written once, by the first run; 3-4 by the resume
        rows = RunDir(tmp_path / "out" / by_lr[lr].runs[0]).read_metrics()
        assert [r["round"] for r in rows] == [1, 2, 3, 4]
        first = next(i for i, (name, _, _) in enumerate(execute.calls, 1) if name == by_lr[lr].runs[0])
        assert [r["call"] for r in rows[:2]] == [first] * 2 and rows[2]["call"] == rows[3]["call"] > 4
    (tie,) = tuning.ties
    assert (tie.round, tie.extended_to, [c.lr for c in tie.candidates]) == (2, 4, [3e-3, 1e-2, 1e-3])
    record = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert {c["settings"]["federation.lr"]: c["rounds"] for c in record["candidates"]} == {
        "1e-3": 4, "3e-3": 4, "1e-2": 4, "3e-2": 2}
    assert record["ties"] == [{"method": "bias", "round": 2, "score": 0.1565, "extended_to": 4, "candidates": [
        {"federation.lr": "3e-3"}, {"federation.lr": "1e-2"}, {"federation.lr": "1e-3"}]}]
    assert record["proxy"]["tie_tolerance"] == 1e-3 and record["proxy"]["max_rounds"] == 8
    md = (tmp_path / "out" / "tune.md").read_text()
    assert "| bias | federation.lr=1e-2 | 0.62 | 0.62 | 0.45 | 8 | 4 | **chosen**; tied at round 2 -> 4 |" in md
    assert "| bias | federation.lr=3e-2 | 0.1 | 0.1 | 0.5 | 4 | 2 |  |" in md
    assert "bias: 3 candidates tied at round 2 (val macro-F1 0.1565; federation.lr=3e-3; federation.lr=1e-2; " \
           "federation.lr=1e-3): ran them to round 4" in md
    again = Scripted(execute.scores)  # re-running resumes nothing: every folder is finished
    assert run_tune(config, tmp_path / "out", BIAS, rounds=2, execute=again).choices["bias"].lr == 1e-2
    assert again.calls == []


def test_no_tie_at_the_top_runs_nothing_longer(poisoned, tmp_path):
    config = write_config(poisoned, tmp_path / "c.toml", rounds=8)
    scores = {1e-3: (0.30, 0.7), 3e-3: (0.302, 0.6), 1e-2: (0.40, 0.65), 3e-2: (0.40 - 1.5e-3, 0.1)}  # 1e-2 by > 1e-3
    execute = Scripted(scripted(scores))
    tuning = run_tune(config, tmp_path / "out", BIAS, rounds=2, execute=execute)
    assert [resume for _, resume, _ in execute.calls] == [False] * 4 and {c.rounds for c in tuning.candidates} == {2}
    assert tuning.choices["bias"].lr == 1e-2 and tuning.ties == []
    assert json.loads((tmp_path / "out" / "tune.json").read_text())["ties"] == []
    assert "Ties at the top" not in (tmp_path / "out" / "tune.md").read_text()


def test_tied_candidates_run_at_most_the_configs_rounds_then_the_tie_break_chooses(poisoned, tmp_path):
    """Tied through round 5, the config's federation.rounds: 2 -> 4 -> 5, never more, then the
    lower validation loss decides, and the CLI says so."""
    config = write_config(poisoned, tmp_path / "c.toml", rounds=5)
    tied = {1e-3: (0.156, 0.70), 3e-3: (0.156, 0.60), 1e-2: (0.156, 0.65), 3e-2: (0.100, 0.50)}
    execute = Scripted(scripted(tied))
    tuning = run_tune(config, tmp_path / "out", BIAS, rounds=2, execute=execute)
    assert [rounds for _, resume, rounds in execute.calls if resume] == [4] * 3 + [5] * 3
    assert max(r["round"] for c in tuning.candidates for r in RunDir(tmp_path / "out" / c.runs[0]).read_metrics()) == 5
    assert tuning.choices["bias"].lr == 3e-3 and tuning.choices["bias"].rounds == 5  # the lowest loss of the tied
    assert [(t.round, t.extended_to) for t in tuning.ties] == [(2, 4), (4, 5), (5, None)]
    md = (tmp_path / "out" / "tune.md").read_text()
    assert "tied at round 2 -> 4, 4 -> 5, 5: tie-break" in md
    assert "at the config's federation.rounds, so the tie-break (lower validation loss) chose federation.lr=3e-3" in md
    # the CLI on the same folder: every run is finished (nothing runs), it prints the ties and the usual commands
    result = CliRunner().invoke(app, ["tune", str(config), "--methods", "bias", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "Ties at the top:\n- bias: 3 candidates tied at round 2 (val macro-F1 0.156; " in result.stdout
    assert "- bias: 3 candidates tied at round 5 (" in result.stdout and "the tie-break (lower validation loss) chose" in result.stdout
    assert f"fedpeft run {config} --set method.name=bias --set federation.lr=0.003" in result.stdout
    # a proxy as long as the config: nothing can run longer, the tie-break decides at once
    again = Scripted(scripted(tied))
    short = run_tune(write_config(poisoned, tmp_path / "c2.toml", rounds=2), tmp_path / "out2", BIAS, rounds=4, execute=again)
    assert [resume for _, resume, _ in again.calls] == [False] * 4 and [(t.round, t.extended_to) for t in short.ties] == [(2, None)]
    assert short.choices["bias"].lr == 3e-3


def test_an_lr_added_past_the_grid_edge_runs_as_long_as_the_choice_and_its_ties_run_longer(poisoned, tmp_path):
    """1e-2 and 3e-2 tie at round 2; at round 4 3e-2 wins, an edge, so 1e-1 is tried at 4 rounds
    too; it ties with 3e-2 there, both run to 8 and 1e-1 wins; 3e-1 is then tried at 8 rounds."""
    config = write_config(poisoned, tmp_path / "c.toml", rounds=8)
    def curve(early, late, at=2):
        return {r: early if r <= at else late for r in range(1, 9)}
    execute = Scripted({1e-3: curve((0.1, 1), (0.1, 1)), 3e-3: curve((0.1, 1), (0.1, 1)),
                        1e-2: curve((0.156, 0.5), (0.3, 0.5)), 3e-2: curve((0.156, 0.6), (0.5, 0.5)),
                        1e-1: curve((0.5, 0.4), (0.7, 0.4), at=4), 3e-1: curve((0.2, 1), (0.2, 1))})
    tuning = run_tune(config, tmp_path / "out", BIAS, rounds=2, execute=execute)
    by_lr = {c.lr: c for c in tuning.candidates}
    assert tuning.choices["bias"] is by_lr[1e-1]
    assert {lr: c.rounds for lr, c in by_lr.items()} == {1e-3: 2, 3e-3: 2, 1e-2: 4, 3e-2: 8, 1e-1: 8, 3e-1: 8}
    assert [(lr, resume, rounds) for lr, resume, rounds in ((n.split("=")[2].split("__")[0], r, k)
            for n, r, k in execute.calls)][4:] == [
        ("1e-2", True, 4), ("3e-2", True, 4), ("1e-1", False, 4), ("1e-1", True, 8), ("3e-2", True, 8), ("3e-1", False, 8)]
    assert [(t.round, t.extended_to, [c.lr for c in t.candidates]) for t in tuning.ties] == [
        (2, 4, [1e-2, 3e-2]), (4, 8, [1e-1, 3e-2])]


def test_a_forced_tie_resumes_real_proxy_runs_without_rerunning_their_rounds(poisoned, tmp_path, monkeypatch):
    """The real run path: with every macro-F1 a tie, both candidates resume to round 3 (the
    config's rounds, below 2 x 2); rounds 1-2 keep the rows (wall times included) the first run wrote."""
    from fedpeft import tune

    monkeypatch.setitem(tune.TIE_TOLERANCE, "macro_f1", 1.0)
    config = write_config(poisoned, tmp_path / "c.toml", rounds=3, local_steps=2)
    out, first_resume = tmp_path / "out", {}  # run name -> its rows when it first resumed

    def execute(cfg, folder, resume):
        if resume:
            first_resume.setdefault(folder.name, RunDir(folder).read_metrics())
        execute.calls.append((folder.name, resume, cfg.federation.rounds))
        return default_execute(cfg, folder, resume)

    execute.calls = []
    tuning = run_tune(config, out, ["lora"], ["federation.lr=1e-7,3e-2"], rounds=2, execute=execute)
    assert [(resume, rounds) for _, resume, rounds in execute.calls] == [(False, 2)] * 2 + [(True, 3)] * 2
    for c in tuning.candidates:
        rows = RunDir(out / c.runs[0]).read_metrics()
        assert [r["round"] for r in rows] == [1, 2, 3] and c.rounds == 3
        assert [r["round"] for r in first_resume[c.runs[0]]] == [1, 2] and rows[:2] == first_resume[c.runs[0]]
    assert [(t.round, t.extended_to) for t in tuning.ties] == [(2, 3), (3, None)]
    assert tuning.choices["lora"] is min(tuning.candidates, key=lambda c: c.metrics["loss"])
