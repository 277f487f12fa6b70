"""End-to-end runs on tiny models and synthetic data: outputs, costs, resume, CLI errors."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import interrupt_at

from fedpeft.config import Config
from fedpeft.errors import FedPeftError
from fedpeft.experiment import evaluate_run, run_experiment
from fedpeft.federation.costs import message_bytes
from fedpeft.results import RunDir

WORDS = {
    "sports": "goal match team score ball league coach",
    "weather": "rain sun cloud storm wind snow cold",
    "money": "bank card cash loan price pay account",
}


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory):
    """A small 3-class text dataset whose class is readable from its words."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("test", 45)):
        lines = ["text,label"]
        for i in range(n):
            label = list(WORDS)[i % 3]
            words = rng.choice(WORDS[label].split(), size=5)
            lines.append(f"{' '.join(words)},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def final_state(run):
    """The global state of a run folder's newest checkpoint."""
    return RunDir(run).latest_checkpoint().state


def make_cfg(csv_data, **sections):
    raw = {
        "model": {"name": "tiny-bert", "max_length": 16},
        "data": {"train": str(csv_data / "train.csv"), "test": str(csv_data / "test.csv")},
        "partition": {"scheme": "iid", "num_clients": 4},
        "method": {"name": "lora", "r": 4},
        "federation": {"rounds": 3, "clients_per_round": 2, "local_steps": 2, "batch_size": 8, "lr": 1e-2},
        "runtime": {"seed": 0, "progress": False},
    }
    for name, table in sections.items():
        raw[name] = {**raw.get(name, {}), **table}
    return Config.from_dict(raw)


def test_run_writes_every_output_with_exact_costs(csv_data, tmp_path):
    cfg = make_cfg(csv_data, federation={"dropout": 0.3, "clients_per_round": 3})
    summary = run_experiment(cfg, out=tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.toml", "metrics.jsonl", "summary.json", "partition.json"):
        assert (run / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    state = final_state(run)
    per_msg = message_bytes(state)
    assert per_msg == sum(a.nbytes + len(k.encode()) for k, a in state.items())
    assert summary["bytes_per_client_update"] == per_msg
    for r in rows:
        assert r["bytes_down"] == per_msg * r["clients_selected"]
        assert r["bytes_up"] == per_msg * r["clients_reported"]
        assert r["clients_reported"] + r["clients_dropped"] == r["clients_selected"] == 3
        assert 0 <= r["accuracy"] <= 1 and r["loss"] > 0
        assert {c["status"] for c in r["clients"]} <= {"ok", "dropped"}
    assert summary["total_bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert summary["total_bytes_down"] == sum(r["bytes_down"] for r in rows)
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["best_accuracy"] == max(r["accuracy"] for r in rows)
    assert summary["trainable_params"] < summary["total_params"]
    assert summary["full_model_bytes_per_message"] > 10 * per_msg
    assert summary["client_flops_total"] > 0
    # the cost model (predicted at max_length 16; real batches are padded to their longest row)
    predicted = summary["client_flops"]["predicted_per_round"]
    assert summary["client_flops"]["mean_client_samples"] == 30
    assert predicted == 2 * 8 * summary["client_flops"]["per_sample"]  # local_steps 2, batch 8
    for r in rows:
        for c in r["clients"]:
            assert c["status"] == "dropped" or 0 < c["flops"] <= predicted, c
    memory = summary["client_peak_memory_mb"]
    assert memory["measured"] is None and memory["breakdown"]["peak"] == memory["predicted"]
    assert memory["predicted"] * 2**20 > summary["client_train_state_bytes"] + memory["breakdown"]["weights"] * 2**20
    saved = json.loads((run / "summary.json").read_text())
    assert saved["final_accuracy"] == summary["final_accuracy"]
    part = json.loads((run / "partition.json").read_text())
    assert sum(c["samples"] for c in part["clients"]) == 120
    assert (run / "model" / "adapter_config.json").exists()


def test_same_seed_same_result_other_seed_differs(csv_data, tmp_path):
    a = run_experiment(make_cfg(csv_data), out=tmp_path / "a")
    b = run_experiment(make_cfg(csv_data), out=tmp_path / "b")
    run_experiment(make_cfg(csv_data, runtime={"seed": 1}), out=tmp_path / "c")
    sa, sb, sc = (final_state(tmp_path / d) for d in "abc")
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])
    assert any(not np.array_equal(sa[k], sc[k]) for k in sa)
    assert a["final_loss"] == b["final_loss"]


def test_resume_after_interrupt_equals_uninterrupted(csv_data, tmp_path, monkeypatch):
    cfg = make_cfg(csv_data, federation={"rounds": 4, "dropout": 0.2, "clients_per_round": 3})
    full = run_experiment(cfg, out=tmp_path / "full")

    from fedpeft.federation.client import ClientTrainer

    real_fit = interrupt_at(monkeypatch, 3)
    with pytest.raises(FedPeftError, match="interrupted after round 2; continue with: fedpeft run --resume"):
        run_experiment(cfg, out=tmp_path / "cut")
    monkeypatch.setattr(ClientTrainer, "fit", real_fit)
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 2
    with pytest.raises(FedPeftError, match="already holds a run"):
        run_experiment(cfg, out=tmp_path / "cut")
    resumed = run_experiment(cfg, out=tmp_path / "cut", resume=True)

    a = final_state(tmp_path / "full")
    b = final_state(tmp_path / "cut")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for key in ("final_accuracy", "final_loss", "total_bytes_up", "total_bytes_down", "rounds_completed"):
        assert resumed[key] == full[key], key
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]


def test_resume_extends_rounds_and_refuses_other_changes(csv_data, tmp_path):
    run_experiment(make_cfg(csv_data, federation={"rounds": 2}), out=tmp_path / "r")
    longer = run_experiment(make_cfg(csv_data, federation={"rounds": 3}), out=tmp_path / "r", resume=True)
    assert longer["rounds_completed"] == 3
    ref = run_experiment(make_cfg(csv_data, federation={"rounds": 3}), out=tmp_path / "ref")
    assert ref["final_loss"] == longer["final_loss"]
    with pytest.raises(FedPeftError, match="differs from the saved one in federation.lr"):
        run_experiment(make_cfg(csv_data, federation={"rounds": 3, "lr": 0.5}), out=tmp_path / "r", resume=True)


def test_round_with_all_clients_dropped_keeps_state(csv_data, tmp_path):
    cfg = make_cfg(csv_data, federation={"dropout": 0.99, "rounds": 2})
    summary = run_experiment(cfg, out=tmp_path / "d")
    assert summary["rounds_without_aggregation"] == [1, 2]
    assert summary["total_bytes_up"] == 0 and summary["total_bytes_down"] > 0
    rows = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert "global state is unchanged" in rows[0]["message"]
    assert rows[0]["accuracy"] == rows[1]["accuracy"]


def test_training_learns_the_synthetic_task(csv_data, tmp_path):
    cfg = make_cfg(csv_data, method={"name": "full"}, federation={"rounds": 4, "local_steps": 8, "lr": 3e-3, "clients_per_round": 4})
    summary = run_experiment(cfg, out=tmp_path / "learn")
    assert summary["final_accuracy"] > 0.8


def test_eval_reproduces_the_final_accuracy(csv_data, tmp_path):
    summary = run_experiment(make_cfg(csv_data, method={"name": "bias"}), out=tmp_path / "e")
    metrics = evaluate_run(tmp_path / "e")
    assert metrics["round"] == 3
    assert metrics["accuracy"] == pytest.approx(summary["final_accuracy"])
    assert metrics["loss"] == pytest.approx(summary["final_loss"], rel=1e-5)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedpeft.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_run_and_eval(csv_data, tmp_path):
    cfg = make_cfg(csv_data)
    cfg.save(tmp_path / "c.toml")
    out = tmp_path / "cli"
    res = _cli("run", str(tmp_path / "c.toml"), "--set", "federation.rounds=2", "--set", "method.name=head", "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "head" and summary["rounds_completed"] == 2
    assert "final_accuracy" in res.stdout
    res = _cli("eval", str(out))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["accuracy"] == pytest.approx(summary["final_accuracy"])
    res = _cli("run", "--resume", str(out), "--set", "federation.rounds=3")  # CONFIG from the run
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "summary.json").read_text())["rounds_completed"] == 3


