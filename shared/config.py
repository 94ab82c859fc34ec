"""What every device does in a round, chosen by the coordinator and checked by the device.

One ``RoundConfig`` serves every privacy mode (``PrivacyMode``); ``PRESETS`` holds the defaults
each mode wants, defined here once. The privacy meaning of each field is in
``attune.shared.mechanism`` and ``docs/privacy.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any

from attune.shared.errors import ConfigError


class PrivacyMode(str, Enum):
    """How a device's contribution is protected.

    - ``distributed``: each device adds a share of the noise; the coordinator sees only SecAgg+
      sums, which carry the full noise when enough devices are honest.
    - ``local``: each device adds the full noise; every contribution is DP on its own.
    - ``off``: no clipping, no noise. Labelled NON-PRIVATE wherever it is used.
    """

    DISTRIBUTED = "distributed"
    LOCAL = "local"
    OFF = "off"


LOSSES = ("bce", "bpr")


def knob(default: Any, help: str) -> Any:
    """A config field with its help text (the ``attune`` command's options are built from these)."""
    return field(default=default, metadata={"help": help})


def _check_number(name: str, value: object, *, low: float, integer: bool = False,
                  strict: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or value < low or (strict and value == low):
        kind = "an integer" if integer else "a finite number"
        raise ConfigError(f"{name} must be {kind} {'>' if strict else '>='} {low}, got {value!r}")


@dataclass(frozen=True)
class RoundConfig:
    """One round on a device: a DP refresh of its user vector when due, then the clipped sum of
    its events' gradients on the shared side, plus its noise share (see ``mechanism``)."""

    mode: str = knob(PrivacyMode.DISTRIBUTED.value, "privacy mode: distributed, local or off")
    negatives: int = knob(4, "sampled negative items per event")
    loss: str = knob("bce", "bce or bpr")
    clip: float = knob(1.0, "L2 bound of one event's gradient on the shared side")
    noise_multiplier: float = knob(1.0, "std of a released sum's noise in units of clip (calibrated when "
                                   "an epsilon is given)")
    min_survivors: int = knob(2, "distributed: devices whose noise shares must be in a released sum "
                              "(set by the coordinator's plan)")
    colluders: int = knob(0, "distributed: how many of those may collude with the coordinator")
    device_norm: float = knob(256.0, "L2 bound of one device's contribution, in units of clip")
    quantum_bits: int = knob(16, "one clip is 2**bits integer units on the wire")
    user_every: int = knob(10, "refresh the user vector every this many rounds a device joins (set by the "
                           "coordinator's plan)")
    user_steps: int = knob(2, "full-batch DP steps of a user-vector refresh")
    user_lr: float = knob(0.3, "length of each (normalised) user-vector step")
    user_clip: float = knob(1.0, "L2 bound of one event's gradient on the user vector")
    user_noise_multiplier: float = knob(1.0, "noise of each refresh step in units of user_clip (calibrated "
                                        "when an epsilon is given)")

    def __post_init__(self) -> None:
        if self.mode not in {m.value for m in PrivacyMode}:
            raise ConfigError(f"privacy mode must be one of {', '.join(m.value for m in PrivacyMode)}, "
                              f"got {self.mode!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in ("negatives", "user_every", "min_survivors"):
            _check_number(name, getattr(self, name), low=1, integer=True)
        for name in ("colluders", "user_steps"):
            _check_number(name, getattr(self, name), low=0, integer=True)
        _check_number("quantum_bits", self.quantum_bits, low=4, integer=True)
        if self.quantum_bits > 24:
            raise ConfigError(f"quantum_bits must be at most 24, got {self.quantum_bits}")
        for name in ("clip", "device_norm", "user_lr", "user_clip"):
            _check_number(name, getattr(self, name), low=0.0, strict=True)
        for name in ("noise_multiplier", "user_noise_multiplier"):
            _check_number(name, getattr(self, name), low=0.0, strict=self.private)
        if self.colluders >= self.min_survivors:
            raise ConfigError(f"colluders ({self.colluders}) must be fewer than min_survivors "
                              f"({self.min_survivors}): the honest shares carry the noise")

    @property
    def privacy(self) -> PrivacyMode:
        return PrivacyMode(self.mode)

    @property
    def private(self) -> bool:
        return self.privacy is not PrivacyMode.OFF

    @property
    def honest_shares(self) -> int:
        """How many noise shares a released sum is guaranteed to hold from honest devices."""
        if self.privacy is PrivacyMode.DISTRIBUTED:
            return self.min_survivors - self.colluders
        return 1

    def refresh_due(self, rounds_joined: int) -> bool:
        """Whether a device that has joined ``rounds_joined`` rounds refreshes its vector now."""
        return self.user_steps > 0 and rounds_joined % self.user_every == 0

    def refreshes(self, participations: int) -> int:
        """Refreshes a device makes in ``participations`` rounds (the first round refreshes)."""
        return -(-participations // self.user_every) if self.user_steps else 0

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


# Defaults per mode (MovieLens-100K and the synthetic demo: README "Measured results").
# distributed: the noise of a sum falls as devices join, so one full-batch gradient per round;
# local: each contribution carries the full noise; off: no DP, the user vector refits every round.
PRESETS: dict[PrivacyMode, RoundConfig] = {
    PrivacyMode.DISTRIBUTED: RoundConfig(),
    PrivacyMode.LOCAL: RoundConfig(mode=PrivacyMode.LOCAL.value, min_survivors=1),
    PrivacyMode.OFF: RoundConfig(mode=PrivacyMode.OFF.value, noise_multiplier=0.0,
                                 user_noise_multiplier=0.0, user_every=1, user_steps=1, min_survivors=1),
}


def preset(mode: PrivacyMode | str, **changes: object) -> RoundConfig:
    """The defaults of ``mode`` with ``changes`` applied (validated)."""
    try:
        base = PRESETS[PrivacyMode(mode)]
    except ValueError:
        raise ConfigError(f"privacy mode must be one of {', '.join(m.value for m in PrivacyMode)}, "
                          f"got {mode!r}") from None
    return replace(base, **changes)
