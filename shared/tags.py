"""Item tags (genres, a category: what a catalog says about its items, public) and the person's
affinity to them, which a device ranks with at no privacy cost.

A device knows its person's events; the catalog says which tags each item carries. Each item
spreads one unit over its tags, so a person's events give them a share of every tag. Against the
tag's share of the model's popularity (``softmax`` of the item biases, the DP model's own view of
what everyone picks), their **affinity** to tag ``t`` is

    a_t = (n_t + k * p_t) / (n + k) / p_t

for ``n_t`` of their ``n`` events on ``t`` and ``k`` (``tag_prior_events``) events' worth of the popular shares ``p_t``
(a person with few events stays near 1). An item's **lift** is its tags' mean ``log a_t``, and a
device ranks by the model's score plus ``strength`` times the lift: a person who mostly picks
comedies sees comedies move up, each in its popularity order. Everything is computed on the
device from its own events and the released model, and nothing of it is sent: no budget is spent.
Tags share what a row learns over many items, so they help most where rows are noisiest (a large
catalog, a small epsilon; ``benchmarks/catalog_size.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attune.shared.config import knob, validate
from attune.shared.errors import ConfigError


@dataclass(frozen=True)
class TagAffinity:
    """How a device weighs its person's tags when it ranks (measured across catalogs: see the README)."""

    tag_strength: float = knob(1.0, "weight of each person's tag affinity in their ranking, computed on the "
                               "device from their events (0: tags unused)", low=0.0)
    tag_prior_events: float = knob(10.0, "events' worth of the popular tag shares a person's affinity starts "
                                   "from", above=0.0)

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class ItemTags:
    """Each catalog item's tags, ``0..num_tags-1`` (an item may have none): a sparse item x tag
    matrix whose rows sum to 1 (an item spreads one unit over its tags)."""

    num_tags: int
    starts: torch.Tensor  # long [num_items + 1]: item i's tags are tags[starts[i]:starts[i + 1]]
    tags: torch.Tensor  # long [nnz]

    def __post_init__(self) -> None:
        if isinstance(self.num_tags, bool) or not isinstance(self.num_tags, int) or self.num_tags < 1:
            raise ConfigError(f"num_tags must be a positive integer, got {self.num_tags!r}")
        starts, tags = self.starts, self.tags
        if not (isinstance(starts, torch.Tensor) and isinstance(tags, torch.Tensor) and starts.dtype == torch.long
                and tags.dtype == torch.long and starts.dim() == 1 and tags.dim() == 1 and len(starts) >= 2
                and int(starts[0]) == 0 and int(starts[-1]) == len(tags) and bool((starts.diff() >= 0).all())):
            raise ConfigError("ItemTags needs long 1-D starts (from 0, non-decreasing, ending at the tag count) and "
                              "tags: build it with ItemTags.of")
        if len(tags) and not (0 <= int(tags.min()) and int(tags.max()) < self.num_tags):
            raise ConfigError(f"item tags must be integers in 0..{self.num_tags - 1}")

    @classmethod
    def of(cls, item_tags: Sequence[Sequence[int]], num_tags: int) -> ItemTags:
        """From each item's list of tag indices (repeats are kept once)."""
        if isinstance(item_tags, (str, bytes)) or not isinstance(item_tags, Sequence) or not all(
                isinstance(tags, Sequence) and not isinstance(tags, (str, bytes)) for tags in item_tags):
            raise ConfigError("item tags must be one sequence of tag indices per item")
        if any(not isinstance(t, int) or isinstance(t, bool) for tags in item_tags for t in tags):
            raise ConfigError("item tags must be integers")
        lists = [sorted(set(tags)) for tags in item_tags]
        lengths = torch.tensor([0] + [len(tags) for tags in lists], dtype=torch.long)
        flat = torch.tensor([t for tags in lists for t in tags], dtype=torch.long)
        return cls(num_tags=num_tags, starts=lengths.cumsum(0), tags=flat)

    @property
    def num_items(self) -> int:
        return len(self.starts) - 1

    def entries(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The nonzero entries of the rows of ``items`` (flattened): each one's position in
        ``items``, its tag and its weight (one over the item's number of tags). Sparse: a
        1M-item catalog with many tags never becomes a dense matrix."""
        flat = items.reshape(-1)
        counts = self.starts[flat + 1] - self.starts[flat]
        position = torch.repeat_interleave(torch.arange(len(flat)), counts)
        offsets = torch.arange(len(position)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        return position, self.tags[self.starts[flat][position] + offsets], 1.0 / counts[position].float()

    def shares(self, item_bias: torch.Tensor) -> torch.Tensor:
        """Each tag's share ``[num_tags]`` of the popularity ``softmax(item_bias)`` (all items)."""
        weights = torch.softmax(item_bias.double(), 0)
        counts = self.starts[1:] - self.starts[:-1]
        per_tag = torch.repeat_interleave(weights / counts.clamp(min=1), counts)
        shares = torch.zeros(self.num_tags, dtype=torch.float64).index_add(0, self.tags, per_tag)
        return (shares / shares.sum().clamp(min=1e-300)).float()


def tag_lift(tags: ItemTags, shares: torch.Tensor, own: torch.Tensor, candidates: torch.Tensor,
             config: TagAffinity) -> torch.Tensor:
    """``config.tag_strength`` times each candidate's lift ``[people, candidates]`` for people whose
    events' tag totals are ``own`` ``[people, num_tags]`` (``person_tags``), against ``shares``."""
    floor = shares.clamp(min=1e-12)
    affinity = (own + config.tag_prior_events * floor) / (own.sum(1, keepdim=True) + config.tag_prior_events) / floor
    position, tag, weight = tags.entries(candidates)
    person = position // max(candidates.shape[1], 1)
    lift = torch.zeros(candidates.numel()).index_add(0, position, weight * affinity.log()[person, tag])
    return config.tag_strength * lift.reshape(candidates.shape)


def person_tags(tags: ItemTags, items: torch.Tensor, owners: torch.Tensor, people: int) -> torch.Tensor:
    """Each person's tag totals ``[people, num_tags]`` over their events' ``items`` (``owners``:
    whose event each is)."""
    position, tag, weight = tags.entries(items)
    totals = torch.zeros(people * tags.num_tags).index_add(0, owners[position] * tags.num_tags + tag, weight)
    return totals.reshape(people, tags.num_tags)
