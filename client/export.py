"""Export of the person's scorer for on-device inference outside Python (``torch.export``).

The context encoder is linear, so the query vector for every (hour, weekday) is precomputed into
a ``[24 * 7, dim]`` table: the exported program needs no feature code and gives the same scores
as ``Personalizer.score``. The ``.pt2`` file is what ExecuTorch and AOTInductor take for mobile
and C++ runtimes. It holds the person's own vector: keep it on the device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from attune.shared.vocabulary import Vocabulary

VOCABULARY_FILE = "vocabulary.json"
_MAX_CANDIDATES = 1_000_000


class PersonalScorer(nn.Module):
    """``forward(items, hour, weekday)`` -> scores ``[m]`` of item indices ``[m]`` (long tensors;
    hour and weekday are 0-dim) for this person."""

    item_vectors: torch.Tensor
    item_bias: torch.Tensor
    queries: torch.Tensor

    def __init__(self, item_vectors: torch.Tensor, item_bias: torch.Tensor, queries: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("item_vectors", item_vectors.detach().clone())
        self.register_buffer("item_bias", item_bias.detach().reshape(-1).clone())
        self.register_buffer("queries", queries.detach().reshape(24 * 7, -1).clone())

    def forward(self, items: torch.Tensor, hour: torch.Tensor, weekday: torch.Tensor) -> torch.Tensor:
        slot = (hour * 7 + weekday).reshape(1)
        query = self.queries.index_select(0, slot)[0]
        vectors = self.item_vectors.index_select(0, items)
        return vectors @ query + self.item_bias.index_select(0, items)


def save_scorer(scorer: PersonalScorer, vocabulary: Vocabulary, path: Path) -> None:
    """Export ``scorer`` with a dynamic number of candidates; the id -> index mapping travels
    inside the file (``vocabulary.json``)."""
    mapping = {"num_items": vocabulary.num_items,
               "ids": list(vocabulary.ids) if vocabulary.ids is not None else None,
               "hashing": None if vocabulary.ids is not None else "blake2b-64 little-endian mod num_items"}
    candidates = torch.export.Dim("candidates", min=1, max=_MAX_CANDIDATES)
    example = (torch.tensor([0, 1]), torch.tensor(0), torch.tensor(0))
    program = torch.export.export(scorer.eval(), example, dynamic_shapes=({0: candidates}, None, None))
    torch.export.save(program, str(path), extra_files={VOCABULARY_FILE: json.dumps(mapping)})


def load_scorer(path: Path) -> tuple[nn.Module, dict]:
    """The exported scorer as a callable module, and its vocabulary mapping."""
    extra = {VOCABULARY_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program.module(), json.loads(extra[VOCABULARY_FILE])
