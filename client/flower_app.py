"""Flower ClientApp: a thin adapter from Flower messages to the device round.

A train message holds the global side and the signed round config; the reply holds the device's
contribution and nothing else, or is empty: the device declined, or failed in any way (Flower
would send an exception's text to the coordinator, so none escapes). A distributed-mode
round arrives through SecAgg+ (``secure_aggregation``); the device refuses to send a
distributed-noise contribution any other way, since its share of the noise is not enough alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from attune.client.device_round import run_round
from attune.client.secure_aggregation import SECURE_AGGREGATION_RECORD, make_secure_client_app
from attune.client.settings import DeviceSettings
from attune.shared.config import PrivacyMode
from attune.shared.errors import ModelMismatchError
from attune.shared.records import contribution_content, received

logging.getLogger("flwr").propagate = False  # opacus's logging setup makes flwr lines print twice
log = logging.getLogger(__name__)

SettingsResolver = Callable[[Context], DeviceSettings]


def handle_train(msg: Message, settings: DeviceSettings) -> Message:
    try:
        arrays, items = received(msg.content)
    except ModelMismatchError as error:
        log.warning("refusing round: %s", error)
        return Message(content=RecordDict(), reply_to=msg)
    if items.get("mode") == PrivacyMode.DISTRIBUTED.value:
        log.warning("refusing a distributed-mode round outside SecAgg+: its noise share alone is too small")
        return Message(content=RecordDict(), reply_to=msg)
    vector = run_round(settings, arrays, items)
    return Message(content=RecordDict() if vector is None else contribution_content(vector), reply_to=msg)


def make_client_app(resolve: SettingsResolver) -> ClientApp:
    """A ClientApp whose device settings come from ``resolve(context)``."""
    app = ClientApp()
    secure = make_secure_client_app(resolve)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if SECURE_AGGREGATION_RECORD in msg.content.config_records:  # a SecAgg+ round
            return secure(msg, context)  # raises nothing but the one constant decline
        try:
            return handle_train(msg, resolve(context))
        except Exception:  # noqa: BLE001 - Flower would send its text to the coordinator
            log.exception("the round failed on this device; declining it")
            return Message(content=RecordDict(), reply_to=msg)

    return app


# For `flwr run`: the SuperNode's --node-config names the store and the device's limits.
app = make_client_app(lambda context: DeviceSettings.from_node_config(context.node_config))
