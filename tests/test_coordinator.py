"""The real coordinator loop, driven through an in-process Grid: signed models, user-level DP
reported to devices, dropped devices, and resume after an interruption."""

import json
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from in_process_grid import InProcessGrid
from opacus.accountants import RDPAccountant

from attune.client.personalizer import Personalizer, PrivacyConfig
from attune.client.settings import DeviceSettings
from attune.server.checkpoint import latest_checkpoint
from attune.server.config import ServerConfig
from attune.server.coordinator import run
from attune.shared.config import TrainConfig
from attune.shared.events import Event
from attune.shared.model import MODEL_VERSION, ModelConfig
from attune.shared.records import arrays_to_numpy
from attune.shared.signing import generate_keypair, load_public_key, verify_model
from attune.shared.vocabulary import Vocabulary

MODEL = ModelConfig(num_items=30, dim=4, use_context=False)
VOCAB = Vocabulary.of([f"item{i}" for i in range(30)])
DEVICES = 6


def _make_devices(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocabulary.json").write_text(json.dumps(list(VOCAB.ids)))
    generate_keypair(directory / "coordinator.pem", directory / "coordinator.pub.pem")
    now = time.time()
    for node in range(DEVICES):
        with Personalizer(str(directory / f"d{node}.sqlite"), model=MODEL, vocabulary=VOCAB) as device:
            device.record_many(Event(f"item{(node * 5 + i) % 30}", "click", now - 900 + i) for i in range(20))
            device.grant_consent("policy-1")


def _grid(directory):
    return InProcessGrid({node: DeviceSettings(
        store_path=directory / f"d{node}.sqlite", privacy=PrivacyConfig(min_events=5), seed=node,
        vocabulary_path=directory / "vocabulary.json",
        coordinator_public_key=directory / "coordinator.pub.pem") for node in range(DEVICES)})


def _config(directory, **overrides):
    config = ServerConfig(
        rounds=4, clients_per_round=3, min_clients=DEVICES, server_lr=1.0, fraction_evaluate=0.0,
        user_noise_multiplier=0.7, noise_seed=11, signing_key=directory / "coordinator.pem",
        out_dir=directory / "run", model=MODEL,
        train=TrainConfig(sample_rate=1.0, local_epochs=1, user_epochs=1, noise_multiplier=3.0,
                          update_clip=0.2))
    return replace(config, **overrides)


@pytest.fixture
def devices(tmp_path):
    _make_devices(tmp_path / "devices")
    return tmp_path / "devices"


def test_signed_rounds_with_user_level_dp_reported_to_devices(devices):
    grid = _grid(devices)
    history = run(grid, _config(devices, rounds=2))
    public = load_public_key(devices / "coordinator.pub.pem")
    assert len(grid.delivered) == 6  # 3 of 6 devices per round
    for msg in grid.delivered:  # every model a device received verifies
        config = msg.content["config"]
        verify_model(public, arrays_to_numpy(msg.content["arrays"]), MODEL_VERSION,
                     int(config["server-round"]), config["model-signature"])
    reference = RDPAccountant()
    for _ in history:
        reference.step(noise_multiplier=0.7, sample_rate=3 / 6)
    assert history[-1].train["user-epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert all(r.train["devices-trained"] == 3 for r in history)
    second_round = [m for m in grid.delivered if m.content["config"]["server-round"] == 2]
    sent = second_round[0].content["config"]["user-epsilon"]
    assert sent == pytest.approx(history[0].train["user-epsilon"])
    reported = []
    for node in range(DEVICES):
        with Personalizer(str(devices / f"d{node}.sqlite"), model=MODEL, vocabulary=VOCAB) as device:
            reported.append(device.privacy_report()["user_level"])
    assert any(r is not None and r["epsilon"] > 0 for r in reported)


def test_a_round_completes_without_devices_that_dropped_out(devices):
    grid = _grid(devices)
    grid.offline = {0, 1, 2}
    history = run(grid, _config(devices, rounds=1, clients_per_round=0, min_clients=3))
    assert history[0].train["devices-trained"] == 3 and history[0].train["devices-missing"] == 3
    assert latest_checkpoint(devices / "run" / "checkpoints").round == 1


class Interrupted(Exception):
    pass


def test_resume_after_an_interruption_continues_round_counter_ledger_and_model(devices, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(devices, twin)  # identical devices for an uninterrupted reference run
    # every device every round: Flower's cohort sampling is not seeded, the rest of the run is
    reference = run(_grid(twin), _config(twin, server_optimizer="adam", server_lr=0.05, clients_per_round=0))

    def stop_after_round_2(done):
        if done.round == 2:
            raise Interrupted

    config = _config(devices, server_optimizer="adam", server_lr=0.05, clients_per_round=0)
    with pytest.raises(Interrupted):
        run(_grid(devices), config, on_round=stop_after_round_2)
    resumed = run(_grid(devices), replace(config, resume=True))
    assert [r.round for r in resumed] == [3, 4]
    assert resumed[-1].train["user-epsilon"] == pytest.approx(reference[-1].train["user-epsilon"])
    final = latest_checkpoint(devices / "run" / "checkpoints")
    expected = latest_checkpoint(twin / "run" / "checkpoints")
    assert final.round == 4 and final.optimizer["kind"] == "adam"
    for name, value in expected.state.items():  # same model as if never interrupted
        np.testing.assert_allclose(final.state[name].numpy(), value.numpy(), rtol=1e-5, atol=1e-7)
    lines = (devices / "run" / "rounds.jsonl").read_text().splitlines()
    rounds = [json.loads(line)["round"] for line in lines]
    assert rounds == [1, 2, 3, 4]
    assert torch.is_tensor(final.state["item_bias.weight"])


def _final_state(directory):
    return latest_checkpoint(directory / "run" / "checkpoints").state


@pytest.mark.parametrize("dropped", [None, 4])
def test_secure_aggregation_equals_plain_aggregation_within_quantization(devices, tmp_path, dropped):
    """SecAgg+ (the coordinator sees only the mean) gives the plain path's model, with the same
    user-level noise, to within quantization error, also when a device leaves mid-protocol."""
    twin = tmp_path / "twin"
    shutil.copytree(devices, twin)
    config = {"rounds": 1, "clients_per_round": 0, "min_clients": DEVICES}
    plain_grid = _grid(twin)
    secure_grid = _grid(devices)
    if dropped is not None:
        plain_grid.offline = {dropped}  # never answers
        secure_grid.drop_after = {dropped: 2}  # shares its keys, then vanishes before its vector
    plain = run(plain_grid, _config(twin, **config))
    secure = run(secure_grid, _config(devices, secure_aggregation=True, **config))
    expected = DEVICES - (dropped is not None)
    assert plain[0].train["devices-trained"] == secure[0].train["devices-trained"] == expected
    assert secure[0].train["user-epsilon"] == pytest.approx(plain[0].train["user-epsilon"])
    stages = {m.metadata.dst_node_id: 0 for m in secure_grid.delivered}
    for msg in secure_grid.delivered:
        stages[msg.metadata.dst_node_id] += 1
    assert max(stages.values()) == 4  # setup, share keys, masked vector, unmask: SecAgg+ ran
    for name, value in _final_state(twin).items():
        np.testing.assert_allclose(_final_state(devices)[name].numpy(), value.numpy(), atol=2e-5)


def test_the_run_stops_at_its_user_level_budget(devices):
    budget = {"user_target_epsilon": 3.0, "user_noise_multiplier": 0.0, "clients_per_round": 0}
    done = run(_grid(devices), _config(devices, rounds=2, **budget))
    assert len(done) == 2 and done[-1].train["user-epsilon"] == pytest.approx(3.0, rel=0.02)
    assert done[-1].train["user-epsilon"] <= 3.0 * (1 + 1e-9)
    more = run(_grid(devices), _config(devices, rounds=4, resume=True, **budget))
    assert more == []  # a third round would go over the budget: nothing more is spent
