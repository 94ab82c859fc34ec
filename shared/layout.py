"""Where every shared parameter sits in the flat vector that crosses the wire, and how one event's
gradient touches it.

A model declares its shared parameters once, as a ``Layout`` (names, shapes, flat order), and the
shape of one event's gradient as ``EventShape``: whole *rows* of parameters that share a row index
(an item's embedding row and its bias: one per item of the event, repeated items adding up), and
*dense* blocks (a context encoder, an item tower). Everything else reads these: flattening for the
wire and the coordinator, checking a received model, the per-event clipping and rounding of the
device round, and the rounding bound that the sensitivity adds (``attune.shared.mechanism``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from attune.shared.errors import ModelMismatchError

State = dict[str, torch.Tensor]


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 16) -> bool:
    """Whether every value is finite, checked a chunk at a time: ``torch.isfinite`` of a whole
    float tensor allocates its absolute value, a model-sized copy (the prior of a 1M-item catalog)."""
    if not tensor.is_floating_point():
        return True
    return all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(chunk))


@dataclass(frozen=True)
class Param:
    """One shared parameter (or buffer): its name on the wire, its shape and its dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def row_width(self) -> int:
        """Numbers in one row (the first axis indexes rows)."""
        return self.size // self.shape[0]


@dataclass(frozen=True)
class Layout:
    """The shared parameters in their flat order (what devices train and contribute to), and the
    buffers sent and signed with them that nobody trains (which items have rows, say)."""

    params: tuple[Param, ...]
    buffers: tuple[Param, ...] = ()

    def __post_init__(self) -> None:
        names = [p.name for p in (*self.params, *self.buffers)]
        if len(set(names)) != len(names):
            raise ValueError(f"parameter names repeat: {names}")

    @property
    def names(self) -> tuple[str, ...]:
        """The trained parameters."""
        return tuple(p.name for p in self.params)

    @property
    def sent(self) -> tuple[str, ...]:
        """Everything a round sends: the parameters, then the buffers."""
        return tuple(p.name for p in (*self.params, *self.buffers))

    @property
    def size(self) -> int:
        return sum(p.size for p in self.params)

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def offset(self, name: str) -> int:
        """Where ``name`` starts in the flat vector."""
        start = 0
        for p in self.params:
            if p.name == name:
                return start
            start += p.size
        raise KeyError(name)

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The parameters as one float64 vector, in layout order."""
        return torch.cat([state[p.name].double().reshape(-1) for p in self.params])

    def unflatten(self, vector: torch.Tensor) -> State:
        """Views of ``vector`` with each parameter's shape (inverse of ``flatten``)."""
        out, start = {}, 0
        for p in self.params:
            out[p.name] = vector[start:start + p.size].reshape(p.shape)
            start += p.size
        return out

    def check(self, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> State:
        """Received parameters and buffers as tensors, or ``ModelMismatchError`` naming every
        difference: missing or extra names, shapes, dtypes, non-finite values."""
        problems = []
        if missing := sorted(set(self.sent) - set(arrays)):
            problems.append(f"missing {', '.join(missing)}")
        if extra := sorted(set(arrays) - set(self.sent)):
            problems.append(f"unexpected {', '.join(extra)}")
        state: State = {}
        for p in (*self.params, *self.buffers):
            if p.name not in arrays:
                continue
            value = arrays[p.name]
            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
            if tuple(tensor.shape) != p.shape:
                problems.append(f"{p.name} has shape {tuple(tensor.shape)}, expected {p.shape}")
            elif tensor.dtype != p.dtype:
                problems.append(f"{p.name} has dtype {tensor.dtype}, expected {p.dtype}")
            elif not all_finite(tensor):
                problems.append(f"{p.name} has non-finite values")
            else:
                state[p.name] = tensor
        if problems:
            raise ModelMismatchError("global model does not match: " + "; ".join(problems))
        return state


@dataclass(frozen=True)
class Rows:
    """Up to ``count`` rows per event of the parameters ``params``, which share a row index."""

    params: tuple[str, ...]
    count: int


@dataclass(frozen=True)
class Dense:
    """All of parameter ``param``, once per event."""

    param: str


EventShape = tuple[Rows | Dense, ...]


def row_width(layout: Layout, part: Rows) -> int:
    return sum(layout.param(name).row_width for name in part.params)


def rounding_bound(layout: Layout, shape: EventShape) -> float:
    """Bound on the L2 norm of one event's rounding error, in units: half a unit on every number it
    touches, summed over its rows and blocks (triangle inequality: a repeated row rounds twice)."""
    total = 0.0
    for part in shape:
        if isinstance(part, Rows):
            total += part.count * math.sqrt(row_width(layout, part)) / 2
        else:
            total += math.sqrt(layout.param(part.param).size) / 2
    return total


@dataclass(frozen=True)
class RowsGradient:
    """Each event's gradient on ``part``: row ids ``[b, k]`` and their values ``[b, k, width]``
    (the row's numbers across ``part.params``, in that order)."""

    part: Rows
    ids: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class DenseGradient:
    """Each event's gradient on a whole parameter, ``[b, size]``."""

    part: Dense
    values: torch.Tensor


@dataclass(frozen=True)
class EventGradients:
    """The per-event gradients of a batch on the shared side, in the parts of its ``EventShape``."""

    parts: tuple[RowsGradient | DenseGradient, ...]

    def squared_norms(self) -> torch.Tensor:
        """``[b]``: repeated rows add up before the norm (``sum_{k,k'} [id_k == id_k'] <v_k, v_k'>``)."""
        total: torch.Tensor | None = None
        for g in self.parts:
            if isinstance(g, RowsGradient):
                same = (g.ids.unsqueeze(2) == g.ids.unsqueeze(1)).to(g.values.dtype)
                gram = torch.bmm(g.values, g.values.transpose(1, 2))
                part = (same * gram).sum(dim=(1, 2))
            else:
                part = g.values.pow(2).sum(dim=1)
            total = part if total is None else total + part
        assert total is not None, "an event touches at least one parameter"
        return total

    def map(self, change) -> EventGradients:  # noqa: ANN001 - values -> values
        """The same parts with ``change`` applied to every values tensor (scaling, rounding)."""
        return EventGradients(tuple(
            RowsGradient(g.part, g.ids, change(g.values)) if isinstance(g, RowsGradient)
            else DenseGradient(g.part, change(g.values)) for g in self.parts))

    def scatter(self, layout: Layout, device: torch.Tensor, devices: int, dtype: torch.dtype) -> torch.Tensor:
        """Each device's sum of its events' gradients, ``[devices, layout.size]`` (``device[e]``: the
        device of event ``e``)."""
        width = layout.size
        sums = torch.zeros(devices * width, dtype=dtype)
        start = device * width
        for g in self.parts:
            if isinstance(g, RowsGradient):
                column = 0
                for name in g.part.params:
                    p = layout.param(name)
                    w = p.row_width
                    base = (start + layout.offset(name)).view(-1, 1, 1)
                    positions = base + (g.ids * w).unsqueeze(2) + torch.arange(w)
                    sums.index_add_(0, positions.reshape(-1), g.values[:, :, column:column + w].reshape(-1).to(dtype))
                    column += w
            else:
                p = layout.param(g.part.param)
                positions = (start + layout.offset(p.name)).view(-1, 1) + torch.arange(p.size)
                sums.index_add_(0, positions.reshape(-1), g.values.reshape(-1).to(dtype))
        return sums.view(devices, width)
