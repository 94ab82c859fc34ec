"""The arithmetic of Attune's secure sum, hardened for Flower's SecAgg+ (Bell et al. 2020).

Flower 1.42's SecAgg+ derives every mask from a 32-bit fold of its key (``pseudo_rand_gen`` seeds
``np.random.RandomState``; flwr#7522), rounds values with the global ``np.random``, and packs the
sum into a 2^32 field with a weight per device. Attune replaces those three pieces on both sides
(``attune.client.secure_aggregation`` and ``attune.server.secure_aggregation`` install them):

- masks are the ChaCha20 keystream (``cryptography``) under SHA-256 of the mask key;
- contributions are already integers (``attune.shared.mechanism``): they enter the field exactly,
  as their residues modulo ``MODULUS`` (2^40), with no rounding at all;
- every device weighs 1 and the sum is read back in two's complement, so it is exact whenever
  its coordinates stay under 2^39 in size, which ``max_cohort`` guarantees by capping the cohort;
- Shamir's secret sharing of the mask seeds and keys is done over the prime field of
  ``2^521 - 1`` with Python integers (``split_secret``, ``combine_shares``): Flower's runs
  pycryptodome's pure-Python GF(2^128) arithmetic in a thread pool per call, 25-50 ms a call,
  which made the shares cost more than the training. Same scheme (Shamir 1979), coefficients
  from the OS's secure source.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import secrets

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from attune.shared.config import RoundConfig
from attune.shared.errors import ConfigError, ModelMismatchError
from attune.shared.mechanism import contribution_dim, device_bound, share_std
from attune.shared.model import ModelConfig

MODULUS_BITS = 40
MODULUS = 1 << MODULUS_BITS
# Flower's protocol parameters that make its arithmetic exact for integer contributions: no
# quantization (range 1 and no clipping offset), one unit of weight per device.
QUANTIZATION_RANGE = 1
CLIPPING_RANGE = 0.0
MAX_WEIGHT = 1.0


def mask_stream(seed: bytes, num_range: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks uniform on ``[0, num_range)`` (a power of 2) from the ChaCha20 keystream under
    ``SHA-256(seed)``: the whole key matters, not a 32-bit fold of it."""
    if num_range & (num_range - 1):
        raise ConfigError(f"the mask range must be a power of 2, got {num_range}")
    key = hashlib.sha256(b"attune-secagg-mask|" + bytes(seed)).digest()
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    out = []
    for shape in shapes:
        count = math.prod(shape)
        words = np.frombuffer(encryptor.update(bytes(8 * count)), dtype="<u8") & np.uint64(num_range - 1)
        out.append(words.astype(np.int64).reshape(shape))
    return out


def encode(parameters: list[np.ndarray]) -> list[np.ndarray]:
    """Integer-valued contributions as field elements (residues mod ``MODULUS``), exactly."""
    out = []
    for array in parameters:
        values = np.asarray(array, dtype=np.float64)
        integers = np.rint(values)
        if not np.array_equal(values, integers) or np.abs(integers).max(initial=0) >= MODULUS // 2:
            raise ModelMismatchError("a secure-sum contribution must be integers under 2^39 in size")
        out.append(np.mod(integers.astype(np.int64), MODULUS))
    return out


def decode(residues: list[np.ndarray]) -> list[np.ndarray]:
    """Field elements back to signed integers (two's complement), as float64 arrays."""
    half = MODULUS // 2
    return [(((np.asarray(r, dtype=np.int64) + half) % MODULUS) - half).astype(np.float64) for r in residues]


