"""The personalization model: a global item side that federates and a local user side that never leaves.

Score of item ``i`` for a person in context ``c``::

    score = dot(user_vector + context_encoder(c), item_embedding[i]) + item_bias[i]

Every sub-layer is an ``nn.Embedding`` or ``nn.Linear`` so that Opacus's reference per-sample
gradient hooks can run on the very same module (the equivalence tests rely on that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attune.shared.config import knob
from attune.shared.errors import ConfigError

MODEL_VERSION = 1

# Which parameters federate. Declared once; client, server and simulations all read these.
GLOBAL_PARAMS: tuple[str, ...] = (
    "item_embedding.weight",
    "item_bias.weight",
    "context_encoder.weight",
)
LOCAL_PARAMS: tuple[str, ...] = ("user_vector.weight",)

# Context features: hour of day and weekday on the unit circle, then a one-hot event type.
TIME_FEATURES = 4


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model. Every device and the coordinator must agree on it (checked on the wire)."""

    num_items: int = knob(4096, "rows of the item table (the dataset sets it in simulations)")
    dim: int = knob(32, "size of item and user vectors")
    num_event_types: int = knob(5, "event types in the context features")
    use_context: bool = knob(True, "train the context encoder (hour, weekday, event type)")

    def __post_init__(self) -> None:
        for name, low in (("num_items", 2), ("dim", 1), ("num_event_types", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.use_context, bool):
            raise ConfigError(f"use_context must be True or False, got {self.use_context!r}")

    @property
    def context_features(self) -> int:
        return TIME_FEATURES + self.num_event_types

    def num_parameters(self) -> int:
        ctx = self.context_features * self.dim if self.use_context else 0
        return self.num_items * (self.dim + 1) + ctx + self.dim

    def size_bytes(self) -> int:
        """Bytes of all parameters in float32."""
        return 4 * self.num_parameters()


class Personalization(nn.Module):
    """Dot-product scorer with item bias and an optional bias-free context encoder."""

    def __init__(self, config: ModelConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.item_embedding = nn.Embedding(config.num_items, config.dim)
        self.item_bias = nn.Embedding(config.num_items, 1)
        self.context_encoder = nn.Linear(config.context_features, config.dim, bias=False)
        self.user_vector = nn.Embedding(1, config.dim)
        with torch.no_grad():
            scale = 1.0 / config.dim**0.5
            self.item_embedding.weight.normal_(0.0, scale, generator=generator)
            self.item_bias.weight.zero_()
            self.context_encoder.weight.zero_()
            self.user_vector.weight.normal_(0.0, scale, generator=generator)
        if not config.use_context:
            self.context_encoder.weight.requires_grad_(False)

    def person(self, batch: int, context: torch.Tensor | None) -> torch.Tensor:
        """The person's query vector per example, ``[batch, dim]``."""
        index = torch.zeros(batch, dtype=torch.long, device=self.user_vector.weight.device)
        query = self.user_vector(index)
        if context is not None and self.config.use_context:
            query = query + self.context_encoder(context)
        return query

    def forward(self, items: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, m]`` for item indices ``[batch, m]``."""
        query = self.person(items.shape[0], context)
        return self.score(query, items)

    def score(self, query: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.score_with(query, self.item_embedding(items), self.item_bias(items))

    @staticmethod
    def score_with(query: torch.Tensor, vectors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Logits from query ``[b, d]``, item vectors ``[b, m, d]`` and biases ``[b, m, 1]``."""
        return torch.bmm(vectors, query.unsqueeze(2)).squeeze(2) + bias.squeeze(-1)

    def global_state(self) -> dict[str, torch.Tensor]:
        """Detached copies of the parameters that federate."""
        state = self.state_dict()
        return {name: state[name].detach().clone() for name in GLOBAL_PARAMS}

    def load_global_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            params = dict(self.named_parameters())
            for name in GLOBAL_PARAMS:
                params[name].copy_(state[name])
