"""Where randomness comes from (devices and the coordinator's noise): the OS's secure source, or a
seed in simulations.

One scheme for every backend, so the Flower simulation and the in-process backend draw the very
same numbers for the same device and round (the backend-equivalence test relies on it).
"""

from __future__ import annotations

import secrets

import torch

MODEL_INIT = 0
USER_INIT = 1
TRAIN = 2  # + the device's count of rounds trained so far
RANK = 10_000  # + the device's count of rounds trained so far
SEGMENT = 15_000  # + the device's count of rounds trained so far (its private choice of segment)
USER_LEVEL_NOISE = 20_000  # + the server round (coordinator's noise on the aggregate)


def device_seed(run_seed: int, device: int) -> int:
    """The seed of simulated device number ``device`` in a run seeded with ``run_seed``."""
    return run_seed * 1_000_003 + device


def generator(seed: int | None, salt: int) -> torch.Generator:
    """A generator for one purpose (``salt``); unseeded devices draw a secure random seed."""
    value = secrets.randbits(63) if seed is None else (seed * 1_000_003 + salt) % 2**63
    return torch.Generator().manual_seed(value)
