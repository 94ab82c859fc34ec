"""Diverse ranking on MovieLens-100K: what each diversity level gains in variety and costs in HR@10.

Trains the model centrally (as benchmarks/centralized_movielens.py), then for every user re-ranks
the 100 leave-one-out candidates with the device's MMR (``Personalizer.rank(diversity=λ)``) and
measures, over the top 10: HR@10 and NDCG@10 of the held-out item, intra-list diversity (1 - mean
pairwise cosine of item vectors) and catalog coverage. Prints a table and writes
benchmarks/results/diversity.json.

    .venv/bin/python benchmarks/diversity.py --data ../shared/datasets/ml-100k
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from centralized_movielens import trained_on_movielens

from attune.client.ranking import mmr_order
from attune.shared.metrics import CUTOFF, intra_list_diversity

LEVELS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7)


def main() -> None:
    args, log, split, model, users = trained_on_movielens()
    table = model.item_embedding.weight.detach()
    candidates = torch.from_numpy(split.candidates)
    with torch.no_grad():
        scores = model.score(users.weight, candidates)
    rows = []
    for level in LEVELS:
        hits, ndcgs, spread, shown = [], [], [], set()
        for user in range(log.num_users):
            picked = mmr_order(scores[user], table[candidates[user]], level, CUTOFF)
            position = picked.index(0) if 0 in picked else None  # column 0 is the held-out item
            hits.append(position is not None)
            ndcgs.append(0.0 if position is None else 1.0 / math.log2(position + 2))
            top = candidates[user, picked]
            spread.append(intra_list_diversity(table[top].numpy()))
            shown.update(top.tolist())
        rows.append({"diversity": level, "hr@10": float(np.mean(hits)), "ndcg@10": float(np.mean(ndcgs)),
                     "intra_list_diversity": float(np.mean(spread)),
                     "coverage": len(shown) / log.num_items})
    base = rows[0]
    print(f"{'λ':>5} {'HR@10':>7} {'NDCG@10':>8} {'ILD':>6} {'coverage':>9} {'ILD gain':>9} {'HR cost':>8}")
    for row in rows:
        row["ild_gain"] = row["intra_list_diversity"] / base["intra_list_diversity"] - 1
        row["hr_cost"] = 1 - row["hr@10"] / base["hr@10"]
        print(f"{row['diversity']:>5} {row['hr@10']:>7.3f} {row['ndcg@10']:>8.3f} "
              f"{row['intra_list_diversity']:>6.3f} {row['coverage']:>9.3f} {row['ild_gain']:>+9.1%} "
              f"{row['hr_cost']:>8.1%}")
    out = Path(__file__).parent / "results" / "diversity.json"
    out.write_text(json.dumps({"dataset": "movielens-100k", "dim": args.dim, "epochs": args.epochs,
                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
