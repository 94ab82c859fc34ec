"""Leave-one-out ranking evaluation of He et al. 2017 ("Neural Collaborative Filtering").

Per user the latest interaction is held out and ranked among 99 items sampled (seeded) from the
items that user never interacted with; HR@10 and NDCG@10 are averaged over all users. Ties count
half (the expected rank under random tie-breaking), so constant scores are not rewarded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attune.shared.errors import DataError
from attune.shared.events import EVENT_TYPES, RANKED_EVENT_TYPE, context_matrix
from attune.shared.metrics import hit_and_ndcg
from attune.shared.model import ModelConfig, shared_model
from attune.simulations.datasets import EventLog


@dataclass(frozen=True)
class Split:
    """Training events and, per user, 100 candidates whose first column is the held-out item."""

    train: np.ndarray  # bool mask over the log's events
    candidates: np.ndarray  # int64 [num_users, 1 + negatives]
    test_times: np.ndarray  # float64 [num_users]


def hours_weekdays(timestamps: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Hour of day and weekday of unix timestamps (UTC), as devices derive them."""
    seconds = torch.from_numpy(np.asarray(timestamps, dtype=np.int64))
    return (seconds // 3600) % 24, ((seconds // 86400) + 3) % 7  # 1970-01-01 was a Thursday


def leave_one_out(log: EventLog, *, negatives: int = 99, seed: int = 0) -> Split:
    if log.num_items <= negatives:
        raise DataError(f"{log.name}: leave-one-out ranks each held-out item among {negatives} items the person "
                        f"never used; the log has only {log.num_items} items")
    if np.bincount(log.users, minlength=log.num_users).max() < 2:
        raise DataError(f"{log.name}: every user has one event; leave-one-out holds it out and leaves nothing "
                        "to train on")
    order = np.lexsort((np.arange(len(log)), log.timestamps, log.users))
    last = np.ones(len(log), dtype=bool)
    last[order[:-1]] = log.users[order[:-1]] != log.users[order[1:]]
    held = order[last[order]]  # one event per user: the latest
    train = np.ones(len(log), dtype=bool)
    train[held] = False
    rng = np.random.default_rng(seed)
    seen = np.zeros((log.num_users, log.num_items), dtype=bool)
    seen[log.users, log.items] = True
    candidates = np.empty((log.num_users, negatives + 1), dtype=np.int64)
    test_times = np.empty(log.num_users)
    for event in held:
        user = log.users[event]
        unseen = np.flatnonzero(~seen[user])
        candidates[user, 0] = log.items[event]
        candidates[user, 1:] = rng.choice(unseen, size=negatives, replace=unseen.size < negatives)
        test_times[user] = log.timestamps[event]
    return Split(train=train, candidates=candidates, test_times=test_times)


def popularity_baseline(log: EventLog, split: Split) -> dict[str, float]:
    """HR@10 / NDCG@10 of ranking by training-set popularity, same protocol."""
    counts = np.bincount(log.items[split.train], minlength=log.num_items).astype(np.float64)
    hit, ndcg = hit_and_ndcg(counts[split.candidates])
    return {"hr@10": float(hit.mean()), "ndcg@10": float(ndcg.mean())}


def skew_data_sizes(log: EventLog, split: Split, skew: float, seed: int) -> Split:
    """Heterogeneous devices: user ``u`` keeps only its most recent ``ceil(n_u * r_u)`` training
    events, ``r_u = (k_u / num_users) ** skew`` for a seeded random rank ``k_u`` in 1..num_users.
    ``skew = 0`` keeps everything; larger values leave most devices with little data."""
    if skew < 0:
        raise DataError(f"data skew must be >= 0, got {skew}")
    if skew == 0:
        return split
    ranks = np.random.default_rng(seed).permutation(log.num_users) + 1
    keep_share = (ranks / log.num_users) ** skew
    order = np.lexsort((-np.arange(len(log)), -log.timestamps, log.users))  # newest first per user
    order = order[split.train[order]]
    train = np.zeros(len(log), dtype=bool)
    bounds = np.searchsorted(log.users[order], np.arange(log.num_users + 1))
    for user in range(log.num_users):
        rows = order[bounds[user] : bounds[user + 1]]
        train[rows[: int(np.ceil(len(rows) * keep_share[user]))]] = True
    return Split(train=train, candidates=split.candidates, test_times=split.test_times)


@dataclass(frozen=True)
class Ranking:
    """How every device ranks its held-out candidates: scores ``[users, candidates]`` and its query
    vector with and without its own vector (``[users, dim]``, for the beyond-accuracy report)."""

    scores: torch.Tensor
    personal: torch.Tensor
    global_only: torch.Tensor
    bias: torch.Tensor | None = None  # each user's own item biases [users, items] (Ditto)


def test_queries(state: dict[str, torch.Tensor], model: ModelConfig, vectors: torch.Tensor,
                 split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's query at its held-out time, with its own vector and with the global model only."""
    hours, days = hours_weekdays(split.test_times)
    clicks = torch.full_like(hours, EVENT_TYPES.index(RANKED_EVENT_TYPE))
    features = context_matrix(hours, days, clicks)
    shared = shared_model(model)
    global_only = shared.query(state, torch.zeros(len(hours), model.dim), features)
    return shared.query(state, vectors, features), global_only
