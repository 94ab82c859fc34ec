"""Adapters between Attune's wire types and Flower records (``flwr.app``).

The only module of ``attune.shared`` that imports Flower; the apps call it at their edges.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from attune.shared.errors import ModelMismatchError
from attune.shared.signing import SIGNATURE_KEY
from attune.shared.wire import CONTRIBUTION, RoundRequest

ARRAYS = "arrays"
CONFIG = "config"


def request_content(request: RoundRequest, signature: str | None) -> RecordDict:
    """The train message's content: the global side and the (signed) config entries."""
    config = ConfigRecord(dict(request.items()))
    if signature is not None:
        config[SIGNATURE_KEY] = signature
    arrays = ArrayRecord({name: Array(value) for name, value in request.arrays().items()})
    return RecordDict({ARRAYS: arrays, CONFIG: config})


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Decode every array; a truncated or malformed payload raises ``ModelMismatchError``."""
    out = {}
    for name, array in record.items():
        try:
            out[name] = array.numpy()
        except Exception as error:  # noqa: BLE001 - any decoding failure means a bad payload
            raise ModelMismatchError(f"array {name!r} cannot be decoded: {error}") from None
    return out


def received(content: RecordDict) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """The arrays and config entries of a train message, as sent (checked after verifying)."""
    if ARRAYS not in content.array_records or CONFIG not in content.config_records:
        raise ModelMismatchError("the round message lacks its arrays or config")
    return arrays_to_numpy(content.array_records[ARRAYS]), dict(content.config_records[CONFIG])


def contribution_content(vector: torch.Tensor) -> RecordDict:
    """A device's reply: its contribution vector and nothing else."""
    return RecordDict({CONTRIBUTION: ArrayRecord({CONTRIBUTION: Array(vector.detach().cpu().numpy())})})


def contribution_of(content: RecordDict) -> np.ndarray | None:
    """The contribution in a reply (``None``: the device sent none), before any check."""
    if CONTRIBUTION not in content.array_records:
        return None
    arrays = arrays_to_numpy(content.array_records[CONTRIBUTION])
    if set(arrays) != {CONTRIBUTION}:
        raise ModelMismatchError(f"a reply holds arrays {sorted(arrays)}; only {CONTRIBUTION!r} is expected")
    return arrays[CONTRIBUTION]
