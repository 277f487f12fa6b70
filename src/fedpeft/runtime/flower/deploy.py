"""A real Flower deployment on this machine: 1 SuperLink + N SuperNodes on loopback ports.

For trying a deployment, for the parity and fault tests and for ``benchmarks/runtimes.py``.
Every process is a real Flower process talking over the network stack (insecure, 127.0.0.1);
SuperNode ``i`` holds ``partition-id = i``. With ``warm=True`` (the default) the SuperLink runs
``--isolation process`` with a ``fedpeft flower-server-worker`` for every run's ServerApp, and each node is a
``fedpeft flower-supernode`` (Flower's SuperNode + a ``fedpeft flower-worker`` that keeps the
backbone loaded; idle pulls every ``idle_poll`` s); with ``warm=False`` it is Flower's default
``flower-supernode`` (a fresh ClientApp process per message, idle pulls every 3 s).

>>> with LoopbackDeployment(num_nodes=2, workdir="/tmp/fl") as dep:
...     cfg.runtime.superlink, cfg.runtime.insecure = dep.superlink, True
...     run_experiment(cfg.replace(kind="flower"), out="/tmp/fl/run")
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedpeft.errors import FedPeftError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).with_name(name))


class LoopbackDeployment:
    """Start, inspect and stop a loopback SuperLink + SuperNodes (+ fedpeft workers)."""

    def __init__(self, num_nodes: int, workdir: str | Path, warm: bool = True, threads: int | None = None,
                 idle_poll: float = 0.25, superexec_secret: bool = False) -> None:
        self.num_nodes, self.warm, self.threads, self.idle_poll = num_nodes, warm, threads, idle_poll
        self.superexec_secret = superexec_secret  # the SuperLink accepts only a signed server worker
        self.workdir = Path(workdir).resolve()
        self.port = free_port()
        self.superlink = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "FLWR_HOME": str(self.workdir / "flwr-home")}
        if threads:
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.workdir / "logs" / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def start(self, timeout: float = 120.0) -> "LoopbackDeployment":
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        secret: list[str] = []
        if self.superexec_secret:
            (self.workdir / "superexec.secret").write_bytes(os.urandom(32))
            secret = ["--superexec-auth-secret-file", str(self.workdir / "superexec.secret")]
        self._start("superlink", [
            _bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation", "--isolation", "process" if self.warm else "subprocess",
            *secret,
        ])
        self._wait_port(self.port, timeout)
        if self.warm:  # every run's ServerApp in one long-lived process
            self._start("server-worker", [
                _bin("fedpeft"), "flower-server-worker", "--runtime-api-address", self.superlink, "--insecure",
                "--ready-file", str(self.workdir / "server-worker.ready"), *secret,
            ])
        for i in range(self.num_nodes):
            self.start_node(i)
        deadline = time.monotonic() + timeout
        readies = [self.workdir / f"worker-{i}.ready" for i in range(self.num_nodes)] + [self.workdir / "server-worker.ready"]
        for ready in readies:
            while self.warm and not ready.exists():
                self._check_alive()
                if time.monotonic() > deadline:
                    raise FedPeftError(f"{ready.stem} not ready after {timeout:g} s; see {self.workdir}/logs")
                time.sleep(0.2)
        return self

    def start_node(self, i: int) -> None:
        """Start SuperNode ``i`` (with its worker); used again to restart a killed node."""
        flower_args = ["--insecure", "--superlink", self.superlink,
                       "--node-config", f"partition-id={i} num-partitions={self.num_nodes}"]
        if not self.warm:
            self._start(f"supernode-{i}", [_bin("flower-supernode"), *flower_args, "--host", "127.0.0.1", "--port", str(free_port())])
            return
        ready = self.workdir / f"worker-{i}.ready"
        ready.unlink(missing_ok=True)
        self._start(f"supernode-{i}", [
            _bin("fedpeft"), "flower-supernode", "--idle-poll", str(self.idle_poll), "--runtime-port", str(free_port()),
            "--ready-file", str(ready), "--", *flower_args,
        ])

    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode ``i`` and its worker: a machine that dies without a word."""
        proc = self.procs.pop(f"supernode-{i}", None)
        if proc is not None:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker is in the node's process group
            proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise FedPeftError(f"{name} exited with code {proc.returncode}; see {self.workdir}/logs/{name}.log")

    def _wait_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise FedPeftError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s; see {self.workdir}/logs")

    def __enter__(self) -> "LoopbackDeployment":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
