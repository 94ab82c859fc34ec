"""From what devices sent to the next global model, framework-free: combine the contributions (their
sum, or a robust rule), add device-level noise, divide by the expected cohort, and take a server
optimizer step. Every vector here is the shared side flattened (``attune.shared.layout.Layout.flatten``).
"""

from __future__ import annotations

from typing import Protocol

import torch

from attune.shared.errors import ConfigError
from attune.shared.randomness import Stream, normal


class ServerOptimizer(Protocol):
    """Applies a pseudo-gradient (the mean of the devices' gradient sums) to the parameters."""

    def step(self, params: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ServerSGD:
    """``params - lr * gradient``."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def step(self, params: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        return params - self.lr * gradient

    def state_dict(self) -> dict:
        return {"kind": "sgd"}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "sgd":
            raise ConfigError(f"checkpoint holds a {state.get('kind')!r} server optimizer, not sgd")


class ServerAdam:
    """Adam on the coordinator (Reddi et al. 2021, "Adaptive Federated Optimization"): the released
    sums are noisy and most item rows get signal from few devices, and per-coordinate step sizes
    keep the noise of a round from setting the step. Post-processing of the released sums."""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.t = 0

    def step(self, params: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        gradient = gradient.double()
        if self.m is None or self.v is None:
            self.m, self.v = torch.zeros_like(gradient), torch.zeros_like(gradient)
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * gradient
        self.v = self.beta2 * self.v + (1 - self.beta2) * gradient**2
        m_hat = self.m / (1 - self.beta1**self.t)
        v_hat = self.v / (1 - self.beta2**self.t)
        return params - self.lr * m_hat / (v_hat.sqrt() + self.eps)

    def state_dict(self) -> dict:
        return {"kind": "adam", "m": self.m, "v": self.v, "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "adam":
            raise ConfigError(f"checkpoint holds a {state.get('kind')!r} server optimizer, not adam")
        self.m, self.v, self.t = state["m"], state["v"], int(state["t"])


def server_optimizer(kind: str, lr: float) -> ServerSGD | ServerAdam:
    if kind == "sgd":
        return ServerSGD(lr)
    if kind == "adam":
        return ServerAdam(lr)
    raise ConfigError(f"unknown server optimizer {kind!r}: use adam or sgd")


def trimmed_mean(contributions: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping the ``trim_fraction`` largest and smallest values (Yin
    et al. 2018), times the count: a sum robust to a minority of hostile devices."""
    count = contributions.shape[0]
    cut = int(count * trim_fraction)
    ordered = contributions.double().sort(dim=0).values
    return ordered[cut:count - cut].mean(dim=0) * count


def coordinate_median(contributions: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median (mean of the two middle values for an even count), times the count."""
    count = contributions.shape[0]
    ordered = contributions.double().sort(dim=0).values
    return (ordered[(count - 1) // 2] + ordered[count // 2]) / 2 * count


def combine(contributions: torch.Tensor, rule: str, trim_fraction: float) -> torch.Tensor:
    """One summed contribution from the rows of ``contributions`` by ``rule``."""
    if rule == "sum":
        return contributions.sum(dim=0)
    if rule == "trimmed-mean":
        return trimmed_mean(contributions, trim_fraction)
    if rule == "median":
        return coordinate_median(contributions)
    raise ConfigError(f"unknown aggregation {rule!r}: use sum, trimmed-mean or median")


def device_level_noise(total: torch.Tensor, bound: float, noise_multiplier: float, stream: Stream) -> torch.Tensor:
    """DP-FedAvg on a sum of contributions each bounded by ``bound`` (L2, in the sum's units):
    Gaussian noise of std ``noise_multiplier * bound`` on every coordinate (zero multiplier: none)."""
    if noise_multiplier <= 0:
        return total.double()
    return total.double() + normal(stream, tuple(total.shape), noise_multiplier * bound)
