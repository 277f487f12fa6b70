"""Shorter waits inside Flower's own processes, for rounds of seconds rather than minutes.

flwr 1.41 hard-codes waits tuned for long rounds over a WAN: an idle SuperNode asks the SuperLink
for work every 3 s, and a message whose arrays are not uploaded yet is retried after 1 s, then 2 s,
4 s, ... (``PULL_INITIAL_BACKOFF``). With rounds of ~12 s on a LAN or loopback these waits are a
quarter of the round. The functions here change them in the calling process only, for the one
flwr module that uses them, and check first that the module looks as expected.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import types
from collections.abc import Callable

log = logging.getLogger(__name__)
FLOWER_IDLE_WAIT = "time.sleep(3)"  # what flwr 1.41's SuperNode loop does after an empty pull


def shorten_idle_wait(idle_poll: float) -> bool:
    """Make this process's SuperNode wait ``idle_poll`` s (not 3 s) after an empty pull.

    Replaces, as seen by ``flwr.supernode.start_client_internal`` only, the ``time`` module with
    one whose ``sleep`` is capped at ``idle_poll``, and ``pull_objects`` with one whose retries
    start at ``idle_poll / 5`` (Flower: 1 s, then 2, 4, ...). That retry matters once the node asks
    early: it often gets a message whose arrays the ServerApp is still uploading. Returns False
    (and changes nothing) if the loop does not look as expected.
    """
    import flwr.supernode.start_client_internal as node_loop

    if idle_poll >= 3:
        return True
    if FLOWER_IDLE_WAIT not in inspect.getsource(node_loop.start_client_internal) or not hasattr(node_loop, "pull_objects"):
        log.warning("this flwr's SuperNode loop has no %s: --idle-poll ignored", FLOWER_IDLE_WAIT)
        return False
    capped = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    capped.sleep = lambda seconds: time.sleep(min(seconds, idle_poll))
    node_loop.time = capped
    node_loop.pull_objects = fast_retries(node_loop.pull_objects, idle_poll / 5, idle_poll)
    return True


def fast_retries(pull_objects: Callable, first: float, cap: float) -> Callable:
    """``flwr``'s ``pull_objects`` retrying an object that is not there yet after ``first`` s,
    doubling up to ``cap`` s."""
    return functools.partial(pull_objects, initial_backoff=first, backoff_cap=cap)


def fast_grid_pulls(first: float = 0.05, cap: float = 0.5) -> None:
    """Let a ServerApp's ``HttpGrid`` retry a reply whose arrays are still being uploaded after
    ``first`` s (doubling up to ``cap``), not 1 s: it pulls from its own SuperLink, so retries
    are cheap. No effect in simulation (in-memory grid)."""
    import flwr.superlink.grid.http_grid as http_grid

    if not isinstance(http_grid.pull_objects, functools.partial):
        http_grid.pull_objects = fast_retries(http_grid.pull_objects, first, cap)
