"""What crosses the network, checked on both ends, framework-free (``attune.shared.records``
adapts it to Flower records).

Coordinator to device: a ``RoundRequest`` (run id, round, model shape, round config and the
global side), all of it signed. Device to coordinator: one contribution vector and nothing else
(no count, loss, metric or epsilon: see ``docs/privacy.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum

import numpy as np
import torch

from attune.shared.config import RoundConfig
from attune.shared.errors import ConfigError, ModelMismatchError
from attune.shared.mechanism import contribution_dim, device_bound, share_std
from attune.shared.model import MODEL_VERSION, ModelConfig, shared_model
from attune.shared.signing import Scalar

RUN_KEY = "run-id"
ROUND_KEY = "server-round"
VERSION_KEY = "model-version"
DEVICE_LEVEL_EPSILON = "device-level-epsilon"
DEVICE_LEVEL_DELTA = "device-level-delta"
CONTRIBUTION = "contribution"


def check_global_state(
    arrays: Mapping[str, np.ndarray | torch.Tensor], config: ModelConfig, version: int
) -> dict[str, torch.Tensor]:
    """Validate received global parameters and return them as float32 tensors.

    Raises ``ModelMismatchError`` naming every difference: model version, missing or extra
    names, shapes, dtypes, non-finite values.
    """
    if version != MODEL_VERSION:
        raise ModelMismatchError(f"model version {version!r} received, this code speaks {MODEL_VERSION}")
    model = shared_model(config)
    state = model.layout.check(arrays)
    model.check(state)
    return state


def _items_of(config: object) -> dict[str, Scalar]:
    def plain(value: object) -> Scalar:
        return value.value if isinstance(value, Enum) else value  # type: ignore[return-value]

    return {f.name.replace("_", "-"): plain(getattr(config, f.name)) for f in fields(config)}  # type: ignore[arg-type]


def _typed(cls: type, items: Mapping[str, object]) -> object:
    """Build ``cls`` from kebab-case entries, refusing wrong types (1.9 is not an int; True is
    not a number)."""
    kwargs = {}
    for f in fields(cls):
        key = f.name.replace("_", "-")
        if key not in items:
            raise ModelMismatchError(f"the round config lacks {key!r}")
        value = items[key]
        expected = type(getattr(cls(), f.name))
        if issubclass(expected, Enum):
            expected = str
        if expected is bool and not isinstance(value, bool):
            raise ModelMismatchError(f"{key} must be true or false, got {value!r}")
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ModelMismatchError(f"{key} must be an integer, got {value!r}")
        if expected is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ModelMismatchError(f"{key} must be a number, got {value!r}")
            value = float(value)
        if expected is str and not isinstance(value, str):
            raise ModelMismatchError(f"{key} must be a string, got {value!r}")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise ModelMismatchError(f"bad round config: {error}") from None


def model_of(items: Mapping[str, object]) -> ModelConfig:
    """The model a round's config entries describe (``ModelMismatchError`` if they do not)."""
    return _typed(ModelConfig, items)  # type: ignore[return-value]


