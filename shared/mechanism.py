"""The privacy mechanism of a device's contribution: bound its sensitivity, then add noise.

Unit of privacy: one event. Neighbouring data sets differ by adding or removing one event of
one device. In a round a device releases (to the secure sum, or to the coordinator in ``local``
mode) one vector ``w + noise`` over the shared parameters (``contribution_dim``):

1. **Sensitivity** (``bound``). Each event's gradient on the shared side is clipped to L2 norm
   ``clip`` (in float64) and scaled to integer units (``2**quantum_bits`` per ``clip``), and
   rounded to the nearest integer (each part of its gradient: the rows of the event's item and
   its negatives, a context block). The device sums its events' integer gradients into ``z`` and
   projects ``z`` onto the L2 ball of radius ``device_norm`` clips, truncating toward zero, so
   ``|w| <= device_bound`` holds exactly (rounding could overshoot it). One event then moves
   ``w`` by at most ``sensitivity``: its clipped gradient, plus half a unit per rounded
   coordinate of the event (triangle inequality over its parts), plus under one unit per
   coordinate of the projection's truncation (the projection itself is 1-Lipschitz). Both bounds
   are checked on what is about to be sent; a contribution outside them (NaN gradients, say)
   is refused with ``PrivacyError`` and the round ends as a decline.
2. **Noise** (``add_noise``). The device adds discrete Gaussian noise of std ``share_std`` to every coordinate:
   ``noise_multiplier * 2**bits / sqrt(honest_shares)``. In ``distributed`` mode any
   ``honest_shares = min_survivors - colluders`` shares sum to the full noise; in ``local`` mode
   a device's own share is the full noise.

What the coordinator sees is then the distributed discrete Gaussian mechanism (Kairouz, Liu and
Steinke 2021) on a sum with L2 sensitivity ``sensitivity``; ``round_entries`` writes it into the
device's ledger, together with the refreshes of its user vector (the same clip-round-noise on the
vector's gradient, full noise on the device, never sent). The user vector shapes the gradients,
so its refreshes are accounted as part of every round's release (adaptive composition).
Integer data plus integer noise: nothing here is exposed to floating-point attacks on noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from attune.shared.accounting import DiscreteGaussianSum, Entry, calibrate, distributed_tau
from attune.shared.config import RoundConfig, RoundTask
from attune.shared.errors import ConfigError, PrivacyError
from attune.shared.evaluation import EVALUATION_SHAPE, evaluation_layout
from attune.shared.layout import EventGradients, Layout, rounding_bound
from attune.shared.model import ModelConfig, shared_model
from attune.shared.randomness import Stream, add_discrete_gaussian
from attune.shared.selection import COUNT_SHAPE, count_layout

# Opacus adds this to norms before dividing (optimizers/optimizer.py); kept identical so Attune's
# closed-form clipping and Opacus's reference per-sample path clip by exactly the same factor.
NORM_EPS = 1e-6


def layout_of(model: ModelConfig, task: RoundTask = RoundTask.TRAIN, part: int = 0) -> Layout:
    """What a round's contribution covers: the model's trained parameters, in a count round one
    count per item of its slice of the catalog (``attune.shared.selection``), in an evaluation
    round five sums (``attune.shared.evaluation``)."""
    if task is RoundTask.COUNT:
        return count_layout(model.num_items, part)
    return evaluation_layout() if task is RoundTask.EVALUATE else shared_model(model).layout


def contribution_dim(model: ModelConfig, config: RoundConfig | RoundTask = RoundTask.TRAIN) -> int:
    """Length of a contribution to a round of ``config`` (or of a task, first slice): its layout
    flattened."""
    if isinstance(config, RoundTask):
        return layout_of(model, config).size
    return layout_of(model, config.task, config.count_part).size


def units(config: RoundConfig) -> float:
    """Integer units per unit of gradient: one ``clip`` is ``2**quantum_bits`` units."""
    return 2.0**config.quantum_bits / config.clip


def event_rounding(model: ModelConfig, config: RoundConfig) -> float:
    """Bound on the L2 norm of one event's rounding error, in units: half a unit on every number
    of every part its gradient touches (``EventShape``: for the embedding model, the ``dim + 1``
    numbers of each of its ``1 + negatives`` items, and the context block)."""
    if config.task is not RoundTask.TRAIN:
        shape = COUNT_SHAPE if config.task is RoundTask.COUNT else EVALUATION_SHAPE
        return rounding_bound(layout_of(model, config.task, config.count_part), shape)
    shared = shared_model(model)
    return rounding_bound(shared.layout, shared.event_shape(config.negatives))


def sensitivity(model: ModelConfig, config: RoundConfig) -> float:
    """L2 change of a device's released vector (before noise) when one event is added or removed."""
    return 2.0**config.quantum_bits + event_rounding(model, config) + math.sqrt(contribution_dim(model, config))


