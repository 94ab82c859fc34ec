"""Checkpoints: after every round, the global model, the round, the server optimizer's state and
the user-level privacy ledger, written atomically with a SHA-256 beside each file.

Loading never unpickles code (``weights_only``). A checkpoint whose file or checksum is missing,
or whose bytes do not match, is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attune.shared.errors import StoreError

log = logging.getLogger(__name__)
_PATTERN = "global_round_*.pt"


@dataclass
class Checkpoint:
    round: int
    state: dict[str, torch.Tensor]
    optimizer: dict = field(default_factory=dict)  # ServerSGD/ServerAdam.state_dict()
    ledger: dict | None = None  # PrivacyLedger.state_dict() of the user-level accountant


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write ``global_round_{r}.pt`` and its checksum (and refresh ``global_final.pt``)."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"round": checkpoint.round,
                "state": {k: t.detach().clone() for k, t in checkpoint.state.items()},
                "optimizer": checkpoint.optimizer, "ledger": checkpoint.ledger}, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest().encode()
    path = directory / f"global_round_{checkpoint.round:04d}.pt"
    for target in (path, directory / "global_final.pt"):
        _write_atomic(target, data)  # the data first: a checksum never vouches for missing bytes
        _write_atomic(_checksum_path(target), digest)
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Load one checkpoint; ``StoreError`` if it is missing, partial or does not match its checksum."""
    try:
        data = path.read_bytes()
        expected = _checksum_path(path).read_text().strip()
    except OSError as error:
        raise StoreError(f"checkpoint {path} is incomplete: {error}") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise StoreError(f"checkpoint {path} does not match its checksum (corrupt or partial)")
    payload = torch.load(io.BytesIO(data), weights_only=True)
    return Checkpoint(round=int(payload["round"]), state=payload["state"],
                      optimizer=payload["optimizer"], ledger=payload["ledger"])


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest checkpoint in ``directory`` that loads and matches its checksum, if any."""
    for path in sorted(directory.glob(_PATTERN), reverse=True):
        try:
            return load_checkpoint(path)
        except StoreError as error:
            log.warning("skipping checkpoint: %s", error)
    return None
