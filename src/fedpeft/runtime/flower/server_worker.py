"""A long-lived ServerApp process for a Flower SuperLink: torch and the model code stay imported.

Why
    By default (``--isolation subprocess``) a SuperLink starts a fresh ``flwr-serverapp`` process
    for every run, which imports flwr, torch and transformers before the first round (5-8 s here).
How
    ``flower-superlink --isolation process`` lets an external process execute its ServerApp
    tasks, as ``flower-supernode --isolation process`` does for ClientApps (see
    :mod:`fedpeft.runtime.flower.worker`). ``fedpeft flower-server-worker`` acquires each run's
    ServerApp task from the SuperLink's Runtime API and runs fedpeft's ServerApp in this process,
    one run after another. Its output goes to the run's log, so ``flwr run --stream`` (and
    ``fedpeft run``) show it as usual. It only ever runs fedpeft's own ServerApp.

    flower-superlink --isolation process --host 127.0.0.1 --port 9093 ... &
    fedpeft flower-server-worker --runtime-api-address 127.0.0.1:9093 --insecure

The protocol calls follow ``flwr.superlink.runtime.run_serverapp`` of flwr 1.41.
"""

from __future__ import annotations

import gc
import logging
import queue
import time
import tomllib
from importlib import resources
from pathlib import Path

from flwr.app import RecordDict
from flwr.common.constant import SubStatus
from flwr.common.serde import context_from_proto, context_to_proto, run_from_proto
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest, PushTaskOutputRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.logger import flush_logs, mirror_output_to_queue, start_log_uploader, stop_log_uploader
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import HttpGrid

from fedpeft.runtime.flower.launch import APP_PYPROJECT
from fedpeft.runtime.flower.worker import acquiring_client, poll_forever, warm_up

log = logging.getLogger(__name__)


def app_config_defaults() -> dict:
    """The run config defaults of fedpeft's Flower app (``[tool.flwr.app.config]``)."""
    text = resources.files("fedpeft.runtime.flower").joinpath(APP_PYPROJECT).read_text()
    return dict(tomllib.loads(text)["tool"]["flwr"]["app"]["config"])


def _drain(log_queue: queue.Queue) -> None:
    """Drop output written between runs: it belongs to no run's log."""
    while True:
        try:
            log_queue.get_nowait()
        except queue.Empty:
            return


def run_server_task(address: str, token: str, insecure: bool, certs: bytes | None, log_queue: queue.Queue) -> str:
    """Execute one run's ServerApp task in this process; return its final status."""
    from fedpeft.federation.costs import reset_peak_rss
    from fedpeft.runtime.flower.app import server_app

    grid = HttpGrid(runtime_api_address=address, insecure=insecure, root_certificates=certs, token=token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(grid._runtime_client))
    heartbeat.start()
    context, uploader = None, None
    status, details = SubStatus.FAILED, "ServerApp task failed"
    try:
        res = grid._runtime_client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
        context, run = context_from_proto(res.context), run_from_proto(res.run)
        grid.set_run(run)
        _drain(log_queue)
        uploader = start_log_uploader(log_queue=log_queue, node_id=0, run_id=run.run_id, client=grid._runtime_client)
        context.run_config = {**app_config_defaults(), **run.override_config}
        gc.collect()  # the previous run's objects are not this run's memory
        reset_peak_rss()
        server_app(grid, context)
        context.state = RecordDict()  # as flwr-serverapp: the resulting state is not sent back
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - reported to the SuperLink as the task's outcome
        log.exception("ServerApp task failed")
        details = f"ServerApp failed with exception: {exc}"
    finally:
        try:
            if uploader is not None:
                flush_logs(log_queue)
            grid._retry_invoker.max_tries = 1
            grid._runtime_client.PushTaskOutput(PushTaskOutputRequest(
                context=context_to_proto(context) if context is not None else None, sub_status=status, details=details,
            ))
        finally:
            if uploader is not None:
                stop_log_uploader(log_queue, uploader)
            heartbeat.stop()
            grid.close()
    return status


def serve_server_apps(
    runtime_api_address: str, insecure: bool = False, root_certificates: str | None = None, ready_file: str | None = None,
    auth_secret_file: str | None = None,
) -> None:
    """Execute the SuperLink's ServerApp tasks (one per run) one after another, forever."""
    certs = Path(root_certificates).read_bytes() if root_certificates else None
    log_queue: queue.Queue = queue.Queue()
    mirror_output_to_queue(log_queue)  # a run's output also goes to its log (flwr run --stream)
    warm_up(ready_file)
    log.info("fedpeft flower-server-worker serving ServerApp tasks of %s", runtime_api_address)
    acquire = acquiring_client(runtime_api_address, insecure, certs, auth_secret_file)

    def run(token: str) -> str:
        start = time.perf_counter()
        return f"{run_server_task(runtime_api_address, token, insecure, certs, log_queue)} ({time.perf_counter() - start:.1f} s)"

    poll_forever(acquire, AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]), run, "SuperLink")
