"""Private choice among a few models: the exponential mechanism, and its entry in the ledger.

A device that picks the segment model fitting its events best (IFCA, Ghosh et al. 2020) reveals
something about all its events by the pick alone. It picks with the exponential mechanism
(McSherry and Talwar 2007) instead: ``P(k) ~ exp(epsilon * score_k / (2 * sensitivity))``,
which is epsilon-DP when one event moves every score by at most ``sensitivity``.

Accounting: the exponential mechanism is epsilon-bounded-range (Durfee and Rogers 2019), and
epsilon-bounded-range implies (epsilon^2 / 8)-zCDP (Cesar and Rogers 2021, "Bounding,
Concentrating, and Truncating"), i.e. Renyi DP ``alpha * epsilon^2 / 8`` at every order
``alpha``: exactly the curve of one full-batch Gaussian step with noise multiplier
``2 / epsilon``. The ledger (Opacus's RDP history) records a choice as that step, so a device's
epsilon composes its training and its choices in one number.
"""

from __future__ import annotations

import torch

from attune.shared.accounting import History


def private_choice(
    scores: torch.Tensor, *, sensitivity: float, epsilon: float, generator: torch.Generator
) -> int:
    """Index drawn with probability ``softmax(epsilon * scores / (2 * sensitivity))``."""
    if sensitivity <= 0 or epsilon <= 0:
        raise ValueError("sensitivity and epsilon must be > 0")
    weights = torch.softmax(scores.double() * (epsilon / (2.0 * sensitivity)), dim=0)
    return int(torch.multinomial(weights, 1, generator=generator))


def choice_entry(epsilon: float) -> tuple[float, float, int]:
    """The ledger entry ``(noise_multiplier, sample_rate, steps)`` of one epsilon-DP choice."""
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    return (2.0 / epsilon, 1.0, 1)


def choices(epsilon: float, count: int) -> History:
    """Ledger entries of ``count`` choices (empty when there are none)."""
    sigma, rate, _ = choice_entry(epsilon)
    return [(sigma, rate, count)] if count else []
