"""The in-process backend and Flower's simulation engine (real apps, real SecAgg+) release the
same sums and so give the same global model, epsilon and quality; both run the evaluation round."""

from dataclasses import replace

import pytest
import torch

from attune.server.checkpoint import load_checkpoint
from attune.server.config import ServerConfig
from attune.simulations.runner import DataSource, SimulationConfig, simulate


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["distributed", "local"])
def test_fast_and_flower_backends_agree(tmp_path, mode):
    server = ServerConfig(mode=mode, rounds=2, seed=5, target_epsilon=4.0, eval_share=0.05)
    server = replace(server, model=replace(server.model, dim=8))
    source = DataSource("synthetic", synthetic_users=12)
    results = {backend: simulate(SimulationConfig(source, server, tmp_path / backend, backend=backend,
                                                  noise="per-device", evaluations=1))
               for backend in ("fast", "flower")}
    fast = load_checkpoint(tmp_path / "fast" / "checkpoints" / "global_final.pt")
    flower = load_checkpoint(tmp_path / "flower" / "checkpoints" / "global_final.pt")
    assert fast.round == flower.round == 3  # the count, a training round, the evaluation round
    for name in flower.state:  # the same integers summed: the same model up to float rounding
        torch.testing.assert_close(fast.state[name], flower.state[name], rtol=1e-5, atol=1e-6)
    assert results["flower"]["privacy"]["trust"]["secure_aggregation"] == (
        "flower-secagg+ (hardened)" if mode == "distributed" else "none")
    assert results["fast"]["privacy"]["epsilon"] == pytest.approx(results["flower"]["privacy"]["epsilon"], rel=1e-9)
    assert results["fast"]["final"]["hr@10"] == pytest.approx(results["flower"]["final"]["hr@10"], abs=1e-6)
    for backend in ("fast", "flower"):  # every device evaluated its held-out event; the ledgers agree on its cost
        estimate = results[backend]["federated_evaluation"]["estimate"]
        assert estimate["devices"] == 12 and abs(estimate["events"] - 12) < 5 * estimate["noise_std"]
