"""Ranking metrics (HR@10, NDCG@10) and the held-out candidates a simulated device evaluates on.

Shared because devices compute their own metrics (federated evaluation) and simulations compute
baselines with the very same function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attune.shared.events import EventContext

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


@dataclass(frozen=True)
class HeldOut:
    """A held-out interaction (``candidates[0]``) and the unseen items it is ranked against."""

    candidates: list[str]
    context: EventContext


def write_heldout(path: Path, heldout: HeldOut) -> None:
    payload = {
        "candidates": heldout.candidates,
        "hour": heldout.context.hour,
        "weekday": heldout.context.weekday,
    }
    Path(path).write_text(json.dumps(payload))


def read_heldout(path: Path) -> HeldOut:
    payload = json.loads(Path(path).read_text())
    context = EventContext(hour=payload["hour"], weekday=payload["weekday"])
    return HeldOut(candidates=list(payload["candidates"]), context=context)


def intra_list_diversity(vectors: np.ndarray) -> float:
    """1 - mean pairwise cosine similarity of a list's item vectors ``[k, d]`` (higher: more varied)."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    k = unit.shape[0]
    if k < 2:
        return 0.0
    similarity = unit @ unit.T
    return float(1.0 - (similarity.sum() - np.trace(similarity)) / (k * (k - 1)))
