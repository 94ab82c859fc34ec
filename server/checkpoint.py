"""Checkpoints: after every round, the global model, the server optimizer's state, the run's id and
plan, the device-level ledger and who contributed how often, written atomically with a SHA-256
beside each file.

Loading never unpickles code (``weights_only``). A checkpoint whose file or checksum is missing,
unreadable or does not match is skipped with a warning and the previous one is used; rounds are
ordered by number, not by file name.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import torch

from attune.server.planning import Plan
from attune.shared.accounting import Entry, ledger_from_json, ledger_to_json
from attune.shared.config import RoundConfig
from attune.shared.errors import AttuneError, StoreError

log = logging.getLogger(__name__)
_NAME = re.compile(r"global_round_(\d+)\.pt")


@dataclass
class Checkpoint:
    round: int
    state: dict[str, torch.Tensor]
    optimizer: dict = field(default_factory=dict)  # ServerSGD/ServerAdam.state_dict()
    run_id: str = ""
    plan: Plan | None = None
    device_level: list[Entry] = field(default_factory=list)  # the device-level ledger
    participation: dict[int, int] = field(default_factory=dict)  # device -> rounds contributed
    params: torch.Tensor | None = None  # the flattened model in float64: a resumed run continues exactly
    counted: bool = True  # the count round (if the model has one) released its sum
    counts: dict[int, int] = field(default_factory=dict)  # device -> count rounds contributed
    evaluated: dict[int, int] = field(default_factory=dict)  # device -> evaluation rounds contributed


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _plan_dict(plan: Plan | None) -> dict | None:
    if plan is None:
        return None
    def plain(config: RoundConfig | None) -> dict | None:  # plain values: loads never unpickle classes
        return None if config is None else {name: value.value if isinstance(value, Enum) else value
                                            for name, value in asdict(config).items()}

    return {**asdict(plan), "round": plain(plan.round), "count": plain(plan.count),
            "evaluation": plain(plan.evaluation), "evaluation_rounds": list(plan.evaluation_rounds)}


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write ``global_round_{r}.pt`` and its checksum (and refresh ``global_final.pt``)."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"round": checkpoint.round,
                "state": {k: t.detach().clone() for k, t in checkpoint.state.items()},
                "optimizer": checkpoint.optimizer, "run_id": checkpoint.run_id,
                "plan": _plan_dict(checkpoint.plan), "device_level": ledger_to_json(checkpoint.device_level),
                "participation": {str(k): int(v) for k, v in checkpoint.participation.items()},
                "params": checkpoint.params, "counted": checkpoint.counted,
                "counts": {str(k): int(v) for k, v in checkpoint.counts.items()},
                "evaluated": {str(k): int(v) for k, v in checkpoint.evaluated.items()}}, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest().encode()
    path = directory / f"global_round_{checkpoint.round:04d}.pt"
    for target in (path, directory / "global_final.pt"):
        _write_atomic(target, data)  # the data first: a checksum never vouches for missing bytes
        _write_atomic(_checksum_path(target), digest)
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Load one checkpoint; ``StoreError`` if it is missing, partial, unreadable or does not match
    its checksum."""
    if not path.is_file() or not _checksum_path(path).is_file():  # a device or a folder: never read it whole
        raise StoreError(f"checkpoint {path} or its checksum is not a regular file")
    try:
        data = path.read_bytes()
        expected = _checksum_path(path).read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise StoreError(f"checkpoint {path} is incomplete or its checksum unreadable: {error}") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise StoreError(f"checkpoint {path} does not match its checksum (corrupt or partial)")
    try:
        payload = torch.load(io.BytesIO(data), weights_only=True)
        raw_plan = payload["plan"]
        plan = None if raw_plan is None else Plan(**{
            **raw_plan, "round": RoundConfig(**raw_plan["round"]),
            "count": None if raw_plan["count"] is None else RoundConfig(**raw_plan["count"]),
            "evaluation": None if raw_plan["evaluation"] is None else RoundConfig(**raw_plan["evaluation"]),
            "evaluation_rounds": tuple(int(r) for r in raw_plan["evaluation_rounds"])})
        return Checkpoint(round=int(payload["round"]), state=payload["state"], optimizer=payload["optimizer"],
                          run_id=str(payload["run_id"]), plan=plan,
                          device_level=ledger_from_json(payload["device_level"]),
                          participation={int(k): int(v) for k, v in payload["participation"].items()},
                          params=payload["params"], counted=bool(payload["counted"]),
                          counts={int(k): int(v) for k, v in payload["counts"].items()},
                          evaluated={int(k): int(v) for k, v in payload["evaluated"].items()})
    except (KeyError, TypeError, ValueError, RuntimeError, AttuneError) as error:
        raise StoreError(f"checkpoint {path} cannot be read: {error}") from None


def prune_checkpoints(directory: Path, keep: int) -> int:
    """Delete all but the newest ``keep`` round checkpoints this loop wrote (``0``: keep all);
    ``global_final.pt`` stays. Returns how many were deleted."""
    if keep == 0:
        return 0
    written = sorted((int(match.group(1)), path) for path in directory.glob("global_round_*.pt")
                     if (match := _NAME.fullmatch(path.name)))
    for _, path in written[:-keep]:
        path.unlink(missing_ok=True)
        _checksum_path(path).unlink(missing_ok=True)
    return max(len(written) - keep, 0)


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest checkpoint in ``directory`` that loads and verifies, if any: newest by the round
    recorded inside it (checksummed), never by its file name, so a renamed or swapped file does
    not roll the run back."""
    found: list[Checkpoint] = []
    for path in directory.glob("global_round_*.pt"):
        match = _NAME.fullmatch(path.name)
        if not match:
            continue
        try:
            checkpoint = load_checkpoint(path)
        except StoreError as error:
            log.warning("skipping checkpoint: %s", error)
            continue
        if checkpoint.round != int(match.group(1)):
            log.warning("checkpoint %s holds round %d: renamed; read by its content", path, checkpoint.round)
        found.append(checkpoint)
    return max(found, key=lambda checkpoint: checkpoint.round, default=None)
