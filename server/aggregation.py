"""Aggregation math, framework-free: the mean (plain, robust, or user-level DP) of updates, applied
by a server step.

Used by the Flower strategy and by the in-process simulation backend alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attune.shared import seeding
from attune.shared.errors import ConfigError
from attune.shared.user_level import add_noise_to_mean, noised_mean

Update = dict[str, torch.Tensor]


def weighted_mean(updates: Sequence[tuple[Update, float]]) -> Update:
    """Mean of updates weighted by example counts, accumulated in float64 in the given order."""
    if not updates:
        raise ValueError("no updates to aggregate")
    total = sum(weight for _, weight in updates)
    if total <= 0:
        raise ValueError("update weights must sum to a positive number")
    names = updates[0][0].keys()
    return {
        name: sum(update[name].double() * (weight / total) for update, weight in updates)  # type: ignore[misc]
        for name in names
    }


# Every example moves the context encoder, so its mean update is not diluted the way a row of the
# item table is (each row moves only on the devices that saw the item): it takes the plain mean.
PLAIN_MEAN_PARAMS = frozenset({"context_encoder.weight"})


def apply_update(current: Update, mean_update: Update, server_lr: float) -> Update:
    """``current + server_lr * mean_update`` for the item table, ``+ mean_update`` for the rest."""
    return {
        name: (value.double() + (1.0 if name in PLAIN_MEAN_PARAMS else server_lr) * mean_update[name]).float()
        for name, value in current.items()
    }


class ServerSGD:
    """Plain FedAvg step: ``current + server_lr * mean`` (see ``apply_update``)."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def step(self, current: Update, mean_update: Update) -> Update:
        return apply_update(current, mean_update, self.lr)

    def state_dict(self) -> dict:
        return {"kind": "sgd"}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "sgd":
            raise ConfigError(f"checkpoint holds a {state.get('kind')!r} server optimizer, not sgd")


class ServerAdam:
    """Adam on the server with the mean update as the (negative) pseudo-gradient.

    Reddi et al. 2021, "Adaptive Federated Optimization" (FedAdam). Per-coordinate step sizes
    suit the item table, whose rows are updated by few devices each, and the context encoder,
    updated by all. Its state is part of a checkpoint.
    """

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.99, eps: float = 1e-3) -> None:
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m: Update = {}
        self.v: Update = {}

    def step(self, current: Update, mean_update: Update) -> Update:
        out = {}
        for name, value in current.items():
            delta = mean_update[name]
            m = self.m.get(name, torch.zeros_like(delta)) * self.beta1 + (1 - self.beta1) * delta
            v = self.v.get(name, torch.zeros_like(delta)) * self.beta2 + (1 - self.beta2) * delta**2
            self.m[name], self.v[name] = m, v
            out[name] = (value.double() + self.lr * m / (v.sqrt() + self.eps)).float()
        return out

    def state_dict(self) -> dict:
        return {"kind": "adam", "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "adam":
            raise ConfigError(f"checkpoint holds a {state.get('kind')!r} server optimizer, not adam")
        self.m, self.v = dict(state["m"]), dict(state["v"])


def server_step(kind: str, lr: float) -> ServerSGD | ServerAdam:
    """The server optimizer named in the run config: ``sgd`` (FedAvg) or ``adam`` (FedAdam)."""
    if kind == "sgd":
        return ServerSGD(lr)
    if kind == "adam":
        return ServerAdam(lr)
    raise ValueError(f"unknown server optimizer {kind!r}: use sgd or adam")


def trimmed_mean(updates: Sequence[Update], trim_fraction: float) -> Update:
    """Coordinate-wise mean after dropping the ``trim_fraction`` largest and smallest values
    (Yin et al. 2018): robust to a minority of broken or hostile updates."""
    cut = int(len(updates) * trim_fraction)
    out = {}
    for name in updates[0]:
        stacked = torch.stack([u[name].double() for u in updates]).sort(dim=0).values
        out[name] = stacked[cut : len(updates) - cut].mean(dim=0)
    return out


def coordinate_median(updates: Sequence[Update]) -> Update:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    out = {}
    for name in updates[0]:
        stacked = torch.stack([u[name].double() for u in updates]).sort(dim=0).values
        n = len(updates)
        out[name] = (stacked[(n - 1) // 2] + stacked[n // 2]) / 2
    return out


RULES = ("mean", "trimmed-mean", "median")


@dataclass(frozen=True)
class AggregationConfig:
    """How accepted updates become one.

    ``user_noise_multiplier > 0`` turns on user-level DP (needs ``update_clip > 0`` and the plain
    ``mean`` rule, whose sensitivity is ``update_clip``): a uniform mean of the clipped updates
    plus Gaussian noise. Otherwise ``rule`` picks the example-weighted mean or a robust rule.
    """

    rule: str = "mean"
    trim_fraction: float = 0.1
    update_clip: float = 0.0
    user_noise_multiplier: float = 0.0
    noise_seed: int | None = None  # simulations only: seeded noise is no protection

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"aggregation must be one of {', '.join(RULES)}, got {self.rule!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.user_noise_multiplier < 0:
            raise ConfigError("user_noise_multiplier must be >= 0")
        if self.user_noise_multiplier > 0 and (self.update_clip <= 0 or self.rule != "mean"):
            raise ConfigError("user-level DP needs update_clip > 0 and the 'mean' aggregation rule")

    @property
    def user_level_dp(self) -> bool:
        return self.user_noise_multiplier > 0


def aggregate(
    config: AggregationConfig, server_round: int, updates: Sequence[tuple[Update, float]]
) -> Update:
    """One mean update from the accepted ``(update, examples)`` pairs of a round."""
    if not updates:
        raise ValueError("no updates to aggregate")
    if config.user_level_dp:
        return noised_mean([u for u, _ in updates], config.update_clip, config.user_noise_multiplier,
                           _noise_generator(config, server_round))
    if config.rule == "trimmed-mean":
        return trimmed_mean([u for u, _ in updates], config.trim_fraction)
    if config.rule == "median":
        return coordinate_median([u for u, _ in updates])
    return weighted_mean(updates)


def _noise_generator(config: AggregationConfig, server_round: int) -> torch.Generator:
    return seeding.generator(config.noise_seed, seeding.USER_LEVEL_NOISE + server_round)


def noise_secure_mean(config: AggregationConfig, server_round: int, mean: Update, count: int) -> Update:
    """User-level DP for a mean that secure aggregation produced (the same noise as ``aggregate``)."""
    if not config.user_level_dp:
        return mean
    return add_noise_to_mean(mean, count, config.update_clip, config.user_noise_multiplier,
                             _noise_generator(config, server_round))
