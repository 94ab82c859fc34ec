"""Ranking metrics (HR@10, NDCG@10) and the beyond-accuracy metrics of a ranked list.

Computed by the simulator on the device's scores, for the model and for the baselines alike, with
the very same functions; devices send no metric.
"""

from __future__ import annotations

import numpy as np

CUTOFF = 10


def rank_of_first(scores: np.ndarray) -> np.ndarray:
    """0-based rank of column 0 within each row (ties count half: expected random tie-break); a
    row with a non-finite score ranks its target last (a diverged model hits nothing)."""
    target = scores[:, :1]
    rank = (scores > target).sum(axis=1) + 0.5 * ((scores == target).sum(axis=1) - 1)
    broken = ~np.isfinite(scores).all(axis=1)
    return np.where(broken, scores.shape[1] - 1, rank)


def hit_and_ndcg(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row HR@10 and NDCG@10 for candidate scores ``[rows, candidates]`` (target first)."""
    rank = rank_of_first(np.asarray(scores, dtype=np.float64))
    hit = (rank < CUTOFF).astype(np.float64)
    return hit, hit / np.log2(rank + 2.0)


def intra_list_diversity(vectors: np.ndarray) -> float:
    """1 - mean pairwise cosine similarity of a list's item vectors ``[k, d]`` (higher: more varied)."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    k = unit.shape[0]
    if k < 2:
        return 0.0
    similarity = unit @ unit.T
    return float(1.0 - (similarity.sum() - np.trace(similarity)) / (k * (k - 1)))
