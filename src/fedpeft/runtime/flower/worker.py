"""A long-lived ClientApp process for one Flower SuperNode: the backbone stays loaded across rounds.

Why
    By default (``--isolation subprocess``) a SuperNode starts a fresh ``flwr-clientapp`` process
    for every message, so each round re-imports torch/transformers and reloads the model.
How
    Flower's ``--isolation process`` mode lets an external process execute the SuperNode's
    ClientApp tasks: it acquires a task token from the SuperNode's Runtime API, pulls the
    message, runs the ClientApp and pushes the reply (what ``flower-superexec`` + ``flwr-clientapp``
    do, one process per task). ``fedpeft flower-worker`` does the same in a loop, in one process,
    so :data:`fedpeft.runtime.flower.app._CLIENT_EXPERIMENTS` (model + encoded partition) survives
    from round to round. It only ever runs fedpeft's own ClientApp.

    flower-supernode --isolation process --port 9094 ... &
    fedpeft flower-worker --runtime-api-address 127.0.0.1:9094 --insecure

The protocol calls below follow ``flwr.supernode.runtime.run_clientapp`` of flwr 1.41.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedpeft.errors import FedPeftError

log = logging.getLogger(__name__)
PULL_BACKOFF_S = (0.02, 0.2)  # retry delays while the SuperNode still stores the message's arrays


def _client(address: str, insecure: bool, root_certificates: bytes | None, interceptors: list) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=root_certificates,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context]:
    """The task's message and context, as ``flwr``'s ``pull_task_input`` pulls them, but retrying
    fast: the SuperNode hands out the task before it has stored the message's arrays, and Flower's
    default first retry waits 1 s, on every round."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context = context_from_proto(res.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message for this task from the SuperNode Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=PULL_BACKOFF_S[0],
        backoff_cap=PULL_BACKOFF_S[1],
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as flwr does: not part of the content
    return message, context


def run_task(address: str, token: str, insecure: bool, root_certificates: bytes | None) -> str:
    """Execute one ClientApp task in this process; return its final status and where the time went."""
    from fedpeft.runtime.flower.app import client_app

    client = _client(address, insecure, root_certificates, [
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token),
    ])
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    times = [time.perf_counter()]
    try:
        message, context = pull_task_input(client)
        times.append(time.perf_counter())
        reply = client_app(message=message, context=context)
        times.append(time.perf_counter())
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - reported back to the ServerApp as an error reply
        log.exception("ClientApp task failed")
        details = f"{type(exc).__name__}: {exc}"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=status, details=details)
        finally:
            heartbeat.stop()
            client.close()
    times.append(time.perf_counter())
    steps = ", ".join(f"{name} {b - a:.2f} s" for name, a, b in zip(("pull", "run", "push"), times, times[1:]))
    return f"{status} ({steps})"


def acquiring_client(address: str, insecure: bool, certs: bytes | None, auth_secret_file: str | None) -> RuntimeHttpClient:
    """A Runtime API client that acquires tasks as a SuperExec does, signing its requests with the
    shared secret of ``--superexec-auth-secret-file`` when the SuperNode / SuperLink has one."""
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if auth_secret_file:
        from flwr.supercore.auth import load_superexec_auth_secret
        from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor

        try:
            secret = load_superexec_auth_secret(auth_secret_file)
        except ValueError as exc:
            raise FedPeftError(f"--superexec-auth-secret-file: {exc}") from None
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}),
        ))
    return _client(address, insecure, certs, interceptors)


def poll_forever(
    acquire: RuntimeHttpClient, request: AcquireTaskRequest, run: Callable[[str], str], what: str,
    poll_interval: tuple[float, float] = (0.05, 0.5),
) -> None:
    """Acquire tasks with ``request`` and execute each with ``run(token)``, forever; poll every
    ``poll_interval[0]`` s after a task, backing off to ``poll_interval[1]`` s while idle."""
    wait, unreachable_since = poll_interval[0], None
    while True:
        try:
            res = acquire.AcquireTask(request)
        except KeyboardInterrupt:  # flwr's HTTP retry interrupts its own process on 401 Unauthorized
            raise FedPeftError(
                f"stopped: Ctrl-C, or the {what} refused to hand this worker a task (401 Unauthorized: "
                f"if the {what} runs with --superexec-auth-secret-file, give the worker the same file)"
            ) from None
        except Exception as exc:  # noqa: BLE001 - the SuperNode / SuperLink may be (re)starting
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > 10:
                log.warning("cannot reach the %s Runtime API: %s", what, exc)
            time.sleep(0.2 if time.monotonic() - unreachable_since < 10 else 1.0)
            continue
        unreachable_since = None
        if res.HasField("task") and res.token:
            log.info("task %d: %s", res.task.task_id, run(res.token))
            wait = poll_interval[0]
        else:  # idle: back off (each poll costs the SuperNode CPU)
            time.sleep(wait)
            wait = min(wait * 1.5, poll_interval[1])


def warm_up(ready_file: str | None) -> None:
    """Import torch, transformers and the model code once, before the first task; then touch
    ``ready_file`` (if given) to say the process is ready."""
    from fedpeft.experiment import preload

    preload()
    if ready_file:
        Path(ready_file).touch()


def serve(
    runtime_api_address: str,
    insecure: bool = False,
    root_certificates: str | None = None,
    poll_interval: tuple[float, float] = (0.05, 0.5),
    ready_file: str | None = None,
    auth_secret_file: str | None = None,
) -> None:
    """Execute the SuperNode's ClientApp tasks one after another, forever."""
    certs = Path(root_certificates).read_bytes() if root_certificates else None
    acquire = acquiring_client(runtime_api_address, insecure, certs, auth_secret_file)
    warm_up(ready_file)
    log.info("fedpeft flower-worker serving ClientApp tasks of %s", runtime_api_address)
    poll_forever(acquire, AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]),
                 lambda token: run_task(runtime_api_address, token, insecure, certs), "SuperNode", poll_interval)
