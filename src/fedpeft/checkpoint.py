"""Checkpoints: the source of truth for a run's progress, kept twice, checked on every read.

A checkpoint of round ``N`` is the folder ``DIR/checkpoint/round-0000N/``::

    global.safetensors   the global exchanged state after round N
    server.safetensors   the strategy's state (the server optimizer's moments, SCAFFOLD's c)
    clients.safetensors  per-client state the server keeps (SCAFFOLD's c_i of the in-process
                         runtime: ``<client>/<name>``); only when the runtime has any
    metrics.jsonl        the metric rows of rounds 1..N (metrics.jsonl is rebuilt from them)
    config.toml          the run's resolved config (config.toml is restored from it)
    state.json           round, the SHA-256 of each file above, and what resuming needs

It is written to a temporary folder and renamed into place, so a kill never leaves half a
checkpoint; :data:`KEPT` checkpoints are kept, so one damaged file never loses the run: resuming
falls back to the previous checkpoint and recomputes the rounds after it, which a seeded run
reproduces exactly. Every read verifies each file against its recorded hash; damage is reported
as one line naming the file (:class:`CheckpointDamaged`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import load_file as load_safetensors_file
from safetensors.numpy import save as save_safetensors
from safetensors.numpy import save_file as save_safetensors_file

from fedpeft.errors import FedPeftError

NamedArrays = dict[str, np.ndarray]
KEPT = 2  # checkpoints kept: the newest and the one before it
FORMAT = 2  # state.json "format"; checkpoints of fedpeft 0.1 (a flat state.json) are format 1
FILES = ("global.safetensors", "server.safetensors", "metrics.jsonl", "config.toml")
CLIENTS_FILE = "clients.safetensors"  # written only for a runtime that keeps per-client state


class CheckpointDamaged(FedPeftError):
    """A checkpoint file is missing, cut short or changed since it was written."""


@dataclass
class Checkpoint:
    """One checkpoint as read back (and verified)."""

    round: int
    state: NamedArrays
    rows: list[dict[str, Any]] | None  # metric rows 1..round (None: a format-1 checkpoint)
    config_text: str | None  # the resolved config as TOML (None: a format-1 checkpoint)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. started_at
    server_state: NamedArrays | None = None  # the strategy's state_dict (None: a format-1 checkpoint)
    path: Path | None = None
    client_state: NamedArrays | None = None  # e.g. every client's SCAFFOLD c_i (None: not kept)


def write_checkpoint(root: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` below ``root`` (the run's ``checkpoint/`` folder) and keep the newest :data:`KEPT`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{ckpt.round:05d}"
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    contents = {
        "global.safetensors": _safetensors(ckpt.state),
        "server.safetensors": _safetensors(ckpt.server_state or {}),
        "metrics.jsonl": "".join(json.dumps(r) + "\n" for r in ckpt.rows or []).encode(),
        "config.toml": (ckpt.config_text or "").encode(),
    }
    for name, data in contents.items():
        _write_synced(tmp / name, data)
    hashes = {n: _sha256(d) for n, d in contents.items()}
    if ckpt.client_state is not None:  # one state per client: streamed to disk, never a second copy in memory
        path = tmp / CLIENTS_FILE
        save_safetensors_file({k: np.require(v, requirements="C") for k, v in ckpt.client_state.items()}, path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        hashes[CLIENTS_FILE] = _file_sha256(path)
    meta = {"format": FORMAT, "round": ckpt.round, "sha256": hashes, **ckpt.extra}
    _write_synced(tmp / "state.json", (json.dumps(meta, indent=2) + "\n").encode())
    if final.exists():  # the same round again (recomputed after a damaged checkpoint)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_folders(root)[KEPT:]:
        shutil.rmtree(old, ignore_errors=True)
    for legacy in [root / "state.json", *root.glob("global-*.safetensors")]:  # format 1, now superseded
        legacy.unlink(missing_ok=True)
    return final


def checkpoint_folders(root: Path) -> list[Path]:
    """The ``round-*`` folders below ``root``, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("round-*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def read_checkpoint(folder: Path) -> Checkpoint:
    """Read and verify the checkpoint in ``folder``; :class:`CheckpointDamaged` names the bad file."""
    meta = _read_meta(folder / "state.json")
    hashes = meta.pop("sha256", None)
    if meta.pop("format", None) != FORMAT or not isinstance(hashes, dict) or set(hashes) - {CLIENTS_FILE} != set(FILES):
        raise CheckpointDamaged(f"{folder / 'state.json'}: not a fedpeft checkpoint record")
    data = {}
    for name in hashes:
        path = folder / name
        try:
            if name == CLIENTS_FILE:  # possibly large: hashed from disk, loaded from the file below
                digest = _file_sha256(path)
            else:
                data[name] = path.read_bytes()
                digest = _sha256(data[name])
        except OSError:
            raise CheckpointDamaged(f"{path}: missing") from None
        if digest != hashes[name]:
            raise CheckpointDamaged(f"{path}: damaged (its content does not match the hash recorded when it was written)")
    rnd = meta.pop("round")
    rows = [json.loads(line) for line in data["metrics.jsonl"].decode().splitlines() if line.strip()]
    if [r.get("round") for r in rows] != list(range(1, rnd + 1)):
        raise CheckpointDamaged(f"{folder / 'metrics.jsonl'}: does not hold rounds 1..{rnd}")
    state, server = (load_safetensors(data[f"{n}.safetensors"]) for n in ("global", "server"))
    clients = load_safetensors_file(folder / CLIENTS_FILE) if CLIENTS_FILE in hashes else None
    return Checkpoint(rnd, state, rows, data["config.toml"].decode(), meta, server_state=server, path=folder,
                      client_state=clients)


def read_legacy_checkpoint(root: Path) -> Checkpoint:
    """A format-1 checkpoint (fedpeft 0.1: ``state.json`` naming one ``global-N.safetensors``)."""
    from safetensors import SafetensorError

    meta = _read_meta(root / "state.json")
    path = root / str(meta.pop("state_file", ""))
    try:
        state = load_safetensors(path.read_bytes())
    except (OSError, SafetensorError) as exc:
        raise CheckpointDamaged(f"{path}: unreadable ({exc})") from None
    return Checkpoint(int(meta.pop("round")), state, None, None, meta, path=root)


def latest_valid(root: Path) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint below ``root`` that reads back intact, and why newer ones did not.

    Returns ``(None, problems)`` when there is no checkpoint or none is intact.
    """
    problems: list[str] = []
    for folder in checkpoint_folders(root):
        try:
            return read_checkpoint(folder), problems
        except CheckpointDamaged as exc:
            problems.append(str(exc))
    if (root / "state.json").exists():
        try:
            return read_legacy_checkpoint(root), problems
        except CheckpointDamaged as exc:
            problems.append(str(exc))
    return None, problems


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointDamaged(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointDamaged(f"{path}: damaged ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("round"), int):
        raise CheckpointDamaged(f"{path}: damaged (no round number)")
    return meta


def _safetensors(arrays: NamedArrays) -> bytes:
    return save_safetensors({k: np.require(v, requirements="C") for k, v in arrays.items()})  # 0-d stays 0-d


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
