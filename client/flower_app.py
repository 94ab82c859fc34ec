"""Flower ClientApp: a thin adapter from Flower messages to ``Personalizer``.

Receives the global side, checks its signature and shape, trains locally with DP and replies
with the *change* of the global side plus metrics. The user vector and raw events are never put in a message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from attune.client.device_round import open_device, train_on_device
from attune.client.personalizer import Personalizer
from attune.client.secure_aggregation import make_secure_client_app
from attune.client.settings import DeviceSettings
from attune.shared.errors import AttuneError
from attune.shared.metrics import hit_and_ndcg, read_heldout
from attune.shared.records import arrays_to_numpy, state_to_arrays

logging.getLogger("flwr").propagate = False  # opacus's logging setup makes flwr lines print twice

SettingsResolver = Callable[[Context], DeviceSettings]
SECURE_AGGREGATION_RECORD = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants


def _open(settings: DeviceSettings, msg: Message) -> Personalizer:
    return open_device(settings, arrays_to_numpy(msg.content["arrays"]), msg.content["config"])


def _reply(msg: Message, metrics: dict[str, float | int], arrays: ArrayRecord | None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


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