@pytest.mark.parametrize(
    "sets, message",
    [
        (["method.name=nope"], "method.name: unknown method 'nope'"),
        (["data.train=/nonexistent/train.csv"], "/nonexistent/train.csv"),
        (["data.text_column=sentence"], "sentence"),
        (["partition.num_clients=500"], "client"),
        (["federation.rounds=-1"], "federation.rounds: must be >= 1"),
    ],
)
def test_cli_user_errors_are_one_line(csv_data, tmp_path, sets, message):
    make_cfg(csv_data).save(tmp_path / "c.toml")
    args = ["run", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o")]
    for s in sets:
        args += ["--set", s]
    res = _cli(*args)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "error:" in res.stderr and message in res.stderr.replace("\n", "")


def test_cli_label_mismatch_and_missing_config(csv_data, tmp_path):
    bad = tmp_path / "test.csv"
    bad.write_text("text,label\nhello,unseen_label\n")
    make_cfg(csv_data, data={"test": str(bad)}).save(tmp_path / "c.toml")
    res = _cli("run", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "label set mismatch" in res.stderr
    res = _cli("run", str(tmp_path / "missing.toml"))
    assert res.returncode == 2 and "config file not found" in res.stderr


def test_image_classification_runs_through_the_same_path(tmp_path):
    """An image folder (class subfolders) + tiny ViT + visual prompts, end to end."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colors = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for split, n in (("train", 8), ("test", 3)):
        for label, rgb in colors.items():
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    cfg = Config.from_dict({
        "model": {"name": "tiny-vit"},
        "data": {"train": str(tmp_path / "train"), "test": str(tmp_path / "test")},
        "partition": {"scheme": "iid", "num_clients": 2},
        "method": {"name": "prompt", "num_virtual_tokens": 2},
        "federation": {"rounds": 2, "local_steps": 2, "batch_size": 4},
        "runtime": {"progress": False},
    })
    summary = run_experiment(cfg, out=tmp_path / "run")
    assert summary["num_labels"] == 3 and summary["train_samples"] == 24 and summary["test_samples"] == 9
    assert summary["rounds_completed"] == 2 and 0 <= summary["final_accuracy"] <= 1
    assert summary["total_bytes_up"] == 2 * 2 * summary["bytes_per_client_update"]
    assert (tmp_path / "run" / "model" / "exchanged.safetensors").exists()


def test_nan_update_is_rejected_with_its_reason_and_the_run_goes_on(csv_data, tmp_path, monkeypatch):
    from fedpeft.federation.client import ClientTrainer

    real_fit = ClientTrainer.fit

    def poisoned_fit(self, client, indices, state, rnd):
        result = real_fit(self, client, indices, state, rnd)
        if client == 0:
            name = next(iter(result.state))
            result.state[name] = np.full_like(result.state[name], np.nan)
        return result

    monkeypatch.setattr(ClientTrainer, "fit", poisoned_fit)
    cfg = make_cfg(csv_data, federation={"clients_per_round": 4, "rounds": 2})
    summary = run_experiment(cfg, out=tmp_path / "nan")
    rows = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        bad = [c for c in r["clients"] if c["id"] == 0][0]
        assert bad["status"] == "rejected" and "non-finite" in bad["reason"]
        assert r["clients_rejected"] == 1 and r["aggregated"]
    assert summary["clients_rejected_total"] == 2
    state = final_state(tmp_path / "nan")
    assert all(np.isfinite(a).all() for a in state.values())


def test_progress_bar_on_a_terminal(csv_data, tmp_path):
    """The rich progress display (rounds + clients) runs when the console is a terminal."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    cfg = make_cfg(csv_data, runtime={"progress": True}, federation={"rounds": 2})
    run_experiment(cfg, out=tmp_path / "p", console=console)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())  # drop ANSI styling
    assert "round 1/2" in text and "round 2/2" in text and "acc " in text
    assert "clients" in text and "eta" in text  # the live bar was drawn, not only the log lines


def test_tensorboard_logs_every_round_metric(csv_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_experiment(make_cfg(csv_data, output={"tensorboard": True, "save_model": False}), out=tmp_path / "tb")
    rows = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("eval/accuracy")]
    assert accuracy == [(r["round"], pytest.approx(r["accuracy"])) for r in rows]
    assert [e.value for e in events.Scalars("cost/cum_bytes_up")] == [r["cum_bytes_up"] for r in rows]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-run peak RSS needs /proc/self/clear_refs")
def test_each_run_reports_its_own_peak_rss_in_a_shared_process(csv_data, tmp_path):
    """A sweep runs many experiments in one process: a run's peak RSS must not be an earlier
    run's (here: a 1.2 GB array freed before the run started)."""
    from fedpeft.federation.costs import peak_rss_mb

    big = np.ones(150_000_000)  # 1.2 GB resident
    big.sum()
    del big
    before = peak_rss_mb()
    summary = run_experiment(make_cfg(csv_data), out=tmp_path / "run")
    assert 0 < summary["peak_rss_mb"] < before - 600, (summary["peak_rss_mb"], before)


def test_progress_in_a_log_file_is_one_unwrapped_line_per_event(csv_data, tmp_path, monkeypatch):
    """Without a terminal: finished clients are reported as they finish (throttled), and no line
    is wrapped even on a console narrower than the lines."""
    import io

    from rich.console import Console

    import fedpeft.runtime.rounds as rounds

    monkeypatch.setattr(rounds, "LOG_EVERY_S", 0.0)  # report every finished client
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=40)
    run_experiment(make_cfg(csv_data, federation={"rounds": 2, "clients_per_round": 3}), out=tmp_path / "p", console=console)
    lines = buf.getvalue().splitlines()
    done = [x for x in lines if "clients done" in x]
    assert [x.split(": ")[1].split(" ")[0] for x in done] == ["1/3", "2/3", "1/3", "2/3"]  # not the last one
    rows = [x for x in lines if x.startswith("round ") and "acc " in x]
    assert len(rows) == 2 and all(x.rstrip().endswith("s") and "up " in x for x in rows)  # whole lines
    assert all(len(x) > 40 for x in rows)  # longer than the console, yet not wrapped
