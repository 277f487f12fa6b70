"""Whether the Hugging Face hub can be used now, decided once per process before any hub call.

Unreachable, the hub libraries retry for ~25 s and log every retry. fedpeft asks first: with
``HF_HUB_OFFLINE=1`` the libraries read only their local cache, at once, so no probe is made;
otherwise one TCP connect to the hub's host (or to the proxy for it), at most
:data:`PROBE_TIMEOUT_S` seconds, decides for the rest of the process.
"""

from __future__ import annotations

import functools
import logging
import socket
import urllib.parse
import urllib.request

PROBE_TIMEOUT_S = 3.0
# libraries whose logger has its own stderr handler and also propagates to the root logger's
LIBRARY_LOGGERS = ("huggingface_hub", "datasets")


def hub_problem() -> str | None:
    """Why a hub call cannot succeed now (a clause for a one-line error), or None to go ahead.

    None also when the hub is offline (``HF_HUB_OFFLINE=1``): the libraries then read their local
    cache without any network call, and fail at once if the files are not there. Whatever the
    answer, the hub libraries' log records are printed once from now on (:func:`single_library_logs`).
    """
    import huggingface_hub

    single_library_logs()
    if huggingface_hub.is_offline_mode():
        return None
    host, port = _probe_address(huggingface_hub.constants.ENDPOINT)
    if _connects(host, port):
        return None
    return (
        f"the Hugging Face hub is unreachable (no connection to {host}:{port} within "
        f"{PROBE_TIMEOUT_S:g} s; HF_HUB_OFFLINE=1 uses what the local hub cache holds)"
    )


def failure_reason(exc: BaseException) -> str:
    """The first line of a hub library's error, saying so when the hub is offline."""
    import huggingface_hub

    reason = first_line(exc)
    if huggingface_hub.is_offline_mode():
        return f"{reason} (the hub is offline: HF_HUB_OFFLINE=1, only the local hub cache is read)"
    return reason


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def single_library_logs() -> None:
    """Print each hub-library log record once: keep their own handler, stop the copy via root."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).propagate = False


def _probe_address(endpoint: str) -> tuple[str, int]:
    """The (host, port) a hub request connects to first: the proxy for ``endpoint`` if any."""
    url = urllib.parse.urlsplit(endpoint)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


@functools.cache
def _connects(host: str, port: int) -> bool:
    """True if a TCP connection to ``host:port`` opens within :data:`PROBE_TIMEOUT_S` (cached)."""
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True
