"""A real loopback deployment that loses a SuperNode mid-run (its own file: the suite's workers
take a file each, and this ~100 s test would otherwise sit with test_flower.py's simulations)."""

from __future__ import annotations

import threading
import time

from test_flower import rows_of
from test_runs import csv_data, make_cfg  # noqa: F401 - fixture reused

from fedpeft.experiment import run_experiment


def test_a_supernode_killed_mid_run_fails_its_rounds_and_the_run_goes_on(csv_data, tmp_path):  # noqa: F811
    from fedpeft.runtime.flower.deploy import LoopbackDeployment

    out = tmp_path / "run"
    cfg = make_cfg(
        csv_data, partition={"num_clients": 3},
        federation={"rounds": 3, "clients_per_round": 3, "min_clients": 2, "local_steps": 30},
        runtime={"kind": "flower", "insecure": True, "threads": 1, "round_timeout": 20, "connect_timeout": 60},
    )
    with LoopbackDeployment(3, tmp_path / "deploy") as dep:
        cfg.runtime.superlink = dep.superlink
        done: dict = {}
        thread = threading.Thread(target=lambda: done.update(summary=run_experiment(cfg, out=out)))
        thread.start()
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
            assert thread.is_alive() and time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.2)
        dep.kill_node(2)  # round 2 is being sent/trained now
        thread.join(300)
    summary = done["summary"]
    rows = rows_of(out)
    assert summary["rounds_completed"] == 3 and all(r["aggregated"] for r in rows)
    assert rows[0]["clients_failed"] == 0
    assert summary["clients_failed_total"] >= 1
    assert all(f["client"] == 2 for f in summary["failures"])
    assert any(f["round"] == 2 for f in summary["failures"])
    for r in rows[1:]:
        statuses = {c["id"]: c["status"] for c in r["clients"]}
        assert statuses[0] == statuses[1] == "ok"