def user_sensitivity(model: ModelConfig, config: RoundConfig) -> float:
    """The same for one refresh step of the user vector (``dim`` coordinates, one column)."""
    return 2.0**config.quantum_bits + math.sqrt(model.dim) / 2


def device_bound(config: RoundConfig) -> float:
    """L2 bound of one device's contribution before noise, in units."""
    return config.device_norm * 2.0**config.quantum_bits


def share_std(config: RoundConfig) -> float:
    """Std of the discrete Gaussian noise one device adds to each coordinate, in units."""
    return config.noise_multiplier * 2.0**config.quantum_bits / math.sqrt(config.honest_shares)


def round_entries(model: ModelConfig, config: RoundConfig, refresh: bool) -> list[Entry]:
    """Ledger entries of one round: what the coordinator's view of it costs the device."""
    if not config.private:
        return []
    honest = config.honest_shares
    entries = [Entry(DiscreteGaussianSum(z=config.noise_multiplier * 2.0**config.quantum_bits
                                         / sensitivity(model, config),
                                         tau=distributed_tau(share_std(config), honest),
                                         dim=contribution_dim(model, config)))]
    if refresh and config.user_steps:
        entries.append(user_entry(model, config))
    return entries


def smallest_z(model: ModelConfig, config: RoundConfig) -> float:
    """The smallest accounted noise multiplier (noise std over true sensitivity) among a private
    round's mechanisms: its released sum and, when it has any, a refresh step. What a device's
    floor is checked on, so "no one round takes much of the budget" holds at any grid."""
    return min(entry.mechanism.z for entry in round_entries(model, config, refresh=config.task is RoundTask.TRAIN)
               if isinstance(entry.mechanism, DiscreteGaussianSum))


def user_entry(model: ModelConfig, config: RoundConfig) -> Entry:
    """A refresh of the user vector: ``user_steps`` discrete Gaussian steps, full noise."""
    return Entry(DiscreteGaussianSum(
        z=config.user_noise_multiplier * 2.0**config.quantum_bits / user_sensitivity(model, config), dim=model.dim),
        count=config.user_steps)


def local_entries(model: ModelConfig, config: RoundConfig, refresh: bool) -> list[Entry]:
    """What one device's own contribution reveals alone (its share only, no other device's):
    the weaker guarantee ``epsilon_local`` reported beside ``epsilon`` in distributed mode."""
    if not config.private:
        return []
    entries = [Entry(DiscreteGaussianSum(z=share_std(config) / sensitivity(model, config),
                                         dim=contribution_dim(model, config)))]
    if refresh and config.user_steps:
        entries.append(user_entry(model, config))
    return entries


