"""What every device does in a round, chosen by the coordinator and checked by the device.

One ``RoundConfig`` serves every privacy mode (``PrivacyMode``); ``PRESETS`` holds the defaults
each mode wants, defined here once. The privacy meaning of each field is in
``attune.shared.mechanism`` and ``docs/privacy.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

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


class RoundTask(str, Enum):
    """What a round asks of devices: train the shared side, count their items (the DP count
    that selects which items get a trained row, ``attune.shared.selection``), or sum how the model
    ranked their recorded events (``attune.shared.evaluation``)."""

    TRAIN = "train"
    COUNT = "count"
    EVALUATE = "evaluate"


class Loss(str, Enum):
    """The training loss of an event against its sampled negatives."""

    BCE = "bce"  # binary cross-entropy over the item and each negative
    BPR = "bpr"  # Bayesian personalised ranking: the item against each negative


def knob(default: Any, help: str, *, low: float | None = None, high: float | None = None,
         above: float | None = None) -> Any:
    """A config field with its help text (the ``attune`` command's options are built from these)
    and its bounds (``low <= value <= high``, ``value > above``), which ``validate`` checks."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "above": above})


@cache
def _hints(cls: Any) -> dict[str, Any]:
    return get_type_hints(cls)


def _kind(annotation: Any) -> tuple[Any, bool]:
    """The field's type without ``None``, and whether ``None`` (unset) is allowed."""
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(get_args(annotation))
    return annotation, False


def validate(config: Any) -> None:
    """Check every field of a config dataclass against its type and its knob's bounds; enum fields
    given as their string are converted. Raises ``ConfigError`` naming the field."""
    for f in fields(config):
        if "help" not in f.metadata:
            continue
        value = getattr(config, f.name)
        kind, optional = _kind(_hints(type(config))[f.name])  # type: ignore[arg-type]  # classes hash
        if value is None and optional:
            continue
        if isinstance(kind, type) and issubclass(kind, Enum):
            try:
                object.__setattr__(config, f.name, kind(value))
            except ValueError:
                choices = ", ".join(m.value for m in kind)
                raise ConfigError(f"{f.name} must be one of {choices}, got {value!r}") from None
            continue
        if kind is Path:
            if not isinstance(value, (str, Path)) or not str(value):
                raise ConfigError(f"{f.name} must be a path, got {value!r}")
            object.__setattr__(config, f.name, Path(value))
            continue
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{f.name} must be true or false, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise ConfigError(f"{f.name} must be a string, got {value!r}")
        if kind in (int, float):
            _check_number(f.name, value, integer=kind is int, low=f.metadata["low"], high=f.metadata["high"],
                          above=f.metadata["above"])
            if kind is float:
                object.__setattr__(config, f.name, float(value))


def _check_number(name: str, value: object, *, integer: bool, low: float | None, high: float | None,
                  above: float | None) -> None:
    kinds = (int,) if integer else (int, float)
    bounds = [f">= {low:g}" if low is not None else "", f"<= {high:g}" if high is not None else "",
              f"> {above:g}" if above is not None else ""]
    wanted = f"{'an integer' if integer else 'a finite number'} {' and '.join(b for b in bounds if b)}".strip()
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or (low is not None and value < low) or (high is not None and value > high) \
            or (above is not None and value <= above):
        raise ConfigError(f"{name} must be {wanted}, got {value!r}")


@dataclass(frozen=True)
class RoundConfig:
    """One round on a device: a DP refresh of its user vector when due, then the clipped sum of
    its events' gradients on the shared side, plus its noise share (see ``mechanism``). Built by
    the coordinator's plan, signed and sent with every round; every field is set."""

    mode: PrivacyMode = knob(PrivacyMode.DISTRIBUTED, "privacy mode: distributed, local or off")
    task: RoundTask = knob(RoundTask.TRAIN, "train the shared side, count the devices' items, or "
                                 "evaluate")
    negatives: int = knob(4, "sampled negative items per event", low=1, high=1000)
    loss: Loss = knob(Loss.BCE, "bce or bpr")
    clip: float = knob(1.0, "L2 bound of one event's gradient on the shared side", above=0.0)
    noise_multiplier: float = knob(1.0, "std of a released sum's noise in units of clip (calibrated when "
                                   "an epsilon is given)", low=0.0)
    min_survivors: int = knob(2, "distributed: devices whose noise shares must be in a released sum "
                              "(the coordinator's plan derives it)", low=1)
    colluders: int = knob(0, "distributed: how many of those may collude with the coordinator", low=0)
    device_norm: float = knob(256.0, "L2 bound of one device's contribution, in units of clip", above=0.0)
    quantum_bits: int = knob(16, "one clip is 2**bits integer units on the wire", low=4, high=24)
    user_every: int = knob(10, "refresh the user vector every this many rounds a device joins (the "
                           "coordinator's plan derives it)", low=1)
    user_steps: int = knob(2, "full-batch DP steps of a user-vector refresh", low=0, high=1000)
    user_lr: float = knob(0.3, "length of each (normalised) user-vector step", above=0.0)
    user_clip: float = knob(1.0, "L2 bound of one event's gradient on the user vector", above=0.0)
    user_noise_multiplier: float = knob(1.0, "noise of each refresh step in units of user_clip (calibrated "
                                        "when an epsilon is given)", low=0.0)
    count_part: int = knob(0, "count rounds: which slice of the catalog this one counts (a catalog over "
                           "131,072 items is counted a slice per round)", low=0)

    def __post_init__(self) -> None:
        validate(self)
        if self.private and (self.noise_multiplier <= 0 or self.user_noise_multiplier <= 0):
            raise ConfigError(f"a {self.mode.value} round needs noise: noise_multiplier and user_noise_multiplier "
                              "must be > 0")
        if self.colluders >= self.min_survivors:
            raise ConfigError(f"colluders ({self.colluders}) must be fewer than min_survivors "
                              f"({self.min_survivors}): the honest shares carry the noise")

    @property
    def privacy(self) -> PrivacyMode:
        return self.mode

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


# Defaults per mode (MovieLens-100K and the synthetic demo: README "Measured results").
# distributed: the noise of a sum falls as devices join, so one full-batch gradient per round;
# local: each contribution carries the full noise; off: no DP, the user vector refits every round.
PRESETS: dict[PrivacyMode, RoundConfig] = {
    PrivacyMode.DISTRIBUTED: RoundConfig(),
    PrivacyMode.LOCAL: RoundConfig(mode=PrivacyMode.LOCAL, min_survivors=1),
    PrivacyMode.OFF: RoundConfig(mode=PrivacyMode.OFF, noise_multiplier=0.0,
                                 user_noise_multiplier=0.0, user_every=1, user_steps=1, min_survivors=1),
}


def preset(mode: PrivacyMode | str, **changes: Any) -> RoundConfig:
    """The defaults of ``mode`` with ``changes`` applied (validated)."""
    try:
        base = PRESETS[PrivacyMode(mode)]
    except ValueError:
        raise ConfigError(f"privacy mode must be one of {', '.join(m.value for m in PrivacyMode)}, "
                          f"got {mode!r}") from None
    return replace(base, **changes)


def _given(name: str) -> Any:
    """A settings field mirroring ``RoundConfig``'s ``name`` (its help and bounds), absent by default."""
    return field(default=None, metadata=next(f for f in fields(RoundConfig) if f.name == name).metadata)


@dataclass(frozen=True)
class RoundSettings:
    """The round knobs a person gave; ``None`` is absent: the mode's preset applies, or the
    coordinator's plan derives the value (``min_survivors``, ``user_every``, the noise multipliers).
    The plan turns these into the ``RoundConfig`` it signs."""

    negatives: int | None = _given("negatives")
    loss: Loss | None = _given("loss")
    clip: float | None = _given("clip")
    noise_multiplier: float | None = _given("noise_multiplier")
    min_survivors: int | None = _given("min_survivors")
    colluders: int | None = _given("colluders")
    device_norm: float | None = _given("device_norm")
    quantum_bits: int | None = _given("quantum_bits")
    user_every: int | None = _given("user_every")
    user_steps: int | None = _given("user_steps")
    user_lr: float | None = _given("user_lr")
    user_clip: float | None = _given("user_clip")
    user_noise_multiplier: float | None = _given("user_noise_multiplier")

    def __post_init__(self) -> None:
        validate(self)

    def given(self) -> dict[str, Any]:
        """The knobs that were given, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
