"""Training examples and their losses: a positive item and sampled negatives per event.

Kept free of Opacus so that ranking and on-device fitting import quickly (a device process is
started per Flower message); ``attune.client.training`` adds the private round on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attune.shared.errors import ConfigError


@dataclass(frozen=True)
class Batch:
    """A device's training examples for one step: each event against its sampled negatives
    (all its events every round; possibly none).

    ``items[:, 0]`` is the interacted item and ``items[:, 1:]`` the sampled negatives;
    ``labels`` is 1 for the positive column and 0 elsewhere.
    """

    items: torch.Tensor  # long [b, m]
    labels: torch.Tensor  # float [b, m]
    weights: torch.Tensor  # float [b]: event-type weight of each example
    context: torch.Tensor | None  # float [b, features]

    def __len__(self) -> int:
        return int(self.items.shape[0])


def per_example_loss(logits: torch.Tensor, batch: Batch, loss: str) -> torch.Tensor:
    """Weighted loss of each example, ``[b]``: BCE over all columns, or BPR (pos vs each neg)."""
    if loss == "bce":
        per = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, batch.labels, reduction="none"
        ).sum(dim=1)
    elif loss == "bpr":
        margin = logits[:, :1] - logits[:, 1:]
        per = torch.nn.functional.softplus(-margin).sum(dim=1)
    else:
        raise ConfigError(f"unknown loss {loss!r}: use 'bce' or 'bpr'")
    return per * batch.weights


def logit_gradients(logits: torch.Tensor, batch: Batch, loss: str) -> torch.Tensor:
    """``d per_example_loss / d logits`` in closed form, ``[b, m]`` (no autograd pass needed)."""
    logits = logits.detach()
    weights = batch.weights.unsqueeze(1)
    if loss == "bce":
        return (torch.sigmoid(logits) - batch.labels) * weights
    if loss == "bpr":
        push = torch.sigmoid(logits[:, 1:] - logits[:, :1]) * weights  # d softplus(-margin)
        return torch.cat([-push.sum(dim=1, keepdim=True), push], dim=1)
    raise ConfigError(f"unknown loss {loss!r}: use 'bce' or 'bpr'")
