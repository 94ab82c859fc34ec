"""What crosses the network: the global side of the model, checked on both ends.

Framework-free: tensors in, tensors out. ``attune.shared.records`` adapts these to Flower records.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from attune.shared.errors import ModelMismatchError
from attune.shared.model import GLOBAL_PARAMS, MODEL_VERSION, ModelConfig


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {
        "item_embedding.weight": (config.num_items, config.dim),
        "item_bias.weight": (config.num_items, 1),
        "context_encoder.weight": (config.dim, config.context_features),
    }


def check_global_state(
    arrays: Mapping[str, np.ndarray | torch.Tensor], config: ModelConfig, version: int
) -> dict[str, torch.Tensor]:
    """Validate received global parameters and return them as float32 tensors.

    Raises ``ModelMismatchError`` naming every difference: model version, missing or extra
    names, shapes, dtypes, non-finite values.
    """
    if version != MODEL_VERSION:
        raise ModelMismatchError(f"model version {version} received, this code speaks {MODEL_VERSION}")
    names = set(arrays)
    problems = []
    if missing := sorted(set(GLOBAL_PARAMS) - names):
        problems.append(f"missing {', '.join(missing)}")
    if extra := sorted(names - set(GLOBAL_PARAMS)):
        problems.append(f"unexpected {', '.join(extra)}")
    state: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(config).items():
        if name not in arrays:
            continue
        value = arrays[name]
        tensor = torch.from_numpy(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
        if tuple(tensor.shape) != shape:
            problems.append(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
        elif tensor.dtype != torch.float32:
            problems.append(f"{name} has dtype {tensor.dtype}, expected torch.float32")
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(f"{name} has non-finite values")
        else:
            state[name] = tensor
    if problems:
        raise ModelMismatchError("global model does not match: " + "; ".join(problems))
    return state
