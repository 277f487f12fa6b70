"""Run folders that survive damage: every file fedpeft reads is checked, the checkpoint is the
source of truth, and a resumed run equals an uninterrupted one in every field but wall times."""

import json
import shutil

import numpy as np
import pytest

from conftest import interrupt_and_resume, interrupt_at

from fedpeft.errors import FedPeftError
from fedpeft.experiment import evaluate_run, run_experiment
from fedpeft.federation.client import ClientTrainer
from fedpeft.results import RunDir
from test_runs import _cli, csv_data, final_state, make_cfg  # noqa: F401 - csv_data is a fixture

# measurements of this machine, not of the experiment: the only fields a resumed run may change
TIME_KEYS = {"wall_s", "client_compute_s", "eval_s", "other_s", "peak_rss_mb", "compute_s",
             "started_at", "ended_at", "resumed_at"}
ROUNDS = 3


def strip_times(obj):
    """``obj`` (a row, a summary) without the machine-measured fields, recursively."""
    if isinstance(obj, dict):
        return {k: strip_times(v) for k, v in obj.items() if k not in TIME_KEYS}
    if isinstance(obj, list):
        return [strip_times(v) for v in obj]
    return obj


def rows_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def small_cfg(csv_data, **federation):
    fed = {"rounds": ROUNDS, "clients_per_round": 3, "dropout": 0.2, "local_steps": 1, **federation}
    return make_cfg(csv_data, federation=fed, output={"save_model": False})


@pytest.fixture(scope="module")
def reference(csv_data, tmp_path_factory):
    """An uninterrupted run and a run killed (Ctrl-C) in round 3, both with 2 checkpoints kept."""
    root = tmp_path_factory.mktemp("reference")
    summary = run_experiment(small_cfg(csv_data), out=root / "finished")
    with pytest.MonkeyPatch.context() as mp:
        interrupt_at(mp, 3)
        with pytest.raises(FedPeftError, match="interrupted after round 2"):
            run_experiment(small_cfg(csv_data), out=root / "killed")
    return {"finished": root / "finished", "killed": root / "killed", "summary": summary,
            "eval": evaluate_run(root / "finished")}


def test_resume_equals_uninterrupted_in_every_field_but_wall_times(reference, csv_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["killed"], run)
    killed = json.loads((run / "summary.json").read_text())
    assert killed["status"] == "interrupted" and killed["rounds_completed"] == 2 and killed["ended_at"]
    resumed = run_experiment(small_cfg(csv_data), out=run, resume=True)
    full = reference["summary"]
    assert resumed["status"] == full["status"] == "finished" and resumed["resumed_at"]
    assert strip_times(resumed) == strip_times(full)
    assert resumed["client_flops_total"] == full["client_flops_total"] > 0  # exact, not re-measured
    assert strip_times(rows_of(run)) == strip_times(rows_of(reference["finished"]))
    a, b = final_state(run), final_state(reference["finished"])
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_with_a_server_optimizer_equals_uninterrupted(reference, csv_data, tmp_path, monkeypatch):
    """FedAdam's moments are checkpointed: a run killed in round 3 and resumed ends bit-identical."""
    cfg = small_cfg(csv_data, server_optimizer="fedadam", server_lr=0.05)
    full = run_experiment(cfg, out=tmp_path / "full")
    resumed = interrupt_and_resume(monkeypatch, cfg, tmp_path / "cut", 3)
    assert strip_times(resumed) == strip_times(full)
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "cut")
    assert metrics_equal(a, b)
    fedavg = final_state(reference["finished"])  # the same clients and data, plain FedAvg
    assert a.keys() == fedavg.keys() and not metrics_equal(a, fedavg)
    moments = RunDir(tmp_path / "cut").latest_checkpoint().server_state
    assert int(moments["step"]) == ROUNDS and {f"m/{k}" for k in a} <= set(moments)


def test_summary_says_running_during_a_run_and_failed_with_the_error(csv_data, tmp_path, monkeypatch):
    real_fit = ClientTrainer.fit
    seen = []

    def fit(self, client, indices, state, rnd):
        if rnd == 2:
            seen.append(json.loads((tmp_path / "run" / "summary.json").read_text()))
            raise RuntimeError("disk on fire")
        return real_fit(self, client, indices, state, rnd)

    monkeypatch.setattr(ClientTrainer, "fit", fit)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_experiment(small_cfg(csv_data), out=tmp_path / "run")
    assert seen[0]["status"] == "running" and seen[0]["rounds_completed"] == 1 and seen[0]["ended_at"] is None
    final = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert final["status"] == "failed" and "disk on fire" in final["error"]
    assert set(final["versions"]) == {"fedpeft", "torch", "transformers", "peft", "flwr"}
    assert final["versions"]["torch"] and final["started_at"].endswith("Z")


def test_two_checkpoints_are_kept(reference):
    folders = sorted(p.name for p in (reference["finished"] / "checkpoint").iterdir())
    assert folders == ["round-00002", "round-00003"]


# ---------------------------------------------------------------------------- damage matrix

