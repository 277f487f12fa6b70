"""Start an experiment on Flower: its simulation engine (``flower-sim``) or a SuperLink (``flower``).

Both reuse :mod:`fedpeft.runtime.flower.app`; nothing here knows the algorithm.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w
from rich.console import Console

from fedpeft.config import Config
from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.results import RunDir

APP_PYPROJECT = "pyproject.toml"  # the Flower app definition shipped with fedpeft


def write_app_dir(path: Path) -> Path:
    """Write fedpeft's Flower app definition (a pyproject.toml) into ``path``; return ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    text = resources.files("fedpeft.runtime.flower").joinpath(APP_PYPROJECT).read_text()
    (path / "pyproject.toml").write_text(text)
    return path


def usable_cpus() -> int:
    """CPUs this process may run on (``taskset`` / cgroup affinity), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def run_flower_simulation(
    cfg: Config, out: str | Path | None, resume: bool, console: Console | None
) -> dict[str, Any]:
    """Run on Flower's Ray simulation engine: one virtual SuperNode per client (partition).

    Each Ray actor is a long-lived process, so a client's backbone is loaded once per actor.
    ``runtime.sim_cpus_per_client`` sets how many clients train at once (CPUs / that value).
    """
    from flwr.simulation import run_simulation

    from fedpeft.runtime.flower.app import client_app, make_server_app

    outcome: dict[str, Any] = {}
    server_app = make_server_app(cfg.to_toml(), str(out) if out is not None else None, resume, outcome)
    backend = {
        "client_resources": {"num_cpus": cfg.runtime.sim_cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": usable_cpus(), "include_dashboard": False, "log_to_driver": True},
    }
    run_simulation(server_app, client_app, num_supernodes=cfg.partition.num_clients, backend_config=backend)
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise FedPeftError("the Flower simulation ended without running the ServerApp (see the log above)")
    return outcome["summary"]


def check_root_certificates(path: str) -> Path:
    """The CA file of ``runtime.root_certificates``, made absolute, if it holds PEM certificates.

    Raises
    ------
    ConfigError
        Naming the key, when the file is missing or holds no PEM certificate (a private key, DER).
    """
    from cryptography import x509

    cert = Path(path).expanduser().resolve()
    if not cert.is_file():
        raise ConfigError(f"runtime.root_certificates: no such file: {cert}")
    try:
        x509.load_pem_x509_certificates(cert.read_bytes())
    except ValueError as exc:
        raise ConfigError(f"runtime.root_certificates: {cert} holds no PEM certificate ({exc}); give the CA "
                          "certificate of the SuperLink (ca.crt of fedpeft flower-keys)") from None
    return cert


def check_superlink_tls(address: str, root_certificates: str | None, timeout: float = 10.0) -> None:
    """Shake hands with the SuperLink at ``address`` over TLS as ``flwr run`` will, verifying its
    certificate with ``root_certificates`` (None: the system's CAs), so that an untrusted or
    misnamed certificate is named here (``flwr`` only says the connection is unavailable).
    A SuperLink that does not answer is left to ``flwr run`` to report.

    Raises
    ------
    FedPeftError
        When the SuperLink's certificate does not verify, or it does not speak TLS.
    """
    import socket
    import ssl

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=root_certificates)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as exc:
        ca = f"runtime.root_certificates = {root_certificates}" if root_certificates else \
            "the system's CAs (runtime.root_certificates is not set)"
        raise FedPeftError(f"TLS: the SuperLink at {address} presented a certificate that does not verify with {ca}: "
                           f"{exc.verify_message} (CERTIFICATE_VERIFY_FAILED); set runtime.root_certificates to the "
                           "CA that signed it (ca.crt of fedpeft flower-keys)") from None
    except ssl.SSLError as exc:
        raise FedPeftError(f"TLS: no TLS handshake with the SuperLink at {address} ({exc.reason}): does it run with "
                           "--insecure? Then set runtime.insecure = true (loopback trials only)") from None
    except (OSError, ValueError):
        return  # unreachable: flwr run says so


def flower_home(cfg: Config, path: Path) -> Path:
    """A FLWR_HOME whose default SuperLink connection is ``runtime.superlink``."""
    conn: dict[str, Any] = {"address": cfg.runtime.superlink, "insecure": cfg.runtime.insecure}
    if cfg.runtime.root_certificates:
        conn["root-certificates"] = str(check_root_certificates(cfg.runtime.root_certificates))
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "fedpeft", "fedpeft": conn}}))
    return path


def run_flower_deployment(
    cfg: Config, out: str | Path | None, resume: bool, console: Console | None
) -> dict[str, Any]:
    """Submit the experiment to the SuperLink at ``runtime.superlink`` with ``flwr run`` and wait.

    The ServerApp writes the run folder on the SuperLink's machine; the path is made absolute
    here so a SuperLink on this machine writes exactly where asked.
    """
    console = console or Console(stderr=True)
    run_dir = RunDir(Path(out or cfg.output_dir()).resolve())
    if not resume and run_dir.has_run():
        raise FedPeftError(
            f"{run_dir.path} already holds a run; continue it with --resume {run_dir.path} or choose another --out"
        )
    if not cfg.runtime.insecure:
        check_superlink_tls(cfg.runtime.superlink, str(check_root_certificates(cfg.runtime.root_certificates))
                            if cfg.runtime.root_certificates else None)
    flwr = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    with tempfile.TemporaryDirectory(prefix="fedpeft-flwr-") as tmp:
        app = write_app_dir(Path(tmp) / "app")
        run_config = Path(tmp) / "run.toml"
        run_config.write_text(tomli_w.dumps({"fedpeft-config": cfg.to_toml(), "out": str(run_dir.path), "resume": resume}))
        env = {**os.environ, "FLWR_HOME": str(flower_home(cfg, Path(tmp) / "home"))}
        cmd = [flwr, "run", str(app), "fedpeft", "--run-config", str(run_config), "--stream"]
        console.print(f"submitting to the SuperLink at {cfg.runtime.superlink} (flwr run ... --stream)")
        proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise FedPeftError(f"flwr run exited with code {proc.returncode} (SuperLink {cfg.runtime.superlink})")
    if not run_dir.summary.exists():
        raise FedPeftError(
            f"the run ended but {run_dir.summary} does not exist here: the ServerApp failed (see its log "
            "above) or the SuperLink runs on another machine (the run folder is there)"
        )
    summary = run_dir.read_summary()
    if summary.get("status", "finished") != "finished":  # the ServerApp wrote why it stopped
        raise FedPeftError(f"the run on the SuperLink ended {summary['status']}: {summary.get('error', 'see its log above')}")
    return summary
