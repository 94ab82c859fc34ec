"""In-process simulation backend: the same local training and aggregation code, no message passing.

Device state is compact: every device's events in flat arrays, and user vectors and rounds
trained in tensors (``DeviceData``, ``FastState``). Used for quick
research loops; the Flower backend (``runner.simulate``) remains the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from attune.client.training import LocalData, fit_rank_vector, train_round
from attune.server.aggregation import aggregate, server_step
from attune.server.checkpoint import Checkpoint, save_checkpoint
from attune.server.config import ServerConfig
from attune.server.coordinator import (
    RoundRecord,
    aggregation_config,
    planned_train_config,
    user_noise_multiplier,
)
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
from attune.shared.user_level import clip_update
from attune.simulations.algorithms import Algorithm, algorithm, fit_ditto
from attune.simulations.datasets import EventLog
from attune.simulations.evaluation import Split
from attune.simulations.report import beyond_accuracy

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


def evaluate(model: Personalization, query: torch.Tensor, split: Split,
             bias: torch.Tensor | None = None) -> tuple[float, float]:
    """Mean HR@10 / NDCG@10; ``bias`` ``[users, items]`` replaces the global item biases."""
    candidates = torch.from_numpy(split.candidates)
    with torch.no_grad():
        scores = model.score(query, candidates)
        if bias is not None:
            scores = scores - model.item_bias(candidates)[..., 0] + torch.gather(bias, 1, candidates)
    hit, ndcg = hit_and_ndcg(scores.numpy())
    return float(hit.mean()), float(ndcg.mean())


def personal_models(alg: Algorithm, model: Personalization, state: FastState, shared: torch.Tensor,
                    datasets: DeviceData, seeds: list[int], min_events: int, ditto_strength: float,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What each device ranks with: its vector ``[users, dim]``, whether it has one, and (Ditto)
    its own item biases ``[users, items]``."""
    users, trained = state.users.clone(), state.trained.clone()
    if alg.shared_query:
        users[:], trained[:] = shared, True
    if alg.local_fit == "none":
        return users, trained, None
    bias = model.item_bias.weight.detach()[:, 0].repeat(len(users), 1) if alg.local_fit == "ditto" else None
    fitting = state.trained if not alg.shared_query else datasets.sizes() >= min_events
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
) -> dict[str, object]:
    """Run the simulation; returns the final model's metrics beyond HR/NDCG (``report``)."""
    torch.set_num_threads(1)
    alg = algorithm(algorithm_name)
    if alg.shared_query:  # no local phase: the query vector trains with the item side and federates
        server = replace(server, train=replace(server.train, user_epochs=0.0, joint_user=True))
    model = Personalization(server.model, generator=torch.Generator().manual_seed(server.seed))
    current = model.global_state()
    shared = torch.zeros(server.model.dim)
    train = planned_train_config(server, log.num_users)
    datasets = device_datasets(log, split, server.model.use_context)
    seeds = [device_seed(server.seed, user) for user in range(log.num_users)]
    state = FastState(users=torch.zeros(log.num_users, server.model.dim),
                      trained=torch.zeros(log.num_users, dtype=torch.bool),
                      rounds=torch.zeros(log.num_users, dtype=torch.int32))
    step = server_step(server.server_optimizer, server.server_lr)

    @functools.cache
    def spent(rounds: int) -> float:
        """A device's epsilon after ``rounds`` rounds (what its ledger would say)."""
        return epsilon_of([(train.noise_multiplier, train.sample_rate, rounds * train.steps_per_round)],
                          server.delta)
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
        for user in cohort[online].tolist():
            data = datasets[user]
            if len(data) < min_events:
                continue
            if train.private and budget is not None and spent(int(state.rounds[user]) + 1) > budget:
                continue
            # exactly what Personalizer.train does on a device
            model.load_global_state(current)
            with torch.no_grad():
                if alg.shared_query:
                    model.user_vector.weight.copy_(shared)
                elif state.trained[user]:
                    model.user_vector.weight.copy_(state.users[user])
                else:
                    init = seeding.generator(seeds[user], seeding.USER_INIT)
                    model.user_vector.weight.normal_(0.0, server.model.dim**-0.5, generator=init)
            generator = seeding.generator(seeds[user], seeding.TRAIN + int(state.rounds[user]))
            result = train_round(model, data, train, PrivacyLedger(), generator)
            update = result.update
            if alg.shared_query:  # the query vector's change is part of what is sent
                update = {**update, "user_vector.weight": model.user_vector.weight.detach() - shared}
                if train.update_clip > 0:
                    update, _ = clip_update(update, train.update_clip)
            state.users[user] = model.user_vector.weight.detach()[0]
            state.trained[user] = True
            state.rounds[user] += 1
            trained_now.append(user)
            accepted.append((update, float(result.examples)))
            losses.append((result.mean_loss, result.examples))
        if accepted:
            mean = aggregate(aggregation, server_round, accepted)
            if alg.shared_query:  # every example moves it: the plain mean, as the context encoder
                shared = shared + mean.pop("user_vector.weight")[0].float()
            current = step.step(current, mean)
        if accountant is not None:
            accountant.record(len(cohort), log.num_users)
        model.load_global_state(current)
        eps = [spent(int(state.rounds[u])) for u in trained_now] if train.private else []
        if server.out_dir is not None:
            save_checkpoint(server.out_dir / "checkpoints", Checkpoint(
                server_round, current, step.state_dict(),
                accountant.ledger.state_dict() if accountant is not None else None))
        hr = ndcg = float("nan")
        if evaluate_every_round or server_round == server.rounds:
            if rank_fit or alg.local_fit != "rank":
                users, trained, bias = personal_models(alg, model, state, shared, datasets, seeds,
                                                       min_events, ditto_strength)
            else:
                users, trained, bias = state.users, state.trained, None
            personal, global_only = queries(model, users, trained, split)
            if alg.shared_query:  # the global model of these algorithms includes the shared vector
                global_only = global_only + shared
            hr, ndcg = evaluate(model, personal, split, bias)
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
    weights = model.global_state()
    item_bias = weights["item_bias.weight"][:, 0] if bias is None else bias
    return {"algorithm": alg.name, **beyond_accuracy(
        log, split, weights["item_embedding.weight"].numpy(), item_bias.numpy(), personal.numpy(),
        global_only.numpy(), global_bias=weights["item_bias.weight"][:, 0].numpy())}
