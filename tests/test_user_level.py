"""User-level DP and robust aggregation math against independent references; checkpoints."""

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from attune.server.aggregation import (
    AggregationConfig,
    ServerAdam,
    aggregate,
    coordinate_median,
    trimmed_mean,
)
from attune.server.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from attune.server.privacy import UserLevelAccountant
from attune.shared.errors import ConfigError, StoreError
from attune.shared.user_level import clip_update, noised_mean


def _update(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"a": scale * torch.randn(7, 3, generator=g), "b": scale * torch.randn(5, generator=g)}


def test_clipping_matches_numpy_and_survives_a_zero_update():
    update = _update(0, scale=3.0)
    flat = np.concatenate([update["a"].numpy().ravel(), update["b"].numpy().ravel()])
    clipped, norm = clip_update(update, 1.5)
    assert norm == pytest.approx(float(np.linalg.norm(flat.astype(np.float64))))
    again = np.concatenate([clipped["a"].numpy().ravel(), clipped["b"].numpy().ravel()])
    np.testing.assert_allclose(again, flat * 1.5 / np.linalg.norm(flat), rtol=1e-6)
    small, _ = clip_update(_update(1, scale=0.01), 1.5)
    torch.testing.assert_close(small, _update(1, scale=0.01))  # under the bound: untouched
    zero, zero_norm = clip_update({k: torch.zeros_like(v) for k, v in update.items()}, 1.5)
    assert zero_norm == 0.0 and all(not t.any() for t in zero.values())


def test_noise_on_the_sum_has_the_calibrated_scale():
    updates = [{"w": torch.full((200_000,), 0.1)} for _ in range(4)]
    out = noised_mean(updates, max_norm=2.0, noise_multiplier=1.5, generator=torch.Generator().manual_seed(0))
    noise = out["w"].numpy() - 0.1
    assert abs(noise.mean()) < 0.01
    assert noise.std() == pytest.approx(1.5 * 2.0 / 4, rel=0.01)  # std of the mean: z C / n
    exact = noised_mean(updates, max_norm=2.0, noise_multiplier=0.0, generator=torch.Generator())
    np.testing.assert_allclose(exact["w"].numpy(), 0.1, rtol=1e-7)


def test_user_level_ledger_equals_opacus_and_stops_at_budget():
    accountant = UserLevelAccountant(noise_multiplier=1.1, delta=1e-5, budget=None)
    reference = RDPAccountant()
    for cohort, population in ((30, 100), (25, 100), (30, 120)):  # actual cohort sizes per round
        accountant.record(cohort, population)
        reference.step(noise_multiplier=1.1, sample_rate=cohort / population)
    assert accountant.epsilon() == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    capped = UserLevelAccountant(noise_multiplier=1.1, delta=1e-5, budget=accountant.epsilon() * 1.01)
    capped.ledger.load_state_dict(accountant.ledger.state_dict())
    assert not capped.admits(30, 100)
    assert UserLevelAccountant(1.1, 1e-5, budget=1e6).admits(30, 100)


def test_robust_rules_match_numpy_and_ignore_an_outlier():
    updates = [_update(i) for i in range(9)]
    updates[4] = {k: v * 1e6 for k, v in updates[4].items()}  # one hostile device
    stack = np.stack([u["a"].numpy() for u in updates]).astype(np.float64)
    np.testing.assert_allclose(coordinate_median(updates)["a"].numpy(), np.median(stack, axis=0))
    ordered = np.sort(stack, axis=0)
    np.testing.assert_allclose(trimmed_mean(updates, 0.2)["a"].numpy(), ordered[1:8].mean(axis=0))
    assert float(trimmed_mean(updates, 0.2)["a"].abs().max()) < 10
    config = AggregationConfig(rule="median")
    torch.testing.assert_close(aggregate(config, 1, [(u, 1.0) for u in updates]), coordinate_median(updates))
    with pytest.raises(ConfigError, match="user-level DP"):
        AggregationConfig(rule="median", update_clip=1.0, user_noise_multiplier=1.0)


def test_checkpoint_round_trip_and_fallback_past_corrupt_or_partial_files(tmp_path):
    adam = ServerAdam(0.1)
    adam.step(_update(0), _update(1))
    ledger = UserLevelAccountant(1.0, 1e-5, None)
    ledger.record(10, 100)
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, Checkpoint(r, _update(r), adam.state_dict(), ledger.ledger.state_dict()))
    loaded = load_checkpoint(tmp_path / "global_round_0002.pt")
    torch.testing.assert_close(loaded.state, _update(2))
    restored = ServerAdam(0.1)
    restored.load_state_dict(loaded.optimizer)
    torch.testing.assert_close(restored.m, adam.m)
    assert loaded.ledger == ledger.ledger.state_dict()
    newest = tmp_path / "global_round_0003.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))  # a flipped bit
    with pytest.raises(StoreError, match="checksum"):
        load_checkpoint(newest)
    assert latest_checkpoint(tmp_path).round == 2
    (tmp_path / "global_round_0002.pt").write_bytes(b"partial")  # a torn write
    assert latest_checkpoint(tmp_path).round == 1
    (tmp_path / "global_round_0001.pt.sha256").unlink()
    assert latest_checkpoint(tmp_path) is None


def test_pyproject_run_config_declares_every_server_option_with_its_default():
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    from attune.server.config import ServerConfig

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert ServerConfig.from_run_config(pyproject["tool"]["flwr"]["app"]["config"]) == ServerConfig()
