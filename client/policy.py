"""The device's own limits and its decision to join a round, whatever the coordinator asks.

A device joins a round only if the person consented and did not pause, the round moves its run
forward (no replay), its privacy mode and noise meet the device's floor, and its ledger can pay
for it. None of these depends on the person's events, so whether a device joins reveals nothing
about them (it is disclosed on purpose, ``docs/privacy.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attune.client.store import LedgerRow
from attune.shared.accounting import Entry
from attune.shared.config import RoundConfig, RoundTask
from attune.shared.errors import ConfigError
from attune.shared.mechanism import smallest_z
from attune.shared.model import ModelConfig
from attune.shared.wire import RoundRequest


@dataclass(frozen=True)
class PrivacyConfig:
    """The device's own privacy limits; the coordinator cannot override them.

    ``epsilon_budget`` and ``delta`` bound the event-level guarantee over the device's lifetime
    (what the coordinator can learn, by the ledger). The device refuses rounds with a mechanism
    whose accounted noise multiplier (noise std over its true sensitivity, rounding included: the
    ``z`` its ledger writes) is under ``min_noise_multiplier``, so no one round can take much of
    the budget, and, without ``allow_non_private``, rounds that are not private. Without
    ``allow_evaluation`` it spends nothing on evaluation rounds (``attune.shared.evaluation``).
    """

    epsilon_budget: float = 8.0
    delta: float = 1e-5
    min_noise_multiplier: float = 1.0
    allow_non_private: bool = False
    allow_evaluation: bool = True

    def __post_init__(self) -> None:
        for name, value, top in (("epsilon_budget", self.epsilon_budget, 1e3), ("delta", self.delta, 1.0),
                                 ("min_noise_multiplier", self.min_noise_multiplier, 1e6)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 < value < top:
                raise ConfigError(f"{name} must be a finite number in (0, {top:g}), got {value!r}")
        for name in ("allow_non_private", "allow_evaluation"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")


def refusal(request: RoundRequest, privacy: PrivacyConfig, *, consented: bool, paused: bool) -> str | None:
    """Why the device declines ``request`` before touching its ledger, or ``None``."""
    config = request.config
    if not consented:
        return "no consent: the person has not opted in (or withdrew)"
    if paused:
        return "paused by the person: nothing is computed or sent"
    if not config.private and not privacy.allow_non_private:
        return "non-private rounds are not allowed on this device"
    if config.task is RoundTask.EVALUATE and not privacy.allow_evaluation:
        return "this device takes no part in evaluation rounds (allow_evaluation=False)"
    return noise_refusal(request.model, config, privacy)


def noise_refusal(model: ModelConfig, config: RoundConfig, privacy: PrivacyConfig) -> str | None:
    """Why a private round's accounted noise is under this device's floor, or ``None``."""
    if config.private and (z := smallest_z(model, config)) < privacy.min_noise_multiplier:
        return (f"the round's accounted noise multiplier ({z:.3g}: noise over sensitivity) is under this "
                f"device's floor of {privacy.min_noise_multiplier}")
    return None


def replayed(request: RoundRequest, rows: list[LedgerRow]) -> str | None:
    """Refuse a round of a run this device already joined at the same or a later round, and a
    round of a run it left for another one (a signed round of an earlier run, delivered late)."""
    joined = [row.round for row in rows if row.run_id == request.run_id]
    if joined and request.round <= max(joined):
        return (f"round {request.round} of run {request.run_id} is not after round {max(joined)}, "
                "which this device already joined: a replay")
    if joined and rows[-1].run_id != request.run_id:
        return (f"run {request.run_id} was followed on this device by run {rows[-1].run_id}: a round of an "
                "earlier run is not joined again")
    return None


def slice_refusal(request: RoundRequest, rows: list[LedgerRow], first: list[Entry], vocabulary: str) -> str | None:
    """A later slice of a count pass (``attune.shared.selection``) is free only for a device that
    paid the pass's first slice (``first``: what that slice costs at this round's noise) with the
    same item ids (``vocabulary``'s fingerprint: an event's item stays in one slice) and has not
    sent this slice in the pass since; anything else is refused, never charged again."""
    counts = [row for row in rows if row.run_id == request.run_id and row.task == RoundTask.COUNT.value]
    starts = [k for k, row in enumerate(counts) if row.part == 0]
    if not starts or list(counts[starts[-1]].entries) != first or counts[starts[-1]].vocabulary != vocabulary:
        return (f"count slice {request.config.count_part} of a pass whose first slice this device did not pay at "
                "this noise with these item ids")
    if any(row.part == request.config.count_part for row in counts[starts[-1]:]):
        return f"count slice {request.config.count_part} was already sent in this pass"
    return None
