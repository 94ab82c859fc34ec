"""Empirical privacy audit with one training run (Steinke, Nasr and Jagielski, NeurIPS 2023,
"Privacy Auditing with One (1) Training Run").

Each audited device gets one canary: an event for an item it never interacted with, inserted
with probability 1/2 (seeded coin). Every device then trains one local round exactly as
``Personalizer.train`` does, and the auditor sees what the coordinator sees: the update. The
membership score of a canary is the change of its item's bias in that update. The auditor
guesses "in" for the ``guesses / 2`` highest scores and "out" for as many lowest, and counts the
correct guesses. For an epsilon-DP mechanism the number correct is dominated by
``Binomial(guesses, e^eps / (1 + e^eps))`` (their Theorem 3.1), so every epsilon under which the
observed count is less likely than ``beta`` is refuted: the largest refuted epsilon is a lower
bound, at confidence ``1 - beta``. For (epsilon, delta)-DP the bound is made conservative by
spending ``canaries * delta`` of ``beta`` on the delta part (a simplification of their
Theorem 5.2 that can only lower the bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binom

from attune.client.training import LocalData, train_round
from attune.shared import seeding
from attune.shared.accounting import PrivacyLedger
from attune.shared.config import TrainConfig
from attune.shared.events import EVENT_WEIGHTS
from attune.shared.model import ModelConfig, Personalization
from attune.shared.seeding import device_seed
from attune.simulations.datasets import EventLog
from attune.simulations.evaluation import Split
from attune.simulations.fast import device_datasets

CANARY_EVENT = "purchase"


@dataclass(frozen=True)
class AuditResult:
    canaries: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    epsilon_accounted: float | None  # None: trained without DP
    confidence: float

    def as_dict(self) -> dict[str, float | int | None]:
        return dict(self.__dict__)


def epsilon_lower_bound(guesses: int, correct: int, beta: float = 0.05, slack: float = 0.0) -> float:
    """Largest epsilon refuted at confidence ``1 - beta`` by ``correct`` of ``guesses``; the
    binomial tail must stay below ``beta - slack`` (``slack``: the delta allowance)."""
    level = beta - slack
    if level <= 0:
        raise ValueError("delta allowance leaves no confidence budget: use more canaries or a smaller delta")

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


def audit(
    log: EventLog,
    split: Split,
    model_config: ModelConfig,
    train: TrainConfig,
    *,
    delta: float = 1e-5,
    guess_fraction: float = 0.2,
    beta: float = 0.05,
    seed: int = 0,
) -> AuditResult:
    """One round on every device of ``log``, half of them with their canary; the audit's result."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    datasets = device_datasets(log, split, model_config.use_context)
    model = Personalization(model_config, generator=torch.Generator().manual_seed(seed))
    start = model.global_state()
    seen = np.zeros((log.num_users, log.num_items), dtype=bool)
    seen[log.users, log.items] = True
    canaries = np.array([rng.choice(np.flatnonzero(~seen[u])) for u in range(log.num_users)])
    included = rng.random(log.num_users) < 0.5
    scores = np.zeros(log.num_users)
    epsilon = 0.0
    for user in range(len(datasets)):
        data = datasets[user]
        if included[user]:
            context = None
            if data.context is not None:
                context = torch.cat([data.context, data.context[-1:]])  # the canary at the last context
            data = LocalData(items=torch.cat([data.items, torch.tensor([int(canaries[user])])]),
                             weights=torch.cat([data.weights, torch.tensor([EVENT_WEIGHTS[CANARY_EVENT]])]),
                             context=context)
        model.load_global_state(start)
        generator = seeding.generator(device_seed(seed, user), seeding.TRAIN)
        with torch.no_grad():
            model.user_vector.weight.normal_(0.0, model_config.dim**-0.5, generator=generator)
        ledger = PrivacyLedger()
        update = train_round(model, data, train, ledger, generator).update
        scores[user] = float(update["item_bias.weight"][int(canaries[user]), 0])
        if train.private:
            epsilon = max(epsilon, ledger.epsilon(delta))
    half = int(log.num_users * guess_fraction) // 2
    order = np.argsort(scores, kind="stable")
    correct = int(included[order[-half:]].sum() + (~included[order[:half]]).sum()) if half else 0
    slack = log.num_users * delta if train.private else 0.0
    bound = epsilon_lower_bound(2 * half, correct, beta, slack)
    return AuditResult(canaries=log.num_users, guesses=2 * half, correct=correct, epsilon_lower_bound=bound,
                       epsilon_accounted=epsilon if train.private else None, confidence=1 - beta)
