"""Metrics beyond the mean HR@10: who gains from personalization, and how varied the lists are.

- **Fairness across users**: HR@10 per decile of users by activity (training events), and the
  worst decile's. (Per-user leave-one-out HR is 0 or 1, so deciles of users by HR say nothing;
  deciles by activity show whether light users are served as well as heavy ones.)
- **Gain of personalization per user**: the held-out item's rank with the person's own vector vs
  with the global model only (no user vector): mean rank gain, share of users helped and hurt.
- **Top-10 lists over the whole catalog** (items the user trained on excluded): catalog coverage,
  intra-list diversity (1 - mean pairwise cosine of item vectors) and novelty (mean
  ``-log2`` of the share of users who interacted with each recommended item).
"""

from __future__ import annotations

import numpy as np

from attune.shared.metrics import CUTOFF, hit_and_ndcg, intra_list_diversity, rank_of_first
from attune.simulations.datasets import EventLog
from attune.simulations.evaluation import Split

_CHUNK = 4096  # users per block when scoring the whole catalog


def beyond_accuracy(
    log: EventLog,
    split: Split,
    table: np.ndarray,
    bias: np.ndarray,
    personal: np.ndarray,
    global_only: np.ndarray,
    global_bias: np.ndarray | None = None,
    segments: np.ndarray | None = None,
) -> dict[str, object]:
    """``table`` ``[items, dim]`` is the global item side, or one per segment
    ``[segments, items, dim]`` with each user's segment in ``segments`` ``[users]`` (IFCA);
    ``bias`` the item biases ``[items]``, or each user's own ``[users, items]``, and
    ``global_bias`` likewise (default: ``bias``); ``personal`` and ``global_only`` are each
    user's query vector ``[users, dim]`` with and without their own vector."""
    candidates = split.candidates
    shape = (log.num_users, log.num_items)
    tables = table if table.ndim == 3 else table[None]
    segment = np.zeros(log.num_users, dtype=np.int64) if segments is None else segments
    user_bias = np.broadcast_to(bias, shape)
    global_bias = np.broadcast_to(bias if global_bias is None else global_bias, shape)
    vectors = tables[segment[:, None], candidates]
    scores = np.einsum("ucd,ud->uc", vectors, personal) + np.take_along_axis(user_bias, candidates, axis=1)
    scores_global = (np.einsum("ucd,ud->uc", vectors, global_only)
                     + np.take_along_axis(global_bias, candidates, axis=1))
    hit, _ = hit_and_ndcg(scores)
    hit_global, _ = hit_and_ndcg(scores_global)
    gain = rank_of_first(scores_global) - rank_of_first(scores)

    activity = np.bincount(log.users[split.train], minlength=log.num_users)
    deciles = np.array_split(np.argsort(activity, kind="stable"), 10)
    by_decile = [float(hit[group].mean()) for group in deciles if len(group)]

    seen = np.zeros((log.num_users, log.num_items), dtype=bool)
    seen[log.users[split.train], log.items[split.train]] = True
    reach = seen.sum(axis=0)
    novelty_of = -np.log2((reach + 1) / (log.num_users + 1))
    shown, spread, novelty = np.zeros(log.num_items, dtype=bool), [], []
    for start in range(0, log.num_users, _CHUNK):
        block = slice(start, start + _CHUNK)
        full = np.empty((len(personal[block]), log.num_items))
        for k, items in enumerate(tables):
            mine = segment[block] == k
            full[mine] = personal[block][mine] @ items.T
        full += user_bias[block]
        full[seen[block]] = -np.inf
        top = np.argpartition(-full, CUTOFF, axis=1)[:, :CUTOFF]
        shown[top.ravel()] = True
        spread += [intra_list_diversity(tables[k][row]) for k, row in zip(segment[block], top, strict=True)]
        novelty.append(novelty_of[top].mean(axis=1))
    return {
        "hr@10_personal": float(hit.mean()),
        "hr@10_global_only": float(hit_global.mean()),
        "hr@10_by_activity_decile": [round(v, 6) for v in by_decile],
        "worst_decile_hr@10": min(by_decile),
        "personalization_rank_gain_mean": float(gain.mean()),
        "share_users_helped": float((gain > 0).mean()),
        "share_users_hurt": float((gain < 0).mean()),
        "catalog_coverage@10": float(shown.mean()),
        "intra_list_diversity@10": float(np.mean(spread)),
        "novelty@10": float(np.concatenate(novelty).mean()),
    }
