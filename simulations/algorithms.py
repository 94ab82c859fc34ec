"""Personalization algorithms the fast backend compares (``--algorithm``).

- ``partial-local`` (default, what devices run): the user vector never leaves the device; the
  item side federates (Singhal et al. 2021, "Federated Reconstruction").
- ``global``: FedAvg with no local part. The query vector is one shared vector that federates
  with the item side, so every person gets the same ranking (plus context).
- ``finetune``: ``global`` training, then each device fits its own vector to the final global
  item side on the device (no DP needed: it never leaves).
- ``ditto``: ``partial-local`` training of the global model; each device also keeps a personal
  model, its vector and item biases, fitted to its own events with a pull of strength ``lambda``
  toward the global biases (Li et al. 2021, "Ditto"); on the device, so no DP needed.
- ``ifca``: segment-level personalization (Ghosh et al. 2020, "An Efficient Framework for
  Clustered Federated Learning"): several global models, all starting from the same one. Each
  round a device scores every segment's model on its own events (clipped loss of each event's
  item with its DP vector) and joins one through the exponential mechanism
  (``attune.shared.selection``), so the choice is private and in the device's ledger; it then
  trains that segment's model, partial-local. For ranking, the device uses the segment that fits
  it best (on the device, so no DP needed).

Every algorithm trains the shared part through the same DP local round and accounting; only
where the query vector lives and what the device fits for itself differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from attune.client.training import LocalData, sample_batch
from attune.server.config import ServerConfig
from attune.server.coordinator import participations, planned_train_config
from attune.shared.accounting import calibrate_noise
from attune.shared.config import TrainConfig
from attune.shared.errors import ConfigError
from attune.shared.loss import per_example_loss
from attune.shared.model import Personalization
from attune.shared.selection import choices, private_choice

# Each event's loss in a segment's score is clipped to this, so one event moves a score by at most it.
SEGMENT_LOSS_BOUND = 2.0


@dataclass(frozen=True)
class Algorithm:
    name: str
    shared_query: bool  # the query vector federates (no local part during training)
    local_fit: str  # what a device fits for itself before ranking: "rank", "finetune", "ditto", "none"
    segments: bool = False  # several global models; each device privately joins one per round


ALGORITHMS = {
    "global": Algorithm("global", shared_query=True, local_fit="none"),
    "finetune": Algorithm("finetune", shared_query=True, local_fit="finetune"),
    "partial-local": Algorithm("partial-local", shared_query=False, local_fit="rank"),
    "ditto": Algorithm("ditto", shared_query=False, local_fit="ditto"),
    "ifca": Algorithm("ifca", shared_query=False, local_fit="rank", segments=True),
}


def algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}: use one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def fit_ditto(
    model: Personalization,
    data: LocalData,
    start: torch.Tensor,
    *,
    strength: float = 1.0,
    steps: int = 40,
    lr: float = 0.1,
    negatives: int = 4,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A device's personal vector ``[dim]`` and item biases ``[items]``: its own loss plus
    ``strength / 2 * ||bias - global bias||^2``, from ``start`` and the global biases."""
    global_bias = model.item_bias.weight.detach()[:, 0]
    vector = start.clone().requires_grad_(True)
    bias = global_bias.clone().requires_grad_(True)
    if len(data) == 0:
        return start, global_bias
    optimizer = torch.optim.Adam([vector, bias], lr=lr)
    table = model.item_embedding.weight.detach()
    for _ in range(steps):
        batch = sample_batch(data, 1.0, negatives, model.config.num_items, generator)
        logits = torch.einsum("bmd,d->bm", table[batch.items], vector) + bias[batch.items]
        pull = strength / 2 * (bias - global_bias).pow(2).sum()
        loss = per_example_loss(logits, batch, "bce").mean() + pull
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return vector.detach(), bias.detach()


@dataclass(frozen=True)
class SegmentConfig:
    """IFCA: how many segment models, and the share of each device's budget (in zCDP terms) its
    private choices of segment take, one per round it trains."""

    count: int = 2
    choice_share: float = 0.2

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"segments must be >= 1, got {self.count}")
        if not 0 < self.choice_share < 1:
            raise ConfigError(f"the choice share must be in (0, 1), got {self.choice_share}")


def choice_epsilon(segments: SegmentConfig, server: ServerConfig, num_devices: int) -> float | None:
    """Epsilon of one choice: ``choice_share`` of the zCDP budget that (target epsilon, delta)
    allows, ``rho = (sqrt(eps + log 1/delta) - sqrt(log 1/delta))^2`` (Bun and Steinke 2016),
    split over the rounds a device trains, each choice costing ``epsilon^2 / 8``. With an explicit
    noise multiplier (no target), the share is of epsilon 8's budget. ``None`` without DP: the
    device then simply takes the best-fitting segment."""
    if not server.train.private:
        return None
    target = server.target_epsilon if server.target_epsilon is not None else 8.0
    log_delta = math.log(1 / server.delta)
    rho = (math.sqrt(target + log_delta) - math.sqrt(log_delta)) ** 2
    return math.sqrt(8 * segments.choice_share * rho / participations(server, num_devices))


def train_config(alg: Algorithm, server: ServerConfig, num_devices: int,
                 segments: SegmentConfig) -> TrainConfig:
    """What devices train with: as the coordinator plans it, with the noise recalibrated so that
    a device's segment choices and its training together stay within the target epsilon.
    Algorithms whose query vector federates have no local phase: it trains with the item side."""
    if alg.shared_query:
        server = replace(server, train=replace(server.train, user_epochs=0.0, joint_user=True))
    train = planned_train_config(server, num_devices)
    picking = choice_epsilon(segments, server, num_devices) if alg.segments else None
    if picking is None or server.target_epsilon is None:
        return train
    rounds = participations(server, num_devices)
    sigma = calibrate_noise(epsilon=server.target_epsilon, delta=server.delta,
                            sample_rate=train.sample_rate, steps=rounds * train.steps_per_round,
                            also=choices(picking, rounds))
    return replace(train, noise_multiplier=sigma)


def segment_scores(model: Personalization, states: list[dict[str, torch.Tensor]], data: LocalData,
                   vector: torch.Tensor) -> torch.Tensor:
    """Each segment's fit to the device's events, ``[segments]``: minus the sum over events of
    ``min(softplus(-score of the event's item), SEGMENT_LOSS_BOUND)`` with the vector ``[dim]``.
    Loads each state into ``model`` in turn."""
    scores = []
    for state in states:
        model.load_global_state(state)
        with torch.no_grad():
            query = vector.expand(len(data), -1)
            if data.context is not None and model.config.use_context:
                query = query + model.context_encoder(data.context)
            logits = model.score(query, data.items.unsqueeze(1))[:, 0]
            loss = torch.nn.functional.softplus(-logits).clamp(max=SEGMENT_LOSS_BOUND)
        scores.append(-loss.sum())
    return torch.stack(scores)


def choose_segment(model: Personalization, states: list[dict[str, torch.Tensor]], data: LocalData,
                   vector: torch.Tensor, epsilon: float | None, generator: torch.Generator) -> int:
    """The device's private choice of segment (exponential mechanism, sensitivity the loss bound);
    without DP (``epsilon`` None) the best-fitting one."""
    scores = segment_scores(model, states, data, vector)
    if epsilon is None:
        return int(scores.argmax())
    return private_choice(scores, sensitivity=SEGMENT_LOSS_BOUND, epsilon=epsilon, generator=generator)
