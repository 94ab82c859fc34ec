"""MovieLens-100K loader and protocol (skipped cleanly when ../shared/datasets/ml-100k is absent)."""

import hashlib

import numpy as np

from attune.simulations.datasets import load_movielens
from attune.simulations.evaluation import leave_one_out, popularity_baseline

U_DATA_SHA256 = "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"


def test_movielens_loads_and_protocol_holds(movielens_dir):
    assert hashlib.sha256((movielens_dir / "u.data").read_bytes()).hexdigest() == U_DATA_SHA256
    log = load_movielens(movielens_dir)
    assert (log.num_users, log.num_items, len(log)) == (943, 1682, 100_000)
    split = leave_one_out(log, seed=0)
    assert int((~split.train).sum()) == 943  # exactly one held-out event per user
    held_users = log.users[~split.train]
    assert sorted(held_users.tolist()) == list(range(943))
    # the held-out event is each user's latest
    for user in (0, 100, 942):
        times = log.timestamps[log.users == user]
        assert log.timestamps[(~split.train) & (log.users == user)][0] == times.max()
    # negatives are items the user never interacted with
    seen = set(log.items[log.users == 5].tolist())
    assert not seen & set(split.candidates[5, 1:].tolist())
    popular = popularity_baseline(log, split)
    assert 0.40 < popular["hr@10"] < 0.42 and 0.22 < popular["ndcg@10"] < 0.24
    assert np.isfinite(popular["ndcg@10"])
