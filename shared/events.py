"""Interaction events: their types and weights, validation, and model features.

Shared because the device stores and trains on events and simulations turn datasets into them.
"""

from __future__ import annotations

import math
import numbers
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
# Ranking scores the chance of this interaction (training sees every type in the context features).
RANKED_EVENT_TYPE = "click"

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
        if not isinstance(self.event_type, str) or self.event_type not in EVENT_WEIGHTS:
            raise InvalidEventError(
                f"event_type {self.event_type!r} is unknown; use one of {', '.join(EVENT_TYPES)}"
            )
        ts = self.timestamp
        if isinstance(ts, bool) or not isinstance(ts, numbers.Real):
            raise InvalidEventError(f"timestamp must be a number of seconds, got {ts!r}")
        try:
            ts = float(ts)  # numpy numbers too; 10**400 overflows
        except (OverflowError, ValueError):
            shown = str(self.timestamp)[:40]
            raise InvalidEventError(f"timestamp must be a finite number of seconds, got {shown}") from None
        if not math.isfinite(ts):
            raise InvalidEventError(f"timestamp must be a finite number of seconds, got {ts!r}")
        object.__setattr__(self, "timestamp", ts)
        if ts < EARLIEST_TIMESTAMP:
            raise InvalidEventError(f"timestamp {ts} is before 2000-01-01: is it in milliseconds?")
        if self.context is not None and not isinstance(self.context, EventContext):
            raise InvalidEventError("context must be an EventContext or None")

    @property
    def weight(self) -> float:
        return EVENT_WEIGHTS[self.event_type]

    def resolved_context(self) -> EventContext:
        return self.context if self.context is not None else EventContext.at(self.timestamp)


def check_recordable(event: Event, now: float) -> None:
    """What only recording checks, against the clock at that moment (a store must still read an
    event after the clock moves back): its timestamp is at most a day in the future."""
    if event.timestamp > now + MAX_CLOCK_SKEW_S:
        hint = ": it looks like milliseconds; divide by 1000" if abs(event.timestamp / 1000 - now) < 100 * 365 * 86400 \
            else ""
        raise InvalidEventError(f"timestamp {event.timestamp} is more than a day in the future{hint}")


def validate_item_id(item_id: object) -> str:
    if not isinstance(item_id, str) or not ITEM_ID_PATTERN.fullmatch(item_id):
        raise InvalidEventError(
            f"item_id must be 1-128 characters of letters, digits and _.:/@#-, got {item_id!r}"
        )
    return item_id


def nearest_event_types(weights: torch.Tensor) -> torch.Tensor:
    """Index into ``EVENT_TYPES`` of the type whose weight is closest to each weight (logs that
    carry free weights, such as CSV files, are mapped onto the known types this way)."""
    table = torch.tensor([EVENT_WEIGHTS[kind] for kind in EVENT_TYPES], dtype=torch.float64)
    return (weights.double().unsqueeze(1) - table).abs().argmin(dim=1)


def context_matrix(
    hours: torch.Tensor, weekdays: torch.Tensor, event_types: torch.Tensor | None
) -> torch.Tensor:
    """Context-encoder features, ``[n, 4 + len(EVENT_TYPES)]``: hour and weekday on the unit
    circle, then a one-hot event type (index into ``EVENT_TYPES``; ``None`` or -1 gives zeros).
    """
    hour = 2 * math.pi * hours.double() / 24
    day = 2 * math.pi * weekdays.double() / 7
    features = torch.zeros(hours.shape[0], 4 + len(EVENT_TYPES), dtype=torch.float64)
    features[:, 0], features[:, 1] = hour.sin(), hour.cos()
    features[:, 2], features[:, 3] = day.sin(), day.cos()
    if event_types is not None:
        known = event_types >= 0
        features[known.nonzero().squeeze(1), 4 + event_types[known]] = 1.0
    return features.float()


def context_features(context: EventContext | None, event_type: str | None) -> torch.Tensor:
    """Features of one event (see ``context_matrix``); ``None`` parts give zeros."""
    types = torch.tensor([EVENT_TYPES.index(event_type) if event_type is not None else -1])
    if context is None:
        features = context_matrix(torch.zeros(1), torch.zeros(1), types)[0]
        features[:4] = 0.0
        return features
    return context_matrix(torch.tensor([context.hour]), torch.tensor([context.weekday]), types)[0]
