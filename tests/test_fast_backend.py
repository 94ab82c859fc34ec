"""The in-process backend runs the same training code and reports recomputable privacy."""

import pytest

from attune.shared.accounting import epsilon_of
from attune.simulations.runner import DataSource, SimulationConfig, server_config, simulate


def test_fast_backend_private_run_reports_recomputable_epsilon(tmp_path):
    server = server_config(rounds=2, clients_per_round=0, local_epochs=1.0, user_epochs=1.0,
                           epsilon=4.0, delta=1e-5, noise_multiplier=None, max_grad_norm=1.0,
                           sample_rate=1.0, lr=1.0, user_lr=0.5, server_lr=10.0, dim=8,
                           no_dp=False, seed=1)
    config = SimulationConfig(DataSource("synthetic", synthetic_users=40), server, tmp_path, backend="fast")
    results = simulate(config)
    privacy = results["privacy"]
    assert results["backend"] == "fast" and privacy["steps_max"] == 4
    assert privacy["epsilon_max"] == pytest.approx(4.0, abs=0.05)
    recomputed = epsilon_of([(privacy["noise_multiplier"], privacy["sample_rate"], privacy["steps_max"])],
                            privacy["delta"])
    assert recomputed == pytest.approx(privacy["epsilon_max"], abs=1e-5)
    assert len(results["rounds"]) == 2 and (tmp_path / "curve.png").exists()


@pytest.mark.parametrize("algorithm", ["global", "finetune", "partial-local", "ditto", "ifca"])
def test_each_algorithm_trains_privately_and_reports(tmp_path, algorithm):
    server = server_config(rounds=2, clients_per_round=0, local_epochs=1.0, user_epochs=1.0,
                           epsilon=8.0, delta=1e-5, noise_multiplier=None, max_grad_norm=1.0,
                           sample_rate=1.0, lr=1.0, user_lr=0.5, server_lr=10.0, dim=8,
                           no_dp=False, seed=1)
    results = simulate(SimulationConfig(DataSource("synthetic", synthetic_users=40), server, tmp_path,
                                        backend="fast", algorithm=algorithm))
    metrics = results["beyond_accuracy"]
    assert results["algorithm"] == metrics["algorithm"] == algorithm
    privacy = results["privacy"]
    assert 0 < privacy["epsilon_max"] <= 8.0 + 1e-6  # every algorithm is accounted
    recomputed = epsilon_of([tuple(entry) for entry in privacy["history_max"]], privacy["delta"])
    assert recomputed == pytest.approx(privacy["epsilon_max"], abs=1e-5)
    if algorithm == "ifca":  # training and two private segment choices, within the budget
        assert privacy["history_max"][1] == [2.0 / privacy["choice_epsilon"], 1.0, 2]
        assert privacy["epsilon_max"] == pytest.approx(8.0, abs=0.05)
        assert sum(metrics["segments"]) == 40
    if algorithm == "global":  # one shared model: personalization changes nobody's ranking
        assert metrics["share_users_helped"] == metrics["share_users_hurt"] == 0.0
    else:
        assert metrics["share_users_helped"] > 0


def test_other_algorithms_need_the_fast_backend(tmp_path):
    from attune.shared.errors import ConfigError

    server = server_config(rounds=1, clients_per_round=0, local_epochs=1.0, user_epochs=1.0,
                           epsilon=8.0, delta=1e-5, noise_multiplier=None, max_grad_norm=1.0,
                           sample_rate=1.0, lr=1.0, user_lr=0.5, server_lr=10.0, dim=8, no_dp=False, seed=1)
    with pytest.raises(ConfigError, match="fast backend only"):
        SimulationConfig(DataSource("synthetic"), server, tmp_path, backend="flower", algorithm="ditto")
