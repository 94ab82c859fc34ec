"""Empirical privacy audit with one training run (Steinke, Nasr and Jagielski, NeurIPS 2023,
"Privacy Auditing with One (1) Training Run").

Each audited device gets one canary: a purchase of an item it never interacted with, inserted
with probability 1/2 (a seeded coin). Every device computes one ``local``-mode contribution (the
device round itself, ``attune.client.training.train_round``), which is what the coordinator would
see of it; in ``distributed`` mode this is a device's own contribution without the secure sum,
the ``epsilon_local`` mechanism. The auditor knows everything but the coins: its score of a
canary is the projection of the contribution's canary coordinates (the item's row and bias) on
the direction the canary's own clipped gradient takes there, the Neyman-Pearson test for a shift
in Gaussian noise. It guesses "in" for the ``guesses / 2`` highest scores and "out" for as many
lowest, and counts the correct guesses. For an epsilon-DP mechanism the number correct is
dominated by ``Binomial(guesses, e^eps / (1 + e^eps))`` (their Theorem 3.1), so every epsilon
under which the observed count is less likely than ``beta`` is refuted: the largest refuted
epsilon is a lower bound, at confidence ``1 - beta``. ``delta`` is accounted conservatively by
spending ``canaries * delta`` of ``beta``. ``epsilon_certifiable`` is the bound all-correct
guesses would give: no audit of this size can show more.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import binom

from attune.client.training import Cohort, LocalData, initial_user_vector, train_round
from attune.shared.accounting import epsilon_of
from attune.shared.config import RoundConfig, preset
from attune.shared.errors import ConfigError
from attune.shared.events import EVENT_WEIGHTS
from attune.shared.mechanism import local_entries
from attune.shared.model import ITEM_BIAS, ITEM_EMBEDDING, ModelConfig, shared_model
from attune.shared.randomness import Stream, device_stream, integers
from attune.simulations.datasets import EventLog
from attune.simulations.evaluation import Split
from attune.simulations.fast import device_cohort, subset

CANARY_EVENT = "purchase"


@dataclass(frozen=True)
class AuditResult:
    canaries: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    epsilon_certifiable: float  # the bound if every guess were right: the audit's power
    epsilon_accounted: float | None  # None: no DP
    confidence: float

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def epsilon_lower_bound(guesses: int, correct: int, beta: float = 0.05, slack: float = 0.0) -> float:
    """Largest epsilon refuted at confidence ``1 - beta`` by ``correct`` of ``guesses``; the
    binomial tail must stay below ``beta - slack`` (``slack``: the delta allowance)."""
    level = beta - slack
    if level <= 0:
        raise ConfigError("delta allowance leaves no confidence budget: use more canaries or a smaller delta")

    def tail(eps: float) -> float:
        p = 1.0 / (1.0 + math.exp(-eps))
        return float(binom.sf(correct - 1, guesses, p))  # P[Bin >= correct]

    if guesses == 0 or tail(0.0) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while tail(high) < level and high < 100:
        low, high = high, high * 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if tail(mid) < level else (low, mid)
    return low


def _score(contribution: torch.Tensor, state: dict[str, torch.Tensor], model: ModelConfig, config: RoundConfig,
           user: torch.Tensor, data: LocalData, canary: int, stream: Stream) -> float:
    """Projection of the contribution on the canary's own gradient there: its item's row and bias
    and those of its negatives (redrawn from the device's stream: the auditor knows all but coins)."""
    negatives = integers(stream, (len(data), config.negatives), model.num_items)[-1]
    columns = torch.cat([torch.tensor([canary]), negatives])
    shared = shared_model(model)
    logits = shared.score(state, user.unsqueeze(0), columns.unsqueeze(0))[0]
    labels = torch.zeros(len(columns))
    labels[0] = 1.0
    gradients = (torch.sigmoid(logits) - labels).double()  # d loss / d logit of each column
    score = 0.0
    parts = shared.layout.unflatten(contribution.double())
    for column, gradient in zip(columns.tolist(), gradients, strict=True):
        score += float(gradient * (parts[ITEM_EMBEDDING][column] @ user.double() + parts[ITEM_BIAS][column, 0]))
    return score


def audit(log: EventLog, split: Split, *, noise_multiplier: float | None, dim: int = 8, delta: float = 1e-5,
          guess_fraction: float = 0.2, beta: float = 0.05, seed: int = 0) -> AuditResult:
    """One round on every device of ``log``, half of them with their canary; the audit's result."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    model = ModelConfig(num_items=log.num_items, dim=dim, use_context=False, trained_items=0)  # a row per item
    config = preset("off", negatives=1) if noise_multiplier is None else preset(
        "local", negatives=1, noise_multiplier=noise_multiplier, user_noise_multiplier=noise_multiplier)
    state = shared_model(model).init_state(torch.Generator().manual_seed(seed))
    seen = np.zeros((log.num_users, log.num_items), dtype=bool)
    seen[log.users, log.items] = True
    canaries = torch.tensor([rng.choice(np.flatnonzero(~seen[u])) for u in range(log.num_users)])
    included = rng.random(log.num_users) < 0.5
    base = device_cohort(log, split, use_context=False)
    datasets = []
    for user in range(log.num_users):
        data = subset(base, [user]).device(0)
        if included[user]:  # the canary is the device's latest event
            data = LocalData(torch.cat([data.items, canaries[user:user + 1]]),
                             torch.cat([data.weights, torch.tensor([EVENT_WEIGHTS[CANARY_EVENT]])]), None)
        datasets.append(data)
    users = torch.stack([initial_user_vector(dim, device_stream(seed, u, "user-init")) for u in range(log.num_users)])
    output = train_round(state, model, users, Cohort.of(datasets), config,
                         [device_stream(seed, u, "audit") for u in range(log.num_users)], [False] * log.num_users)
    scores = np.array([_score(output.contributions[user], state, model, config, users[user], datasets[user],
                                     int(canaries[user]), device_stream(seed, user, "audit"))
                       for user in range(log.num_users)])
    half = int(log.num_users * guess_fraction) // 2
    order = np.argsort(scores, kind="stable")
    correct = int(included[order[-half:]].sum() + (~included[order[:half]]).sum()) if half else 0
    slack = log.num_users * delta if noise_multiplier is not None else 0.0
    accounted = None
    if noise_multiplier is not None:
        accounted = epsilon_of(local_entries(model, config, refresh=False), delta)
    return AuditResult(canaries=log.num_users, guesses=2 * half, correct=correct,
                       epsilon_lower_bound=epsilon_lower_bound(2 * half, correct, beta, slack),
                       epsilon_certifiable=epsilon_lower_bound(2 * half, 2 * half, beta, slack),
                       epsilon_accounted=accounted, confidence=1 - beta)
