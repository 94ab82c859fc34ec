"""Signed rounds (Ed25519): a device acts only on what the coordinator signed.

The signature covers everything a device acts on or shows: every array of the global model
(name, dtype, shape, bytes), and every config entry (the run id, the round, the model version,
the model's shape and the whole round config: noise, clipping, survivors), in a canonical byte
string. A tampered value, a changed noise multiplier, or a model from another run or round fails.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from attune.shared.errors import ConfigError, SignatureError

SIGNATURE_KEY = "signature"
Scalar = int | float | str | bool


def _value_bytes(value: Scalar) -> bytes:
    if isinstance(value, bool):
        return b"b" + (b"1" if value else b"0")
    if isinstance(value, int):
        return b"i" + str(value).encode()
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SignatureError(f"config value {value!r} cannot be signed")
        return b"f" + struct.pack("<d", value)
    if isinstance(value, str):
        return b"s" + value.encode()
    raise SignatureError(f"config value of type {type(value).__name__} cannot be signed")


def signed_bytes(arrays: Mapping[str, np.ndarray], config: Mapping[str, Scalar]) -> bytes:
    """The canonical byte string a signature covers (``config`` without the signature itself)."""
    parts = [b"attune-round-v2"]
    for key in sorted(k for k in config if k != SIGNATURE_KEY):
        entry = key.encode() + b"=" + _value_bytes(config[key])
        parts += [struct.pack("<q", len(entry)), entry]
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        header = f"{name}|{value.dtype.str}|{','.join(map(str, value.shape))}".encode()
        parts += [struct.pack("<q", len(header)), header, struct.pack("<q", value.nbytes), value.tobytes()]
    return b"".join(parts)


def sign(key: Ed25519PrivateKey, arrays: Mapping[str, np.ndarray], config: Mapping[str, Scalar]) -> str:
    return key.sign(signed_bytes(arrays, config)).hex()


def verify(key: Ed25519PublicKey, arrays: Mapping[str, np.ndarray], config: Mapping[str, Scalar]) -> None:
    """Raise ``SignatureError`` unless ``config[SIGNATURE_KEY]`` is the coordinator's signature of
    exactly these arrays and config entries."""
    signature = config.get(SIGNATURE_KEY)
    if not isinstance(signature, str) or not signature:
        raise SignatureError("the round is not signed; this device accepts only signed rounds")
    try:
        key.verify(bytes.fromhex(signature), signed_bytes(arrays, config))
    except (InvalidSignature, ValueError):
        raise SignatureError("the round's signature does not verify: tampered, or signed by another "
                             "key") from None


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
