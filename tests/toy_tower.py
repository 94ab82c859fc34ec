"""A second model, for tests only: items scored through a small shared tower over fixed item
features instead of a learned row per item, so the noised dimension does not grow with the
catalog. Registered as ``toy-tower``; Flower's processes import it through ``ATTUNE_MODEL_MODULES``.

An item's vector and bias are ``W f_i`` (``W``: ``[dim + 1, FEATURES]``, the last row the bias), so
one event's gradient on ``W`` is ``sum_m g_m [q, 1] f_m^T``: one dense block.
"""

from functools import lru_cache

import torch

from attune.shared.layout import Dense, DenseGradient, EventGradients, EventShape, Layout, Param, State
from attune.shared.model import ModelConfig, SharedModel, register

FEATURES = 6
TOWER = "tower.weight"


@lru_cache(maxsize=8)
def item_features(num_items: int) -> torch.Tensor:
    """Fixed features of every item (what item metadata would give), ``[num_items, FEATURES]``."""
    return torch.randn(num_items, FEATURES, generator=torch.Generator().manual_seed(num_items)) / FEATURES**0.5


@register("toy-tower")
class ToyTower(SharedModel):
    @staticmethod
    def shared_layout(config: ModelConfig) -> Layout:
        return Layout((Param(TOWER, (config.dim + 1, FEATURES)),))

    def init_state(self, generator: torch.Generator) -> State:
        return {TOWER: torch.randn(self.config.dim + 1, FEATURES, generator=generator) * 0.1}

    def item_side(self, state: State, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = item_features(self.config.num_items)[items] @ state[TOWER].float().T
        return out[..., :-1], out[..., -1]

    def event_shape(self, negatives: int) -> EventShape:
        return (Dense(TOWER),)

    def event_gradients(self, state: State, query: torch.Tensor, items: torch.Tensor, logit_grads: torch.Tensor,
                        context: torch.Tensor | None) -> EventGradients:
        ones = torch.ones(query.shape[0], 1, dtype=query.dtype)
        weighted = logit_grads.unsqueeze(2) * item_features(self.config.num_items)[items]  # [b, m, F]
        outer = torch.cat([query, ones], dim=1).unsqueeze(2) * weighted.sum(dim=1).unsqueeze(1)  # [b, d + 1, F]
        return EventGradients((DenseGradient(Dense(TOWER), outer.reshape(len(items), -1)),))
