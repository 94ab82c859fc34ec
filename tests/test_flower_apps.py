"""The ClientApp acts only on signed rounds and replies with its contribution and nothing else;
the plain transport rejects any contribution an honest device could not have sent."""

import json

import numpy as np
import pytest
import torch
from device_helpers import MODEL, VOCAB, open_device, request
from flwr.app import Array, ConfigRecord, Context, Message, RecordDict

from attune.client.flower_app import handle_train
from attune.client.personalizer import Personalizer, PrivacyConfig
from attune.client.secure_aggregation import DECLINED, Declined, check_secure_round
from attune.client.settings import DeviceSettings
from attune.server.transport import GridTransport
from attune.shared.mechanism import contribution_dim, share_std
from attune.shared.records import CONFIG, contribution_content, request_content
from attune.shared.signing import generate_keypair, load_private_key, sign
from attune.shared.wire import CONTRIBUTION


@pytest.fixture
def keys(tmp_path):
    generate_keypair(tmp_path / "c.pem", tmp_path / "c.pub.pem")
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub.pem")
    return load_private_key(tmp_path / "c.pem"), load_private_key(tmp_path / "other.pem"), tmp_path / "c.pub.pem"


@pytest.fixture
def settings(tmp_path, keys):
    open_device(tmp_path / "d.sqlite").close()
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(json.dumps(list(VOCAB.ids)))
    return DeviceSettings(store_path=tmp_path / "d.sqlite", privacy=PrivacyConfig(), vocabulary_path=vocabulary,
                          coordinator_public_key=keys[2])


def _message(key, round_request, tamper=None) -> Message:
    content = request_content(round_request, None if key is None else sign(key, round_request.arrays(),
                                                                             round_request.items()))
    if tamper is not None:
        tamper(content)
    return Message(content=content, dst_node_id=1, message_type="train")


def _sent(reply: Message) -> bool:
    return bool(reply.content.array_records)


def test_the_device_acts_only_on_what_the_coordinator_signed(settings, keys):
    key, other, _ = keys

    def lower_noise(content):
        content[CONFIG]["noise-multiplier"] = 0.3  # changed after signing

    def change_model(content):
        arrays = content.array_records["arrays"]
        bias = arrays["item_bias.weight"].numpy().copy()
        bias[3, 0] += 1e-3
        arrays["item_bias.weight"] = Array(bias)

    def change_run(content):
        content[CONFIG]["run-id"] = "another-run"

    for bad in (_message(None, request()), _message(other, request()), _message(key, request(), lower_noise),
                _message(key, request(), change_model), _message(key, request(), change_run)):
        assert not _sent(handle_train(bad, settings))
    with Personalizer(settings.store_path, model=MODEL, vocabulary=VOCAB) as device:
        assert device.store.ledger() == [] and device.state.rounds_joined == 0  # nothing adopted or paid
    assert _sent(handle_train(_message(key, request(round=1)), settings))
    assert not _sent(handle_train(_message(key, request(round=1)), settings))  # the same round, replayed


def test_the_reply_holds_the_contribution_and_nothing_else(settings, keys):
    reply = handle_train(_message(keys[0], request()), settings)
    assert set(reply.content.array_records) == {CONTRIBUTION}
    assert not reply.content.metric_records and not reply.content.config_records
    (array,) = reply.content.array_records[CONTRIBUTION].values()
    assert array.numpy().shape == (contribution_dim(MODEL),) and array.numpy().dtype == np.int64


def test_a_distributed_round_is_refused_outside_secure_aggregation(settings, keys):
    reply = handle_train(_message(keys[0], request(mode="distributed", min_survivors=5)), settings)
    assert not _sent(reply)


