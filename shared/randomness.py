"""Where every random draw of a privacy mechanism comes from: a ChaCha20 keystream.

A ``Stream`` is the ChaCha20 keystream of ``cryptography`` (OpenSSL) under a 256-bit key. On a
real device or coordinator the key comes from the OS's secure source (``Stream.secure()``), so
the noise is cryptographically unpredictable; in simulations it is derived from the run's seed
and a label (``Stream.seeded(seed, ...)``), so runs repeat and every backend draws the very same
numbers for the same device and round. Both are the same generator; only the key differs.

Samplers built on its uniform doubles (53 random bits each):

- ``discrete_gaussian``: the exact rejection sampler of Canonne, Kamath and Steinke 2020 ("The
  Discrete Gaussian for Differential Privacy", Algorithm 3), run on floating-point uniforms as
  the TensorFlow Privacy and Google DDP implementations do. Device noise is integer, added to
  integer data, so no floating-point weakness of continuous samplers applies to it.
- ``normal``: Box-Muller, summed over four draws and halved (Holohan and Braghin 2021; what
  Opacus's ``secure_mode`` does), for the coordinator's continuous user-level noise only.
- ``bernoulli``, ``integers``, ``gumbel``: masks, negative items and the exponential mechanism.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from attune.shared.errors import ConfigError

_KEY_BYTES = 32
_NONCE = bytes(16)  # one stream per key: a key is never reused for another stream
_CHUNK = 1 << 16  # 64-bit words per keystream read
_NOISE_CHUNK = 1 << 14  # coordinates per pass of the discrete Gaussian sampler (about 1.5 MB of work arrays)


class Stream:
    """A ChaCha20 keystream read as uniform numbers. Not thread-safe; one per purpose."""

    def __init__(self, key: bytes, *, seeded: bool) -> None:
        if len(key) != _KEY_BYTES:
            raise ConfigError(f"a stream key is {_KEY_BYTES} bytes, got {len(key)}")
        self._cipher = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
        self.seeded = seeded

    @classmethod
    def secure(cls) -> Stream:
        """A stream keyed from the OS's secure source (real devices and coordinators)."""
        return cls(os.urandom(_KEY_BYTES), seeded=False)

    @classmethod
    def seeded_from(cls, seed: int, *labels: int | str) -> Stream:
        """A reproducible stream for simulations: the key is SHA-256 of the seed and labels."""
        text = "|".join(["attune-stream", str(int(seed)), *map(str, labels)])
        return cls(hashlib.sha256(text.encode()).digest(), seeded=True)

    def words(self, count: int) -> np.ndarray:
        """``count`` uniformly random 64-bit words."""
        return np.frombuffer(self._cipher.update(bytes(8 * count)), dtype="<u8")

    def uniform(self, count: int) -> torch.Tensor:
        """``count`` doubles uniform on the open interval (0, 1), float64."""
        out = np.empty(count, dtype=np.float64)
        for start in range(0, count, _CHUNK):  # chunks stay in cache: ~4x faster than one pass
            words = self.words(min(_CHUNK, count - start))
            chunk = out[start:start + words.shape[0]]
            np.add(np.right_shift(words, np.uint64(11)), 0.5, out=chunk)
            np.multiply(chunk, 2.0**-53, out=chunk)
        return torch.from_numpy(out)

    def key_bytes(self) -> bytes:
        """32 fresh bytes of the keystream (to key a sub-stream)."""
        return self._cipher.update(bytes(_KEY_BYTES))


def device_stream(seed: int, device: int, *labels: int | str) -> Stream:
    """Simulated device ``device``'s stream for a purpose: the same key in every backend."""
    return Stream.seeded_from(seed, "device", device, *labels)


def bernoulli(stream: Stream, count: int, p: float) -> torch.Tensor:
    """``count`` independent coin flips with probability ``p``, bool."""
    return stream.uniform(count) < p


def integers(stream: Stream, shape: tuple[int, ...], high: int) -> torch.Tensor:
    """Uniform integers in ``[0, high)`` (long), by the floor of a 53-bit uniform."""
    count = math.prod(shape)
    return (stream.uniform(count) * high).long().clamp_(max=high - 1).reshape(shape)


