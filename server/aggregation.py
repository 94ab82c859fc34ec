"""Aggregation math, framework-free: the example-weighted mean of updates, applied by a server step.

Used by the Flower strategy and by the in-process simulation backend alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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


def server_step(kind: str, lr: float) -> ServerSGD | ServerAdam:
    """The server optimizer named in the run config: ``sgd`` (FedAvg) or ``adam`` (FedAdam)."""
    if kind == "sgd":
        return ServerSGD(lr)
    if kind == "adam":
        return ServerAdam(lr)
    raise ValueError(f"unknown server optimizer {kind!r}: use sgd or adam")
