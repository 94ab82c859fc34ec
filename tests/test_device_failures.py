"""No failure on a device reaches the coordinator: whatever goes wrong in a round, and whatever it
depends on, the device's reply is an ordinary decline (issue 19, item 1).

Flower's SuperNode sends ``str(exception)`` of a ClientApp exception to the coordinator; the grid
here does the same (``flower_reason``) and audits every reply: it must be a lone contribution, an
empty reply, or the one constant decline of a secure round.
"""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from in_process_grid import InProcessGrid, device_grid, flower_reason, simulated_devices

import attune.client.personalizer as personalizer_module
from attune.client.flower_app import make_client_app
from attune.client.personalizer import Personalizer
from attune.client.policy import PrivacyConfig
from attune.client.secure_aggregation import DECLINED, Declined
from attune.client.settings import DeviceSettings
from attune.server.app import transport_for
from attune.server.config import ServerConfig
from attune.server.coordinator import run
from attune.shared.errors import InvalidEventError
from attune.shared.vocabulary import Vocabulary
from attune.shared.wire import CONTRIBUTION
from attune.simulations.devices import SIMULATION_RETENTION, store_path

DECLINE = flower_reason(Declined(DECLINED))


class AuditingGrid(InProcessGrid):
    """Fails the test on any reply that is not a lone contribution, an empty reply or the constant
    decline; keeps each device's replies with the SecAgg+ stage they answered."""

    def __init__(self, grid: InProcessGrid) -> None:
        super().__init__(grid.devices)
        self.replies: dict[int, list[tuple[str, str]]] = {node: [] for node in grid.devices}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        stages = {m.metadata.dst_node_id: _stage(m) for m in messages}
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                assert reply.error.reason == DECLINE, f"device {node} sent {reply.error.reason!r}"
                kind = "declined"
            else:
                records = set(reply.content.array_records) | set(reply.content.config_records) \
                    | set(reply.content.metric_records)
                if not stages[node]:  # the Message API; SecAgg+ replies carry the protocol's own records
                    assert records in (set(), {CONTRIBUTION}), f"device {node} sent {records}"
                kind = "empty" if not records else "sent"
            self.replies[node].append((stages[node], kind))
        return replies


def _stage(message) -> str:
    configs = message.content.config_records.get("secaggplus_configs")
    return str(configs.get("stage", "")) if configs is not None else ""


def _config(directory, log, mode, **changes) -> ServerConfig:
    changes = {"min_devices": log.num_users, **changes}
    base = ServerConfig(mode=mode, rounds=1, target_epsilon=2.0, signing_key=directory / "coordinator.pem",
                               noise_seed=3, seed=3, **changes)
    return replace(base, model=replace(base.model, num_items=log.num_items, dim=4, trained_items=0))


def _open(directory, user: int, vocabulary=None) -> Personalizer:
    ids = json.loads((directory / "vocabulary.json").read_text())
    vocabulary = vocabulary or Vocabulary.of(ids)
    model = replace(ServerConfig().model, num_items=len(ids), dim=4, trained_items=0)
    return Personalizer(store_path(directory, user), model=model,
                        vocabulary=vocabulary, retention=SIMULATION_RETENTION)


def _only_on(directory, device: int, others: range) -> int:
    """An item index that device ``device``'s events hold and no other device's do."""
    def items(user):
        with _open(directory, user) as opened:
            return set(opened.local_data().items.tolist())

    return min(items(device) - set().union(*(items(user) for user in others if user != device)))


def _failing_on(item: int):
    """``train_round`` that fails, naming an item, on a device holding ``item``: a failure that
    depends on the events."""
    real = personalizer_module.train_round

    def failing(state, model, users, cohort, *args, **kwargs):
        if bool((cohort.items == item).any()):
            raise InvalidEventError(f"item_id 'item{item}' is not in the model's vocabulary")
        return real(state, model, users, cohort, *args, **kwargs)

    return failing


