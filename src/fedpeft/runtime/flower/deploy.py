"""A real Flower deployment on this machine: 1 SuperLink + N SuperNodes on loopback ports.

For trying a deployment, for the parity and fault tests and for ``benchmarks/runtimes.py``.
Every process is a real Flower process talking over the network stack (127.0.0.1); SuperNode
``i`` holds ``partition-id = i``. Insecure by default; with ``keys`` (a folder of
:func:`~fedpeft.runtime.flower.keys.make_deployment_keys`, ``fedpeft flower-keys``) it is the
README's production setup: TLS on the SuperLink (every API on its one port: Fleet, Control,
Runtime), ``--enable-supernode-auth`` with SuperNode ``i``'s public key registered through
``flwr supernode register`` before it starts with its private key, the server worker over TLS,
and (``superexec_secret=True``) the SuperExec secret of ``keys`` on the SuperLink and the server
worker. With ``warm=True`` (the default) the SuperLink runs
``--isolation process`` with a ``fedpeft flower-server-worker`` for every run's ServerApp, and each node is a
``fedpeft flower-supernode`` (Flower's SuperNode + a ``fedpeft flower-worker`` that keeps the
backbone loaded; idle pulls every ``idle_poll`` s); with ``warm=False`` it is Flower's default
``flower-supernode`` (a fresh ClientApp process per message, idle pulls every 3 s).

>>> with LoopbackDeployment(num_nodes=2, workdir="/tmp/fl") as dep:
...     cfg.runtime.superlink, cfg.runtime.insecure = dep.superlink, True
...     run_experiment(cfg.replace(kind="flower"), out="/tmp/fl/run")
>>> keys = make_deployment_keys("/tmp/fl/keys", num_nodes=2)
>>> with LoopbackDeployment(2, "/tmp/fl", keys=keys, superexec_secret=True) as dep:
...     cfg.runtime.superlink, cfg.runtime.root_certificates = dep.superlink, str(keys.ca_cert)
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

import tomli_w

from fedpeft.errors import FedPeftError
from fedpeft.runtime.flower.keys import DeploymentKeys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).with_name(name))


class LoopbackDeployment:
    """Start, inspect and stop a loopback SuperLink + SuperNodes (+ fedpeft workers)."""

    def __init__(self, num_nodes: int, workdir: str | Path, warm: bool = True, threads: int | None = None,
                 idle_poll: float = 0.25, superexec_secret: bool = False, keys: DeploymentKeys | None = None) -> None:
        self.num_nodes, self.warm, self.threads, self.idle_poll = num_nodes, warm, threads, idle_poll
        self.superexec_secret = superexec_secret  # the SuperLink accepts only a signed server worker
        self.keys = keys  # TLS + SuperNode authentication (None: insecure)
        if keys is not None:
            missing = [p for p in (keys.ca_cert, keys.server_cert, keys.server_key,
                                   *(keys.node_key(i) for i in range(num_nodes))) if not p.is_file()]
            if missing:
                raise FedPeftError(f"keys: no such file: {missing[0]} (make them with fedpeft flower-keys "
                                   f"{keys.directory} --nodes {num_nodes})")
        self.workdir = Path(workdir).resolve()
        self.port = free_port()
        self.superlink = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "FLWR_HOME": str(self.workdir / "flwr-home")}
        if threads:
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    def tls_args(self) -> list[str]:
        """The SuperLink's TLS and node-authentication options (``--insecure`` without keys)."""
        if self.keys is None:
            return ["--insecure"]
        k = self.keys
        return ["--ssl-ca-certfile", str(k.ca_cert), "--ssl-certfile", str(k.server_cert),
                "--ssl-keyfile", str(k.server_key), "--enable-supernode-auth"]

    def client_tls_args(self) -> list[str]:
        """How a client of the SuperLink (server worker) verifies it: the CA, or ``--insecure``."""
        return ["--insecure"] if self.keys is None else ["--root-certificates", str(self.keys.ca_cert)]

    def write_connection(self) -> Path:
        """``FLWR_HOME/config.toml`` naming this SuperLink as the default connection of the ``flwr``
        CLI (``flwr supernode register``, ``flwr supernode ls``); returns the FLWR_HOME."""
        home = Path(self.env["FLWR_HOME"])
        conn: dict[str, object] = {"address": self.superlink}
        conn.update({"insecure": True} if self.keys is None else {"root-certificates": str(self.keys.ca_cert)})
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "loopback", "loopback": conn}}))
        return home

    def register_nodes(self, timeout: float = 120.0) -> None:
        """``flwr supernode register nodes/node-<i>.pub`` for every node (in parallel), as an
        operator does before starting them; fails naming the node whose key was refused."""
        self.write_connection()
        procs = {i: subprocess.Popen([_bin("flwr"), "supernode", "register", str(self.keys.node_public_key(i)), "loopback"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
                 for i in range(self.num_nodes)}
        for i, proc in procs.items():
            out, _ = proc.communicate(timeout=timeout)
            (self.workdir / "logs" / f"register-{i}.log").write_text(out)
            if proc.returncode != 0 or "registered successfully" not in out:
                raise FedPeftError(f"flwr supernode register {self.keys.node_public_key(i)} failed: {out.strip()[-500:]}")

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.workdir / "logs" / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def start(self, timeout: float = 120.0) -> "LoopbackDeployment":
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        secret: list[str] = []
        if self.superexec_secret:  # the one of keys, or a fresh one
            path = self.keys.superexec_secret if self.keys is not None else self.workdir / "superexec.secret"
            if self.keys is None:
                path.write_bytes(os.urandom(32))
            secret = ["--superexec-auth-secret-file", str(path)]
        self._start("superlink", [
            _bin("flower-superlink"), *self.tls_args(), "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation", "--isolation", "process" if self.warm else "subprocess",
            *secret,
        ])
        self._wait_port(self.port, timeout)
        if self.warm:  # every run's ServerApp in one long-lived process
            self._start("server-worker", [
                _bin("fedpeft"), "flower-server-worker", "--runtime-api-address", self.superlink, *self.client_tls_args(),
                "--ready-file", str(self.workdir / "server-worker.ready"), *secret,
            ])
        if self.keys is not None:  # the nodes' public keys, before they connect (a stranger is refused)
            self.register_nodes(timeout)
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

    def node_args(self, i: int, private_key: Path | None = None, root_certificates: bool = True) -> list[str]:
        """``flower-supernode``'s options for a node holding partition ``i``: with keys, the CA
        (unless ``root_certificates`` is False) and node ``i``'s private key (or ``private_key``)."""
        args = ["--superlink", self.superlink, "--node-config", f"partition-id={i} num-partitions={self.num_nodes}"]
        if self.keys is None:
            return ["--insecure", *args]
        tls = ["--root-certificates", str(self.keys.ca_cert)] if root_certificates else []
        return [*args, *tls, "--auth-supernode-private-key", str(private_key or self.keys.node_key(i))]

    def start_probe_node(self, name: str, i: int, private_key: Path | None = None,
                         root_certificates: bool = True) -> subprocess.Popen:
        """Start Flower's plain ``flower-supernode`` (no worker, gives up after 2 failed
        connection attempts) as ``name``, its log in ``logs/<name>.log``: to see a node that
        should be refused being refused (:meth:`log`)."""
        self._start(name, [_bin("flower-supernode"), *self.node_args(i, private_key, root_certificates),
                           "--max-retries", "2", "--max-wait-time", "20", "--host", "127.0.0.1", "--port", str(free_port())])
        return self.procs[name]

    def log(self, name: str) -> str:
        """What process ``name`` (``superlink``, ``supernode-0``, a probe node) has logged so far."""
        return (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")

    def start_node(self, i: int) -> None:
        """Start SuperNode ``i`` (with its worker); used again to restart a killed node."""
        flower_args = self.node_args(i)
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
