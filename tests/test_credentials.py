"""Deployment credentials are what Flower and the devices expect."""

import ipaddress
import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from attune.server.credentials import Credentials
from attune.shared.signing import load_private_key, load_public_key
from attune.simulations.cli import cli


def test_attune_credentials_makes_a_ca_a_server_cert_node_keys_and_a_signing_key(tmp_path):
    result = CliRunner().invoke(cli, ["credentials", "--out", str(tmp_path), "--host", "127.0.0.1",
                                      "--host", "coordinator.example", "--supernodes", "2"])
    assert result.exit_code == 0, result.output
    creds = Credentials(tmp_path)
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises unless the CA signed it
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert "coordinator.example" in names.get_values_for_type(x509.DNSName)
    for index in range(2):  # the formats flower-supernode and `flwr supernode register` read
        private = load_ssh_private_key(creds.supernode_key(index).read_bytes(), None)
        public = load_ssh_public_key(creds.supernode_public_key(index).read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert stat.S_IMODE(creds.supernode_key(index).stat().st_mode) == 0o600
    signing = load_private_key(creds.signing_key)
    assert signing.public_key().public_bytes_raw() == load_public_key(creds.verify_key).public_bytes_raw()
    assert stat.S_IMODE(creds.server_key.stat().st_mode) == 0o600
