"""Credentials for a deployment: a TLS CA and SuperLink certificate, SuperNode authentication keys,
and the coordinator's model-signing key. Made with ``cryptography``; for real deployments use your
organization's PKI and keep every private key where only its owner can read it.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attune.shared.errors import ConfigError
from attune.shared.signing import generate_keypair


@dataclass(frozen=True)
class Credentials:
    """Where each file is (all under one directory)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def signing_key(self) -> Path:
        return self.directory / "coordinator.pem"

    @property
    def verify_key(self) -> Path:
        return self.directory / "coordinator.pub.pem"

    def supernode_key(self, index: int) -> Path:
        return self.directory / f"supernode_{index}"

    def supernode_public_key(self, index: int) -> Path:
        return self.directory / f"supernode_{index}.pub"


def _private(path: Path, key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    path.chmod(0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Attune coordinator"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _san(host: str) -> x509.GeneralName:
    """An IP address or a DNS name (RFC 1123 labels, at most 253 characters), or ``ConfigError``."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not isinstance(host, str) or not 0 < len(host) <= 253 or not all(
            _LABEL.fullmatch(label) for label in host.removesuffix(".").split(".")):
        raise ConfigError(f"{host!r} is neither an IP address nor a host name (letters, digits and '-' in "
                          "dot-separated labels)")
    return x509.DNSName(host)


def create_credentials(directory: Path, hosts: list[str], supernodes: int, days: int = 365) -> Credentials:
    """A CA, a SuperLink certificate for ``hosts``, ``supernodes`` SuperNode key pairs (EC P-384 in
    OpenSSH format, as ``flwr supernode register`` and ``flower-supernode`` read them) and an
    Ed25519 model-signing key pair."""
    if not hosts:
        raise ConfigError("give at least one host name or IP address for the SuperLink certificate")
    names = [_san(h) for h in hosts]  # every host checked before anything is written
    creds = Credentials(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("Attune CA")).issuer_name(_name("Attune CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(valid[0]).not_valid_after(valid[1])
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA384()))
    creds.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _private(directory / "ca.key", ca_key, serialization.PrivateFormat.PKCS8)
    creds.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _private(creds.server_key, server_key, serialization.PrivateFormat.PKCS8)
    for index in range(supernodes):
        node_key = ec.generate_private_key(ec.SECP384R1())
        _private(creds.supernode_key(index), node_key, serialization.PrivateFormat.OpenSSH)
        creds.supernode_public_key(index).write_bytes(node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    generate_keypair(creds.signing_key, creds.verify_key)
    return creds
