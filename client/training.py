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

Per-event gradient norms and the clipped sums are in closed form from the per-logit gradients
``g = dL/dlogit`` (no autograd, no ``batch x items x dim`` tensor): for the shared side an
example's squared norm is ``Q (||query||^2 + 1) + ||v||^2 ||x||^2`` with
``Q = sum_{m,m'} g_m g_m' [items_m == items_m']`` (repeated items add up before the norm) and
``v = sum_m g_m item_vector_m``; for the user vector it is ``||v||^2``. ``tests/test_dp_equivalence``
checks both against Opacus's per-sample reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attune.shared.config import RoundConfig
from attune.shared.errors import ConfigError
from attune.shared.loss import Batch, logit_gradients, per_example_loss
from attune.shared.mechanism import (
    add_noise_shares,
    bound_devices,
    bound_floats,
    clip_factors,
    contribution_dim,
    to_units,
)
from attune.shared.model import GLOBAL_PARAMS, ModelConfig
from attune.shared.randomness import Stream, discrete_gaussian, integers, normal
from attune.shared.wire import expected_shapes

GlobalState = dict[str, torch.Tensor]


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


def flatten(state: GlobalState) -> torch.Tensor:
    """The shared parameters as one float64 vector, in ``GLOBAL_PARAMS`` order."""
    return torch.cat([state[name].double().reshape(-1) for name in GLOBAL_PARAMS])


def unflatten(vector: torch.Tensor, model: ModelConfig) -> GlobalState:
    """Inverse of ``flatten`` (float64 views of ``vector``)."""
    out, start = {}, 0
    for name, shape in expected_shapes(model).items():
        size = int(torch.tensor(shape).prod())
        out[name] = vector[start:start + size].reshape(shape)
        start += size
    return out


def _draw_negatives(cohort: Cohort, config: RoundConfig, num_items: int, streams: list[Stream],
                    among: list[int]) -> torch.Tensor:
    """Negative items of every event of the devices in ``among``, each from its own stream."""
    sizes = cohort.sizes().tolist()
    parts = [integers(streams[k], (sizes[k], config.negatives), num_items) for k in among]
    return torch.cat(parts) if parts else torch.zeros(0, config.negatives, dtype=torch.long)


def _rows(cohort: Cohort, among: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(int(cohort.offsets[k]), int(cohort.offsets[k + 1])) for k in among]) \
        if among else torch.zeros(0, dtype=torch.long)


def _examples(cohort: Cohort, rows: torch.Tensor, negatives: torch.Tensor) -> Batch:
    items = torch.cat([cohort.items[rows].unsqueeze(1), negatives], dim=1)
    labels = torch.zeros(items.shape)
    labels[:, 0] = 1.0
    context = cohort.context[rows] if cohort.context is not None else None
    return Batch(items=items, labels=labels, weights=cohort.weights[rows], context=context)


def _queries(state: GlobalState, model: ModelConfig, users: torch.Tensor, device: torch.Tensor,
             batch: Batch) -> torch.Tensor:
    query = users[device].float()
    if model.use_context and batch.context is not None:
        query = query + batch.context @ state["context_encoder.weight"].float().T
    return query


def _refresh_users(state: GlobalState, model: ModelConfig, users: torch.Tensor, cohort: Cohort,
                   config: RoundConfig, streams: list[Stream], among: list[int]) -> torch.Tensor:
    """``user_steps`` DP steps on the user vectors of the devices in ``among``."""
    users = users.clone()
    table, bias = state["item_embedding.weight"].float(), state["item_bias.weight"].float()[:, 0]
    rows = _rows(cohort, among)
    position = torch.full((len(cohort),), -1, dtype=torch.long)
    position[torch.tensor(among, dtype=torch.long)] = torch.arange(len(among))
    device = position[cohort.device_of_events()[rows]]
    for _ in range(config.user_steps):
        batch = _examples(cohort, rows, _draw_negatives(cohort, config, model.num_items, streams, among))
        chosen = users[torch.tensor(among, dtype=torch.long)]
        query = _queries(state, model, chosen, device, batch)
        vectors = table[batch.items]
        logits = torch.bmm(vectors, query.unsqueeze(2)).squeeze(2) + bias[batch.items]
        grads = torch.bmm(logit_gradients(logits, batch, config.loss).unsqueeze(1), vectors).squeeze(1)
        if config.private:
            grads = grads * clip_factors(grads.norm(dim=1), config.user_clip).unsqueeze(1)
            units = to_units(grads * (config.clip / config.user_clip), config)
            sums = torch.zeros(len(among), model.dim, dtype=torch.long).index_add_(0, device, units)
            noisy = _user_noise(sums, config, [streams[k] for k in among]).double()
        else:
            noisy = torch.zeros(len(among), model.dim, dtype=torch.float64).index_add_(0, device, grads.double())
        norms = noisy.norm(dim=1, keepdim=True)
        step = torch.where(norms > 0, noisy / norms.clamp(min=1e-300), torch.zeros_like(noisy))
        users[torch.tensor(among, dtype=torch.long)] = (chosen.double() - config.user_lr * step).to(users.dtype)
    return users


def _user_noise(sums: torch.Tensor, config: RoundConfig, streams: list[Stream]) -> torch.Tensor:
    """Full local noise on a refresh step's sum (the vector never leaves: no shares)."""
    return sums + discrete_gaussian(streams, sums.shape[1], config.user_noise_multiplier * 2.0**config.quantum_bits)


def _contributions(state: GlobalState, model: ModelConfig, users: torch.Tensor, cohort: Cohort,
                   config: RoundConfig, streams: list[Stream], shares: bool) -> torch.Tensor:
    """Each device's contribution: clipped, rounded, bounded gradient sum plus noise share."""
    count, items, dim = len(cohort), model.num_items, model.dim
    everyone = list(range(count))
    rows = torch.arange(int(cohort.offsets[-1]))
    batch = _examples(cohort, rows, _draw_negatives(cohort, config, items, streams, everyone))
    device = cohort.device_of_events()
    table, bias = state["item_embedding.weight"].float(), state["item_bias.weight"].float()[:, 0]
    query = _queries(state, model, users, device, batch)
    vectors = table[batch.items]
    logits = torch.bmm(vectors, query.unsqueeze(2)).squeeze(2) + bias[batch.items]
    grads = logit_gradients(logits, batch, config.loss)
    context = batch.context if model.use_context else None
    query_grads = torch.bmm(grads.unsqueeze(1), vectors).squeeze(1) if context is not None else None
    if config.private:
        same = (batch.items.unsqueeze(2) == batch.items.unsqueeze(1)).to(grads.dtype)
        q = (torch.bmm(same, grads.unsqueeze(2)).squeeze(2) * grads).sum(dim=1)
        squared = q * (query.pow(2).sum(dim=1) + 1.0)
        if context is not None:
            squared = squared + query_grads.pow(2).sum(dim=1) * context.pow(2).sum(dim=1)
        factors = clip_factors(squared.sqrt(), config.clip)
        grads = grads * factors.unsqueeze(1)
        if query_grads is not None:
            query_grads = query_grads * factors.unsqueeze(1)
    width = contribution_dim(model)
    columns = torch.cat([grads.unsqueeze(2) * query.unsqueeze(1), grads.unsqueeze(2)], dim=2)  # [b, m, d + 1]
    values = to_units(columns, config) if config.private else columns.double()
    # flat positions in [devices, width]: row j's coordinate c at j * dim + c, its bias at items * dim + j
    start = (device * width).view(-1, 1, 1)
    embedding = start + (batch.items * dim).unsqueeze(2) + torch.arange(dim)
    positions = torch.cat([embedding, start + items * dim + batch.items.unsqueeze(2)], dim=2)
    sums = torch.zeros(count * width, dtype=values.dtype).index_add_(0, positions.reshape(-1), values.reshape(-1))
    sums = sums.view(count, width)
    if context is not None:
        outer = (query_grads.unsqueeze(2) * context.unsqueeze(1)).reshape(len(device), dim * model.context_features)
        sums[:, items * (dim + 1):].index_add_(0, device, to_units(outer, config) if config.private else outer.double())
    if not config.private:
        return bound_floats(sums, config)
    bounded = bound_devices(sums, config)
    return add_noise_shares(bounded, config, streams) if shares else bounded


def initial_user_vector(dim: int, stream: Stream) -> torch.Tensor:
    """A device's first user vector, drawn before it has seen anything: ``N(0, 1/dim)`` each."""
    return normal(stream, (dim,), dim**-0.5).float()


def train_round(state: GlobalState, model: ModelConfig, users: torch.Tensor, cohort: Cohort,
                config: RoundConfig, streams: list[Stream], refresh: list[bool], *,
                shares: bool = True) -> RoundOutput:
    """One round for every device of ``cohort`` (``users``: their vectors ``[devices, dim]``;
    ``refresh[k]``: whether device ``k`` refreshes its vector this round). ``shares=False``
    leaves out the noise shares: for a simulator that draws their total itself."""
    if not (len(users) == len(cohort) == len(streams) == len(refresh)):
        raise ConfigError("users, cohort, streams and refresh must describe the same devices")
    due = [k for k, flag in enumerate(refresh) if flag]
    if due and config.user_steps:
        users = _refresh_users(state, model, users, cohort, config, streams, due)
    return RoundOutput(_contributions(state, model, users, cohort, config, streams, shares), users)


def fit_rank_vectors(state: GlobalState, model: ModelConfig, starts: torch.Tensor, cohort: Cohort,
                     generator: torch.Generator, *, steps: int = 40, lr: float = 0.1,
                     negatives: int = 4, weight_decay: float = 1e-3) -> torch.Tensor:
    """Each device's vector for *ranking only*, fitted without DP against the frozen shared side
    (Adam on each device's mean BCE, from its DP vector). It never shapes anything that leaves
    the device, so it needs no noise. ``[devices, dim]``; devices without events keep their start."""
    count = len(cohort)
    vectors = starts.detach().clone().float().requires_grad_(True)
    if int(cohort.offsets[-1]) == 0 or steps == 0:
        return vectors.detach()
    table, bias = state["item_embedding.weight"].float(), state["item_bias.weight"].float()[:, 0]
    device = cohort.device_of_events()
    sizes = cohort.sizes().clamp(min=1).float()
    shift = torch.zeros(len(device), model.dim)
    if model.use_context and cohort.context is not None:
        shift = cohort.context @ state["context_encoder.weight"].float().T
    optimizer = torch.optim.Adam([vectors], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        columns = torch.cat([cohort.items.unsqueeze(1),
                             torch.randint(0, model.num_items, (len(device), negatives), generator=generator)], 1)
        labels = torch.zeros(columns.shape)
        labels[:, 0] = 1.0
        batch = Batch(columns, labels, cohort.weights, None)
        logits = torch.bmm(table[columns], (vectors[device] + shift).unsqueeze(2)).squeeze(2) + bias[columns]
        per_event = per_example_loss(logits, batch, "bce")
        loss = (torch.zeros(count).index_add(0, device, per_event) / sizes).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return vectors.detach()
