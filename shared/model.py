"""The personalization models: a shared item side that federates and a person's vector that never
leaves the device.

Every model scores an item ``i`` for a person with query ``q`` (their vector, plus the shared
context encoder's view of the moment when the model has one) as ``dot(q, v_i) + b_i``; models
differ in where the item's vector ``v_i`` and bias ``b_i`` come from. A model is one class: its
shared parameters (``Layout``), its item side, and the closed-form gradient of one event on the
shared side (``EventGradients``, in the parts its ``EventShape`` declares). The device round,
the mechanism, the wire and the coordinator read nothing else, so a new model changes none of them.

``ModelConfig.architecture`` names the class: ``embedding`` (a row and a bias per item) ships here;
``register`` adds others, and modules named in ``ATTUNE_MODEL_MODULES`` (comma-separated, set on
the machine, never by a coordinator) are imported to register theirs.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from attune.shared.config import knob, validate
from attune.shared.errors import ConfigError, ModelMismatchError
from attune.shared.layout import (
    Dense,
    DenseGradient,
    EventGradients,
    EventShape,
    Layout,
    Param,
    Rows,
    RowsGradient,
    State,
)
from attune.shared.selection import Selection

MODEL_VERSION = 2
# Context features: hour of day and weekday on the unit circle, then a one-hot event type.
TIME_FEATURES = 4
PLUGINS_VARIABLE = "ATTUNE_MODEL_MODULES"


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model. Every device and the coordinator must agree on it (checked on the wire).
    The defaults are the measured preset: dim 8 without the context encoder (at MovieLens scale
    under DP the context block takes clip budget from the item rows: HR@10 0.51 with it, 0.58
    without, at epsilon 8)."""

    num_items: int = knob(4096, "rows of the item table (the dataset sets it in simulations)", low=2)
    dim: int = knob(8, "size of item and user vectors", low=1, high=4096)
    num_event_types: int = knob(5, "event types in the context features", low=0)
    use_context: bool = knob(False, "train the context encoder (hour, weekday, event type)")
    architecture: str = knob("embedding", "the model class (attune.shared.model.register)")
    trained_items: int = knob(4096, "at most this many items get a trained row, the most counted by a DP count; "
                              "the others rank by their noisy popularity (0: every item has a row, no count)",
                              low=0)

    def __post_init__(self) -> None:
        validate(self)
        if self.use_context and self.num_event_types < 1:
            raise ConfigError("use_context needs num_event_types >= 1 (the ranked event type is one of them)")
        if self.num_items * (self.dim + 1) > 2**31:
            raise ConfigError(f"num_items * (dim + 1) must stay under 2**31, got {self.num_items} x {self.dim + 1}")
        model_class(self.architecture)  # an unknown architecture fails here

    @property
    def context_features(self) -> int:
        return TIME_FEATURES + self.num_event_types

    @property
    def rows(self) -> int:
        """Trained rows of the item table: ``trained_items`` at most, the catalog at most."""
        return min(self.trained_items, self.num_items) if self.trained_items else self.num_items


