"""Encryption at rest for the on-device store: AES-256-GCM under a key the app provides.

The app keeps the key in the platform keystore (Android Keystore, iOS Keychain, ...) and hands it
to ``Personalizer``/``EventStore``; Attune never writes it anywhere. Each sealed value carries a
fresh 96-bit nonce, and a label (what the value is) as associated data, so a ciphertext moved to
another slot fails authentication instead of being misread.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from attune.shared.errors import ConfigError, WrongKeyError

KEY_BYTES = 32
NONCE_BYTES = 12


def new_key() -> bytes:
    """A fresh random 256-bit key (for apps without a keystore-generated one, and for tests)."""
    return AESGCM.generate_key(bit_length=256)


class Sealer:
    """Seals and opens values; with ``key=None`` values pass through unchanged (no encryption)."""

    def __init__(self, key: bytes | None) -> None:
        if key is not None and (not isinstance(key, bytes) or len(key) != KEY_BYTES):
            raise ConfigError(f"the encryption key must be {KEY_BYTES} bytes (AES-256)")
        self._aead = AESGCM(key) if key is not None else None
        # A public fingerprint of the key: tells "wrong key" apart from "corrupt data" at open.
        self.key_check = (
            hmac.new(key, b"attune store key check", hashlib.sha256).hexdigest()[:32] if key else ""
        )

    @property
    def encrypted(self) -> bool:
        return self._aead is not None

    def seal(self, data: bytes, label: str) -> bytes:
        if self._aead is None:
            return data
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, label.encode())

    def open(self, blob: bytes, label: str) -> bytes:
        if self._aead is None:
            return blob
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], label.encode())
        except InvalidTag:
            raise WrongKeyError(
                f"stored value {label!r} fails authentication: wrong key or tampered file"
            ) from None
