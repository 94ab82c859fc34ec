"""Personalization algorithms (``--algorithm``), as objects: every one trains the shared side with
the same device round and accounting, and differs in what a device does for itself, on the
device and without DP, to rank (its ``rank`` hook). So every algorithm runs in every privacy mode
and on both backends.

- ``partial-local`` (default): the person's ranking vector, fitted to their events against the
  shared side from their DP user vector (Singhal et al. 2021, "Federated Reconstruction").
- ``ditto``: the ranking vector and the person's own item biases, pulled toward the global biases
  with strength ``lambda`` (Li et al. 2021, "Ditto").
- ``global``: no personal part: everyone ranks with the shared side alone (context included).

When the catalog lists item tags, a personal algorithm's device adds its person's tag affinity
(``attune.shared.tags``), as the SDK's ``Personalizer`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from attune.client.training import Cohort, fit_rank_vectors
from attune.shared.errors import ConfigError
from attune.shared.loss import Batch, per_example_loss
from attune.shared.model import ModelConfig, dot_scores, shared_model
from attune.simulations.evaluation import Ranking, Split, rank_heldout, test_queries


class Algorithm(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def personal(self) -> bool:
        """Whether a device ranks with anything of its own (its vector, its tags' affinity)."""
        ...

    def rank(self, state: dict[str, torch.Tensor], model: ModelConfig, users: torch.Tensor,
             started: torch.Tensor, cohort: Cohort, split: Split, seed: int) -> Ranking: ...


@dataclass(frozen=True)
class PartialLocal:
    name: str = "partial-local"
    personal: bool = True

    def rank(self, state, model, users, started, cohort, split, seed):
        return rank_heldout(state, model, users, started, cohort, split, seed)


@dataclass(frozen=True)
class Global:
    name: str = "global"
    personal: bool = False

    def rank(self, state, model, users, started, cohort, split, seed):
        return rank_heldout(state, model, torch.zeros_like(users), started, cohort, split, seed, rank_fit=False)


@dataclass(frozen=True)
class Ditto:
    """Personal item biases ``b_u`` fitted with the ranking vector on the person's own loss plus
    ``strength / 2 * ||b_u - b||^2`` (40 Adam steps, on the device)."""

    strength: float = 1.0
    name: str = "ditto"
    personal: bool = True

    def rank(self, state, model, users, started, cohort, split, seed):
        generator = torch.Generator().manual_seed(seed)
        vectors = fit_rank_vectors(state, model, users, cohort, generator) * started.unsqueeze(1)
        shared = shared_model(model)
        global_bias = shared.all_items(state)[1]
        bias = global_bias.repeat(len(cohort), 1).requires_grad_(True)
        device = cohort.device_of_events()
        sizes = cohort.sizes().clamp(min=1).float()
        optimizer = torch.optim.Adam([bias], lr=0.1)
        for _ in range(40):
            columns = torch.cat([cohort.items.unsqueeze(1),
                                 torch.randint(0, model.num_items, (len(device), 4), generator=generator)], 1)
            labels = torch.zeros(columns.shape)
            labels[:, 0] = 1.0
            logits = dot_scores(vectors[device], shared.item_side(state, columns)[0],
                                torch.gather(bias[device], 1, columns))
            per_event = per_example_loss(logits, Batch(columns, labels, cohort.weights, None), "bce")
            own = (torch.zeros(len(cohort)).index_add(0, device, per_event) / sizes).sum()
            loss = own + self.strength / 2 * (bias - global_bias).pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        bias = torch.where(started.unsqueeze(1), bias.detach(), global_bias)
        personal, global_only = test_queries(state, model, vectors, split)
        candidates = torch.from_numpy(split.candidates)
        scores = dot_scores(personal, shared.item_side(state, candidates)[0], torch.gather(bias, 1, candidates))
        return Ranking(scores=scores, personal=personal, global_only=global_only, bias=bias)


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (PartialLocal(), Global(), Ditto())}


def algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}: use one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]
