"""What the CLI prints reads well in a log file (output to a pipe: no line is wrapped, whatever
COLUMNS says) and in a narrow terminal (links and hub ids stay whole)."""

import json
import os
import re
import subprocess
import sys

import pytest

from fedpeft.data import KNOWN_DATASETS
from fedpeft.methods import get_method_class, method_names
from test_runs import csv_data, make_cfg  # noqa: F401 - fixture reused
from test_sweep_report import fake_run

SUMMARY_KEYS = ("method", "final_accuracy", "trainable_params", "total_bytes_up", "wall_s")


def piped(*args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` with stdout and stderr to pipes, as in ``fedpeft ... > log 2>&1``, and a
    COLUMNS that would wrap at 40 columns if it were honoured."""
    env = {**os.environ, "COLUMNS": "40"}
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    return res


def cli(*args: str) -> subprocess.CompletedProcess:
    return piped("-m", "fedpeft.cli", *args)


def line_with(text: str, output: str) -> str:
    """The one line of ``output`` that holds ``text``."""
    (line,) = [line for line in output.splitlines() if text in line]
    return line


def test_methods_in_a_log_show_each_link_and_options_whole_on_the_methods_line():
    out = cli("methods").stdout
    for name in method_names():
        cls = get_method_class(name)
        row = line_with(f"│ {name} ", out)
        assert cls.paper in row
        if name == "lora":
            assert "r=8, alpha=16, dropout=0.0, target_modules=None" in row


def test_datasets_in_a_log_show_each_hub_id_on_the_datasets_line():
    out = cli("datasets").stdout
    for name, spec in KNOWN_DATASETS.items():
        assert spec.hub_id in line_with(f"│ {name} ", out)


def test_methods_in_a_narrow_terminal_fit_and_keep_links_whole():
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))  # 60 columns
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft.cli", "methods"], stdout=child, stderr=child,
                            env={**env, "NO_COLOR": "1", "TERM": "xterm"})
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    assert proc.wait(timeout=60) == 0
    out = re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode())
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 60
    for name in method_names():
        assert get_method_class(name).paper in line_with(f"│ {name} ", out)


def test_run_in_a_log_prints_its_round_lines_and_summary_unwrapped(csv_data, tmp_path):  # noqa: F811
    config = tmp_path / "c.toml"
    make_cfg(csv_data, federation={"rounds": 1}, method={"name": "head"}).save(config)
    folder = tmp_path / ("a-run-folder-with-a-long-name-" + "x" * 80)
    res = cli("run", str(config), "--out", str(folder))
    summary = json.loads((folder / "summary.json").read_text())
    assert res.stdout.splitlines()[0] == f"fedpeft run: {folder}"
    for key in SUMMARY_KEYS:
        value = summary[key]
        assert (f"{value:.4g}" if isinstance(value, float) else str(value)) in line_with(f"│ {key} ", res.stdout)
    rounds = [line for line in res.stderr.splitlines() if line.startswith("round ")]
    assert len(rounds) == 1 and re.fullmatch(r"round 1/1 .* down [\d.]+ MB +[\d.]+s", rounds[0]), res.stderr


def test_sweep_table_in_a_log_keeps_names_and_reasons_whole(tmp_path):
    name = "method.name=lora__federation.lr=0.003__partition.alpha=0.1__federation.clients_per_round=0.25__seed=0"
    reason = "failed: data.train: no such file /a/very/long/path/" + "y" * 60 + " [red]"
    code = ("from pathlib import Path; from fedpeft.cli import _print_outcomes; "
            f"_print_outcomes({{{name!r}: {reason!r}, 'b': 'ran'}}, Path({str(tmp_path)!r}))")
    out = piped("-c", code).stdout
    assert out.splitlines()[0] == f"fedpeft sweep: {tmp_path}"
    assert reason in line_with(name, out)


def test_report_in_a_log_prints_the_marked_table_and_its_notes(tmp_path):
    fake_run(tmp_path / "head0", seed=0, accuracy=0.4)
    fake_run(tmp_path / "head1", seed=1, completed=1, status="interrupted")
    fake_run(tmp_path / "head1-copy", seed=1)  # finished: kept over the interrupted head1
    fake_run(tmp_path / "head2", seed=2, completed=1, status="interrupted")
    res = cli("report", str(tmp_path))
    assert "| method=head | 3 | 2 of 3 | 0.450 ± 0.050 |" in res.stdout
    assert "- `head2` (method=head, seed 2): interrupted, 1 of 2 rounds" in res.stdout.splitlines()
    assert "- `head1` repeats seed 1 of `head1-copy` (method=head)" in res.stdout.splitlines()
    assert res.stderr.splitlines()[-1] == (f"wrote {tmp_path / 'report.md'} and accuracy_vs_round.png, "
                                           "accuracy_vs_mb.png, frontier.png")