def damage(path, how):
    if how == "delete":
        path.unlink()
    else:
        data = path.read_bytes()
        path.write_bytes(data[: {"empty": 0, "half": len(data) // 2, "last byte": len(data) - 1}[how]])


NEWEST, PREVIOUS = "checkpoint/round-00003", "checkpoint/round-00002"
FILES = ["metrics.jsonl", "summary.json", "config.toml", "partition.json",
         *(f"{NEWEST}/{f}" for f in ("global.safetensors", "server.safetensors", "state.json", "metrics.jsonl",
                                     "config.toml")),
         f"{PREVIOUS}/global.safetensors", f"{PREVIOUS}/state.json"]
HOWS = ["delete", "half", "last byte"]


@pytest.mark.parametrize("name", FILES)
def test_damaged_finished_run_resumes_to_the_same_result_or_says_why(reference, csv_data, tmp_path, name):
    """Every damage of one file of a finished run: --resume ends in the same run (the checkpoint
    kept before the newest recomputes a damaged last round), and eval in the same accuracy or a
    one-line error naming the file."""
    for how in HOWS:
        run = tmp_path / how.replace(" ", "-")
        shutil.copytree(reference["finished"], run)
        damage(run / name, how)
        hashed = name.startswith(NEWEST) and not name.endswith("state.json")  # any cut is detected
        try:
            metrics = evaluate_run(run)
        except FedPeftError as exc:
            assert name.startswith(NEWEST), (how, exc)  # only the newest checkpoint is needed by eval
            assert "\n" not in str(exc) and name.split("/")[-1] in str(exc) and "--resume" in str(exc)
        else:
            assert not hashed, how
            assert metrics == reference["eval"], how  # state.json without its final newline is intact
        summary = run_experiment(small_cfg(csv_data), out=run, resume=True)  # every case recovers
        assert strip_times(summary) == strip_times(reference["summary"]), how
        assert strip_times(rows_of(run)) == strip_times(rows_of(reference["finished"])), how
        assert metrics_equal(final_state(run), final_state(reference["finished"])), how


def metrics_equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json", "config.toml",
                                  "checkpoint/round-00002/state.json", "checkpoint/round-00002/global.safetensors"])
def test_damaged_killed_run_resumes_to_the_same_result_or_says_why(reference, csv_data, tmp_path, name):
    for how in HOWS:
        run = tmp_path / how.replace(" ", "-")
        shutil.copytree(reference["killed"], run)
        damage(run / name, how)
        summary = run_experiment(small_cfg(csv_data), out=run, resume=True)
        assert summary["rounds_completed"] == ROUNDS and summary["status"] == "finished", how
        assert strip_times(rows_of(run)) == strip_times(rows_of(reference["finished"])), how


def test_every_checkpoint_damaged_is_one_line_exit_2(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["finished"], run)
    for folder in (run / "checkpoint").iterdir():
        damage(folder / "global.safetensors", "half")
    res = _cli("run", "--resume", str(run))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    (line,) = [x for x in res.stderr.splitlines() if x.strip()]
    assert "every checkpoint" in line and "global.safetensors" in line
    res = _cli("eval", str(run))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "global.safetensors: damaged" in res.stderr


def test_an_edited_config_is_refused_not_silently_used(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["finished"], run)
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text(text.replace("lr = 0.01", "lr = 0.5"))
    with pytest.raises(FedPeftError, match=r"differs from the config this run was made with in federation.lr; restore"):
        evaluate_run(run)


def test_a_fedpeft_0_1_checkpoint_still_resumes(reference, csv_data, tmp_path):
    """The flat layout of fedpeft 0.1 (state.json naming global-N.safetensors) is still read."""
    run = tmp_path / "run"
    shutil.copytree(reference["killed"], run)
    ckpt = run / "checkpoint"
    shutil.copy(ckpt / "round-00002" / "global.safetensors", ckpt / "global-00002.safetensors")
    (ckpt / "state.json").write_text(json.dumps({"round": 2, "state_file": "global-00002.safetensors"}))
    for folder in ckpt.glob("round-*"):
        shutil.rmtree(folder)
    summary = run_experiment(small_cfg(csv_data), out=run, resume=True)
    assert strip_times(rows_of(run)) == strip_times(rows_of(reference["finished"]))
    assert summary["final_accuracy"] == reference["summary"]["final_accuracy"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["round-00003"]  # the old files are gone


def test_a_copied_run_folder_evaluates_and_resumes_elsewhere(reference, csv_data, tmp_path, monkeypatch):
    run = tmp_path / "moved" / "run"
    shutil.copytree(reference["killed"], run)
    monkeypatch.chdir(tmp_path / "moved")
    assert evaluate_run("run")["round"] == 2
    res = _cli("run", "--resume", "run", cwd=tmp_path / "moved")
    assert res.returncode == 0, res.stderr
    assert "resuming at round 3 of 3" in res.stderr
    assert strip_times(rows_of(run)) == strip_times(rows_of(reference["finished"]))


def test_extending_rounds_on_resume_with_eval_every_equals_the_uninterrupted_run(csv_data, tmp_path):
    """eval_every = 2: a 3-round run extended to 5 (its round 3 was evaluated as the last; a 5-round
    run never evaluates it) writes exactly the rows of the uninterrupted 5-round run (a run killed
    mid-way resumes to them anyway: the schedule depends on the round alone). eval_every itself
    may not change on --resume."""
    cfg = small_cfg(csv_data, rounds=5, eval_every=2)
    full = run_experiment(cfg, out=tmp_path / "full")
    expected = strip_times(rows_of(tmp_path / "full"))
    assert [r["accuracy"] is not None for r in expected] == [False, True, False, True, True]

    short = small_cfg(csv_data, rounds=3, eval_every=2)
    run_experiment(short, out=tmp_path / "ext")
    assert rows_of(tmp_path / "ext")[2]["accuracy"] is not None  # the last round is always evaluated
    extended = run_experiment(cfg, out=tmp_path / "ext", resume=True)
    assert strip_times(rows_of(tmp_path / "ext")) == expected
    assert strip_times(extended) == strip_times(full)  # best_accuracy too
    with pytest.raises(FedPeftError, match="differs from the saved one in federation.eval_every"):
        run_experiment(small_cfg(csv_data, rounds=6, eval_every=3), out=tmp_path / "ext", resume=True)
