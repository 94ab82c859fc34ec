"""The ClientApp's reply carries only the global side; the strategy rejects bad updates."""

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from attune.client.flower_app import handle_train
from attune.client.personalizer import Personalizer, PrivacyConfig
from attune.client.settings import DeviceSettings
from attune.server.strategy import UpdateFedAvg
from attune.shared.config import TrainConfig
from attune.shared.events import Event
from attune.shared.model import GLOBAL_PARAMS, MODEL_VERSION, ModelConfig, Personalization
from attune.shared.records import state_to_arrays, to_config_record

MODEL = ModelConfig(num_items=40, dim=6)
TRAIN = TrainConfig(sample_rate=0.5, noise_multiplier=1.0)


def _train_message() -> Message:
    arrays = state_to_arrays(Personalization(MODEL).global_state())
    content = RecordDict({"arrays": arrays, "config": to_config_record(MODEL, TRAIN)})
    return Message(content=content, dst_node_id=1, message_type="train")


def test_outgoing_message_holds_only_global_parameters(tmp_path):
    store = tmp_path / "device.sqlite"
    with Personalizer(str(store), model=MODEL) as device:
        now = time.time()
        device.record_many(Event(f"sku-{i % 15}", "view", now - 500 + i) for i in range(40))
        device.grant_consent("test-policy-1")
    settings = DeviceSettings(store_path=store, privacy=PrivacyConfig(), seed=1)
    reply = handle_train(_train_message(), settings)
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