def clip_factors(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """Opacus's flat clipping factor ``min(1, clip / (norm + 1e-6))``."""
    return (clip / (norms + NORM_EPS)).clamp(max=1.0)


def to_units(values: torch.Tensor, config: RoundConfig, clip: float | None = None) -> torch.Tensor:
    """Clipped gradient values in integer units (long), rounded to the nearest integer: one
    ``clip`` (the round's, unless given) is ``2**quantum_bits`` units."""
    return torch.round(values.double() * (2.0**config.quantum_bits / (clip or config.clip))).long()


def bound(gradients: EventGradients, layout: Layout, device: torch.Tensor, devices: int, config: RoundConfig, *,
          clip: float | None = None, project: bool = True) -> torch.Tensor:
    """Step 1, the sensitivity: each event's gradient clipped to L2 ``clip`` (the round's unless
    given; in float64, so the clip holds on the integer grid at any ``quantum_bits``), rounded to
    integer units, summed per device (``device[e]`` owns event ``e``), and, with ``project``,
    each device's sum projected onto the ball of ``device_bound`` by truncating toward zero, so its
    norm never exceeds the bound (rounding could). ``[devices, layout.size]`` long. Whatever
    produced the gradients, a sum outside these bounds is refused (``PrivacyError``), never sent."""
    clip = clip or config.clip
    gradients = gradients.map(lambda values: values.double())
    factors = clip_factors(gradients.squared_norms().clamp(min=0.0).sqrt(), clip)
    clipped = gradients.map(lambda values: values * factors.view(-1, *[1] * (values.dim() - 1)))
    norms = clipped.squared_norms().clamp(min=0.0).sqrt()
    if not bool((norms <= clip * (1 + 1e-9)).all()):  # NaN fails too
        raise PrivacyError("an event's clipped gradient is not within its bound: nothing is sent")
    sums = clipped.map(lambda values: to_units(values, config, clip)).scatter(layout, device, devices, torch.long)
    if project:
        sums = _project(sums, device_bound(config))
        if not bool((_row_norms(sums) <= device_bound(config)).all()):
            raise PrivacyError("a device's sum is not within its bound: nothing is sent")
    return sums


_COLUMNS = 1 << 16  # columns per pass over the devices' sums: no float64 copy of a catalog-wide count


def _row_norms(sums: torch.Tensor) -> torch.Tensor:
    """Each row's L2 norm in float64, a slice of columns at a time."""
    squares = torch.zeros(len(sums), dtype=torch.float64)
    for start in range(0, sums.shape[1], _COLUMNS):
        squares += sums[:, start:start + _COLUMNS].double().square().sum(dim=1)
    return squares.sqrt()


def _project(sums: torch.Tensor, radius: float) -> torch.Tensor:
    """Rows of integer ``sums`` over ``radius`` in L2 scaled onto it and truncated toward zero
    (1-Lipschitz, then under one unit of change per coordinate; the norm never grows), in place."""
    norms = _row_norms(sums)
    for row in (norms > radius).nonzero().flatten().tolist():
        scale = radius / float(norms[row])
        for start in range(0, sums.shape[1], _COLUMNS):
            part = sums[row, start:start + _COLUMNS]
            part.copy_(torch.trunc(part.double() * scale).long())
    return sums


def add_noise(bounded: torch.Tensor, std: float, streams: list[Stream]) -> torch.Tensor:
    """Step 2: each device's bounded sum (row) plus discrete Gaussian noise of ``std`` from its own
    stream, added in place (``bounded`` becomes the noised sum: a catalog-wide count round holds
    one array, not three)."""
    return add_discrete_gaussian(bounded, streams, std)


def bound_floats(sums: torch.Tensor, config: RoundConfig) -> torch.Tensor:
    """Non-private contributions are bounded too (``device_norm * clip``): one device never
    moves the sum by more, whatever it sends."""
    norms = sums.norm(dim=1, keepdim=True)
    return sums * (config.device_norm * config.clip / norms.clamp(min=1e-300)).clamp(max=1.0)


def dequantize(total: torch.Tensor, config: RoundConfig) -> torch.Tensor:
    """A released integer sum back in gradient units (float64)."""
    return total.double() / units(config)


def planned_entries(model: ModelConfig, config: RoundConfig, participations: int, *,
                    local: bool = False, count: RoundConfig | None = None, counts: int = 1,
                    evaluation: RoundConfig | None = None, evaluations: int = 0) -> list[Entry]:
    """The ledger of a device that joins ``counts`` count rounds ``count`` (if any),
    ``participations`` training rounds (what noise is planned for) and ``evaluations`` evaluation
    rounds ``evaluation``; ``local``: what its own contributions alone reveal (``local_entries``)."""
    if not config.private:
        return []
    release = local_entries if local else round_entries
    entries = [e.times(counts) for e in release(model, count, refresh=False)] if count is not None and counts else []
    if evaluation is not None and evaluations:
        entries += [e.times(evaluations) for e in release(model, evaluation, refresh=False)]
    if participations == 0:
        return entries
    entries += [entry.times(participations) for entry in release(model, config, refresh=False)]
    refreshes = config.refreshes(participations)
    if refreshes:
        entry = user_entry(model, config)
        entries.append(entry.times(entry.count * refreshes))
    return entries


@dataclass(frozen=True)
class Side:
    """A round other than training that a run plans (a count or an evaluation round): its config,
    how many of them a device joins, and its share of the budget (zCDP; 0: its noise is kept)."""

    config: RoundConfig
    times: int
    share: float


def calibrated(model: ModelConfig, config: RoundConfig, *, epsilon: float, delta: float, participations: int,
               user_share: float, count: Side | None = None,
               evaluation: Side | None = None) -> tuple[RoundConfig, RoundConfig | None, RoundConfig | None]:
    """``config``, the count round and the evaluation rounds with their noise multipliers set so
    that all the rounds a device is planned to join spend ``epsilon``: in zCDP terms the
    user-vector refreshes get ``user_share`` of the budget, the count and the evaluations their
    ``share``, the released training sums the rest (one common scale, solved by bisection against
    the ledger). The split is on the accounted ``z`` (noise over true sensitivity, rounding
    included), so it holds at any ``quantum_bits``."""
    if not config.private:
        return config, None if count is None else count.config, None if evaluation is None else evaluation.config
    refresh_steps = config.refreshes(participations) * config.user_steps
    user = user_share if refresh_steps else 0.0
    sides = [side for side in (count, evaluation) if side is not None and side.times]
    taken = sum(side.share for side in sides)
    if not (0 <= user and all(side.share >= 0 for side in sides) and user + taken < 1):
        raise ConfigError(f"user_share ({user_share}), count_share and eval_share must be >= 0 and leave a share "
                          "for training")

    def multiplier(z: float, of: float, round_config: RoundConfig) -> float:  # z = multiplier * 2**bits / of
        return z * of / 2.0**round_config.quantum_bits

    def side_at(scale: float, side: Side | None, user_noise: float) -> RoundConfig | None:
        if side is None:
            return None
        noise = multiplier(scale * math.sqrt(side.times / (2 * side.share)), sensitivity(model, side.config),
                           side.config) if side.times and side.share else side.config.noise_multiplier
        return replace(side.config, noise_multiplier=noise, user_noise_multiplier=user_noise)

    def at(scale: float) -> tuple[RoundConfig, RoundConfig | None, RoundConfig | None]:
        item = multiplier(scale * math.sqrt(participations / (2 * (1 - user - taken))), sensitivity(model, config),
                          config)
        user_noise = multiplier(scale * math.sqrt(refresh_steps / (2 * user)), user_sensitivity(model, config),
                                config) if user else config.user_noise_multiplier
        return (replace(config, noise_multiplier=item, user_noise_multiplier=user_noise),
                side_at(scale, count, user_noise), side_at(scale, evaluation, user_noise))

    def ledger(scale: float) -> list[Entry]:
        train, counting, evaluating = at(scale)
        return planned_entries(model, train, participations, count=counting, counts=count.times if count else 0,
                               evaluation=evaluating, evaluations=evaluation.times if evaluation else 0)

    scale = calibrate(ledger, epsilon, delta)
    return at(scale)
