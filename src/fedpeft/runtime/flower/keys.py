"""Development credentials for a secure Flower deployment: ``fedpeft flower-keys DIR``.

What Flower's own example (``examples/flower-authentication``, its ``generate_creds.sh``) makes
with ``openssl`` and ``ssh-keygen``, made here with the ``cryptography`` package:

``ca.crt``, ``ca.key``
    A self-signed development CA (10 years). The SuperLink gets ``ca.crt`` as
    ``--ssl-ca-certfile``; every client of the SuperLink (SuperNodes ``--root-certificates``,
    ``fedpeft flower-server-worker --root-certificates``, ``runtime.root_certificates`` for
    ``flwr run``) verifies the server with it.
``server.pem``, ``server.key``
    The SuperLink's TLS certificate (``--ssl-certfile`` / ``--ssl-keyfile``), signed by the CA,
    for the names ``localhost``, ``127.0.0.1``, ``::1`` and every ``--host`` given (a DNS name or
    an IP address): a client that dials another name is refused by TLS.
``nodes/node-<i>``, ``nodes/node-<i>.pub``
    One key pair per SuperNode: an EC P-384 private key in OpenSSH format (what
    ``flower-supernode --auth-supernode-private-key`` loads with ``load_ssh_private_key``) and its
    public key as an OpenSSH line ``ecdsa-sha2-nistp384 ...`` (what ``flwr supernode register``
    loads with ``load_ssh_public_key``; any NIST curve is accepted).
``superexec.secret``
    32 random bytes for ``--superexec-auth-secret-file`` of the SuperLink and the server worker
    (and of a SuperNode and its worker): only a process holding it is handed ServerApp tasks.

The CA and server keys are EC P-384 too (Flower's script uses RSA 4096: slower to make, the
same TLS). Private keys are written with mode 0600. These are for development and tests: a
production CA keeps its key offline.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.errors import FedPeftError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")  # always in the server certificate
CURVE = ec.SECP384R1  # Flower's example: ssh-keygen -t ecdsa -b 384
CA_DAYS, SERVER_DAYS = 3650, 365


@dataclass(frozen=True)
class DeploymentKeys:
    """Paths of the credentials in one folder (:func:`make_deployment_keys`)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def superexec_secret(self) -> Path:
        return self.directory / "superexec.secret"

    def node_key(self, i: int) -> Path:
        """SuperNode ``i``'s private key (OpenSSH format); its public key is ``<path>.pub``."""
        return self.directory / "nodes" / f"node-{i}"

    def node_public_key(self, i: int) -> Path:
        return self.directory / "nodes" / f"node-{i}.pub"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpeft development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def subject_alternative_names(hosts: tuple[str, ...] | list[str]) -> list[x509.GeneralName]:
    """``DNSName`` or ``IPAddress`` entries for :data:`DEFAULT_HOSTS` + ``hosts`` (no repeats).

    Raises
    ------
    FedPeftError
        For an empty name or one with a scheme or port (``https://host``, ``host:9093``).
    """
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*DEFAULT_HOSTS, *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not host or "/" in host or ":" in host or " " in host:
            raise FedPeftError(f"--host {host!r}: give a DNS name or an IP address, without scheme or port")
        names.append(x509.DNSName(host))
    return names


def make_deployment_keys(directory: str | Path, num_nodes: int, hosts: tuple[str, ...] | list[str] = (),
                         overwrite: bool = False) -> DeploymentKeys:
    """Write a development CA, a SuperLink certificate for ``hosts`` and ``num_nodes`` SuperNode
    key pairs into ``directory`` (the layout of :class:`DeploymentKeys`).

    Raises
    ------
    FedPeftError
        When ``num_nodes < 1``, a host is not a name or an address, or the folder already holds
        credentials and ``overwrite`` is False (new keys would lock out registered nodes).
    """
    if num_nodes < 1:
        raise FedPeftError(f"--nodes must be >= 1, got {num_nodes}")
    keys = DeploymentKeys(Path(directory).expanduser().resolve())
    sans = subject_alternative_names(hosts)
    existing = [p for p in (keys.ca_cert, keys.server_cert, keys.node_key(0)) if p.exists()]
    if existing and not overwrite:
        raise FedPeftError(f"{keys.directory} already holds credentials ({existing[0].name}); "
                           "choose another folder or pass --force to replace them")
    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(minutes=5)  # clock skew between machines

    ca_key = ec.generate_private_key(CURVE())
    ca_name = _name("fedpeft development CA")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))

    server_key = ec.generate_private_key(CURVE())
    server_cert = (x509.CertificateBuilder().subject_name(_name("fedpeft SuperLink")).issuer_name(ca_name)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA384()))

    _write(keys.ca_key, _pem_key(ca_key), private=True)
    _write(keys.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(keys.server_key, _pem_key(server_key), private=True)
    _write(keys.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    for i in range(num_nodes):
        node = ec.generate_private_key(CURVE())
        _write(keys.node_key(i), node.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()), private=True)
        public = node.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(keys.node_public_key(i), public + f" fedpeft-node-{i}\n".encode(), private=False)
    _write(keys.superexec_secret, os.urandom(32), private=True)
    return keys
