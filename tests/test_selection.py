"""Selection of the items that get a trained row: the coordinator's choice from a noisy count, the
model with selected rows (its gradients, negatives and scores), and a run that counts first."""

import math
import time
from dataclasses import replace

import pytest
import torch
from in_process_grid import device_grid, simulated_devices

from attune.client import state as state_keys
from attune.client.personalizer import Personalizer
from attune.client.training import Cohort, LocalData, train_round
from attune.server.app import transport_for
from attune.server.checkpoint import load_checkpoint
from attune.server.config import ServerConfig
from attune.server.coordinator import run
from attune.shared.config import RoundTask, preset
from attune.shared.events import Event
from attune.shared.loss import Batch, per_example_loss
from attune.shared.model import ITEM_BIAS, ITEM_EMBEDDING, ITEM_PRIOR, ROW_ITEMS, ModelConfig, shared_model
from attune.shared.randomness import Stream, integers
from attune.shared.selection import select
from attune.shared.vocabulary import Vocabulary
from attune.shared.wire import RoundRequest

MODEL = ModelConfig(num_items=30, dim=3, trained_items=8)


def test_the_most_counted_items_over_the_threshold_get_rows_and_every_item_a_prior():
    counts = torch.tensor([50.0, -2.0, 9.0, 30.0, 0.4, 12.0, 8.0])
    chosen = select(counts, 4, min_count=10.0, negatives=2)
    assert chosen.row_items.tolist() == [0, 3, 5, -1]  # 9 and 8 are under 10: the fourth row stays unused
    drawn = (50 + 9 + 30 + 0.4 + 12 + 8) * 2 / 3  # each row's expected draws as a negative
    assert chosen.prior[0] == pytest.approx(math.log(50 / drawn))
    assert chosen.prior[1] == chosen.prior[4] == pytest.approx(math.log(0.5 / drawn))  # floored
    assert bool((chosen.prior[[0, 3, 5, 2, 6]].diff() < 0).all())  # more counted, higher prior


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    model = shared_model(MODEL)
    counts = torch.arange(30, 0, -1).float()  # item 0 most counted
    return model.adopt(model.init_state(torch.Generator().manual_seed(seed)),
                       select(counts, MODEL.rows, min_count=0.0, negatives=4))


def test_items_without_a_row_score_their_prior_and_get_no_gradient():
    state = _state()
    assert state[ROW_ITEMS].tolist() == list(range(8))
    vectors, bias = shared_model(MODEL).item_side(state, torch.tensor([2, 20]))
    assert vectors[1].abs().sum() == 0 and bias[1] == state[ITEM_PRIOR][20]
    assert bias[0] == state[ITEM_BIAS][2, 0] == state[ITEM_PRIOR][2]  # a row's bias starts at its prior
    data = LocalData(torch.tensor([20, 21, 25]), torch.ones(3), None)  # events on items without rows only
    out = train_round(state, MODEL, torch.ones(1, 3), Cohort.of([data]), preset("off", device_norm=1e9),
                      [Stream.seeded_from(0, "n")], [False])
    rows = shared_model(MODEL).layout.unflatten(out.contributions[0])
    positives = rows[ITEM_EMBEDDING].abs().sum(dim=1)
    negatives = integers(Stream.seeded_from(0, "n"), (3, 4), 8)  # drawn among the 8 rows
    assert set(positives.nonzero().flatten().tolist()) == set(negatives.flatten().tolist())


def test_the_selected_rows_gradient_is_the_autograd_gradient():
    state = _state(1)
    model = shared_model(MODEL)
    data = LocalData(torch.tensor([0, 3, 20, 7, 7, 29]), torch.rand(6) + 0.5, None)
    user = torch.randn(1, 3, generator=torch.Generator().manual_seed(2))
    out = train_round(state, MODEL, user, Cohort.of([data]), preset("off", device_norm=1e9),
                      [Stream.seeded_from(0, "g")], [False])
    params = {name: state[name].clone().requires_grad_(True) for name in model.layout.names}
    items = torch.cat([data.items.unsqueeze(1), state[ROW_ITEMS][integers(Stream.seeded_from(0, "g"), (6, 4), 8)]], 1)
    labels = torch.zeros(items.shape)
    labels[:, 0] = 1
    logits = model.score({**state, **params}, user.expand(6, 3), items)
    per_example_loss(logits, Batch(items, labels, data.weights, None), "bce").sum().backward()
    expected = model.layout.flatten({name: p.grad for name, p in params.items()})
    torch.testing.assert_close(out.contributions[0], expected, atol=1e-5, rtol=1e-5)


