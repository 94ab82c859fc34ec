"""Interaction events: their types and weights, validation, and model features.

Shared because the device stores and trains on events and simulations turn datasets into them.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
from attune.shared.errors import InvalidEventError

# Event type -> training weight. The order fixes the one-hot position in the context features.
EVENT_WEIGHTS: Mapping[str, float] = {
    "view": 0.5,
    "click": 1.0,
    "like": 2.0,
    "add_to_cart": 2.0,
    "purchase": 3.0,
}
EVENT_TYPES: tuple[str, ...] = tuple(EVENT_WEIGHTS)

ITEM_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:/@#-]{1,128}")
EARLIEST_TIMESTAMP = 946_684_800.0  # 2000-01-01: older clocks are wrong clocks
MAX_CLOCK_SKEW_S = 86_400.0  # a device clock may run up to a day fast


@dataclass(frozen=True)
class EventContext:
    """When an interaction happened, in the person's local time."""

    hour: int
    weekday: int  # Monday = 0

    def __post_init__(self) -> None:
        for name, value, top in (("hour", self.hour, 23), ("weekday", self.weekday, 6)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
                raise InvalidEventError(f"context.{name} must be an integer in 0..{top}, got {value!r}")

    @classmethod
    def at(cls, timestamp: float) -> EventContext:
        moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
        return cls(hour=moment.hour, weekday=moment.weekday())


@dataclass(frozen=True)
class Event:
    """One interaction of the person with an item. Validated on construction."""

    item_id: str
    event_type: str = "click"
    timestamp: float = field(default_factory=time.time)
    context: EventContext | None = None

    def __post_init__(self) -> None:
        validate_item_id(self.item_id)
        if self.event_type not in EVENT_WEIGHTS:
            raise InvalidEventError(
                f"event_type {self.event_type!r} is unknown; use one of {', '.join(EVENT_TYPES)}"
            )
        ts = self.timestamp
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise InvalidEventError(f"timestamp must be a finite number of seconds, got {ts!r}")
        if ts < EARLIEST_TIMESTAMP:
            raise InvalidEventError(f"timestamp {ts} is before 2000-01-01: is it in milliseconds?")
        if ts > time.time() + MAX_CLOCK_SKEW_S:
            raise InvalidEventError(f"timestamp {ts} is more than a day in the future")
        if self.context is not None and not isinstance(self.context, EventContext):
            raise InvalidEventError("context must be an EventContext or None")

    @property
    def weight(self) -> float:
        return EVENT_WEIGHTS[self.event_type]

    def resolved_context(self) -> EventContext:
        return self.context if self.context is not None else EventContext.at(self.timestamp)


def validate_item_id(item_id: object) -> str:
    if not isinstance(item_id, str) or not ITEM_ID_PATTERN.fullmatch(item_id):
        raise InvalidEventError(
            f"item_id must be 1-128 characters of letters, digits and _.:/@#-, got {item_id!r}"
        )
    return item_id


def context_features(context: EventContext | None, event_type: str | None) -> torch.Tensor:
    """Features for the context encoder: hour and weekday on the unit circle, one-hot event type.

    ``None`` parts give zeros, which the encoder maps to no shift (it has no bias).
    """
    values = [0.0] * (4 + len(EVENT_TYPES))
    if context is not None:
        hour = 2 * math.pi * context.hour / 24
        day = 2 * math.pi * context.weekday / 7
        values[0:4] = [math.sin(hour), math.cos(hour), math.sin(day), math.cos(day)]
    if event_type is not None:
        values[4 + EVENT_TYPES.index(event_type)] = 1.0
    return torch.tensor(values, dtype=torch.float32)
