"""Adapters between Attune's typed objects and Flower records (``flwr.app``).

The only module of ``attune.shared`` that imports Flower; the apps call it at their edges.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from attune.shared.config import TrainConfig
from attune.shared.errors import ModelMismatchError
from attune.shared.model import MODEL_VERSION, ModelConfig


def _key(name: str) -> str:
    return name.replace("_", "-")


def to_config_record(*configs: object, **extra: int | float | str | bool) -> ConfigRecord:
    """Flatten frozen dataclasses into one ConfigRecord (``local_epochs`` -> ``local-epochs``)."""
    record = ConfigRecord()
    for config in configs:
        for f in fields(config):  # type: ignore[arg-type]
            record[_key(f.name)] = getattr(config, f.name)
    for name, value in extra.items():
        record[_key(name)] = value
    record["model-version"] = MODEL_VERSION
    return record


def _from_record(cls: type, record: ConfigRecord) -> object:
    kwargs = {}
    for f in fields(cls):
        key = _key(f.name)
        if key not in record:
            raise ModelMismatchError(f"config record lacks {key!r}")
        kwargs[f.name] = record[key]
    return cls(**kwargs)


def model_config_from(record: ConfigRecord) -> ModelConfig:
    return _from_record(ModelConfig, record)  # type: ignore[return-value]


def train_config_from(record: ConfigRecord) -> TrainConfig:
    return _from_record(TrainConfig, record)  # type: ignore[return-value]


def model_version_from(record: ConfigRecord) -> int:
    if "model-version" not in record:
        raise ModelMismatchError("config record lacks 'model-version'")
    return int(record["model-version"])  # type: ignore[arg-type]


def state_to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({name: Array(t.detach().cpu().numpy()) for name, t in state.items()})


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Decode every array; a truncated or malformed payload raises ``ModelMismatchError``."""
    out = {}
    for name, array in record.items():
        try:
            out[name] = array.numpy()
        except Exception as error:  # noqa: BLE001 - any decoding failure means a bad payload
            raise ModelMismatchError(f"array {name!r} cannot be decoded: {error}") from None
    return out
