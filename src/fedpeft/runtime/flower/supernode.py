"""``fedpeft flower-supernode``: one command per client machine for fedpeft on a Flower deployment.

It runs Flower's own SuperNode (``flower-supernode``, every option passed through) in
``--isolation process`` mode with its Runtime API on loopback, plus a ``fedpeft flower-worker``
child that executes the ClientApp tasks and keeps the backbone loaded across rounds (see
:mod:`fedpeft.runtime.flower.worker`). The worker is restarted if it dies and stopped with the node.

Idle pull interval
    An idle flwr 1.41 SuperNode waits a fixed 3 s between requests for work, so each round starts
    up to 3 s late on every node: nothing next to rounds of minutes, a quarter of a 12 s round.
    ``--idle-poll S`` caps that wait and the node's other internal waits at ``S`` and retries a
    message's arrays that are still uploading after ``S / 5`` s instead of 1 s
    (:mod:`fedpeft.runtime.flower.polling`; if the installed flwr does not look as expected, the
    node runs unchanged with a warning). Each idle poll is one small request to the SuperLink:
    keep Flower's 3 s with many nodes or long rounds, lower it for a few nodes and short rounds.

    fedpeft flower-supernode --idle-poll 0.25 -- --superlink HOST:9092 \\
        --node-config "partition-id=0 num-partitions=4" --root-certificates ca.crt
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from fedpeft.errors import FedPeftError

log = logging.getLogger(__name__)
RESERVED = ("--isolation", "--host", "--port")  # set by this command


SECRET_OPTION = "--superexec-auth-secret-file"  # flower-supernode's; its worker must sign with the same file


def secret_file(flower_args: Sequence[str]) -> str | None:
    """The value of ``--superexec-auth-secret-file`` among ``flower_args`` (``--opt v`` or ``--opt=v``)."""
    for i, arg in enumerate(flower_args):
        if arg == SECRET_OPTION and i + 1 < len(flower_args):
            return flower_args[i + 1]
        if arg.startswith(SECRET_OPTION + "="):
            return arg.split("=", 1)[1]
    return None


def worker_command(runtime_port: int, ready_file: str | None, auth_secret_file: str | None = None) -> list[str]:
    """The ``fedpeft flower-worker`` child: a node started with the SuperExec secret hands tasks
    only to a worker that signs with it, so the worker gets the same file."""
    cmd = [sys.executable, "-m", "fedpeft.cli", "flower-worker", "--insecure", "--parent-pid", str(os.getpid()),
           "--runtime-api-address", f"127.0.0.1:{runtime_port}"]
    cmd += [SECRET_OPTION, auth_secret_file] if auth_secret_file else []
    return cmd + (["--ready-file", ready_file] if ready_file else [])


class Worker:
    """The ``fedpeft flower-worker`` child: started with the node (it retries until the Runtime API
    answers), restarted if it exits while the node runs, stopped with the node."""

    def __init__(self, cmd: list[str]) -> None:
        self.cmd, self.stopping, self.proc = cmd, False, None
        self.lock = threading.Lock()  # no start after stop

    def start(self) -> None:
        threading.Thread(target=self._keep_running, daemon=True, name="fedpeft-worker").start()

    def _keep_running(self) -> None:
        while True:
            with self.lock:
                if self.stopping:
                    return
                self.proc = proc = subprocess.Popen(self.cmd)
            code = proc.wait()
            if not self.stopping:
                log.warning("fedpeft flower-worker exited with code %s; restarting it", code)
                time.sleep(1.0)

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_supernode(flower_args: Sequence[str], idle_poll: float, runtime_port: int, ready_file: str | None) -> None:
    """Run Flower's SuperNode with ``flower_args`` in this process, with a warm fedpeft worker."""
    if idle_poll <= 0:
        raise FedPeftError(f"--idle-poll must be > 0 seconds, got {idle_poll}")
    for arg in flower_args:
        if arg.split("=")[0] in RESERVED:
            raise FedPeftError(f"{arg.split('=')[0]} is set by fedpeft flower-supernode (use --runtime-port)")
    from flwr.supercore.exit import add_exit_handler
    from flwr.supercore.logger import console_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedpeft.runtime.flower.polling import shorten_idle_wait

    shorten_idle_wait(idle_poll)
    console_handler.timestamps = True  # a service's log
    if ready_file:
        Path(ready_file).unlink(missing_ok=True)
    worker = Worker(worker_command(runtime_port, ready_file, secret_file(flower_args)))
    add_exit_handler(worker.stop)
    worker.start()
    sys.argv = ["flower-supernode", *flower_args, "--isolation", "process",
                "--host", "127.0.0.1", "--port", str(runtime_port)]
    try:
        flower_supernode()
    finally:
        worker.stop()