def test_the_device_refuses_to_unmask_a_device_listed_alive_and_dropped(caplog):
    message = Message(content=RecordDict({"secaggplus_configs": ConfigRecord(
        {"stage": "unmask", "active_nids": [1, 2, 3], "dead_nids": [3]})}),
        dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(Declined) as refused:
        check_secure_round(message, context, lambda msg, ctxt: msg)
    assert str(refused.value) == DECLINED  # the reason stays on the device, in its log
    assert "alive and dropped" in caplog.text


class _Replies:
    """A Grid whose devices send the given replies."""

    def __init__(self, contents):
        self.contents = contents

    def get_node_ids(self):
        return list(range(len(self.contents)))

    def send_and_receive(self, messages, *, timeout=None):
        return [Message(content=content, reply_to=msg) for msg, content in zip(messages, self.contents, strict=True)]


def test_contributions_no_honest_device_could_send_are_rejected():
    round_request = request()
    dim, config = contribution_dim(MODEL), round_request.config
    good = torch.zeros(dim, dtype=torch.long)
    good[5] = 1000
    huge = torch.full((dim,), 10**12, dtype=torch.long)
    two = contribution_content(good)
    two.array_records[CONTRIBUTION]["extra"] = Array(np.zeros(3))
    truncated = contribution_content(good)
    blob = truncated.array_records[CONTRIBUTION][CONTRIBUTION]
    truncated.array_records[CONTRIBUTION][CONTRIBUTION] = Array(dtype=blob.dtype, shape=blob.shape,
                                                                stype=blob.stype, data=blob.data[:-7])
    replies = [contribution_content(good), contribution_content(huge), contribution_content(good.double()),
               contribution_content(good[:-1]), two, truncated, RecordDict(),
               contribution_content(torch.full((dim,), float("nan"), dtype=torch.float64))]
    transport = GridTransport(_Replies(replies), lambda r: None)
    collected = transport.collect(round_request, list(range(len(replies))), 1)
    assert collected.contributors == [0] and collected.rejected == 6 and collected.refused == 1
    assert torch.equal(collected.total, good)
    assert any("over the bound" in reason for reason in collected.rejections)
    assert share_std(config) > 0


def test_a_declined_secure_round_is_not_logged_as_an_error_but_real_errors_are():
    """Flower's simulation engine logs a ClientApp exception as an error with its traceback; a device
    declining a secure round (its budget is spent) is the protocol's way to drop out."""
    import logging

    from attune.simulations.flower_apps import _not_a_decline

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("flwr", logging.ERROR, __file__, 1, message, None, None)

    assert not _not_a_decline(record(f"Traceback ...\nattune.client.secure_aggregation.Declined: {DECLINED}"))
    assert not _not_a_decline(record("An exception was raised when processing a message by RayBackend"))
    assert _not_a_decline(record("Traceback ...\nValueError: the store is corrupt"))


class _EndedRun:
    """A ``flwr run`` process that has exited."""

    returncode = 0

    def poll(self) -> int:
        return 0


def test_the_simulator_scores_the_rounds_the_flower_app_saved_and_reads_whole_lines_only(tmp_path):
    from dataclasses import asdict

    from attune.server.coordinator import RoundRecord
    from attune.simulations.flower_apps import snapshot_path
    from attune.simulations.flower_backend import _follow

    def line(server_round: int) -> str:
        return json.dumps(asdict(RoundRecord(round=server_round, sampled=3, contributed=3, refused=0, rejected=0,
                                             failed=0, aborted="", epsilon=1.0, device_level_epsilon=None)))

    saved = snapshot_path(tmp_path, 2)
    saved.parent.mkdir()
    torch.save({"state": {"w": torch.ones(2)}, "users": torch.ones(3, 4), "started": torch.ones(3, dtype=torch.bool)},
               saved)
    # round 3 is being written; round 4 is evaluated but its model was never saved (the run died)
    (tmp_path / "rounds.jsonl").write_text(f"{line(1)}\n{line(2)}\n{line(3)[:20]}")
    seen = []
    _follow(tmp_path, _EndedRun(), {2, 4}, lambda record, state, devices: seen.append(
        (record.round, sorted(state), tuple(devices().users.shape))))
    assert seen == [(1, [], (0,)), (2, ["w"], (3, 4))]
    assert not saved.exists()  # scored once, then removed

    (tmp_path / "rounds.jsonl").write_text(f"{line(1)}\n{line(2)}\n{line(3)}\n{line(4)}\n{line(5)}\n")
    seen.clear()
    _follow(tmp_path, _EndedRun(), {4}, lambda record, state, devices: seen.append(record.round))
    assert seen == [1, 2, 3]  # never past an evaluated round whose model is missing


def test_a_flower_run_that_ends_before_its_last_round_is_an_error_naming_the_log(tmp_path, monkeypatch):
    from attune.server.config import ServerConfig
    from attune.shared.errors import ConfigError
    from attune.simulations import flower_backend
    from attune.simulations.datasets import synthetic
    from attune.simulations.evaluation import leave_one_out

    class _NoFlower:  # the SuperLink starts and the run exits at once, as when the ServerApp crashes
        def __init__(self, config) -> None:
            self.logs = config.directory / "logs"

        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def start_run(self, run_config) -> _EndedRun:
            return _EndedRun()

    monkeypatch.setattr(flower_backend, "LocalFederation", _NoFlower)
    log = synthetic(num_users=4, seed=0)
    server = ServerConfig(mode="distributed", rounds=2, out_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"the Flower run failed .* log is in .*flower/logs"):
        flower_backend.run_flower(log, leave_one_out(log, seed=0), server, PrivacyConfig(), {2},
                                  lambda *args: None)
