"""Global-model checkpoints: written atomically after every round, loaded without unpickling code."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_checkpoint(directory: Path, server_round: int, state: dict[str, torch.Tensor]) -> Path:
    """Write ``global_round_{r}.pt`` (and refresh ``global_final.pt``) via temp file + rename."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {name: t.detach().clone() for name, t in state.items()}
    payload["__round__"] = torch.tensor(server_round)
    path = directory / f"global_round_{server_round:04d}.pt"
    for target in (path, directory / "global_final.pt"):
        tmp = target.with_suffix(".tmp")
        with tmp.open("wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    return path


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    payload = torch.load(path, weights_only=True)
    server_round = int(payload.pop("__round__").item())
    return server_round, payload
