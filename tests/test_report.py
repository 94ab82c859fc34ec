"""Beyond-accuracy metrics against a plain-Python reference, and in the fast backend's results."""

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest

from attune.server.config import ServerConfig
from attune.simulations.datasets import synthetic
from attune.simulations.evaluation import leave_one_out
from attune.simulations.report import beyond_accuracy
from attune.simulations.runner import DataSource, SimulationConfig, simulate


def test_beyond_accuracy_matches_a_plain_reference():
    log = synthetic(num_users=30, seed=2)
    split = leave_one_out(log, seed=2)
    rng = np.random.default_rng(0)
    table, bias = rng.normal(size=(log.num_items, 4)), rng.normal(size=log.num_items) * 0.1
    personal, global_only = rng.normal(size=(30, 4)), np.zeros((30, 4))
    report = beyond_accuracy(log, split, table, bias, personal, global_only)

    users, items = log.users[split.train], log.items[split.train]
    train_pairs = {(int(u), int(i)) for u, i in zip(users, items, strict=True)}
    shown, ild, novelty = set(), [], []
    reach = {i: len({u for u, j in train_pairs if j == i}) for i in range(log.num_items)}
    for user in range(30):
        scores = {i: float(table[i] @ personal[user] + bias[i]) for i in range(log.num_items)
                  if (user, i) not in train_pairs}
        top = sorted(scores, key=lambda i: -scores[i])[:10]
        shown.update(top)
        unit = [table[i] / np.linalg.norm(table[i]) for i in top]
        ild.append(1 - np.mean([float(a @ b) for a, b in itertools.permutations(unit, 2)]))
        novelty.append(np.mean([-math.log2((reach[i] + 1) / 31) for i in top]))
    assert report["catalog_coverage@10"] == pytest.approx(len(shown) / log.num_items)
    assert report["intra_list_diversity@10"] == pytest.approx(np.mean(ild))
    assert report["novelty@10"] == pytest.approx(np.mean(novelty))

    def rank(query, user):
        cands = split.candidates[user]
        s = table[cands] @ query + bias[cands]
        return sum(s[1:] > s[0]) + 0.5 * sum(s[1:] == s[0])

    gains = [rank(global_only[u], u) - rank(personal[u], u) for u in range(30)]
    assert report["personalization_rank_gain_mean"] == pytest.approx(np.mean(gains))
    assert report["share_users_helped"] == pytest.approx(np.mean([g > 0 for g in gains]))
    hits = [rank(personal[u], u) < 10 for u in range(30)]
    assert report["hr@10_personal"] == pytest.approx(np.mean(hits))
    assert report["worst_decile_hr@10"] == min(report["hr@10_by_activity_decile"])


def test_fast_backend_results_carry_the_metrics(tmp_path):
    server = replace(ServerConfig(mode="distributed", rounds=2, target_epsilon=4.0), seed=1)
    server = replace(server, model=replace(server.model, dim=8))
    results = simulate(SimulationConfig(DataSource("synthetic", synthetic_users=40), server, tmp_path))
    metrics = results["beyond_accuracy"]
    assert metrics["hr@10_personal"] == pytest.approx(results["final"]["hr@10"], abs=1e-6)
    assert 0 < metrics["catalog_coverage@10"] <= 1 and len(metrics["hr@10_by_activity_decile"]) == 10


def test_skewed_data_sizes_keep_each_users_newest_events():
    from attune.simulations.evaluation import skew_data_sizes

    log = synthetic(num_users=50, seed=3)
    split = leave_one_out(log, seed=3)
    skewed = skew_data_sizes(log, split, skew=2.0, seed=3)
    assert not (skewed.train & ~split.train).any()  # only ever drops training events
    before = np.bincount(log.users[split.train], minlength=50)
    after = np.bincount(log.users[skewed.train], minlength=50)
    assert (after >= 1).all() and after.sum() < 0.5 * before.sum()
    for user in range(50):
        kept = log.timestamps[skewed.train & (log.users == user)]
        dropped = log.timestamps[split.train & ~skewed.train & (log.users == user)]
        assert not len(dropped) or kept.min() >= dropped.max()  # the newest are kept
    assert skew_data_sizes(log, split, skew=0.0, seed=3) is split


def test_the_persons_budget_lives_in_the_store_and_binds_every_process(tmp_path):
    """Issue 23: an app opened its store with a budget of 2, a SuperNode with the default 8 joined
    rounds up to 8 and the summary said "epsilon 8.00 of 2.00" while "taking part"."""
    from device_helpers import open_device, request

    app = open_device(tmp_path / "d.sqlite", epsilon_budget=2.0)
    app.close()
    node = open_device(tmp_path / "d.sqlite", events=0)  # the node config's default budget, 8
    assert node.epsilon_budget == 2.0
    joined = [node.contribute(request(r, noise_multiplier=6.0, user_noise_multiplier=6.0)).status.value
              for r in range(1, 40)]
    assert joined[0] == "contributed" and "refused" in joined and 1.0 < node.epsilon() <= 2.0  # bound by the store
    node.close()
    later = open_device(tmp_path / "d.sqlite", events=0, epsilon_budget=1.0)  # a smaller one lowers it
    summary = later.privacy_summary()
    assert later.epsilon_budget == 1.0 and "of 1.00" not in summary and "nothing more is spent" in summary
    assert "not contributing (privacy budget used up)" in summary
    assert later.contribute(request(9)).status.value == "refused"
    later.set_epsilon_budget(20.0)  # raised explicitly, for every process
    assert later.privacy_report().epsilon_left > 0 and "taking part" in later.privacy_summary()
    later.close()
    assert open_device(tmp_path / "d.sqlite", events=0).epsilon_budget == 8.0  # the node's own limit still holds
