"""In-process simulation backend: the same local training and aggregation code, no message passing.

Device state is compact: every device's events in flat arrays, and user vectors and rounds
trained in tensors (``DeviceData``, ``FastState``). Where ``attune.simulations.cohort`` covers
the setup, a round's devices train together in batched steps that compute what each device's
``train_round`` would (tested number for number); otherwise device by device with
``train_round`` itself. Used for quick research loops; the Flower backend
(``runner.simulate``) remains the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from attune.client.training import LocalData, RoundResult, fit_rank_vector, train_round
from attune.server.aggregation import AggregationConfig, aggregate, server_step
from attune.server.checkpoint import Checkpoint, save_checkpoint
from attune.server.config import ServerConfig
from attune.server.coordinator import RoundRecord, aggregation_config, user_noise_multiplier
from attune.server.privacy import UserLevelAccountant
from attune.shared import seeding
from attune.shared.accounting import PrivacyLedger, epsilon_of
from attune.shared.events import (
    EVENT_TYPES,
    EVENT_WEIGHTS,
    RANKED_EVENT_TYPE,
    context_matrix,
    nearest_event_types,
)
from attune.shared.metrics import hit_and_ndcg
from attune.shared.model import Personalization
from attune.shared.seeding import device_seed
from attune.shared.selection import choices
from attune.shared.user_level import clip_update
from attune.simulations.algorithms import (
    Algorithm,
    SegmentConfig,
    algorithm,
    choice_epsilon,
    choose_segment,
    fit_ditto,
    segment_scores,
    train_config,
)
from attune.simulations.cohort import supported, train_cohort
from attune.simulations.datasets import EventLog
from attune.simulations.evaluation import Split
from attune.simulations.report import beyond_accuracy

COHORT_BLOCK = 256  # devices trained together (each holds a copy of the item tables)
_TYPE_WEIGHTS = torch.tensor([EVENT_WEIGHTS[t] for t in EVENT_TYPES])


def _hours_weekdays(timestamps: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    seconds = torch.from_numpy(np.asarray(timestamps, dtype=np.int64))
    return (seconds // 3600) % 24, ((seconds // 86400) + 3) % 7  # 1970-01-01 was a Thursday


@dataclass(frozen=True)
class DeviceData:
    """Every device's training events in flat arrays (device ``u`` owns rows
    ``offsets[u]:offsets[u + 1]``, in its store's order): no Python object per device."""

    items: torch.Tensor  # long [events]
    weights: torch.Tensor  # float [events]
    context: torch.Tensor | None  # float [events, features]
    offsets: torch.Tensor  # long [devices + 1]

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def __getitem__(self, user: int) -> LocalData:
        """One device's events as the device builds them from its store (views, no copies)."""
        rows = slice(int(self.offsets[user]), int(self.offsets[user + 1]))
        return LocalData(items=self.items[rows], weights=self.weights[rows],
                         context=self.context[rows] if self.context is not None else None)

    def sizes(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


def device_datasets(log: EventLog, split: Split, use_context: bool) -> DeviceData:
    """Each user's training events as the device would build them from its store."""
    order = np.lexsort((np.arange(len(log)), log.timestamps, log.users))  # the store's order
    order = torch.from_numpy(order[split.train[order]])
    kinds = nearest_event_types(torch.from_numpy(log.weights)[order])  # as simulations.devices stores them
    context = None
    if use_context:
        hours, days = _hours_weekdays(log.timestamps[order.numpy()])
        context = context_matrix(hours, days, kinds)
    bounds = np.searchsorted(log.users[order.numpy()], np.arange(log.num_users + 1))
    return DeviceData(items=torch.from_numpy(log.items)[order], weights=_TYPE_WEIGHTS[kinds],
                      context=context, offsets=torch.from_numpy(bounds.astype(np.int64)))


@dataclass
class FastState:
    """Every device's state in a few tensors: DP user vector, whether it has trained, and rounds
    trained (with one training config per run, a device's privacy history is ``rounds`` times
    the same round, so its epsilon is ``epsilon_of([(sigma, q, rounds * steps)])``)."""

    users: torch.Tensor  # [num_users, dim]
    trained: torch.Tensor  # bool [num_users]
    rounds: torch.Tensor  # int32 [num_users]


def queries(model: Personalization, users: torch.Tensor, trained: torch.Tensor,
            split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's query at their held-out time: with their own vector, and global-only."""
    hours, days = _hours_weekdays(split.test_times)
    context = torch.zeros(len(hours), model.config.dim)
    if model.config.use_context:
        clicks = torch.full_like(hours, EVENT_TYPES.index(RANKED_EVENT_TYPE))
        with torch.no_grad():
            context = model.context_encoder(context_matrix(hours, days, clicks))
    return users * trained.unsqueeze(1) + context, context


def candidate_scores(model: Personalization, query: torch.Tensor, split: Split,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Scores of each user's candidates ``[users, candidates]``; ``bias`` ``[users, items]``
    replaces the global item biases."""
    candidates = torch.from_numpy(split.candidates)
    with torch.no_grad():
        scores = model.score(query, candidates)
        if bias is not None:
            scores = scores - model.item_bias(candidates)[..., 0] + torch.gather(bias, 1, candidates)
    return scores


def personal_models(alg: Algorithm, model: Personalization, state: FastState, shared: torch.Tensor,
                    datasets: DeviceData, seeds: list[int], min_events: int, ditto_strength: float,
                    among: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What each device ranks with: its vector ``[users, dim]``, whether it has one, and (Ditto)
    its own item biases ``[users, items]``. Only devices in the mask ``among`` are fitted."""
    users, trained = state.users.clone(), state.trained.clone()
    if alg.shared_query:
        users[:], trained[:] = shared, True
    if alg.local_fit == "none":
        return users, trained, None
    bias = model.item_bias.weight.detach()[:, 0].repeat(len(users), 1) if alg.local_fit == "ditto" else None
    fitting = state.trained if not alg.shared_query else datasets.sizes() >= min_events
    if among is not None:
        fitting = fitting & among
    for user in fitting.nonzero().squeeze(1).tolist():
        with torch.no_grad():
            model.user_vector.weight.copy_(users[user])
        generator = seeding.generator(seeds[user], seeding.RANK + int(state.rounds[user]))
        if alg.local_fit == "ditto":
            users[user], bias[user] = fit_ditto(model, datasets[user], users[user], strength=ditto_strength,
                                                generator=generator)
        else:  # "rank" (from the DP vector) or "finetune" (from the shared vector)
            users[user] = fit_rank_vector(model, datasets[user], generator=generator)
    return users, trained, bias


def simulate_fast(
    log: EventLog,
    split: Split,
    server: ServerConfig,
    min_events: int = 5,
    budget: float | None = None,
    rank_fit: bool = True,
    on_round: Callable[[RoundRecord], None] | None = None,
    availability: float = 1.0,
    algorithm_name: str = "partial-local",
    ditto_strength: float = 1.0,
    evaluate_every_round: bool = True,
    segments: SegmentConfig = SegmentConfig(),
) -> dict[str, object]:
    """Run the simulation; returns the final model's metrics beyond HR/NDCG (``report``)."""
    torch.set_num_threads(1)
    alg = algorithm(algorithm_name)
    count = segments.count if alg.segments else 1
    model = Personalization(server.model, generator=torch.Generator().manual_seed(server.seed))
    currents = [model.global_state() for _ in range(count)]  # IFCA: the same start for every segment
    shared = torch.zeros(server.model.dim)
    train = train_config(alg, server, log.num_users, segments)
    picking = choice_epsilon(segments, server, log.num_users) if alg.segments else None  # IFCA, DP
    datasets = device_datasets(log, split, server.model.use_context)
    seeds = [device_seed(server.seed, user) for user in range(log.num_users)]
    state = FastState(users=torch.zeros(log.num_users, server.model.dim),
                      trained=torch.zeros(log.num_users, dtype=torch.bool),
                      rounds=torch.zeros(log.num_users, dtype=torch.int32))
    steps = [server_step(server.server_optimizer, server.server_lr) for _ in range(count)]
    # the cohort's rounds in batched steps when that computes what train_round does (simulations.cohort)
    batched = count == 1 and not alg.shared_query and supported(server.model, train)

    @functools.cache
    def spent(rounds: int) -> float:
        """A device's epsilon after ``rounds`` rounds (what its ledger would say)."""
        return epsilon_of(history_of(rounds), server.delta)

    def history_of(rounds: int) -> list[tuple[float, float, int]]:
        picked = choices(picking, rounds) if picking is not None else []
        return [(train.noise_multiplier, train.sample_rate, rounds * train.steps_per_round), *picked]
    z = user_noise_multiplier(server, log.num_users) if server.user_level_dp else 0.0
    aggregation = aggregation_config(server, z)
    accountant = UserLevelAccountant(z, server.user_delta, server.user_target_epsilon) if z > 0 else None
    rng = np.random.default_rng(server.seed)
    per_round = server.clients_per_round or log.num_users
    history = []
    for server_round in range(1, server.rounds + 1):
        cohort = np.sort(rng.choice(log.num_users, size=min(per_round, log.num_users), replace=False))
        if accountant is not None and not accountant.admits(len(cohort), log.num_users):
            break
        accepted, losses, trained_now = [], [], []
        online = np.ones(len(cohort), dtype=bool)
        if availability < 1:  # each sampled device is online this round or not
            online = rng.random(len(cohort)) < availability
        devices = [user for user in cohort[online].tolist() if len(datasets[user]) >= min_events and not (
            train.private and budget is not None and spent(int(state.rounds[user]) + 1) > budget)]
        # exactly what Personalizer.train does on a device: start vector, then the local round
        starts = {user: _start_vector(alg, state, shared, seeds[user], user) for user in devices}
        generators = {user: seeding.generator(seeds[user], seeding.TRAIN + int(state.rounds[user]))
                      for user in devices}
        trained: list[tuple[int, int, RoundResult, torch.Tensor]] = []  # device, segment, result, vector
        if batched:
            for first in range(0, len(devices), COHORT_BLOCK):
                block = devices[first:first + COHORT_BLOCK]
                results, vectors = train_cohort(
                    currents[0], torch.stack([starts[u] for u in block]), [datasets[u] for u in block],
                    train, [generators[u] for u in block])
                trained += [(u, 0, r, v) for u, r, v in zip(block, results, vectors, strict=True)]
        else:
            for user in devices:
                segment = 0
                if count > 1:
                    pick = seeding.generator(seeds[user], seeding.SEGMENT + int(state.rounds[user]))
                    segment = choose_segment(model, currents, datasets[user], starts[user], picking, pick)
                model.load_global_state(currents[segment])
                with torch.no_grad():
                    model.user_vector.weight.copy_(starts[user])
                result = train_round(model, datasets[user], train, PrivacyLedger(), generators[user])
                if alg.shared_query:  # the query vector's change is part of what is sent
                    vector_change = model.user_vector.weight.detach() - shared
                    update = {**result.update, "user_vector.weight": vector_change}
                    if train.update_clip > 0:
                        update, _ = clip_update(update, train.update_clip)
                    result = replace(result, update=update)
                trained.append((user, segment, result, model.user_vector.weight.detach()[0].clone()))
        for user, segment, result, vector in trained:
            state.users[user] = vector
            state.trained[user] = True
            state.rounds[user] += 1
            trained_now.append(user)
            accepted.append((segment, result.update, float(result.examples)))
            losses.append((result.mean_loss, result.examples))
        for segment in range(count):
            updates = [(update, n) for k, update, n in accepted if k == segment]
            if not updates:
                continue
            mean = aggregate(_segment_aggregation(aggregation, segment), server_round, updates)
            if alg.shared_query:  # every example moves it: the plain mean, as the context encoder
                shared = shared + mean.pop("user_vector.weight")[0].float()
            currents[segment] = steps[segment].step(currents[segment], mean)
        if accountant is not None:
            accountant.record(len(cohort), log.num_users)
        eps = [spent(int(state.rounds[u])) for u in trained_now] if train.private else []
        if server.out_dir is not None:
            for segment in range(count):
                folder = "checkpoints" if count == 1 else f"checkpoints/segment-{segment}"
                save_checkpoint(server.out_dir / folder, Checkpoint(
                    server_round, currents[segment], steps[segment].state_dict(),
                    accountant.ledger.state_dict() if accountant is not None else None))
        hr = ndcg = float("nan")
        if evaluate_every_round or server_round == server.rounds:
            ranking = _rank_with(alg, model, state, shared, currents, datasets, seeds, min_events,
                                 ditto_strength, rank_fit, split)
            hits, gains = hit_and_ndcg(ranking.scores.numpy())
            hr, ndcg = float(hits.mean()), float(gains.mean())
        total = sum(n for _, n in losses) or 1
        done = RoundRecord(round=server_round,
                           train={"loss": sum(v * n for v, n in losses) / total,
                                  "epsilon-max": max(eps, default=0.0),
                                  "steps-max": float(int(state.rounds.max()) * train.steps_per_round),
                                  "sample-rate-max": train.sample_rate,
                                  "devices-trained": float(len(accepted)),
                                  **({"user-epsilon": accountant.epsilon()} if accountant else {})},
                           evaluate={"hr@10": hr, "ndcg@10": ndcg})
        history.append(done)
        if on_round is not None:
            on_round(done)
    if len(history) < server.rounds:  # stopped early (budget): the report needs the final round
        return {}
    tables = torch.stack([c["item_embedding.weight"] for c in currents]).numpy()
    segment = ranking.segment.numpy()
    biases = torch.stack([c["item_bias.weight"][:, 0] for c in currents])
    global_bias = biases[0] if count == 1 else biases[ranking.segment]  # [items] or [users, items]
    item_bias = global_bias if ranking.bias is None else ranking.bias
    return {"algorithm": alg.name, **({"segments": np.bincount(segment, minlength=count).tolist()}
                                      if alg.segments else {}),
            **beyond_accuracy(log, split, tables, item_bias.numpy(), ranking.personal.numpy(),
                              ranking.global_only.numpy(), global_bias=global_bias.numpy(),
                              segments=segment)}


def _start_vector(alg: Algorithm, state: FastState, shared: torch.Tensor, seed: int,
                  user: int) -> torch.Tensor:
    """The user vector a device starts its round from: the shared one, its own, or a seeded draw."""
    if alg.shared_query:
        return shared
    if state.trained[user]:
        return state.users[user]
    init = seeding.generator(seed, seeding.USER_INIT)
    return torch.empty(state.users.shape[1]).normal_(0.0, state.users.shape[1] ** -0.5, generator=init)


def _segment_aggregation(config: AggregationConfig, segment: int) -> AggregationConfig:
    """Each segment's aggregate gets its own noise (a seeded simulation would repeat it otherwise)."""
    if segment == 0 or config.noise_seed is None:
        return config
    return replace(config, noise_seed=config.noise_seed + 7_919 * segment)


@dataclass(frozen=True)
class Ranking:
    """How every device ranks at the end of a round: scores of its 100 candidates, its segment,
    query vectors with and without its own vector, and (Ditto) its own item biases."""

    scores: torch.Tensor  # [users, candidates]
    segment: torch.Tensor  # long [users]
    personal: torch.Tensor  # [users, dim]
    global_only: torch.Tensor  # [users, dim]
    bias: torch.Tensor | None  # [users, items]


def _rank_with(alg: Algorithm, model: Personalization, state: FastState, shared: torch.Tensor,
               currents: list[dict[str, torch.Tensor]], datasets: DeviceData, seeds: list[int],
               min_events: int, ditto_strength: float, rank_fit: bool, split: Split) -> Ranking:
    """Each device ranks with the segment model that fits its own events best (on the device,
    so no DP), its personal vector fitted to that model, and (Ditto) its own biases."""
    segment = torch.zeros(len(datasets), dtype=torch.long)
    if len(currents) > 1:
        for user in range(len(datasets)):
            segment[user] = int(segment_scores(model, currents, datasets[user], state.users[user]).argmax())
    scores = torch.empty(split.candidates.shape, dtype=torch.float32)
    personal = torch.empty_like(state.users)
    global_only = torch.empty_like(state.users)
    bias = None
    for k, weights in enumerate(currents):
        among = segment == k
        model.load_global_state(weights)
        if rank_fit or alg.local_fit != "rank":
            users, trained, own_bias = personal_models(alg, model, state, shared, datasets, seeds,
                                                       min_events, ditto_strength, among)
        else:
            users, trained, own_bias = state.users, state.trained, None
        query, plain = queries(model, users, trained, split)
        if alg.shared_query:  # the global model of these algorithms includes the shared vector
            plain = plain + shared
        scores[among] = candidate_scores(model, query, split, own_bias)[among]
        personal[among], global_only[among] = query[among], plain[among]
        if own_bias is not None:
            bias = own_bias if bias is None else torch.where(among.unsqueeze(1), own_bias, bias)
    return Ranking(scores, segment, personal, global_only, bias)
