"""What a device keeps besides its events, typed: its participation and controls (``DeviceState``)
and its vectors and received model (tensors in a byte format that cannot execute code).

Every change goes through ``EventStore.update_json`` (read, change, write in one transaction), so
two objects or processes on one store never lose each other's changes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from attune.client.store import EventStore, Parts
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
PART_BYTES = 1 << 18  # what one stored part of a large value holds (``EventStore`` ``Parts``)


def tensor_parts(tensors: dict[str, torch.Tensor], part_bytes: int = PART_BYTES) -> Iterator[bytes]:
    """A header (names, shapes, dtypes), then the little-endian bytes of each tensor (float32, or
    int64 for index tensors) at most ``part_bytes`` at a time: no pickle, no code, and no copy of a
    whole tensor (a 1M-item prior is stored a quarter of a megabyte at a time)."""
    formats = {name: _FORMATS.get(t.dtype, "<f4") for name, t in tensors.items()}
    header = json.dumps({name: [list(t.shape), formats[name]] for name, t in tensors.items()}).encode()
    yield struct.pack("<I", len(header)) + header
    for name, tensor in tensors.items():
        flat = tensor.detach().contiguous().numpy().astype(formats[name], copy=False).reshape(-1).view(np.uint8)
        for start in range(0, flat.size, part_bytes):
            yield flat[start:start + part_bytes].tobytes()


def encode_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """``tensor_parts`` as one value, for small tensors."""
    return b"".join(tensor_parts(tensors))


def decode_parts(parts: Iterable[bytes]) -> dict[str, torch.Tensor]:
    """Tensors from what ``tensor_parts`` wrote (the header whole in the first part, the rest split
    anywhere): each filled in place from the parts as they come, so no part but the current one is
    held besides the tensors."""
    try:
        chunks = iter(parts)
        first = next(chunks, b"")
        (length,) = struct.unpack_from("<I", first)
        shapes = json.loads(first[4:4 + length])
        pending = memoryview(first)[4 + length:]
        out = {}
        for name, (shape, dtype) in shapes.items():
            if dtype not in _FORMATS.values():
                raise ValueError(f"unknown dtype {dtype!r}")
            values = np.empty(int(np.prod(shape, dtype=np.int64)), dtype=dtype)
            target, filled = values.view(np.uint8), 0
            while filled < target.size:
                if not len(pending):
                    pending = memoryview(next(chunks))  # StopIteration: the value was cut short
                take = min(len(pending), target.size - filled)
                target[filled:filled + take] = np.frombuffer(pending[:take], dtype=np.uint8)
                pending, filled = pending[take:], filled + take
            out[name] = torch.from_numpy(values.astype(dtype[1:], copy=False)).reshape(shape)
        if len(pending) or next(chunks, None) is not None:
            raise ValueError("trailing bytes")
        if not all(all_finite(t) for t in out.values()):
            raise ValueError("a stored vector holds NaN or infinity")
        return out
    except StopIteration:
        raise StoreError("a stored tensor value is damaged: it is cut short") from None
    except (struct.error, ValueError, TypeError, AttributeError, MemoryError) as error:  # MemoryError: a vast shape
        raise StoreError(f"a stored tensor value is damaged: {error}") from None


def decode_tensors(raw: bytes) -> dict[str, torch.Tensor]:
    return decode_parts([raw])


def _digest(tensors: dict[str, torch.Tensor]) -> bytes:
    """SHA-256 of the tensors' names, shapes, dtypes and bytes (hashed in place: no copy)."""
    hashed = hashlib.sha256(json.dumps({name: [list(t.shape), str(t.dtype)] for name, t in tensors.items()}).encode())
    for tensor in tensors.values():
        hashed.update(tensor.detach().contiguous().numpy().data)
    return hashed.hexdigest().encode()


def global_values(state: dict[str, torch.Tensor], buffers: Collection[str],
                  stored: Callable[[str], bytes | None]) -> dict[str, bytes | Parts]:
    """The stored form of a global model: its parameters, and its ``buffers`` unless the ``stored``
    ones are the same (a training round does not rewrite a 1M-item prior it did not change)."""
    kept = {name: state[name] for name in buffers if name in state}
    parameters = {name: tensor for name, tensor in state.items() if name not in kept}
    values: dict[str, bytes | Parts] = {GLOBAL_KEY: encode_tensors(parameters)}
    if stored(BUFFERS_DIGEST_KEY) != (digest := _digest(kept)):  # none kept: an earlier model's are replaced
        values |= {BUFFERS_KEY: Parts(tensor_parts(kept)), BUFFERS_DIGEST_KEY: digest}
    return values


def read_global(store: EventStore) -> dict[str, torch.Tensor] | None:
    """The stored global model, parameters and buffers (None: none received yet)."""
    with store.snapshot():  # parameters and buffers of one write
        raw = store.get_state(GLOBAL_KEY)
        if raw is None:
            return None
        buffers = store.get_parts(BUFFERS_KEY)
        return decode_tensors(raw) | ({} if buffers is None else decode_parts(buffers))
