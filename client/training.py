"""The device round, written once for one device or a whole cohort.

A round on a device (``train_round``):
1. when due, refresh its user vector: ``user_steps`` full-batch steps, each the clipped,
   integer-rounded sum of its events' gradients on the vector plus discrete Gaussian noise, a
   step of length ``user_lr`` along the noised direction (post-processing: no size leaks);
2. compute its contribution: the clipped, rounded sum of its events' gradients on the shared
   side, bounded per device, plus its noise share (``attune.shared.mechanism``).

The same function runs a cohort of devices at once (the in-process simulation backend) and one
device (the ClientApp and the SecAgg+ client): events sit in flat tensors with each event's
device, and every random draw comes from that device's own ``Stream`` in a fixed order (negatives,
then noise, per phase), so a device computes the same numbers alone or in a cohort. Nothing
else leaves a round: no count, loss or clipping rate (the coordinator cannot see them).

Per-event gradients on the shared side come in closed form from the per-logit gradients
``g = dL/dlogit`` (no autograd): the model gives them in the parts of its ``EventShape``
(``attune.shared.layout``), whose norms add repeated rows up before squaring; for the user vector
an event's gradient is ``sum_m g_m item_vector_m``. ``tests/test_dp_equivalence`` checks both
against Opacus's per-sample reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attune.shared.config import Loss, RoundConfig, RoundTask
from attune.shared.errors import ConfigError
from attune.shared.evaluation import evaluation_gradients, evaluation_layout
from attune.shared.layout import Dense, DenseGradient, EventGradients, Layout, Param, State
from attune.shared.loss import Batch, logit_gradients, per_example_loss
from attune.shared.mechanism import add_noise, bound, bound_floats, share_std
from attune.shared.model import ModelConfig, SharedModel, dot_scores, shared_model
from attune.shared.randomness import Stream, integers, normal
from attune.shared.selection import count_gradients, count_layout, count_span

USER = "user"  # the refresh step's one parameter, the user vector (never sent)


@dataclass(frozen=True)
class LocalData:
    """One device's training events as tensors (one row per event)."""

    items: torch.Tensor  # long [n]
    weights: torch.Tensor  # float [n]: event-type weight
    context: torch.Tensor | None  # float [n, features]

    def __len__(self) -> int:
        return int(self.items.shape[0])


@dataclass(frozen=True)
class Cohort:
    """Several devices' events in flat tensors: device ``k`` owns rows ``offsets[k]:offsets[k+1]``."""

    items: torch.Tensor  # long [events]
    weights: torch.Tensor  # float [events]
    context: torch.Tensor | None  # float [events, features]
    offsets: torch.Tensor  # long [devices + 1]

    @classmethod
    def of(cls, datasets: list[LocalData]) -> Cohort:
        sizes = torch.tensor([len(d) for d in datasets], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        context = None
        if datasets and all(d.context is not None for d in datasets):
            context = torch.cat([d.context for d in datasets])  # type: ignore[misc]
        return cls(torch.cat([d.items for d in datasets]) if datasets else torch.zeros(0, dtype=torch.long),
                   torch.cat([d.weights for d in datasets]) if datasets else torch.zeros(0),
                   context, offsets)

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def sizes(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def device_of_events(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self)), self.sizes())

    def device(self, k: int) -> LocalData:
        rows = slice(int(self.offsets[k]), int(self.offsets[k + 1]))
        return LocalData(self.items[rows], self.weights[rows],
                         self.context[rows] if self.context is not None else None)


@dataclass(frozen=True)
class RoundOutput:
    """What a round produced: each device's contribution (``[devices, contribution_dim]``; long
    integer units when private, float64 when not) and its user vector afterwards."""

    contributions: torch.Tensor
    users: torch.Tensor  # [devices, dim]


def draw_negatives(cohort: Cohort, config: RoundConfig, num_items: int, streams: list[Stream],
                    among: list[int], pool: torch.Tensor | None = None) -> torch.Tensor:
    """Negative items of every event of the devices in ``among``, each from its own stream:
    uniform over ``pool`` (``SharedModel.negative_pool``; the whole catalog when not given)."""
    pool = torch.arange(num_items) if pool is None else pool
    sizes = cohort.sizes().tolist()
    parts = [integers(streams[k], (sizes[k], config.negatives), len(pool)) for k in among]
    drawn = torch.cat(parts) if parts else torch.zeros(0, config.negatives, dtype=torch.long)
    return pool[drawn]


