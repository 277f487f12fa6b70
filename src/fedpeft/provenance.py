"""What made a run: package versions, the git commit of a source checkout, timestamps.

Written into every ``summary.json`` (``versions``, ``git_commit``, ``started_at``...), so a
result can be traced to the code that produced it.
"""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from functools import cache
from importlib import metadata
from pathlib import Path

PACKAGES = ("fedpeft", "torch", "transformers", "peft", "flwr")


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second (``2026-12-01T09:40:00Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@cache
def versions() -> dict[str, str | None]:
    """Installed versions of fedpeft and the libraries that shape its results (None: not installed)."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


@cache
def git_commit() -> str | None:
    """The commit of the git checkout fedpeft runs from (``+dirty`` with uncommitted changes to
    tracked files), or None for an installed package."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
