"""What a device keeps besides its events, typed: its participation and controls (``DeviceState``)
and its vectors and received model (tensors in a byte format that cannot execute code).

Every change goes through ``EventStore.update_json`` (read, change, write in one transaction), so
two objects or processes on one store never lose each other's changes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from attune.client.store import EventStore
from attune.shared.errors import StoreError
from attune.shared.layout import all_finite

DEVICE_KEY = "device"
USER_KEY = "user_vector"
RANK_KEY = "rank_vector"
GLOBAL_KEY = "global_model"  # its trained parameters: new every round
# Its buffers (which items have rows, every item's prior: catalog-sized), set by the count round and
# the same in every round after it: written when their digest changes, not every round.
BUFFERS_KEY = "global_buffers"
BUFFERS_DIGEST_KEY = "global_buffers_digest"
NOT_INTERESTED_KEY = "not_interested"
EVALUATION_KEY = "evaluation"  # statistics of events ranked when recorded, until an evaluation round


@dataclass(frozen=True)
class DeviceState:
    """Participation and the person's controls (all persisted)."""

    rounds_joined: int = 0  # rounds this device computed a contribution for
    contributions_sent: int = 0
    bytes_sent: int = 0
    last_sent_at: float | None = None
    last_run: str = ""  # the last (run, round) it joined: older rounds are replays
    last_round: int = 0
    paused: bool = False
    budget_exhausted: bool = False
    # the person's lifetime budget: the smallest any process that opened the store gave, or what
    # set_epsilon_budget set (None: a store from before it was kept)
    epsilon_budget: float | None = None
    device_level_epsilon: float = 0.0  # the coordinator's signed device-level guarantee (0: none)
    device_level_delta: float = 0.0

    @classmethod
    def from_json(cls, raw: object) -> DeviceState:
        if raw is None:
            return cls()
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or not set(raw) <= names:
            raise StoreError(f"the stored device state is not one: {raw!r}")
        try:
            return cls(**raw)
        except TypeError as error:
            raise StoreError(f"the stored device state is damaged: {error}") from None


def read_state(store: EventStore) -> DeviceState:
    return DeviceState.from_json(store.get_json(DEVICE_KEY))


def update_state(store: EventStore, **changes: Any) -> DeviceState:
    """Apply ``changes`` (field values, or functions of the current value) in one transaction."""
    def change(raw: object | None) -> dict:
        current = DeviceState.from_json(raw)
        values = {name: value(getattr(current, name)) if callable(value) else value
                  for name, value in changes.items()}
        return asdict(replace(current, **values))

    return DeviceState(**store.update_json(DEVICE_KEY, change))  # type: ignore[arg-type]


_FORMATS = {torch.float32: "<f4", torch.int64: "<i8"}


def encode_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """A header (names, shapes, dtypes) and the little-endian bytes of each tensor (float32, or
    int64 for index tensors): no pickle, no code."""
    formats = {name: _FORMATS.get(t.dtype, "<f4") for name, t in tensors.items()}
    header = json.dumps({name: [list(t.shape), formats[name]] for name, t in tensors.items()}).encode()
    # One copy of the values, the bytes returned: a model-sized tensor is not copied twice more.
    bodies = [t.detach().contiguous().numpy().astype(formats[name], copy=False).reshape(-1).view(np.uint8).data
              for name, t in tensors.items()]
    return b"".join([struct.pack("<I", len(header)), header, *bodies])


def decode_tensors(raw: bytes) -> dict[str, torch.Tensor]:
    try:
        (length,) = struct.unpack_from("<I", raw)
        shapes = json.loads(raw[4:4 + length])
        out, start = {}, 4 + length
        for name, (shape, dtype) in shapes.items():
            if dtype not in _FORMATS.values():
                raise ValueError(f"unknown dtype {dtype!r}")
            count = int(np.prod(shape, dtype=np.int64))
            values = np.frombuffer(raw, dtype=dtype, count=count, offset=start)
            out[name] = torch.from_numpy(values.astype(dtype[1:], copy=True)).reshape(shape)
            start += values.itemsize * count
        if start != len(raw):
            raise ValueError(f"{len(raw) - start} trailing bytes")
        if not all(all_finite(t) for t in out.values()):
            raise ValueError("a stored vector holds NaN or infinity")
        return out
    except (struct.error, ValueError, TypeError, AttributeError) as error:
        raise StoreError(f"a stored tensor value is damaged: {error}") from None


def _digest(tensors: dict[str, torch.Tensor]) -> bytes:
    """SHA-256 of the tensors' names, shapes, dtypes and bytes (hashed in place: no copy)."""
    hashed = hashlib.sha256(json.dumps({name: [list(t.shape), str(t.dtype)] for name, t in tensors.items()}).encode())
    for tensor in tensors.values():
        hashed.update(tensor.detach().contiguous().numpy().data)
    return hashed.hexdigest().encode()


def global_values(state: dict[str, torch.Tensor], buffers: Collection[str],
                  stored: Callable[[str], bytes | None]) -> dict[str, bytes]:
    """The stored form of a global model: its parameters, and its ``buffers`` unless the ``stored``
    ones are the same (a training round does not rewrite a 1M-item prior it did not change)."""
    kept = {name: state[name] for name in buffers if name in state}
    values = {GLOBAL_KEY: encode_tensors({name: t for name, t in state.items() if name not in kept})}
    if stored(BUFFERS_DIGEST_KEY) != (digest := _digest(kept)):  # none kept: an earlier model's are replaced
        values |= {BUFFERS_KEY: encode_tensors(kept), BUFFERS_DIGEST_KEY: digest}
    return values


def read_global(store: EventStore) -> dict[str, torch.Tensor] | None:
    """The stored global model, parameters and buffers (None: none received yet)."""
    raw = store.get_state(GLOBAL_KEY)
    if raw is None:
        return None
    buffers = store.get_state(BUFFERS_KEY)
    return decode_tensors(raw) | ({} if buffers is None else decode_tensors(buffers))
