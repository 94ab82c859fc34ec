"""The coordinator's user-level privacy ledger: one sampled Gaussian mechanism step per round.

Each round samples ``cohort`` of ``population`` devices (the actual numbers, per round) and adds
noise of multiplier ``z`` to the sum of clipped updates; Opacus's RDP accountant composes the
rounds. The ledger is part of every checkpoint, so a resumed run forgets no epsilon.
"""

from __future__ import annotations

import logging

from attune.shared.accounting import PrivacyLedger

log = logging.getLogger(__name__)


class UserLevelAccountant:
    """User-level (epsilon, delta) of the aggregate so far, and whether one more round fits."""

    def __init__(self, noise_multiplier: float, delta: float, budget: float | None) -> None:
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.budget = budget
        self.ledger = PrivacyLedger()

    def epsilon(self) -> float:
        return self.ledger.epsilon(self.delta)

    def admits(self, cohort: int, population: int) -> bool:
        """False when one more round at this sampling rate would go over the budget."""
        if self.budget is None:
            return True
        after = self.ledger.epsilon_after(self.delta, noise_multiplier=self.noise_multiplier,
                                          sample_rate=cohort / population, steps=1)
        if after > self.budget * (1 + 1e-9):
            log.warning("stopping: the next round would bring user-level epsilon to %.3f, over the "
                        "budget of %.3f", after, self.budget)
            return False
        return True

    def record(self, cohort: int, population: int) -> None:
        self.ledger.record(noise_multiplier=self.noise_multiplier, sample_rate=cohort / population)