def test_a_failing_round_is_an_ordinary_decline_on_the_message_api(tmp_path, monkeypatch):
    log, _, vocabulary = simulated_devices(tmp_path, users=3, seed=3)
    item = _only_on(tmp_path, 0, range(3))
    monkeypatch.setattr(personalizer_module, "train_round", _failing_on(item))
    grid = AuditingGrid(device_grid(tmp_path, 3, vocabulary, seed=3))
    config = _config(tmp_path, log, "local")
    history = run(transport_for(grid, config), config)
    assert history[0].contributed == 2 and history[0].refused == 1 and history[0].failed == 0
    assert grid.replies[0] == [("", "empty")]  # what a device that declines sends
    with _open(tmp_path, 0) as device:
        assert len(device.store.ledger()) == 1  # the events were read: the round stays charged
        assert device.state.contributions_sent == 0


def test_a_failing_round_is_a_dropout_at_the_decline_stage_under_secure_aggregation(tmp_path, monkeypatch):
    log, _, vocabulary = simulated_devices(tmp_path, users=5, seed=3)
    item = _only_on(tmp_path, 0, range(5))
    monkeypatch.setattr(personalizer_module, "train_round", _failing_on(item))
    with _open(tmp_path, 1) as declining:
        declining.withdraw_consent()  # device 1 declines the ordinary way
    grid = AuditingGrid(device_grid(tmp_path, 5, vocabulary, seed=3))
    config = _config(tmp_path, log, "distributed", min_survivor_fraction=0.6)
    history = run(transport_for(grid, config), config)
    assert history[0].contributed == 3 and history[0].aborted == ""
    assert grid.replies[0] == grid.replies[1]  # the same decline at the same stage
    assert ("collect_masked_vectors", "declined") in grid.replies[0]


def test_an_event_whose_item_left_the_vocabulary_is_left_out_as_if_deleted(tmp_path):
    """An app ships a new vocabulary without an item the person has events on: the round goes on
    and the device sends exactly what it would with those events deleted."""
    log, _, vocabulary = simulated_devices(tmp_path, users=3, seed=3)
    ids = json.loads(vocabulary.read_text())
    item = _only_on(tmp_path, 0, range(3))
    dropped = ids[item]
    ids[item] = "item:new-in-this-release"
    vocabulary.write_text(json.dumps(ids))
    copy = tmp_path / "deleted"
    (copy / "devices").mkdir(parents=True)
    shutil.copy(store_path(tmp_path, 0), store_path(copy, 0))
    shutil.copy(vocabulary, copy / "vocabulary.json")
    with _open(copy, 0, Vocabulary.of([*ids[:item], dropped, *ids[item + 1:]])) as device:
        assert device.forget_item(dropped) > 0

    def sent(directory):
        settings = DeviceSettings(store_path=store_path(directory, 0), privacy=PrivacyConfig(),
                                  vocabulary_path=vocabulary, simulation_seed=(3, 0), allow_unsigned=True)
        grid = AuditingGrid(InProcessGrid({0: settings}))
        config = replace(_config(tmp_path, log, "local", min_devices=1), signing_key=None)
        states = []
        run(transport_for(grid, config), config, lambda record, state: states.append(state))
        assert grid.replies[0] == [("", "sent")]
        return states[0]

    stale, deleted = sent(tmp_path), sent(copy)
    for name in stale:
        assert torch.equal(stale[name], deleted[name])


@pytest.mark.parametrize("where", ["settings", "store"])
def test_a_device_that_cannot_even_start_its_round_declines(tmp_path, where):
    """A broken node config or an unreadable store declines the round; no text leaves."""
    log, _, vocabulary = simulated_devices(tmp_path, users=3, seed=3)
    grid = AuditingGrid(device_grid(tmp_path, 3, vocabulary, seed=3))
    if where == "settings":
        grid.app = make_client_app(lambda context: DeviceSettings.from_node_config(
            {"store-path": "x", "epsilon-budget": "eight"}) if context.node_id == 0 else grid.devices[context.node_id])
    else:
        store_path(tmp_path, 0).write_bytes(b"not a database" * 100)
    config = _config(tmp_path, log, "local")
    history = run(transport_for(grid, config), config)
    assert history[0].contributed == 2 and grid.replies[0] == [("", "empty")]
