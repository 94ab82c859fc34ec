"""The ClientApp's reply carries only the global side; the strategy rejects bad updates."""

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from attune.client.flower_app import handle_train
from attune.client.personalizer import Personalizer, PrivacyConfig
from attune.client.settings import DeviceSettings
from attune.server.aggregation import AggregationConfig
from attune.server.strategy import UpdateFedAvg
from attune.shared.config import TrainConfig
from attune.shared.events import Event
from attune.shared.model import GLOBAL_PARAMS, MODEL_VERSION, ModelConfig, Personalization
from attune.shared.records import state_to_arrays, to_config_record
from attune.shared.signing import generate_keypair, load_private_key, sign_model

MODEL = ModelConfig(num_items=40, dim=6)
TRAIN = TrainConfig(sample_rate=0.5, noise_multiplier=1.0)


@pytest.fixture
def coordinator_key(tmp_path):
    generate_keypair(tmp_path / "coordinator.pem", tmp_path / "coordinator.pub.pem")
    return load_private_key(tmp_path / "coordinator.pem"), tmp_path / "coordinator.pub.pem"


def _train_message(key=None, server_round=1, tamper=False) -> Message:
    state = Personalization(MODEL).global_state()
    config = to_config_record(MODEL, TRAIN)
    config["server-round"] = server_round
    if key is not None:
        config["model-signature"] = sign_model(key, {k: v.numpy() for k, v in state.items()},
                                               MODEL_VERSION, server_round)
    if tamper:
        state["item_bias.weight"][3, 0] += 1e-3
    content = RecordDict({"arrays": state_to_arrays(state), "config": config})
    return Message(content=content, dst_node_id=1, message_type="train")


def _device(tmp_path):
    store = tmp_path / "device.sqlite"
    with Personalizer(str(store), model=MODEL) as device:
        now = time.time()
        device.record_many(Event(f"sku-{i % 15}", "view", now - 500 + i) for i in range(40))
        device.grant_consent("test-policy-1")
    return store


def test_device_refuses_unsigned_tampered_replayed_or_foreign_models(tmp_path, coordinator_key):
    key, public = coordinator_key
    store = _device(tmp_path)
    settings = DeviceSettings(store_path=store, privacy=PrivacyConfig(), seed=1,
                              coordinator_public_key=public)
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub.pem")
    for message in (_train_message(None), _train_message(key, tamper=True),
                    _train_message(load_private_key(tmp_path / "other.pem"))):
        reply = handle_train(message, settings)
        assert "arrays" not in reply.content.array_records
        assert reply.content.metric_records["metrics"]["error"] == 1
    replayed = _train_message(key, server_round=1)
    replayed.content["config"]["server-round"] = 2  # an old round's model offered again
    assert handle_train(replayed, settings).content.metric_records["metrics"]["error"] == 1
    with Personalizer(str(store), model=MODEL) as device:
        assert device.privacy_report()["rounds_trained"] == 0  # nothing was adopted or trained
    no_key = DeviceSettings(store_path=store, privacy=PrivacyConfig(), seed=1)
    assert handle_train(_train_message(key), no_key).content.metric_records["metrics"]["error"] == 1
    assert "arrays" in handle_train(_train_message(key), settings).content.array_records


def test_outgoing_message_holds_only_global_parameters(tmp_path, coordinator_key):
    key, public = coordinator_key
    store = _device(tmp_path)
    settings = DeviceSettings(store_path=store, privacy=PrivacyConfig(), seed=1,
                              coordinator_public_key=public)
    reply = handle_train(_train_message(key), settings)
    assert set(reply.content.array_records) == {"arrays"}
    names = set(reply.content.array_records["arrays"].keys())
    assert names == set(GLOBAL_PARAMS)
    assert not any("user" in n for n in names)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == 40 and metrics["trained"] == 1 and metrics["epsilon"] > 0
    with Personalizer(str(store), model=MODEL) as device:
        user = device._model.user_vector.weight.detach().numpy().ravel()
    for array in reply.content.array_records["arrays"].values():  # no copy of the user vector
        values = array.numpy().ravel()
        assert not any(np.allclose(values[i:i + user.size], user)
                       for i in range(0, values.size - user.size + 1, 1))


def _reply(arrays: ArrayRecord, examples=10, version=MODEL_VERSION) -> Message:
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(
        {"num-examples": examples, "model-version": version, "epsilon": 1.0, "loss": 0.5})})
    return Message(content=content, dst_node_id=1, message_type="train")


@pytest.fixture
def strategy():
    s = UpdateFedAvg(MODEL, server_lr=1.0)
    s.current = {k: torch.zeros_like(v) for k, v in Personalization(MODEL).global_state().items()}
    return s


def _update(fill: float) -> dict:
    return {k: torch.full_like(v, fill) for k, v in Personalization(MODEL).global_state().items()}


def test_bad_updates_are_rejected_and_never_reach_the_aggregate(strategy):
    good = _update(1.0)
    nan = dict(_update(0.0), **{"item_bias.weight": torch.full((40, 1), float("nan"))})
    inf = dict(_update(0.0), **{"item_bias.weight": torch.full((40, 1), float("inf"))})
    shape = dict(_update(0.0), **{"item_bias.weight": torch.zeros(41, 1)})
    dtype = {k: v.double() for k, v in _update(5.0).items()}
    truncated = state_to_arrays(_update(5.0))
    blob = truncated["item_bias.weight"]
    truncated["item_bias.weight"] = Array(dtype=blob.dtype, shape=blob.shape,
                                          stype=blob.stype, data=blob.data[:-7])
    replies = [
        _reply(state_to_arrays(good)),
        _reply(state_to_arrays(nan)),
        _reply(state_to_arrays(inf)),
        _reply(state_to_arrays(shape)),
        _reply(ArrayRecord({k: Array(v.numpy()) for k, v in dtype.items()})),
        _reply(state_to_arrays(_update(9.0)), version=MODEL_VERSION + 1),
        _reply(truncated),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["devices-trained"] == 1 and metrics["devices-rejected"] == 6
    for _name, array in arrays.items():
        np.testing.assert_allclose(array.numpy(), 1.0)  # only the good update counted


def test_weighted_mean_of_updates_with_server_lr(strategy):
    strategy.server.lr = 2.0
    replies = [_reply(state_to_arrays(_update(1.0)), examples=30),
               _reply(state_to_arrays(_update(3.0)), examples=10)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["item_bias.weight"].numpy(), 2.0 * (0.75 * 1 + 0.25 * 3))


def test_update_over_the_clip_bound_is_rejected():
    strategy = UpdateFedAvg(MODEL, aggregation=AggregationConfig(update_clip=5.0))
    strategy.current = {k: torch.zeros_like(v) for k, v in Personalization(MODEL).global_state().items()}
    small = _update(0.0)
    small["item_bias.weight"][0, 0] = 4.0  # norm 4: within the bound
    huge = _update(0.0)
    huge["item_bias.weight"][0, 0] = 1e6
    replies = [_reply(state_to_arrays(small)), _reply(state_to_arrays(huge))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["devices-trained"] == 1 and metrics["devices-rejected"] == 1
    assert "over the clip bound" in strategy.last_stats.rejections[0]
    assert float(arrays["item_bias.weight"].numpy()[0, 0]) == 4.0
