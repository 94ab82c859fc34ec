"""The in-process backend and Flower's simulation engine give the same global model (DP on)."""

import pytest
import torch

from attune.server.checkpoint import load_checkpoint
from attune.simulations.runner import DataSource, SimulationConfig, server_config, simulate


@pytest.mark.slow
@pytest.mark.parametrize("context", [True, False], ids=["device-by-device", "batched-cohort"])
def test_fast_and_flower_backends_agree_after_two_rounds(tmp_path, context):
    # without context features and with the user vector frozen in the global phase, the fast
    # backend trains the cohort in batched steps (attune.simulations.cohort)
    server = server_config(rounds=2, clients_per_round=0, local_epochs=1.0, user_epochs=1.0,
                           epsilon=8.0, delta=1e-5, noise_multiplier=None, max_grad_norm=1.0,
                           sample_rate=0.5, lr=1.0, user_lr=0.5, server_lr=10.0, dim=8,
                           no_dp=False, seed=5, context=context, joint_user=context)
    source = DataSource("synthetic", synthetic_users=30)
    results = {}
    for backend in ("fast", "flower"):
        results[backend] = simulate(SimulationConfig(source, server, tmp_path / backend, backend=backend))
    fast_checkpoint = load_checkpoint(tmp_path / "fast" / "checkpoints" / "global_final.pt")
    flower_checkpoint = load_checkpoint(tmp_path / "flower" / "checkpoints" / "global_final.pt")
    fast_round, fast = fast_checkpoint.round, fast_checkpoint.state
    flower_round, flower = flower_checkpoint.round, flower_checkpoint.state
    assert fast_round == flower_round == 2
    for name in flower:
        # same numbers up to float32 summation order in aggregation
        torch.testing.assert_close(fast[name], flower[name], rtol=1e-5, atol=1e-6)
    assert results["fast"]["privacy"]["epsilon_max"] == pytest.approx(
        results["flower"]["privacy"]["epsilon_max"], rel=1e-9)
    assert results["fast"]["final"]["hr@10"] == pytest.approx(results["flower"]["final"]["hr@10"], abs=1e-6)