def max_cohort(model: ModelConfig, config: RoundConfig) -> int:
    """Most devices whose sum cannot wrap around: each contributes at most ``device_bound`` plus
    rounding per coordinate, and the noise of all shares stays within 12 standard deviations."""
    per_device = device_bound(config) + math.sqrt(contribution_dim(model, config))
    room = MODULUS // 2 - 1
    devices = int(room // per_device)
    while devices > 0 and devices * per_device + 12 * share_std(config) * math.sqrt(devices) > room:
        devices -= 1
    return devices


HARDENED_FLOWER = "1.42."  # the Flower release whose SecAgg+ internals the hardening replaces


def check_flower_version() -> None:
    """Refuse to harden a Flower release other than the one the replaced functions were read in:
    their names and signatures are Flower's internals, not its API."""
    found = importlib.metadata.version("flwr")
    if not found.startswith(HARDENED_FLOWER):
        raise ConfigError(f"Attune's SecAgg+ hardening is written for flwr {HARDENED_FLOWER}x, found {found}: "
                          "install the pinned flwr")


def neighbourhood(cohort: int, colluders: int) -> tuple[int, int]:
    """SecAgg+'s graph for a round: ``(shares, threshold)``. Each device splits its two secrets
    (its mask seed and its pairwise-mask key) among ``shares`` devices, itself included: an odd
    number about ``3 log2 n`` and at least ``2 * colluders + 1``, or the whole cohort when that is
    no more; ``threshold`` of them rebuild a secret. The threshold is a strict majority of the
    shares, so a coordinator cannot rebuild both of a device's secrets (which unmasks its own
    vector) by asking half its neighbours for each, and over ``colluders``, so colluding
    neighbours alone hold too few shares (``threshold_holds``)."""
    wanted = max(2 * math.ceil(1.5 * math.log2(max(cohort, 2))) + 1, 2 * colluders + 1)
    shares = cohort if wanted >= cohort else wanted
    return shares, max(2, shares // 2 + 1, colluders + 1)


def threshold_holds(shares: int, threshold: int, colluders: int) -> bool:
    """Whether ``threshold`` of ``shares`` keeps one device's vector from the coordinator and
    ``colluders`` colluding devices (what a device checks before it sends its masked vector)."""
    return colluders < threshold <= shares and 2 * threshold > shares


_PRIME = (1 << 521) - 1  # a Mersenne prime: 64-byte chunks of a secret are field elements
_CHUNK = 64
_ELEMENT = 66  # bytes of one field element


def split_secret(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """``num`` shares of ``secret``, any ``threshold`` of which recover it and fewer reveal
    nothing: one random polynomial of degree ``threshold - 1`` per 64-byte chunk, its constant the
    chunk, evaluated at 1..num. A share is its index and length (4 bytes each), then one field
    element per chunk."""
    if not 1 <= threshold <= num:
        raise ConfigError(f"need 1 <= threshold <= num, got {threshold} and {num}")
    chunks = [secret[i:i + _CHUNK] for i in range(0, len(secret), _CHUNK)] or [b""]
    shares = [bytearray(x.to_bytes(4, "little") + len(secret).to_bytes(4, "little")) for x in range(1, num + 1)]
    for chunk in chunks:
        coefficients = [int.from_bytes(chunk, "little")] + [secrets.randbelow(_PRIME) for _ in range(threshold - 1)]
        for x in range(1, num + 1):
            value = 0
            for coefficient in reversed(coefficients):  # Horner
                value = (value * x + coefficient) % _PRIME
            shares[x - 1] += value.to_bytes(_ELEMENT, "little")
    return [bytes(share) for share in shares]


def combine_shares(shares: list[bytes]) -> bytes:
    """The secret from at least ``threshold`` shares of it (Lagrange interpolation at 0)."""
    xs = [int.from_bytes(share[:4], "little") for share in shares]
    if len(set(xs)) != len(xs) or not shares:
        raise ModelMismatchError("shares must come from distinct indices")
    length = int.from_bytes(shares[0][4:8], "little")
    chunks = (len(shares[0]) - 8) // _ELEMENT
    weights = []
    for j, xj in enumerate(xs):
        numerator = denominator = 1
        for m, xm in enumerate(xs):
            if m != j:
                numerator, denominator = numerator * xm % _PRIME, denominator * (xm - xj) % _PRIME
        weights.append(numerator * pow(denominator, -1, _PRIME) % _PRIME)
    out = bytearray()
    for c in range(chunks):
        start = 8 + c * _ELEMENT
        value = sum(w * int.from_bytes(share[start:start + _ELEMENT], "little") for w, share in zip(weights, shares,
                                                                                                  strict=True))
        out += (value % _PRIME).to_bytes(_ELEMENT, "little")[:_CHUNK]
    return bytes(out[:length])
