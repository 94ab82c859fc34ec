"""Flower ClientApp: a thin adapter from Flower messages to ``Personalizer``.

Receives the global side, checks its signature and shape, trains locally with DP and replies
with the *change* of the global side plus metrics. The user vector and raw events are never put in a message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from attune.client.personalizer import Personalizer
from attune.client.secure_aggregation import make_secure_client_app
from attune.client.settings import DeviceSettings
from attune.shared.errors import AttuneError, SignatureError
from attune.shared.metrics import hit_and_ndcg, read_heldout
from attune.shared.model import MODEL_VERSION
from attune.shared.records import (
    arrays_to_numpy,
    model_config_from,
    model_version_from,
    state_to_arrays,
    train_config_from,
)
from attune.shared.signing import load_public_key, verify_model
from attune.shared.vocabulary import Vocabulary
from attune.shared.wire import check_global_state

logging.getLogger("flwr").propagate = False  # opacus's logging setup makes flwr lines print twice

SettingsResolver = Callable[[Context], DeviceSettings]
SECURE_AGGREGATION_RECORD = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants


def open_device(settings: DeviceSettings, arrays: Mapping[str, np.ndarray], config: Mapping) -> Personalizer:
    """Open the device's store and adopt the received global side, once its signature and shape
    are checked."""
    model = model_config_from(config)
    version = model_version_from(config)
    if settings.coordinator_public_key is not None:
        verify_model(load_public_key(settings.coordinator_public_key), arrays, version,
                     int(config.get("server-round", -1)), config.get("model-signature"))
    elif not settings.allow_unsigned:
        raise SignatureError("this device has no coordinator public key (node config "
                             "'coordinator-public-key'); set allow-unsigned=true only for local experiments")
    received = check_global_state(arrays, model, version)
    vocabulary = Vocabulary(model.num_items)
    if settings.vocabulary_path is not None:
        vocabulary = Vocabulary.of(json.loads(Path(settings.vocabulary_path).read_text()))
    personalizer = Personalizer(
        str(settings.store_path), model=model, vocabulary=vocabulary,
        privacy=settings.privacy, seed=settings.seed, encryption_key=settings.encryption_key(),
    )
    personalizer.set_global(received, version)
    return personalizer


def _open(settings: DeviceSettings, msg: Message) -> Personalizer:
    return open_device(settings, arrays_to_numpy(msg.content["arrays"]), msg.content["config"])


def _reply(msg: Message, metrics: dict[str, float | int], arrays: ArrayRecord | None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def train_on_device(personalizer: Personalizer, config: Mapping
                    ) -> tuple[dict[str, float | int], dict[str, torch.Tensor] | None]:
    """One local round: the reply's metrics, and the update to send (``None``: send nothing)."""
    if "user-epsilon" in config:  # the coordinator's user-level guarantee, for the person's report
        personalizer.note_user_level(float(config["user-epsilon"]), float(config["user-delta"]))
    train = train_config_from(config)
    outcome = personalizer.train(train)
    metrics: dict[str, float | int] = {
        "num-examples": outcome.examples,
        "trained": int(outcome.status == "trained"),
        "private": int(outcome.private),
        "epsilon": outcome.epsilon,
        "steps": personalizer.ledger.steps,
        "model-version": MODEL_VERSION,
    }
    if outcome.update is None:
        return metrics, None
    metrics["loss"] = float(outcome.loss or 0.0)
    metrics["clipped-fraction"] = float(outcome.clipped_fraction or 0.0)
    metrics["sample-rate"] = train.sample_rate
    if not personalizer.consented:  # withdrawn after training finished: still send nothing
        metrics["trained"] = 0
        return metrics, None
    sizes = [t.numpy() for t in outcome.update.values()]
    personalizer.note_update_sent(sum(int(a.size) for a in sizes), sum(int(a.nbytes) for a in sizes))
    return metrics, outcome.update


def handle_train(msg: Message, settings: DeviceSettings) -> Message:
    try:
        personalizer = _open(settings, msg)
    except AttuneError as error:
        return _error_reply(msg, error)
    with personalizer:
        metrics, update = train_on_device(personalizer, msg.content["config"])
        return _reply(msg, metrics, None if update is None else state_to_arrays(update))


def _error_reply(msg: Message, error: AttuneError) -> Message:
    logging.getLogger(__name__).warning("refusing round: %s", error)
    return _reply(msg, {"num-examples": 0, "trained": 0, "error": 1}, None)


def handle_evaluate(msg: Message, settings: DeviceSettings) -> Message:
    """Rank the held-out candidates a simulation left beside the store (``*.eval.json``)."""
    eval_path = Path(str(settings.store_path) + ".eval.json")
    if not eval_path.is_file():
        return _reply(msg, {"num-examples": 0}, None)
    try:
        personalizer = _open(settings, msg)
    except AttuneError as error:
        return _error_reply(msg, error)
    with personalizer:
        personalizer.refresh_ranking()
        heldout = read_heldout(eval_path)
        scores = personalizer.score(heldout.candidates, heldout.context).numpy()[None, :]
        hit, ndcg = hit_and_ndcg(scores)
        return _reply(msg, {"num-examples": 1, "hr@10": float(hit[0]), "ndcg@10": float(ndcg[0])},
                      None)


def make_client_app(resolve: SettingsResolver) -> ClientApp:
    """A ClientApp whose device settings come from ``resolve(context)``."""
    app = ClientApp()
    secure = make_secure_client_app(resolve)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if SECURE_AGGREGATION_RECORD in msg.content.config_records:  # a SecAgg+ round
            return secure(msg, context)
        return handle_train(msg, resolve(context))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, resolve(context))

    return app


# For `flwr run`: the SuperNode's --node-config names the store and the device's limits.
app = make_client_app(lambda context: DeviceSettings.from_node_config(context.node_config))
