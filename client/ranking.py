"""How a device ranks for its person, on the device and without DP (nothing here is sent): the
personal side it fits to its events against the released model, and re-ranking for variety.

**Personal rankings** (``Personalizer(ranking=...)``, ``attune simulate --algorithm``), each fitted
for a whole block of devices at once (a device is a block of one):

- ``partial-local`` (default): the person's ranking vector, fitted to their events against the
  shared side from their DP user vector (Singhal et al. 2021, "Federated Reconstruction").
- ``ditto``: the ranking vector and the person's own item biases, pulled toward the global biases
  with strength ``lambda`` (Li et al. 2021, "Ditto").
- ``global``: no personal part: everyone ranks with the shared side alone (context included).

**Maximal marginal relevance** (Carbonell and Goldstein, 1998). A plain score ranking tends to fill
the top of the list with near-identical items (a filter bubble). MMR picks greedily the item that
maximizes ``(1 - λ) * relevance - λ * max similarity to the items already picked``, with relevance
min-max scaled to [0, 1] over the candidates and similarity the cosine of item vectors, so ``λ``
means the same for every model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from attune.client.training import Cohort, fit_rank_vectors
from attune.shared.config import Loss
from attune.shared.errors import ConfigError
from attune.shared.layout import State
from attune.shared.loss import Batch, per_example_loss
from attune.shared.model import ModelConfig, dot_scores, shared_model


@dataclass(frozen=True)
class PersonalSide:
    """What devices fitted for their people's ranking: vectors ``[devices, dim]`` and, for a
    ranking that keeps them, personal item biases ``[devices, num_items]`` (None: the model's)."""

    vectors: torch.Tensor
    biases: torch.Tensor | None = None


def personal_scores(state: State, model: ModelConfig, queries: torch.Tensor, items: torch.Tensor,
                    biases: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[devices, m]`` of items ``[devices, m]`` for the devices' ``queries``, with their
    own item ``biases`` ``[devices, num_items]`` when their ranking fitted some."""
    vectors, bias = shared_model(model).item_side(state, items)
    return dot_scores(queries, vectors, bias if biases is None else torch.gather(biases, 1, items))


class DeviceRanking(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def personal(self) -> bool:
        """Whether a device ranks with anything of its own (its vector, its tags' affinity)."""
        ...

    def fit(self, state: State, model: ModelConfig, starts: torch.Tensor, cohort: Cohort,
            generator: torch.Generator, steps: int = 40) -> PersonalSide:
        """Each device's personal side, from its DP vector ``starts`` ``[devices, dim]`` and its
        events (``steps`` optimizer steps)."""
        ...


@dataclass(frozen=True)
class PartialLocal:
    name: str = "partial-local"
    personal: bool = True

    def fit(self, state, model, starts, cohort, generator, steps=40):
        return PersonalSide(fit_rank_vectors(state, model, starts, cohort, generator, steps=steps))


@dataclass(frozen=True)
class Global:
    name: str = "global"
    personal: bool = False

    def fit(self, state, model, starts, cohort, generator, steps=40):
        return PersonalSide(torch.zeros_like(starts, dtype=torch.float32))


@dataclass(frozen=True)
class Ditto:
    """Personal item biases ``b_u`` fitted with the ranking vector on the person's own loss plus
    ``strength / 2 * ||b_u - b||^2`` (Adam, on the device)."""

    strength: float = 1.0
    name: str = "ditto"
    personal: bool = True

    def fit(self, state, model, starts, cohort, generator, steps=40):
        vectors = fit_rank_vectors(state, model, starts, cohort, generator, steps=steps)
        shared = shared_model(model)
        global_bias = shared.all_items(state)[1]
        bias = global_bias.repeat(len(cohort), 1).requires_grad_(True)
        device = cohort.device_of_events()
        sizes = cohort.sizes().clamp(min=1).float()
        optimizer = torch.optim.Adam([bias], lr=0.1)
        for _ in range(steps if len(device) else 0):
            columns = torch.cat([cohort.items.unsqueeze(1),
                                 torch.randint(0, model.num_items, (len(device), 4), generator=generator)], 1)
            labels = torch.zeros(columns.shape)
            labels[:, 0] = 1.0
            logits = dot_scores(shared.query(state, vectors[device], cohort.context),
                                shared.item_side(state, columns)[0], torch.gather(bias[device], 1, columns))
            per_event = per_example_loss(logits, Batch(columns, labels, cohort.weights, None), Loss.BCE)
            own = (torch.zeros(len(cohort)).index_add(0, device, per_event) / sizes).sum()
            loss = own + self.strength / 2 * (bias - global_bias).pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return PersonalSide(vectors, bias.detach())


RANKINGS: dict[str, DeviceRanking] = {r.name: r for r in (PartialLocal(), Global(), Ditto())}


def device_ranking(name: str) -> DeviceRanking:
    if name not in RANKINGS:
        raise ConfigError(f"unknown ranking {name!r}: use one of {', '.join(RANKINGS)}")
    return RANKINGS[name]


def mmr_order(scores: torch.Tensor, vectors: torch.Tensor, diversity: float, limit: int) -> list[int]:
    """Positions of the ``limit`` candidates MMR picks, in order; ``diversity=0`` is plain ranking."""
    n = scores.shape[0]
    limit = min(limit, n)
    if diversity == 0.0 or n == 0:
        return torch.argsort(scores, descending=True, stable=True)[:limit].tolist()
    spread = scores.max() - scores.min()
    relevance = (scores - scores.min()) / spread if spread > 0 else torch.zeros_like(scores)
    unit = torch.nn.functional.normalize(vectors, dim=1)  # similarities one picked row at a time: O(n) memory
    closest = torch.full((n,), -1.0)  # max similarity to the picked items (none yet: -1)
    available = torch.ones(n, dtype=torch.bool)
    picked: list[int] = []
    for _ in range(limit):
        gain = (1.0 - diversity) * relevance - diversity * closest.clamp(min=0.0)
        gain[~available] = -float("inf")
        best = int(torch.argmax(gain))
        picked.append(best)
        available[best] = False
        closest = torch.maximum(closest, unit @ unit[best])
    return picked
