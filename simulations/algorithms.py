"""Personalization algorithms the fast backend compares (``--algorithm``).

- ``partial-local`` (default, what devices run): the user vector never leaves the device; the
  item side federates (Singhal et al. 2021, "Federated Reconstruction").
- ``global``: FedAvg with no local part. The query vector is one shared vector that federates
  with the item side, so every person gets the same ranking (plus context).
- ``finetune``: ``global`` training, then each device fits its own vector to the final global
  item side on the device (no DP needed: it never leaves).
- ``ditto``: ``partial-local`` training of the global model; each device also keeps a personal
  model, its vector and item biases, fitted to its own events with a pull of strength ``lambda``
  toward the global biases (Li et al. 2021, "Ditto"); on the device, so no DP needed.

Every algorithm trains the shared part through the same DP local round and accounting; only
where the query vector lives and what the device fits for itself differ. Clustered
personalization (IFCA) is not here: a device's choice of cluster depends on all its events and
would need its own private selection mechanism and accounting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attune.client.training import LocalData, sample_batch
from attune.shared.errors import ConfigError
from attune.shared.loss import per_example_loss
from attune.shared.model import Personalization


@dataclass(frozen=True)
class Algorithm:
    name: str
    shared_query: bool  # the query vector federates (no local part during training)
    local_fit: str  # what a device fits for itself before ranking: "rank", "finetune", "ditto", "none"


ALGORITHMS = {
    "global": Algorithm("global", shared_query=True, local_fit="none"),
    "finetune": Algorithm("finetune", shared_query=True, local_fit="finetune"),
    "partial-local": Algorithm("partial-local", shared_query=False, local_fit="rank"),
    "ditto": Algorithm("ditto", shared_query=False, local_fit="ditto"),
}


def algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}: use one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def fit_ditto(
    model: Personalization,
    data: LocalData,
    start: torch.Tensor,
    *,
    strength: float = 1.0,
    steps: int = 40,
    lr: float = 0.1,
    negatives: int = 4,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A device's personal vector ``[dim]`` and item biases ``[items]``: its own loss plus
    ``strength / 2 * ||bias - global bias||^2``, from ``start`` and the global biases."""
    global_bias = model.item_bias.weight.detach()[:, 0]
    vector = start.clone().requires_grad_(True)
    bias = global_bias.clone().requires_grad_(True)
    if len(data) == 0:
        return start, global_bias
    optimizer = torch.optim.Adam([vector, bias], lr=lr)
    table = model.item_embedding.weight.detach()
    for _ in range(steps):
        batch = sample_batch(data, 1.0, negatives, model.config.num_items, generator)
        logits = torch.einsum("bmd,d->bm", table[batch.items], vector) + bias[batch.items]
        pull = strength / 2 * (bias - global_bias).pow(2).sum()
        loss = per_example_loss(logits, batch, "bce").mean() + pull
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return vector.detach(), bias.detach()