@dataclass(frozen=True)
class RoundRequest:
    """Everything a device gets for one round (and all of it is signed)."""

    run_id: str
    round: int
    model: ModelConfig
    config: RoundConfig
    state: dict[str, torch.Tensor]  # the global side, float32
    device_level_epsilon: float = 0.0  # the coordinator's device-level guarantee so far (0: none)
    device_level_delta: float = 0.0

    def items(self) -> dict[str, Scalar]:
        """The config entries sent with (and signed with) the global side."""
        return {**_items_of(self.model), **_items_of(self.config),
                RUN_KEY: self.run_id, ROUND_KEY: self.round, VERSION_KEY: MODEL_VERSION,
                DEVICE_LEVEL_EPSILON: float(self.device_level_epsilon),
                DEVICE_LEVEL_DELTA: float(self.device_level_delta)}

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: self.state[name].detach().cpu().numpy() for name in shared_model(self.model).layout.sent}

    @classmethod
    def parse(cls, arrays: Mapping[str, np.ndarray], items: Mapping[str, object]) -> RoundRequest:
        """Check and read what a device received (after its signature was verified)."""
        version = items.get(VERSION_KEY)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ModelMismatchError(f"model-version must be an integer, got {version!r}")
        run_id, server_round = items.get(RUN_KEY), items.get(ROUND_KEY)
        if not isinstance(run_id, str) or not 0 < len(run_id) <= 64:
            raise ModelMismatchError(f"run-id must be a non-empty string, got {run_id!r}")
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
            raise ModelMismatchError(f"server-round must be a positive integer, got {server_round!r}")
        guarantee: list[float] = []
        for key in (DEVICE_LEVEL_EPSILON, DEVICE_LEVEL_DELTA):
            value = items.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ModelMismatchError(f"{key} must be a finite number >= 0, got {value!r}")
            guarantee.append(float(value))
        model = _typed(ModelConfig, items)
        config = _typed(RoundConfig, items)
        state = check_global_state(arrays, model, version)  # type: ignore[arg-type]
        return cls(run_id, server_round, model, config, state,  # type: ignore[arg-type]
                   float(guarantee[0]), float(guarantee[1]))


def contribution_bound(model: ModelConfig, config: RoundConfig, devices: int = 1) -> float:
    """Largest L2 norm of the sum of ``devices`` honest contributions (noise included): each is
    bounded by ``device_bound`` plus its rounding, and ``devices`` noise shares of std ``s`` have
    norm at most ``s * sqrt(devices) * (sqrt(dim) + 6)`` but with probability below 1e-7
    (Laurent and Massart 2000). In units when private, in gradient units when not."""
    dim = contribution_dim(model, config)
    if not config.private:
        return devices * config.device_norm * config.clip * (1 + 1e-9)
    noise = share_std(config) * math.sqrt(devices) * (math.sqrt(dim) + 6.0)
    return devices * (device_bound(config) + math.sqrt(dim) / 2) + noise


def check_contribution(vector: np.ndarray | torch.Tensor, model: ModelConfig, config: RoundConfig,
                       devices: int = 1) -> torch.Tensor:
    """A received contribution (or a secure sum of ``devices`` of them), checked: shape, dtype
    (int64 units when private, float64 when not), finite values, norm within what honest devices
    can produce. Raises ``ModelMismatchError`` saying what is wrong."""
    dim = contribution_dim(model, config)
    dtype = torch.long if config.private else torch.float64
    if isinstance(vector, np.ndarray):  # exactly the native array torch reads, checked before torch sees it
        expected = np.dtype(np.int64) if config.private else np.dtype(np.float64)
        if vector.dtype != expected:  # byte order, structured, datetime, text, object, longdouble: all differ
            raise ModelMismatchError(f"contribution has dtype {vector.dtype.str}, expected {expected.str}")
        if vector.shape != (dim,):
            raise ModelMismatchError(f"contribution has shape {vector.shape}, expected ({dim},)")
        vector = torch.from_numpy(np.ascontiguousarray(vector))
    if not isinstance(vector, torch.Tensor):
        raise ModelMismatchError(f"contribution is a {type(vector).__name__}, not an array")
    tensor = vector
    if tuple(tensor.shape) != (dim,):
        raise ModelMismatchError(f"contribution has shape {tuple(tensor.shape)}, expected ({dim},)")
    if tensor.dtype != dtype:
        raise ModelMismatchError(f"contribution has dtype {tensor.dtype}, expected {dtype}")
    if not bool(torch.isfinite(tensor.double()).all()):
        raise ModelMismatchError("contribution has non-finite values")
    norm = float(tensor.double().norm())
    bound = contribution_bound(model, config, devices)
    if not norm <= bound:
        raise ModelMismatchError(f"contribution norm {norm:.6g} is over the bound {bound:.6g} that "
                                 f"{devices} honest device(s) can reach")
    return tensor
