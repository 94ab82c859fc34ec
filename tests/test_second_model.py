"""A second model is one class (``tests/toy_tower.py``): its closed-form event gradient is the
autograd one, and it runs whole federations on both backends through the unchanged mechanism,
wire and coordinator."""

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import toy_tower

from attune.client.training import Cohort, LocalData, train_round
from attune.server.checkpoint import load_checkpoint
from attune.server.config import ServerConfig
from attune.shared.config import preset
from attune.shared.loss import Batch, per_example_loss
from attune.shared.mechanism import contribution_dim, sensitivity
from attune.shared.model import PLUGINS_VARIABLE, ModelConfig, shared_model
from attune.shared.randomness import Stream, integers
from attune.simulations.runner import DataSource, SimulationConfig, simulate

MODEL = ModelConfig(num_items=40, dim=3, architecture="toy-tower")


def test_the_towers_event_gradient_is_the_autograd_gradient():
    tower = shared_model(MODEL)
    state = tower.init_state(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    data = LocalData(torch.randint(0, 40, (9,), generator=g), torch.rand(9, generator=g) + 0.5, None)
    user = torch.randn(1, 3, generator=g)
    out = train_round(state, MODEL, user, Cohort.of([data]), preset("off", device_norm=1e9),
                      [Stream.seeded_from(0, "t")], [False])
    weight = state[toy_tower.TOWER].clone().requires_grad_(True)
    items = torch.cat([data.items.unsqueeze(1), integers(Stream.seeded_from(0, "t"), (9, 4), 40)], dim=1)
    labels = torch.zeros(items.shape)
    labels[:, 0] = 1
    logits = tower.score({toy_tower.TOWER: weight}, user.expand(9, 3), items)
    per_example_loss(logits, Batch(items, labels, data.weights, None), "bce").sum().backward()
    torch.testing.assert_close(out.contributions[0], weight.grad.double().reshape(-1), atol=1e-5, rtol=1e-5)
    assert contribution_dim(MODEL) == 4 * toy_tower.FEATURES  # whatever the catalog's size
    assert sensitivity(MODEL, preset("distributed")) < 2**16 + 10


def _config(out: Path, backend: str) -> SimulationConfig:
    server = ServerConfig(mode="distributed", rounds=2, seed=5, target_epsilon=4.0)
    server = replace(server, model=replace(server.model, dim=3, architecture="toy-tower"))
    return SimulationConfig(DataSource("synthetic", synthetic_users=12), server, out, backend=backend,
                            noise="per-device", evaluations=1)


def test_the_tower_trains_through_a_federation_on_the_fast_backend(tmp_path):
    results = simulate(_config(tmp_path, "fast"))
    final = load_checkpoint(tmp_path / "checkpoints" / "global_final.pt")
    assert set(final.state) == {toy_tower.TOWER} and final.round == 2
    assert results["privacy"]["epsilon"] <= 4.0 and results["final"]["hr@10"] is not None


@pytest.mark.slow
def test_the_tower_runs_on_flower_exactly_as_on_the_fast_backend(tmp_path, monkeypatch):
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv(PLUGINS_VARIABLE, "toy_tower")
    results = {backend: simulate(_config(tmp_path / backend, backend)) for backend in ("fast", "flower")}
    fast = load_checkpoint(tmp_path / "fast" / "checkpoints" / "global_final.pt")
    flower = load_checkpoint(tmp_path / "flower" / "checkpoints" / "global_final.pt")
    torch.testing.assert_close(fast.state[toy_tower.TOWER], flower.state[toy_tower.TOWER], rtol=1e-5, atol=1e-6)
    assert results["fast"]["privacy"]["epsilon"] == pytest.approx(results["flower"]["privacy"]["epsilon"])
