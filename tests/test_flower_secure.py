"""A secure Flower deployment, tested: ``fedpeft flower-keys`` credentials, TLS on the SuperLink,
SuperNode authentication with registered public keys and the SuperExec secret on a loopback
deployment; an unregistered node and a client without the CA are refused; SecAgg+ over it. The
suite's only deployment of the parity run (the same result as in process, the user's way with
``fedpeft run``, warm workers reused, a failing ServerApp, SCAFFOLD + FedEx-LoRA, SFPrompt's
split messages, causal-lm instruction tuning): the insecure path is the killed-node test's (tests/test_flower.py)."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)
from test_flower import (  # noqa: F401 - fixture reused
    assert_same_run,
    assert_same_lm_run,
    assert_same_split_run,
    fedex_scaffold_cfg,
    final_state,
    lm_cfg,
    lm_data,
    local_run,
    parity_cfg,
    ragged_data,
    rows_of,
    sfprompt_cfg,
    sfprompt_local_run,
)
from test_runs import csv_data, make_cfg  # noqa: F401 - fixture reused

from fedpeft.config import ConfigError
from fedpeft.errors import FedPeftError
from fedpeft.experiment import run_experiment
from fedpeft.runtime.flower.keys import DeploymentKeys, make_deployment_keys


def cli(*args, timeout=600):
    done = subprocess.run([sys.executable, "-m", "fedpeft.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def test_flower_keys_makes_a_ca_a_server_certificate_and_node_keys_flower_loads(tmp_path):
    code, out = cli("flower-keys", tmp_path / "k", "--nodes", "2", "--host", "superlink.example.org", "--host", "10.1.2.3")
    assert code == 0, out
    keys = DeploymentKeys(tmp_path / "k")
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}
    assert {str(a) for a in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}
    for i in range(2):  # the loaders flower-supernode and `flwr supernode register` use
        private = load_ssh_private_key(keys.node_key(i).read_bytes(), None)
        public = load_ssh_public_key(keys.node_public_key(i).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
        assert keys.node_key(i).stat().st_mode & 0o077 == 0  # private keys: owner only
    assert not keys.node_key(2).exists() and len(keys.superexec_secret.read_bytes()) == 32
    code, out = cli("flower-keys", tmp_path / "k")  # new keys would lock out registered nodes
    assert code == 2 and "already holds credentials" in out and "--force" in out
    with pytest.raises(FedPeftError, match="without scheme or port"):
        make_deployment_keys(tmp_path / "bad", 1, ["superlink:9093"])
    with pytest.raises(FedPeftError, match="--nodes"):
        make_deployment_keys(tmp_path / "bad", 0)


def test_tls_settings_are_checked_before_anything_is_submitted(csv_data, tmp_path):
    from fedpeft.runtime.flower.launch import flower_home

    with pytest.raises(ConfigError, match="runtime.insecure"):
        parity_cfg(csv_data, kind="flower", insecure=True, root_certificates="ca.crt")
    with pytest.raises(ConfigError, match="runtime.root_certificates: no such file"):
        flower_home(parity_cfg(csv_data, kind="flower", root_certificates=str(tmp_path / "ca.crt")), tmp_path / "h")
    keys = make_deployment_keys(tmp_path / "k", 1)
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        flower_home(parity_cfg(csv_data, kind="flower", root_certificates=str(keys.node_key(0))), tmp_path / "h")
    home = flower_home(parity_cfg(csv_data, kind="flower", root_certificates=str(keys.ca_cert)), tmp_path / "h")
    assert str(keys.ca_cert) in (home / "config.toml").read_text()


def wait_exit(proc, timeout):
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.integration  # the suite's one TLS deployment: 3 warm processes load torch, 6 `fedpeft run`s
@pytest.mark.timeout(1500)  # ~3 min on a free 2-core machine; a loaded one can take 10
def test_a_tls_and_node_authenticated_deployment_runs_as_the_insecure_one_and_refuses_strangers(
        csv_data, local_run, ragged_data, sfprompt_local_run, lm_data, tmp_path):
    from fedpeft.runtime.flower.deploy import LoopbackDeployment

    # the README's production steps: credentials from flower-keys (node-2's key is never registered)
    code, out = cli("flower-keys", tmp_path / "keys", "--nodes", "3")
    assert code == 0, out
    keys = DeploymentKeys(tmp_path / "keys")
    with LoopbackDeployment(2, tmp_path / "deploy", keys=keys, superexec_secret=True) as dep:
        stranger = dep.start_probe_node("unregistered", 1, private_key=keys.node_key(2))
        no_ca = dep.start_probe_node("no-ca", 1, root_certificates=False)
        tls = dict(kind="flower", superlink=dep.superlink, root_certificates=str(keys.ca_cert), connect_timeout=60)
        cfg = parity_cfg(csv_data, **tls)
        (tmp_path / "run.toml").write_text(cfg.to_toml())
        bad = parity_cfg(csv_data, **tls)
        bad.partition.num_clients = 3  # the nodes hold 2 partitions: the ServerApp fails at discovery
        (tmp_path / "bad.toml").write_text(bad.to_toml())
        # SCAFFOLD (each node's c_i in its context.state across messages) with FedEx-LoRA (the
        # corrected base weights in the TRAIN message) on the same deployment
        (tmp_path / "fx.toml").write_text(fedex_scaffold_cfg(csv_data, **tls).to_toml())
        # SFPrompt: per batch a forward and a backward exchange with the body on the ServerApp
        (tmp_path / "sf.toml").write_text(sfprompt_cfg(ragged_data, **tls).to_toml())
        # task.kind = "causal-lm": the nodes train instruction data, the ServerApp evaluates and generates;
        # bfloat16 weights, the states cross as bfloat16 bits
        (tmp_path / "lm.toml").write_text(lm_cfg(lm_data, "bfloat16", **tls).to_toml())
        # submitted the user's way (fedpeft run) to a SuperLink that runs only a signed server worker:
        # a run, a run whose ServerApp fails, then again on the same long-lived server and client workers
        for name in ("run", "bad", "again", "fx", "sf", "lm"):
            code, out = cli("run", tmp_path / f"{'run' if name == 'again' else name}.toml", "--out", tmp_path / name)
            if name == "bad":
                assert code != 0 and "num-partitions=2" in out, out[-3000:]
                continue
            assert code == 0, out[-3000:]
            assert "round 2/2" in out  # the ServerApp's output reached `fedpeft run` over TLS
        # the same deployment with SecAgg+ (privacy.secure_aggregation): one FedAvg round
        secure = secure_round_cfg(csv_data, True, kind="flower", superlink=dep.superlink,
                                  root_certificates=str(keys.ca_cert), connect_timeout=60)
        (tmp_path / "secure.toml").write_text(secure.to_toml())
        code, out = cli("run", tmp_path / "secure.toml", "--out", tmp_path / "secure")
        assert code == 0, out[-3000:]
        # a submitter without the CA: TLS refuses the SuperLink's certificate, nothing runs
        cfg.runtime.root_certificates = None
        (tmp_path / "no-ca.toml").write_text(cfg.to_toml())
        code, out = cli("run", tmp_path / "no-ca.toml", "--out", tmp_path / "no-ca", timeout=120)
        assert code == 2 and "CERTIFICATE_VERIFY_FAILED" in out and "runtime.root_certificates" in out, out[-3000:]
        assert not (tmp_path / "no-ca" / "summary.json").exists()
        for name, proc in (("unregistered", stranger), ("no-ca", no_ca)):
            assert wait_exit(proc, 60) not in (None, 0), f"{name} was not refused: {dep.log(name)[-2000:]}"
        time.sleep(0.5)
        superlink_log = dep.log("superlink")
    assert "Failed to activate SuperNode" in dep.log("unregistered")
    assert "No SuperNode found with the given public key" in superlink_log  # the SuperLink says why
    assert "CERTIFICATE_VERIFY_FAILED" in dep.log("no-ca")
    assert "Activated node_id" in superlink_log and superlink_log.count("Activated node_id") == 2
    for name in ("run", "again"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["runtime"] == "flower" and summary["clients_failed_total"] == 0
        assert_same_run(local_run, tmp_path / name)
        assert (tmp_path / name / "model").is_dir()
    run_experiment(fedex_scaffold_cfg(csv_data), out=tmp_path / "fx-local")
    assert_same_run(tmp_path / "fx-local", tmp_path / "fx")
    assert_same_split_run(sfprompt_local_run, tmp_path / "sf")
    run_experiment(lm_cfg(lm_data, "bfloat16"), out=tmp_path / "lm-local")
    assert_same_lm_run(tmp_path / "lm-local", tmp_path / "lm")
    lm = json.loads((tmp_path / "lm" / "summary.json").read_text())
    assert lm["exchange_dtype"] == lm["model_dtype"] == "bfloat16" and lm["total_wire_bytes_up"] > lm["total_bytes_up"]
    # under SecAgg+ the aggregate is the plain one within the row's stated quantization bound
    run_experiment(secure_round_cfg(csv_data, False), out=tmp_path / "plain")
    (row,) = rows_of(tmp_path / "secure")
    info = row["secure_aggregation"]
    assert info["message_rounds"] == 4 and info["clipped_values"] == 0 and 0 < info["error_bound"] < 1e-4
    assert {c["aggregation"] for c in row["clients"]} == {"secure"} and row["clients_reported"] == 2
    assert row["wire_bytes_up"] > rows_of(tmp_path / "run")[0]["wire_bytes_up"]  # 4 message rounds, masks
    plain, got = final_state(tmp_path / "plain"), final_state(tmp_path / "secure")
    for k in plain:
        np.testing.assert_allclose(got[k], plain[k], rtol=1e-6, atol=info["error_bound"], err_msg=k)


def secure_round_cfg(csv_data, secure, **runtime):
    return make_cfg(csv_data, partition={"num_clients": 2}, runtime={"threads": 1, **runtime},
                    privacy={"secure_aggregation": secure}, federation={"rounds": 1, "clients_per_round": 2})


def test_a_supernode_started_with_the_superexec_secret_gives_it_to_its_worker(tmp_path):
    from fedpeft.runtime.flower.supernode import secret_file, worker_command

    for args in (["--superlink", "h:1", "--superexec-auth-secret-file", "s.secret"], ["--superexec-auth-secret-file=s.secret"]):
        cmd = worker_command(9094, None, secret_file(args))
        assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == "s.secret"
    assert "--superexec-auth-secret-file" not in worker_command(9094, None, secret_file(["--superlink", "h:1"]))