def dot_scores(query: torch.Tensor, vectors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, m]`` from queries ``[b, d]``, item vectors ``[b, m, d]`` and biases ``[b, m]``:
    the one scoring rule of every model."""
    return torch.bmm(vectors, query.unsqueeze(2)).squeeze(2) + bias


class SharedModel(ABC):
    """A model as the round, the wire and the coordinator see it. Subclasses set ``layout`` and
    implement the item side and the per-event gradient; everything takes the shared ``state``
    (name -> tensor, as ``layout`` says) explicitly."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.layout = self.shared_layout(config)

    @staticmethod
    @abstractmethod
    def shared_layout(config: ModelConfig) -> Layout:
        """The shared parameters."""

    @abstractmethod
    def init_state(self, generator: torch.Generator) -> State:
        """A fresh shared side (the coordinator's round 1)."""

    @abstractmethod
    def item_side(self, state: State, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors ``[..., dim]`` and biases ``[...]`` of item indices ``items``."""

    @abstractmethod
    def event_shape(self, negatives: int) -> EventShape:
        """Which parts of the shared side one event's gradient touches, at most (an event is its
        item and ``negatives`` sampled ones)."""

    @abstractmethod
    def event_gradients(self, state: State, query: torch.Tensor, items: torch.Tensor, logit_grads: torch.Tensor,
                        context: torch.Tensor | None) -> EventGradients:
        """Each event's gradient on the shared side: ``d loss / d logit`` is ``logit_grads``
        ``[b, m]`` for the items ``[b, m]`` scored with ``query`` ``[b, d]``."""

    def query(self, state: State, users: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """The queries ``[b, d]`` of people with vectors ``users`` ``[b, d]`` at ``context``."""
        return users.float()

    def score(self, state: State, query: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, m]`` of items ``[b, m]`` for queries ``[b, d]``."""
        vectors, bias = self.item_side(state, items)
        return dot_scores(query, vectors, bias)

    def check(self, state: State) -> None:
        """Refuse a received state whose values this model cannot use (``ModelMismatchError``);
        the layout has checked names, shapes, dtypes and finiteness."""
        return None

    def negative_pool(self, state: State) -> torch.Tensor:
        """The items negatives are drawn from (long): the whole catalog unless a model says less."""
        return torch.arange(self.config.num_items)

    @property
    def counts_items(self) -> bool:
        """Whether a run of this model starts with a count round (``attune.shared.selection``)."""
        return False

    def adopt(self, state: State, selection: Selection) -> State:
        """``state`` once a count round chose which items get rows (models with ``trained_items``)."""
        raise ConfigError(f"the {self.config.architecture} model has no trained_items to select")

    def all_items(self, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item's vector ``[num_items, dim]`` and bias ``[num_items]``."""
        return self.item_side(state, torch.arange(self.config.num_items))


_ARCHITECTURES: dict[str, type[SharedModel]] = {}


def register(name: str) -> Callable[[type[SharedModel]], type[SharedModel]]:
    """Class decorator: ``ModelConfig(architecture=name)`` builds this class."""
    def add(cls: type[SharedModel]) -> type[SharedModel]:
        _ARCHITECTURES[name] = cls
        shared_model.cache_clear()
        return cls

    return add


def model_class(name: str) -> type[SharedModel]:
    if name not in _ARCHITECTURES:
        for module in filter(None, os.environ.get(PLUGINS_VARIABLE, "").split(",")):
            importlib.import_module(module.strip())
    if name not in _ARCHITECTURES:
        raise ConfigError(f"unknown model architecture {name!r}: known {', '.join(sorted(_ARCHITECTURES))}")
    return _ARCHITECTURES[name]


@lru_cache(maxsize=64)
def shared_model(config: ModelConfig) -> SharedModel:
    """The model ``config`` describes."""
    return model_class(config.architecture)(config)


ITEM_EMBEDDING = "item_embedding.weight"
ITEM_BIAS = "item_bias.weight"
CONTEXT_ENCODER = "context_encoder.weight"
ROW_ITEMS = "row_items"  # buffer: the catalog item of each trained row (-1: none)
ITEM_PRIOR = "item_prior"  # buffer: the score of every item without a row (its noisy popularity)


@register("embedding")
class EmbeddingModel(SharedModel):
    """A learned row and bias per item, and a bias-free linear context encoder when ``use_context``.

    With ``trained_items = K > 0`` only ``K`` rows are trained: the items a DP count selected
    (``attune.shared.selection``), named by the buffer ``row_items``; every other item scores its
    ``item_prior`` (its noisy popularity) with no vector. Rows then cost ``K``, not the catalog.

    One event's gradient on the shared side: for each of its ``1 + negatives`` items ``i`` that has
    a row, the row ``g_i * [q, 1]`` (embedding and bias), and ``(sum_i g_i v_i) c^T`` on the
    context encoder.
    """

    ROWS = (ITEM_EMBEDDING, ITEM_BIAS)

    @property
    def rows(self) -> int:
        return self.config.rows

    @property
    def counts_items(self) -> bool:
        return bool(self.config.trained_items)

    @staticmethod
    def shared_layout(config: ModelConfig) -> Layout:
        rows = config.rows
        params = [Param(ITEM_EMBEDDING, (rows, config.dim)), Param(ITEM_BIAS, (rows, 1))]
        if config.use_context:
            params.append(Param(CONTEXT_ENCODER, (config.dim, config.context_features)))
        buffers = () if not config.trained_items else (
            Param(ROW_ITEMS, (rows,), torch.int64), Param(ITEM_PRIOR, (config.num_items,)))
        return Layout(tuple(params), buffers)

    def init_state(self, generator: torch.Generator) -> State:
        config = self.config
        rows = torch.empty(self.rows, config.dim).normal_(0.0, config.dim**-0.5, generator=generator)
        state = {ITEM_EMBEDDING: rows, ITEM_BIAS: torch.zeros(self.rows, 1)}
        if config.use_context:
            state[CONTEXT_ENCODER] = torch.zeros(config.dim, config.context_features)
        if config.trained_items:  # no row is anyone's until a count selects them
            state[ROW_ITEMS] = torch.full((self.rows,), -1, dtype=torch.long)
            state[ITEM_PRIOR] = torch.zeros(config.num_items)
        return state

    def check(self, state: State) -> None:
        if not self.config.trained_items:
            return
        items = state[ROW_ITEMS]
        named = items[items >= 0]
        if bool((items < -1).any()) or bool((items >= self.config.num_items).any()) \
                or named.unique().numel() != named.numel():
            raise ModelMismatchError(f"{ROW_ITEMS} must hold distinct items in 0..{self.config.num_items - 1} or -1")

    def row_of(self, state: State, items: torch.Tensor) -> torch.Tensor:
        """The row of each item (``-1``: it has none)."""
        if not self.config.trained_items:
            return items
        owners = state[ROW_ITEMS]  # looked up in the sorted owners: no catalog-sized map
        named = torch.nonzero(owners >= 0).squeeze(1)
        if len(named) == 0:
            return torch.full_like(items, -1)
        keys, order = owners[named].sort()
        at = torch.searchsorted(keys, items).clamp(max=len(keys) - 1)
        return torch.where(keys[at] == items, named[order[at]], -1)

    def adopt(self, state: State, selection: Selection) -> State:
        """Rows for the selected items, every item's prior, each row's bias started at its item's."""
        named = selection.row_items >= 0
        bias = torch.where(named, selection.prior[selection.row_items.clamp(min=0)], 0.0).unsqueeze(1)
        return state | {ROW_ITEMS: selection.row_items, ITEM_PRIOR: selection.prior, ITEM_BIAS: bias.float()}

    def negative_pool(self, state: State) -> torch.Tensor:
        """The items with a trained row (the whole catalog until a count gave rows out)."""
        owners = state.get(ROW_ITEMS)
        if owners is None or not bool((owners >= 0).any()):
            return super().negative_pool(state)
        return owners[owners >= 0]

    def item_side(self, state: State, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.config.trained_items:
            return state[ITEM_EMBEDDING].float()[items], state[ITEM_BIAS].float()[items, 0]
        rows = self.row_of(state, items)
        has = rows >= 0
        at = rows.clamp(min=0)
        vectors = state[ITEM_EMBEDDING].float()[at] * has.unsqueeze(-1)
        return vectors, torch.where(has, state[ITEM_BIAS].float()[at, 0], state[ITEM_PRIOR].float()[items])

    def query(self, state: State, users: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if context is None or not self.config.use_context:
            return users.float()
        return users.float() + context @ state[CONTEXT_ENCODER].float().T

    def event_shape(self, negatives: int) -> EventShape:
        rows: EventShape = (Rows(self.ROWS, 1 + negatives),)
        return (*rows, Dense(CONTEXT_ENCODER)) if self.config.use_context else rows

    def event_gradients(self, state: State, query: torch.Tensor, items: torch.Tensor, logit_grads: torch.Tensor,
                        context: torch.Tensor | None) -> EventGradients:
        ones = torch.ones(query.shape[0], 1, dtype=query.dtype)
        rows = self.row_of(state, items)
        has = (rows >= 0).to(query.dtype)
        values = (logit_grads * has).unsqueeze(2) * torch.cat([query, ones], dim=1).unsqueeze(1)  # [b, m, d + 1]
        parts: list[RowsGradient | DenseGradient] = [
            RowsGradient(Rows(self.ROWS, items.shape[1]), rows.clamp(min=0), values)]
        if self.config.use_context:
            if context is None:  # events without context features (a device with none): no encoder gradient
                context = torch.zeros(len(items), self.config.context_features)
            vectors = self.item_side(state, items)[0]
            query_grads = torch.bmm(logit_grads.unsqueeze(1), vectors).squeeze(1)  # [b, d]
            outer = (query_grads.unsqueeze(2) * context.unsqueeze(1)).flatten(1)
            parts.append(DenseGradient(Dense(CONTEXT_ENCODER), outer))
        return EventGradients(tuple(parts))


class EmbeddingNetwork(nn.Module):
    """The embedding model as a ``torch.nn.Module`` (parameters named as its layout, plus the
    person's vector), for Opacus's reference per-sample gradients and the centralized baselines:
    the same scoring rule (``dot_scores``) through ``nn.Embedding`` and ``nn.Linear`` layers."""

    def __init__(self, config: ModelConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.item_embedding = nn.Embedding(config.num_items, config.dim)
        self.item_bias = nn.Embedding(config.num_items, 1)
        self.context_encoder = nn.Linear(config.context_features, config.dim, bias=False)
        self.user_vector = nn.Embedding(1, config.dim)
        state = shared_model(config).init_state(generator or torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.item_embedding.weight.copy_(state[ITEM_EMBEDDING])
            self.item_bias.weight.zero_()
            self.context_encoder.weight.zero_()
            self.user_vector.weight.normal_(0.0, config.dim**-0.5, generator=generator)
        self.context_encoder.weight.requires_grad_(config.use_context)

    def forward(self, items: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[b, m]`` of item indices ``[b, m]``."""
        query = self.user_vector(torch.zeros(items.shape[0], dtype=torch.long))
        if context is not None and self.config.use_context:
            query = query + self.context_encoder(context)
        return dot_scores(query, self.item_embedding(items), self.item_bias(items).squeeze(-1))

    def shared_state(self) -> State:
        """Detached copies of the shared parameters, by their layout names."""
        own = dict(self.named_parameters())
        return {name: own[name].detach().clone() for name in shared_model(self.config).layout.names}