def _rows(cohort: Cohort, among: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(int(cohort.offsets[k]), int(cohort.offsets[k + 1])) for k in among]) \
        if among else torch.zeros(0, dtype=torch.long)


def _examples(cohort: Cohort, rows: torch.Tensor, negatives: torch.Tensor) -> Batch:
    items = torch.cat([cohort.items[rows].unsqueeze(1), negatives], dim=1)
    labels = torch.zeros(items.shape)
    labels[:, 0] = 1.0
    context = cohort.context[rows] if cohort.context is not None else None
    return Batch(items=items, labels=labels, weights=cohort.weights[rows], context=context)


def refresh_users(state: State, model: SharedModel, users: torch.Tensor, cohort: Cohort,
                   config: RoundConfig, streams: list[Stream], among: list[int]) -> torch.Tensor:
    """``user_steps`` DP steps on the user vectors of the devices in ``among``."""
    users = users.clone()
    rows = _rows(cohort, among)
    position = torch.full((len(cohort),), -1, dtype=torch.long)
    position[torch.tensor(among, dtype=torch.long)] = torch.arange(len(among))
    device = position[cohort.device_of_events()[rows]]
    dim = model.config.dim
    user_layout = Layout((Param(USER, (dim,)),))
    for _ in range(config.user_steps):
        batch = _examples(cohort, rows, draw_negatives(cohort, config, model.config.num_items, streams, among,
                                                        model.negative_pool(state)))
        chosen = users[torch.tensor(among, dtype=torch.long)]
        query = model.query(state, chosen[device], batch.context)
        vectors, bias = model.item_side(state, batch.items)
        logits = dot_scores(query, vectors, bias)
        grads = torch.bmm(logit_gradients(logits, batch, config.loss).unsqueeze(1), vectors).squeeze(1)
        if config.private:
            gradients = EventGradients((DenseGradient(Dense(USER), grads),))
            sums = bound(gradients, user_layout, device, len(among), config, clip=config.user_clip, project=False)
            noisy = add_noise(sums, config.user_noise_multiplier * 2.0**config.quantum_bits,
                              [streams[k] for k in among]).double()
        else:
            noisy = torch.zeros(len(among), dim, dtype=torch.float64).index_add_(0, device, grads.double())
        norms = noisy.norm(dim=1, keepdim=True)
        step = torch.where(norms > 0, noisy / norms.clamp(min=1e-300), torch.zeros_like(noisy))
        users[torch.tensor(among, dtype=torch.long)] = (chosen.double() - config.user_lr * step).to(users.dtype)
    return users


def _contributions(state: State, model: SharedModel, users: torch.Tensor, cohort: Cohort,
                   config: RoundConfig, streams: list[Stream], shares: bool) -> torch.Tensor:
    """Each device's contribution: clipped, rounded, bounded gradient sum plus noise share."""
    count = len(cohort)
    rows = torch.arange(int(cohort.offsets[-1]))
    batch = _examples(cohort, rows, draw_negatives(cohort, config, model.config.num_items, streams,
                                                    list(range(count)), model.negative_pool(state)))
    device = cohort.device_of_events()
    query = model.query(state, users[device], batch.context)
    logits = model.score(state, query, batch.items)
    gradients = model.event_gradients(state, query, batch.items, logit_gradients(logits, batch, config.loss),
                                      batch.context)
    return _release(gradients, model.layout, device, count, config, streams, shares)


def _counts(model: SharedModel, cohort: Cohort, config: RoundConfig, streams: list[Stream],
            shares: bool) -> torch.Tensor:
    """Each device's count round contribution: its events' items in the round's slice of the
    catalog, counted by the same mechanism (``attune.shared.selection``)."""
    start, stop = count_span(model.config.num_items, config.count_part)
    inside = (cohort.items >= start) & (cohort.items < stop)
    gradients = count_gradients(cohort.items[inside] - start, config.clip)
    return _release(gradients, count_layout(model.config.num_items, config.count_part),
                    cohort.device_of_events()[inside], len(cohort), config, streams, shares)