def test_a_count_round_releases_the_items_histogram():
    data = LocalData(torch.tensor([4, 4, 9]), torch.ones(3), None)
    out = train_round(_state(), MODEL, torch.zeros(1, 3), Cohort.of([data]), preset("off", task=RoundTask.COUNT),
                      [Stream.seeded_from(0, "c")], [False])
    expected = torch.zeros(30, dtype=torch.float64)
    expected[4], expected[9] = 2.0, 1.0
    assert torch.equal(out.contributions[0], expected)


def test_a_run_counts_first_then_trains_the_selected_rows(tmp_path):
    """(Resuming such a run: tests/test_coordinator.py, whose default model counts first too.)"""
    log, _, vocabulary = simulated_devices(tmp_path, users=6, seed=2)
    config = ServerConfig(mode="local", rounds=3, min_devices=6, target_epsilon=4.0, seed=2, noise_seed=2,
                          signing_key=tmp_path / "coordinator.pem", out_dir=tmp_path / "run", min_item_count=2.0)
    config = replace(config, model=ModelConfig(num_items=log.num_items, dim=4, trained_items=20))
    history = run(transport_for(device_grid(tmp_path, 6, vocabulary, seed=2), config), config)
    assert [r.contributed for r in history] == [6, 6, 6]
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "global_final.pt")
    assert final.counted and bool((final.state[ROW_ITEMS] >= 0).any())
    counts = torch.bincount(torch.from_numpy(log.items), minlength=log.num_items)
    named = final.state[ROW_ITEMS][final.state[ROW_ITEMS] >= 0]
    assert counts[named].float().mean() > counts.float().mean()  # the rows went to counted items
    assert history[-1].epsilon <= 4.0 + 1e-6


def test_each_item_finds_its_row_and_an_item_without_one_finds_none():
    model = shared_model(MODEL)
    owners = torch.tensor([17, -1, 3, 29, -1, 0, 11, 8])  # rows 1 and 4 unused
    state = _state() | {ROW_ITEMS: owners}
    items = torch.tensor([[0, 3, 8, 11], [17, 29, 1, 5]])
    expected = [[owners.tolist().index(i) if i in owners.tolist() else -1 for i in row] for row in items.tolist()]
    assert model.row_of(state, items).tolist() == expected
    assert model.row_of(state | {ROW_ITEMS: torch.full((8,), -1)}, items).tolist() == [[-1] * 4] * 2


def test_a_device_stores_the_selection_once_and_reads_back_every_round_s_model(tmp_path, monkeypatch):
    """The catalog-sized buffers (rows' items, every item's prior) are written when they change,
    not every round, and a reopened device reads the latest parameters with the latest buffers."""
    vocabulary = Vocabulary.of([f"item{i}" for i in range(30)])
    device = Personalizer(tmp_path / "device.sqlite", model=MODEL, vocabulary=vocabulary, simulation_seed=(0, 1))
    device.grant_consent("test-policy-1")
    device.record_many(Event(f"item{i % 9}", "click", time.time() - 900 + i) for i in range(20))
    written: list[set[str]] = []
    store_after = device.store.put_state_after

    def spy(change):
        def recorded(read):
            values = change(read)
            written.append(set(values))
            return values
        store_after(recorded)

    monkeypatch.setattr(device.store, "put_state_after", spy)
    first, second = _state(0), _state(1)  # the same selection, other parameters
    recounted = second | {ITEM_PRIOR: second[ITEM_PRIOR] + 1.0}
    for number, state in enumerate([first, second, recounted], start=1):
        reply = device.contribute(RoundRequest("run", number, MODEL, preset("local", noise_multiplier=3.0,
                                                                               user_noise_multiplier=3.0), state))
        assert reply.vector is not None
        reopened = Personalizer(tmp_path / "device.sqlite", model=MODEL, vocabulary=vocabulary).global_state()
        assert all(torch.equal(reopened[name], state[name]) for name in state)
    buffers = [state_keys.BUFFERS_KEY in keys for keys in written]
    assert buffers == [True, False, True] and all(state_keys.GLOBAL_KEY in keys for keys in written)
