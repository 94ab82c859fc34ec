"""Federated evaluation: how the model does on the devices' own events, measured under the same
privacy as training.

When a device records an event while it holds a global model, it first ranks the event's item
among ``NEGATIVES`` other items drawn uniformly from the catalog (the leave-one-out protocol of
He et al. 2017, but with negatives that no other event decides) with the global model and its DP
user vector, before any training saw the event, and keeps the hit and NDCG at 10, and the same
for the popular list (the items ranked by the global model's item bias alone): one row per event,
which depends on that event alone (``attune.client.personalizer``). An **evaluation round**
releases, per device, the sum over its evaluated events of ``[1, hit, ndcg, popular hit,
popular ndcg]`` through the very mechanism of every round
(``attune.shared.mechanism``) on a five-number layout: each event's vector is scaled to L2 norm at
most ``clip`` (one event's "gradient"), so sensitivity, rounding, the per-device bound, noise
shares, the secure sum and the ledger entry are those of any round; its noise multiplier gets its
own share of the budget (``eval_share``).

The coordinator divides the noised sums (post-processing, no further budget): HR@10 is hits over
events, with a 95% interval from the noise it knows was added (the delta method on a ratio of two
noised sums). The interval covers the noise, not the sampling of devices: it is an interval for
the value over the devices that took part.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from attune.shared.layout import Dense, DenseGradient, EventGradients, EventShape, Layout, Param
from attune.shared.metrics import hit_and_ndcg

EVALUATION = "evaluation"
STATISTICS = ("events", "hr@10", "ndcg@10", "popular hr@10", "popular ndcg@10")
EVALUATION_SHAPE: EventShape = (Dense(EVALUATION),)
NEGATIVES = 99  # items ranked against each evaluated event's item
Z95 = 1.959963984540054


def evaluation_layout() -> Layout:
    """An evaluation round's contribution: the five sums of ``STATISTICS``."""
    return Layout((Param(EVALUATION, (len(STATISTICS),)),))


def statistics(model_scores: torch.Tensor, popular_scores: torch.Tensor) -> torch.Tensor:
    """``[events, 5]`` float64: ``[1, hit, ndcg, popular hit, popular ndcg]`` of candidate scores
    ``[events, candidates]`` whose first column is the event's item."""
    hit, ndcg = hit_and_ndcg(model_scores.detach().double().numpy())
    popular_hit, popular_ndcg = hit_and_ndcg(popular_scores.detach().double().numpy())
    columns = [np.ones_like(hit), hit, ndcg, popular_hit, popular_ndcg]
    return torch.from_numpy(np.stack(columns, axis=1))


def evaluation_gradients(stats: torch.Tensor, clip: float) -> EventGradients:
    """Each event's statistics as its "gradient": ``clip / sqrt(5)`` per unit, so its L2 norm is at
    most ``clip`` (all five are in [0, 1])."""
    scale = clip / math.sqrt(len(STATISTICS))
    return EventGradients((DenseGradient(EVALUATION_SHAPE[0], stats.double() * scale),))  # type: ignore[arg-type]


def in_events(total: torch.Tensor, clip: float) -> torch.Tensor:
    """A released sum (dequantized, in gradient units) back in events: the inverse scale."""
    return total.double() * (math.sqrt(len(STATISTICS)) / clip)


@dataclass(frozen=True)
class Estimate:
    """The coordinator's view of one evaluation round: noised totals and the ratios with 95%
    intervals (half-widths, ``nan`` when the noised event count is not positive)."""

    devices: int
    events: float  # noised
    noise_std: float  # of each noised total, in events
    hr: float
    hr_half_width: float
    ndcg: float
    ndcg_half_width: float
    popular_hr: float
    popular_hr_half_width: float
    popular_ndcg: float
    popular_ndcg_half_width: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @property
    def lift(self) -> float:
        """HR@10 over the popular list's, on the same events."""
        return self.hr / self.popular_hr if self.popular_hr > 0 else math.nan


def ratio(numerator: float, events: float, std: float) -> tuple[float, float]:
    """``numerator / events`` and its 95% half-width when both carry independent noise of ``std``
    (delta method: ``std * sqrt(1 + r^2) / events``)."""
    if not events > 0:
        return math.nan, math.nan
    value = numerator / events
    return value, Z95 * std * math.sqrt(1 + value**2) / events


def estimate(totals: torch.Tensor, noise_std: float, devices: int) -> Estimate:
    """The estimate from the five released totals ``totals`` (in events) with noise ``noise_std``."""
    events, *sums = (float(v) for v in totals.reshape(-1))
    values = [ratio(s, events, noise_std) for s in sums]
    return Estimate(devices, events, noise_std, *(x for pair in values for x in pair))
