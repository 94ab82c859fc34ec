"""A catalog over ``SLICE_ITEMS`` is counted a slice per round: the slices are the whole count in
pieces, a device pays a pass once (at its first slice) and sends each slice of it once, and a run
selects rows over the whole catalog. Here a slice is 16 items, so a 40-item catalog has three."""

import time
from dataclasses import replace

import pytest
import torch
from in_process_grid import device_grid, simulated_devices

from attune.client.device_round import Status
from attune.client.personalizer import Personalizer
from attune.client.training import Cohort, LocalData, train_round
from attune.server.app import transport_for
from attune.server.checkpoint import load_checkpoint
from attune.server.config import ServerConfig
from attune.server.coordinator import run
from attune.shared import selection
from attune.shared.config import RoundTask, preset
from attune.shared.errors import ConfigError
from attune.shared.events import Event
from attune.shared.mechanism import contribution_dim
from attune.shared.model import ROW_ITEMS, ModelConfig, shared_model
from attune.shared.randomness import Stream
from attune.shared.vocabulary import Vocabulary
from attune.shared.wire import RoundRequest

MODEL = ModelConfig(num_items=40, dim=3, trained_items=8)


@pytest.fixture(autouse=True)
def small_slices(monkeypatch):
    monkeypatch.setattr(selection, "SLICE_ITEMS", 16)


def _count(part: int, **changes) -> RoundRequest:
    changes.setdefault("noise_multiplier", 3.0)
    config = preset("local", task=RoundTask.COUNT, count_part=part, user_noise_multiplier=3.0, **changes)
    return RoundRequest("run", 0, MODEL, config, shared_model(MODEL).init_state(torch.Generator().manual_seed(0)))


def test_the_slices_cover_the_catalog_once():
    assert [selection.count_span(40, part) for part in range(selection.count_slices(40))] == [(0, 16), (16, 32),
                                                                                              (32, 40)]
    assert [contribution_dim(MODEL, _count(part).config) for part in range(3)] == [16, 16, 8]
    with pytest.raises(ConfigError, match="outside the 3 slices"):
        selection.count_span(40, 3)


def test_the_slices_are_the_whole_count_in_pieces(monkeypatch):
    data = Cohort.of([LocalData(torch.tensor([1, 1, 17, 39, 30, 5]), torch.ones(6), None),
                      LocalData(torch.tensor([33, 2]), torch.ones(2), None)])

    def counts(part: int) -> torch.Tensor:
        config = preset("local", task=RoundTask.COUNT, count_part=part, noise_multiplier=3.0, device_norm=1e6)
        return train_round({}, MODEL, torch.zeros(2, 3), data, config, [Stream.seeded_from(0, k) for k in range(2)],
                           [False, False], shares=False).contributions

    pieces = torch.cat([counts(part) for part in range(3)], dim=1)
    monkeypatch.setattr(selection, "SLICE_ITEMS", 1 << 17)
    assert torch.equal(pieces, counts(0))


def test_a_device_pays_a_count_pass_once_and_sends_each_slice_of_it_once(tmp_path):
    vocabulary = Vocabulary.of([f"item{i}" for i in range(40)])

    def device(name: str) -> Personalizer:
        person = Personalizer(tmp_path / name, model=MODEL, vocabulary=vocabulary, simulation_seed=(0, 1))
        person.grant_consent("test-policy-1")
        person.record_many(Event(f"item{i % 40}", "click", time.time() - 900 + i) for i in range(30))
        return person

    phone = device("a.sqlite")

    def join(number: int, part: int, **changes) -> Status:
        return phone.contribute(replace(_count(part, **changes), round=number)).status

    assert join(1, 0) is Status.CONTRIBUTED
    paid = phone.epsilon()
    assert paid > 0 and [join(2, 1), join(3, 1), join(4, 2)] == [Status.CONTRIBUTED, Status.REFUSED,
                                                                 Status.CONTRIBUTED]
    assert phone.epsilon() == paid and phone.round(replace(_count(1), round=5)).run().reason.endswith(
        "already sent in this pass")
    assert join(6, 0) is Status.CONTRIBUTED and phone.epsilon() > paid  # a new pass is paid again
    assert join(7, 1, noise_multiplier=2.0) is Status.REFUSED  # not at the noise its first slice paid
    other = device("b.sqlite")  # never paid a first slice
    assert other.contribute(replace(_count(1), round=1)).status is Status.REFUSED and other.epsilon() == 0
    assert join(8, 0) is Status.CONTRIBUTED  # a new pass; then the app ships new item ids mid-pass
    shuffled = Personalizer(tmp_path / "a.sqlite", model=MODEL, vocabulary=Vocabulary.of(
        [f"item{(i + 16) % 40}" for i in range(40)]), simulation_seed=(0, 1))  # an item may change slice
    assert shuffled.contribute(replace(_count(1), round=9)).status is Status.REFUSED


def test_a_sliced_run_counts_the_whole_catalog_then_trains(tmp_path):
    log, _, vocabulary = simulated_devices(tmp_path, users=6, seed=2)
    assert selection.count_slices(log.num_items) > 1
    config = ServerConfig(mode="local", rounds=selection.count_slices(log.num_items) + 2, min_devices=6,
                          target_epsilon=4.0, seed=2, noise_seed=2, signing_key=tmp_path / "coordinator.pem",
                          out_dir=tmp_path / "run", min_item_count=2.0)
    config = replace(config, model=ModelConfig(num_items=log.num_items, dim=4, trained_items=20))
    history = run(transport_for(device_grid(tmp_path, 6, vocabulary, seed=2), config), config)
    slices = selection.count_slices(log.num_items)
    assert [r.task for r in history] == ["count"] * slices + ["train"] * 2
    assert all(r.contributed == 6 for r in history)
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "global_final.pt")
    counts = torch.bincount(torch.from_numpy(log.items), minlength=log.num_items)
    named = final.state[ROW_ITEMS][final.state[ROW_ITEMS] >= 0]
    assert final.counted and len(named) > 0 and counts[named].float().mean() > counts.float().mean()
    assert int(named.max()) >= selection.SLICE_ITEMS  # rows went to items past the first slice too
    assert history[-1].epsilon <= 4.0 + 1e-6


def test_the_in_process_backend_pays_a_pass_once_and_skips_slices_of_a_pass_not_paid(tmp_path, monkeypatch):
    from attune.simulations.runner import DataSource, SimulationConfig, simulate

    monkeypatch.setattr(selection, "SLICE_ITEMS", 256)  # 600 synthetic items: three slices
    server = ServerConfig(mode="distributed", rounds=5, seed=1, target_epsilon=4.0)
    server = replace(server, model=replace(server.model, dim=8))
    whole = simulate(SimulationConfig(DataSource("synthetic", synthetic_users=40), server, tmp_path / "a",
                                      evaluations=1))
    assert [r["task"] for r in whole["rounds"]] == ["count"] * 3 + ["train"] * 2
    assert whole["privacy"]["epsilon"] <= 4.0 + 1e-6  # one count pass paid per device, as planned
    local = replace(server, mode="local")  # no survivors to wait for: every slice is released
    flaky = simulate(SimulationConfig(DataSource("synthetic", synthetic_users=40), local, tmp_path / "b",
                                      evaluations=1, availability=0.8))
    first, *later = flaky["rounds"][:3]
    assert all(r["task"] == "count" and r["refused"] > 0 for r in later)  # offline at the first slice: refused
    assert flaky["privacy"]["epsilon"] <= 4.0 + 1e-6
