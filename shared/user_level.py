"""User-level DP on the aggregate (DP-FedAvg, McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models"): all of one person's data together is the unit.

Each device clips its *whole* update to L2 norm ``C`` (on the device, so it holds under secure
aggregation too); the coordinator adds ``N(0, (z C)^2)`` to the *sum* of the clipped updates and
divides by the number of updates summed. One round is one step of the sampled Gaussian mechanism
with sampling rate ``cohort / population``; the coordinator accounts it with Opacus's RDP
accountant (``attune.shared.accounting.PrivacyLedger``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Update = dict[str, torch.Tensor]


def update_norm(update: Update) -> float:
    """L2 norm of the whole update (every tensor together), in float64."""
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in update.values())))  # type: ignore[arg-type]


def clip_update(update: Update, max_norm: float) -> tuple[Update, float]:
    """The update scaled to norm at most ``max_norm``, and its norm before clipping.

    An all-zero update stays zero (no division by its norm: Flower's own clipping divides
    unguarded and raises ``ZeroDivisionError`` there).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = update_norm(update)
    factor = 1.0 if norm <= max_norm else max_norm / norm
    return {name: (t.double() * factor).to(t.dtype) for name, t in update.items()}, norm


def add_noise_to_mean(
    mean: Update, count: int, max_norm: float, noise_multiplier: float, generator: torch.Generator
) -> Update:
    """The mean of ``count`` clipped updates plus ``N(0, (noise_multiplier * max_norm)^2) / count``:
    noise on the *sum*, so it works on a mean that secure aggregation produced as well."""
    std = noise_multiplier * max_norm
    out = {}
    for name, value in mean.items():
        noise = torch.normal(0.0, std, size=tuple(value.shape), generator=generator, dtype=torch.float64)
        out[name] = torch.as_tensor(value).double() + noise / count
    return out


def noised_mean(
    updates: Sequence[Update], max_norm: float, noise_multiplier: float, generator: torch.Generator
) -> Update:
    """``(sum of updates + N(0, (noise_multiplier * max_norm)^2)) / len(updates)``.

    The updates must already be clipped to ``max_norm`` (devices do it; the strategy rejects any
    that are not), so one person changes the sum by at most ``max_norm``.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    mean = {name: sum(u[name].double() for u in updates) / len(updates) for name in updates[0]}
    return add_noise_to_mean(mean, len(updates), max_norm, noise_multiplier, generator)  # type: ignore[arg-type]
