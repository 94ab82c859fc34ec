"""End to end through Flower's simulation engine: real ServerApp, ClientApp and device stores."""

import json

import pytest

from attune.simulations.runner import DataSource, SimulationConfig, server_config, simulate


def _run(out, no_dp: bool, rounds: int):
    server = server_config(rounds=rounds, clients_per_round=0, local_epochs=2.0, user_epochs=3.0,
                           epsilon=8.0, delta=1e-5, noise_multiplier=None, max_grad_norm=1.0,
                           sample_rate=1.0, lr=1.0, user_lr=0.5, server_lr=60.0, dim=32,
                           no_dp=no_dp, seed=3)
    return simulate(SimulationConfig(DataSource("synthetic", synthetic_users=200), server, out))


@pytest.mark.slow
def test_small_federated_run_beats_popularity(tmp_path):
    first = _run(tmp_path / "a", no_dp=True, rounds=10)
    assert first["label"].startswith("NON-PRIVATE")
    assert first["final"]["hr@10"] > first["baseline"]["popular"]["hr@10"] + 0.05
    assert (tmp_path / "a" / "curve.png").stat().st_size > 1000
    assert len(list((tmp_path / "a" / "checkpoints").glob("global_round_*.pt"))) == 10


@pytest.mark.slow
def test_private_run_is_reproducible_and_reports_recomputable_epsilon(tmp_path):
    from attune.shared.accounting import epsilon_of

    results = _run(tmp_path / "dp", no_dp=False, rounds=2)
    privacy = results["privacy"]
    assert privacy["unit"] == "event" and results["private"] is True
    assert 0 < privacy["epsilon_max"] <= 8.0
    recomputed = epsilon_of(
        [(privacy["noise_multiplier"], privacy["sample_rate"], privacy["steps_max"])], privacy["delta"])
    assert recomputed == pytest.approx(privacy["epsilon_max"], abs=1e-5)
    again = _run(tmp_path / "dp-again", no_dp=False, rounds=2)  # the same seed: the same results
    assert again["rounds"] == results["rounds"] and again["final"] == results["final"]
    saved = json.loads((tmp_path / "dp-again" / "results.json").read_text())
    assert saved["final"] == again["final"]