def evaluation_contributions(stats: torch.Tensor, device: torch.Tensor, count: int, config: RoundConfig,
                             streams: list[Stream], shares: bool = True) -> torch.Tensor:
    """Each of ``count`` devices' evaluation round contribution: the statistics ``[events, 5]`` of
    its evaluated events (``device[e]`` owns event ``e``), released by the same mechanism
    (``attune.shared.evaluation``)."""
    return _release(evaluation_gradients(stats, config.clip), evaluation_layout(), device, count, config, streams,
                    shares)


def _release(gradients: EventGradients, layout: Layout, device: torch.Tensor, count: int, config: RoundConfig,
             streams: list[Stream], shares: bool) -> torch.Tensor:
    """Per-event gradients to each device's contribution: clipped, rounded, summed, bounded, plus
    its noise share (not clipped or noised, only bounded, when the round is not private)."""
    if not config.private:
        return bound_floats(gradients.scatter(layout, device, count, torch.float64), config)
    bounded = bound(gradients, layout, device, count, config)
    return add_noise(bounded, share_std(config), streams) if shares else bounded


def initial_user_vector(dim: int, stream: Stream) -> torch.Tensor:
    """A device's first user vector, drawn before it has seen anything: ``N(0, 1/dim)`` each."""
    return normal(stream, (dim,), dim**-0.5).float()


def train_round(state: State, model: ModelConfig, users: torch.Tensor, cohort: Cohort,
                config: RoundConfig, streams: list[Stream], refresh: list[bool], *,
                shares: bool = True) -> RoundOutput:
    """One round for every device of ``cohort`` (``users``: their vectors ``[devices, dim]``;
    ``refresh[k]``: whether device ``k`` refreshes its vector this round). ``shares=False``
    leaves out the noise shares: for a simulator that draws their total itself."""
    if not (len(users) == len(cohort) == len(streams) == len(refresh)):
        raise ConfigError("users, cohort, streams and refresh must describe the same devices")
    shared = shared_model(model)
    if config.task is RoundTask.COUNT:
        return RoundOutput(_counts(shared, cohort, config, streams, shares), users)
    due = [k for k, flag in enumerate(refresh) if flag]
    if due and config.user_steps:
        users = refresh_users(state, shared, users, cohort, config, streams, due)
    return RoundOutput(_contributions(state, shared, users, cohort, config, streams, shares), users)


def fit_rank_vectors(state: State, model: ModelConfig, starts: torch.Tensor, cohort: Cohort,
                     generator: torch.Generator, *, steps: int = 40, lr: float = 0.1,
                     negatives: int = 4, weight_decay: float = 1e-3) -> torch.Tensor:
    """Each device's vector for *ranking only*, fitted without DP against the frozen shared side
    (Adam on each device's mean BCE, from its DP vector). It never shapes anything that leaves
    the device, so it needs no noise. ``[devices, dim]``; devices without events keep their start."""
    count = len(cohort)
    vectors = starts.detach().clone().float().requires_grad_(True)
    if int(cohort.offsets[-1]) == 0 or steps == 0:
        return vectors.detach()
    shared = shared_model(model)
    device = cohort.device_of_events()
    sizes = cohort.sizes().clamp(min=1).float()
    optimizer = torch.optim.Adam([vectors], lr=lr, weight_decay=weight_decay)
    pool = shared.negative_pool(state)
    for _ in range(steps):
        drawn = pool[torch.randint(0, len(pool), (len(device), negatives), generator=generator)]
        columns = torch.cat([cohort.items.unsqueeze(1), drawn], 1)
        labels = torch.zeros(columns.shape)
        labels[:, 0] = 1.0
        batch = Batch(columns, labels, cohort.weights, None)
        logits = shared.score(state, shared.query(state, vectors[device], cohort.context), columns)
        per_event = per_example_loss(logits, batch, Loss.BCE)
        loss = (torch.zeros(count).index_add(0, device, per_event) / sizes).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return vectors.detach()
