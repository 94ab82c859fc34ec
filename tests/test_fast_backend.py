"""The in-process backend: results that state their guarantee and recompute with dp-accounting,
every algorithm in every mode, devices that refuse what a phone would, and runs that repeat."""

import json
from dataclasses import replace

import dp_accounting
import pytest
from device_helpers import request
from dp_accounting import rdp

from attune.client.policy import PrivacyConfig
from attune.server.config import ServerConfig
from attune.shared.accounting import ORDERS, DiscreteGaussianSum, epsilon_of, ledger_from_json
from attune.shared.errors import ConfigError
from attune.simulations.evaluation import leave_one_out
from attune.simulations.fast import InProcessTransport, device_cohort
from attune.simulations.runner import DataSource, SimulationConfig, simulate

SOURCE = DataSource("synthetic", synthetic_users=40)


def _server(mode="distributed", **changes):
    server = ServerConfig(mode=mode, rounds=3, seed=1, **changes)
    return replace(server, model=replace(server.model, dim=8))


def test_results_state_the_guarantee_and_recompute_with_dp_accounting(tmp_path):
    results = simulate(SimulationConfig(SOURCE, _server(target_epsilon=4.0), tmp_path))
    privacy = results["privacy"]
    assert privacy["mode"] == "distributed" and "secure sums" in privacy["statement"]
    # 40 devices, all sampled: SecAgg+ needs ceil(0.9 * 40) of them to unmask a round
    assert privacy["trust"] == {"secure_aggregation": "simulated: the sum is computed directly",
                                "min_survivors": 36, "colluders": 0}
    assert privacy["epsilon"] == pytest.approx(4.0, abs=0.01) and privacy["epsilon_local"] > 4.0
    ledger = ledger_from_json(privacy["history_max"])
    assert epsilon_of(ledger, privacy["delta"]) == pytest.approx(privacy["epsilon"], abs=1e-5)
    accountant = rdp.RdpAccountant(orders=list(ORDERS))
    for entry in ledger:  # the discrete Gaussian sums here have tau * dim below 1e-12: Gaussian events
        assert isinstance(entry.mechanism, DiscreteGaussianSum) and entry.mechanism.tau * entry.mechanism.dim < 1e-12
        accountant.compose(dp_accounting.GaussianDpEvent(entry.mechanism.z), entry.count)
    assert accountant.get_epsilon(privacy["delta"]) == pytest.approx(privacy["epsilon"], rel=1e-3)
    assert "seed" in privacy["noise_source"] and results["rounds"][-1]["epsilon"] == pytest.approx(privacy["epsilon"],
                                                                                                    abs=1e-5)
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text())["privacy"] == privacy


@pytest.mark.parametrize("mode", ["distributed", "local", "off"])
@pytest.mark.parametrize("algorithm", ["partial-local", "ditto", "global"])
def test_every_algorithm_runs_in_every_mode(tmp_path, mode, algorithm):
    results = simulate(SimulationConfig(SOURCE, _server(mode), tmp_path, algorithm=algorithm, evaluations=1))
    metrics = results["beyond_accuracy"]
    assert results["algorithm"] == metrics["algorithm"] == algorithm
    assert (results["privacy"]["epsilon"] is None) == (mode == "off")
    if algorithm == "global":  # one shared model: personalization changes nobody's ranking
        assert metrics["share_users_helped"] == metrics["share_users_hurt"] == 0.0
    else:
        assert metrics["share_users_helped"] > 0


def test_devices_refuse_what_a_phone_would(tmp_path):
    """A noise below the devices' floor: the run is refused before any work, since every device
    would decline it; and asked anyway, the in-process devices decline as a phone does."""
    server = _server(target_epsilon=None, round=replace(_server().round, noise_multiplier=0.5))
    with pytest.raises(ConfigError, match="every device would refuse this run"):
        simulate(SimulationConfig(SOURCE, server, tmp_path, evaluations=1))
    log = SOURCE.load(seed=1)
    transport = InProcessTransport(device_cohort(log, leave_one_out(log, seed=1), use_context=False), 1,
                                   PrivacyConfig())
    collected = transport.collect(request(mode="distributed", noise_multiplier=0.5), transport.devices(), 1)
    assert collected.total is None and collected.contributors == [] and collected.refused == 40


def test_the_same_seed_gives_the_same_run(tmp_path):
    first = simulate(SimulationConfig(SOURCE, _server(), tmp_path / "a", evaluations=1))
    again = simulate(SimulationConfig(SOURCE, _server(), tmp_path / "b", evaluations=1))
    assert [r["hr@10"] for r in first["rounds"]] == [r["hr@10"] for r in again["rounds"]]
    assert first["final"] == again["final"]


def test_bad_simulation_settings_fail_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad in (dict(backend="nope"), dict(algorithm="nope"), dict(noise="nope"), dict(availability=0.0),
                dict(evaluations=0)):
        with pytest.raises(ConfigError):
            SimulationConfig(SOURCE, _server(), tmp_path, **bad)
    with pytest.raises(ConfigError, match="is a file"):
        SimulationConfig(SOURCE, _server(), tmp_path / "file")


def test_a_device_sampled_more_often_than_planned_refuses_what_its_budget_cannot_pay(tmp_path):
    """Sampled devices are planned for the mean plus one standard deviation of their rounds; one
    drawn more often declines the rest, so no device ever spends more than its budget."""
    server = replace(_server(target_epsilon=4.0, devices_per_round=10), rounds=30)
    results = simulate(SimulationConfig(SOURCE, server, tmp_path, evaluations=1))
    assert sum(r["refused"] for r in results["rounds"]) > 0
    ledger = ledger_from_json(results["privacy"]["history_max"])
    assert results["privacy"]["epsilon"] == pytest.approx(epsilon_of(ledger, server.delta), abs=1e-5)
    assert results["privacy"]["epsilon"] <= 4.0 + 1e-6
