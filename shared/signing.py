"""Signed global models (Ed25519): devices adopt only models the coordinator signed.

The signature covers the model version, the server round and every array (name, dtype, shape,
bytes) in name order, so a tampered value, a swapped array or a replayed old model all fail.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from attune.shared.errors import ConfigError, SignatureError


def signed_bytes(arrays: Mapping[str, np.ndarray], version: int, server_round: int) -> bytes:
    """The canonical byte string a signature covers."""
    parts = [b"attune-model", struct.pack("<qq", version, server_round)]
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        header = f"{name}|{value.dtype.str}|{','.join(map(str, value.shape))}".encode()
        parts += [struct.pack("<q", len(header)), header, struct.pack("<q", value.nbytes), value.tobytes()]
    return b"".join(parts)


def sign_model(key: Ed25519PrivateKey, arrays: Mapping[str, np.ndarray], version: int,
               server_round: int) -> str:
    return key.sign(signed_bytes(arrays, version, server_round)).hex()


def verify_model(key: Ed25519PublicKey, arrays: Mapping[str, np.ndarray], version: int,
                 server_round: int, signature: str | None) -> None:
    """Raise ``SignatureError`` unless ``signature`` is the coordinator's for exactly this model."""
    if not signature:
        raise SignatureError("the global model is not signed; this device accepts only signed models")
    try:
        key.verify(bytes.fromhex(signature), signed_bytes(arrays, version, server_round))
    except (InvalidSignature, ValueError):
        raise SignatureError(f"the global model's signature does not verify (round {server_round}): "
                             "tampered, replayed, or signed by another key") from None


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """Write a new Ed25519 key pair as PEM (the private key file is readable by its owner only)."""
    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    private_path.chmod(0o600)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the signing key {path}: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the coordinator's public key {path}: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key
