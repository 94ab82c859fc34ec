"""Personalization algorithms (``--algorithm``): every one trains the shared side with the same
device round and accounting, and differs in what a device does for itself, on the device and
without DP, to rank: the device's own ranking (``attune.client.ranking``: ``partial-local``,
``ditto``, ``global``), run here for every simulated device at once. So every algorithm runs in
every privacy mode and on both backends, and on a real device (``Personalizer(ranking=...)``).

When the catalog lists item tags, a personal algorithm's device adds its person's tag affinity
(``attune.shared.tags``), as the SDK's ``Personalizer`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attune.client.ranking import RANKINGS, DeviceRanking, device_ranking, personal_scores
from attune.client.training import Cohort
from attune.shared.errors import ConfigError
from attune.shared.model import ModelConfig, shared_model
from attune.simulations.evaluation import Ranking, Split, test_queries


@dataclass(frozen=True)
class Algorithm:
    """A device ranking, measured on every simulated device's held-out candidates."""

    ranking: DeviceRanking

    @property
    def name(self) -> str:
        return self.ranking.name

    @property
    def personal(self) -> bool:
        return self.ranking.personal

    def rank(self, state: dict[str, torch.Tensor], model: ModelConfig, users: torch.Tensor, started: torch.Tensor,
             cohort: Cohort, split: Split, seed: int) -> Ranking:
        """What each device would rank, measured by the simulator (which keeps the held-out
        events; devices send nothing for evaluation): its personal side fitted on the device from
        its DP vector, the global model alone if it never joined."""
        side = self.ranking.fit(state, model, users, cohort, torch.Generator().manual_seed(seed))
        joined = started.unsqueeze(1)
        vectors = side.vectors * joined
        biases = None if side.biases is None else torch.where(joined, side.biases,
                                                              shared_model(model).all_items(state)[1])
        personal, global_only = test_queries(state, model, vectors, split)
        with torch.no_grad():
            scores = personal_scores(state, model, personal, torch.from_numpy(split.candidates), biases)
        return Ranking(scores=scores, personal=personal, global_only=global_only, bias=biases)


def algorithm(name: str) -> Algorithm:
    if name not in RANKINGS:
        raise ConfigError(f"unknown algorithm {name!r}: use one of {', '.join(RANKINGS)}")
    return Algorithm(device_ranking(name))