def gumbel(stream: Stream, count: int) -> torch.Tensor:
    """Standard Gumbel draws: ``argmax(scores + gumbel)`` samples ``softmax(scores)``."""
    return -torch.log(-torch.log(stream.uniform(count)))


def normal(stream: Stream, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """Gaussian noise of ``std`` (float64): four Box-Muller draws summed and halved."""
    count = math.prod(shape)
    total = torch.zeros(count, dtype=torch.float64)
    for _ in range(4):
        radius = torch.sqrt(-2.0 * torch.log(stream.uniform(count)))
        total += radius * torch.cos(2.0 * math.pi * stream.uniform(count))
    return (total * (std / 2.0)).reshape(shape)


def discrete_gaussian(streams: list[Stream], count: int, sigma: float) -> torch.Tensor:
    """``count`` integers per stream with ``P(x) ~ exp(-x^2 / (2 sigma^2))`` (long
    ``[streams, count]``), by Canonne-Kamath-Steinke rejection from the discrete Laplace of scale
    ``t = floor(sigma) + 1``. Each row is drawn from its own stream alone, in the same order
    whether one stream or many are given."""
    return add_discrete_gaussian(torch.zeros(len(streams), count, dtype=torch.long), streams, sigma)


def add_discrete_gaussian(values: torch.Tensor, streams: list[Stream], sigma: float) -> torch.Tensor:
    """``values`` (long ``[streams, count]``) plus ``discrete_gaussian`` draws, in place and
    returned: drawn ``_NOISE_CHUNK`` coordinates at a time, so the working memory stays small
    whatever the model's size, and no noise array as large as ``values`` is ever held."""
    if values.dtype != torch.long or values.dim() != 2 or len(values) != len(streams):
        raise ConfigError("noise is added to a long tensor with one row per stream")
    count = values.shape[1]
    if sigma <= 0 or count == 0:
        return values
    rows, draws = values.numpy(), np.empty(min(count, _NOISE_CHUNK), dtype=np.int64)
    for k, stream in enumerate(streams):
        for start in range(0, count, _NOISE_CHUNK):
            stop = min(count, start + _NOISE_CHUNK)
            _discrete_gaussian_into(stream, draws[:stop - start], sigma)
            rows[k, start:stop] += draws[:stop - start]
    return values


def _discrete_gaussian_into(stream: Stream, out: np.ndarray, sigma: float) -> None:
    """Fill ``out`` (int64) with discrete Gaussian draws: candidates in batches, each from two
    64-bit words (a 53-bit uniform for the geometric magnitude, whose lowest bit, unused by that
    uniform, is the sign; a 53-bit uniform for the acceptance test); accepted ones fill ``out``
    in order, so the draws are i.i.d. whatever the batch size."""
    t = math.floor(sigma) + 1
    shift, spread = sigma**2 / t, 2 * sigma**2
    filled, size = 0, out.shape[0]
    oversample = 1.4 if sigma > 2 else 2.5  # about 0.76 of candidates are accepted at large sigma, 0.43 at 0.7
    while filled < size:
        candidates = int((size - filled) * oversample) + 16
        words = stream.words(2 * candidates).reshape(2, candidates)
        first = (np.right_shift(words[0], np.uint64(11)) + 0.5) * 2.0**-53
        magnitude = np.floor(-t * np.log(first))  # geometric: P(G >= k) = exp(-k / t)
        negative = (words[0] & np.uint64(1)).astype(bool)
        second = (np.right_shift(words[1], np.uint64(11)) + 0.5) * 2.0**-53
        keep = ~(negative & (magnitude == 0))  # (-, 0) would count zero twice
        keep &= second < np.exp(-((magnitude - shift) ** 2) / spread)
        drawn = np.where(negative, -magnitude, magnitude)[keep]
        take = min(drawn.shape[0], size - filled)
        out[filled:filled + take] = drawn[:take]
        filled += take
