"""Centralized, non-private training of Attune's model on MovieLens-100K: the utility ceiling.

Same model, negatives, loss and leave-one-out protocol as `attune simulate`; all events in one
place, Adam, no DP. Prints and writes benchmarks/results/centralized_movielens.json.

    .venv/bin/python benchmarks/centralized_movielens.py --data ../shared/datasets/ml-100k
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attune.shared.loss import Batch, per_example_loss
from attune.shared.metrics import hit_and_ndcg
from attune.shared.model import EmbeddingNetwork, ModelConfig
from attune.simulations.datasets import EventLog, load_movielens
from attune.simulations.evaluation import Split, leave_one_out, popularity_baseline


def train_centralized(log: EventLog, split: Split, dim: int, epochs: int, seed: int
                      ) -> tuple[EmbeddingNetwork, torch.nn.Embedding]:
    """The item side and one user vector per user, trained with all events in one place."""
    g = torch.Generator().manual_seed(seed)
    model = EmbeddingNetwork(ModelConfig(num_items=log.num_items, dim=dim, use_context=False), g)
    users = torch.nn.Embedding(log.num_users, dim)
    torch.nn.init.normal_(users.weight, 0, dim**-0.5, generator=g)
    params = [model.item_embedding.weight, model.item_bias.weight, users.weight]
    opt = torch.optim.Adam(params, lr=3e-3)
    u = torch.from_numpy(log.users[split.train])
    i = torch.from_numpy(log.items[split.train])
    for _ in range(epochs):
        for idx in torch.randperm(len(u), generator=g).split(256):
            items = torch.cat([i[idx, None], torch.randint(0, log.num_items, (len(idx), 4), generator=g)], 1)
            labels = torch.zeros(len(idx), 5)
            labels[:, 0] = 1
            batch = Batch(items, labels, torch.ones(len(idx)), None)
            logits = model.score(users(u[idx]), items)
            loss = per_example_loss(logits, batch, "bce").mean() + 1e-6 * users(u[idx]).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, users


def trained_on_movielens() -> tuple[argparse.Namespace, EventLog, Split, EmbeddingNetwork, torch.nn.Embedding]:
    """Parse ``--data --epochs --dim --seed``, load MovieLens and train centrally (shared by the
    benchmarks that need the centrally trained model)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/ml-100k"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    log = load_movielens(args.data)
    split = leave_one_out(log, seed=args.seed)
    model, users = train_centralized(log, split, args.dim, args.epochs, args.seed)
    return args, log, split, model, users


def main() -> None:
    args, log, split, model, users = trained_on_movielens()
    with torch.no_grad():
        cand = torch.from_numpy(split.candidates)
        scores = model.score(users.weight, cand).numpy()
    hit, ndcg = hit_and_ndcg(scores)
    result = {
        "dataset": "movielens-100k", "dim": args.dim, "epochs": args.epochs,
        "centralized_non_private": {"hr@10": float(hit.mean()), "ndcg@10": float(ndcg.mean())},
        "popular": popularity_baseline(log, split),
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "centralized_movielens.json"
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
