"""Which items get a trained row: a DP count of the devices' items, then the coordinator's choice.

Noising every row of a large catalog drowns the rows of rarely seen items: their signal is the few
people who touched them, their noise the same as everyone's, and the noise pushes them into every
top 10. So a run with ``ModelConfig.trained_items = K`` starts with a **count round**: each device
releases the histogram of its events' items through the very mechanism of a training round
(``attune.shared.mechanism``) on another layout, one number per catalog item. One event's
"gradient" is ``clip`` on its item's count (L2 norm ``clip``), so the count round's sensitivity,
rounding, per-device bound, noise shares, secure sum and ledger entry are those of any round; its
noise multiplier gets its own share of the budget (``count_share``).

The coordinator then chooses, as post-processing of the released counts (no further budget): the
``K`` most counted items whose estimated count reaches ``min_count`` get rows, and every item's
**prior**, the bias of an item without a row (and the first bias of an item with one), is its
log count against the negatives training will draw: ``log(c_i / (E * m / R))`` for ``E`` counted
events, ``m`` negatives per event and ``R`` trained rows, the bias that binary cross-entropy
against uniformly drawn negatives converges to for an item the model knows nothing else about.
Rarely seen items then rank by their noisy popularity instead of a noisy embedding, and the
device's noise and reply cost ``K`` rows, not the catalog.

A catalog of more than ``SLICE_ITEMS`` items is counted in **slices**, one per round
(``RoundConfig.count_part``), so a device never holds a catalog-sized reply. Each event's item
lies in exactly one slice and each slice's sum is bounded on its own, so adding or removing one
event changes one slice's release only: the slices of one count pass are one mechanism (parallel
composition), paid for once, at its first slice (``attune.client.policy.slice_refusal``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attune.shared.errors import ConfigError
from attune.shared.layout import EventGradients, EventShape, Layout, Param, Rows, RowsGradient

COUNTS = "item_counts"
# Counts under this (in events) are floored for the prior: a log of a noisy count near 0 is noise.
PRIOR_FLOOR = 0.5


SLICE_ITEMS = 1 << 17  # items one count round counts (1 MB of int64 reply)


def count_slices(num_items: int) -> int:
    """Count rounds in one pass over a catalog of ``num_items``."""
    return -(-num_items // SLICE_ITEMS)


def count_span(num_items: int, part: int) -> tuple[int, int]:
    """The items ``[start, stop)`` that count round ``part`` of a pass counts."""
    if not 0 <= part < count_slices(num_items):
        raise ConfigError(f"count part {part} is outside the {count_slices(num_items)} slices of a "
                          f"{num_items}-item catalog")
    return part * SLICE_ITEMS, min(num_items, (part + 1) * SLICE_ITEMS)


def count_layout(num_items: int, part: int = 0) -> Layout:
    """A count round's contribution: one number per item of its slice of the catalog."""
    start, stop = count_span(num_items, part)
    return Layout((Param(COUNTS, (stop - start, 1)),))


COUNT_SHAPE: EventShape = (Rows((COUNTS,), 1),)


def count_gradients(items: torch.Tensor, clip: float) -> EventGradients:
    """Each event adds ``clip`` to its item's count."""
    values = torch.full((len(items), 1, 1), float(clip), dtype=torch.float64)
    return EventGradients((RowsGradient(COUNT_SHAPE[0], items.unsqueeze(1), values),))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Selection:
    """The coordinator's choice from the released counts."""

    row_items: torch.Tensor  # long [K]: the item of each row, most counted first (-1: an unused row)
    prior: torch.Tensor  # float32 [num_items]: every item's prior bias


def select(counts: torch.Tensor, rows: int, *, min_count: float, negatives: int) -> Selection:
    """Rows for the ``rows`` most counted items whose estimated count ``counts`` (float, in events,
    noised) reaches ``min_count``; priors for all (see the module docstring)."""
    counts = counts.double().reshape(-1)
    order = torch.argsort(counts, descending=True, stable=True)
    chosen = order[:rows][counts[order[:rows]] >= min_count]
    row_items = torch.full((rows,), -1, dtype=torch.long)
    row_items[:len(chosen)] = chosen
    floored = counts.clamp(min=PRIOR_FLOOR)
    events = float(counts.clamp(min=0).sum()) or 1.0
    drawn = events * negatives / max(len(chosen), 1)  # how often training draws each row as a negative
    prior = (floored / drawn).log().float()
    return Selection(row_items=row_items, prior=prior)

