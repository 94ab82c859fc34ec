"""Re-ranking on the device: maximal marginal relevance (Carbonell and Goldstein, 1998).

A plain score ranking tends to fill the top of the list with near-identical items (a filter
bubble). MMR picks greedily the item that maximizes ``(1 - λ) * relevance - λ * max similarity to
the items already picked``, with relevance min-max scaled to [0, 1] over the candidates and
similarity the cosine of item vectors, so ``λ`` means the same for every model.
"""

from __future__ import annotations

import torch


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
