"""The device's side of secure aggregation: Flower's SecAgg+ (``secaggplus_mod``), hardened, around
a legacy ``NumPyClient`` that runs the same device round as the Message API handler.

In flwr 1.42 SecAgg+ is reachable only through the legacy fit protocol, so this adapter speaks it.
``harden()`` (called by ``make_secure_client_app``) puts Attune's mask generator and exact integer
encoding into Flower's mod (``attune.shared.secure_sum``), after checking the Flower release; the
coordinator's transport does the same on its side. Around the mod
the device also refuses to:
- contribute when the signed ``min_survivors`` exceeds the number of devices SecAgg+ announced
  (its noise share would be sized for devices that do not exist), or when the reconstruction
  threshold it was given is not a strict majority of its shares over the signed ``colluders``
  (``secure_sum.threshold_holds``: colluding neighbours could rebuild its secrets and unmask its
  vector); it checks both before it sends its masked vector;
- reveal key shares in the unmask stage for a device listed both as alive and as dropped (that
  would let the coordinator unmask that device's own vector).
A device that declines a round, or fails in any way, raises the one constant ``Declined``: SecAgg+
counts it as dropped and sums the others.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)

from attune.client.device_round import run_round
from attune.client.settings import DeviceSettings
from attune.shared import secure_sum
from attune.shared.errors import AttuneError
from attune.shared.model import shared_model
from attune.shared.wire import model_of

log = logging.getLogger(__name__)
SECURE_AGGREGATION_RECORD = RECORD_KEY_CONFIGS  # the ConfigRecord that marks a SecAgg+ message
FIT_CONFIG = "fitins.config"  # where the legacy protocol carries the round's config


# the module, not the function of the same name its package exports
flower_mod: Any = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")  # internals


def harden() -> None:
    """Replace the weak pieces of Flower's client-side SecAgg+ with Attune's (idempotent; checked
    against the Flower release they were written for). The app factories call it."""
    secure_sum.check_flower_version()
    flower_mod.pseudo_rand_gen = secure_sum.mask_stream
    flower_mod.create_shares = secure_sum.split_secret
    flower_mod.quantize = lambda parameters, clipping_range, target_range: secure_sum.encode(parameters)



DECLINED = "this device does not contribute to this round"


class Declined(AttuneError):
    """The device does not take part in this secure round (the protocol counts it as dropped)."""


class SecureDevice(NumPyClient):
    def __init__(self, settings: DeviceSettings) -> None:
        self.settings = settings

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        names = shared_model(model_of(config)).layout.sent  # the signature covers names and config
        if len(names) != len(parameters):
            raise Declined(DECLINED)
        arrays = dict(zip(names, parameters, strict=True))
        vector = run_round(self.settings, arrays, config)
        if vector is None:
            raise Declined(DECLINED)
        return [vector.double().numpy()], 1, {}  # every device weighs 1


def check_secure_round(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` with the device's own checks on the coordinator's instructions.
    Any failure, whatever its cause, leaves as the one constant ``Declined``: Flower sends an
    exception's text to the coordinator, and a failure that depends on the events must look like
    any other decline (a dropout at the stage where devices decline). The cause is logged here."""
    try:
        _check_instructions(msg, context)
        return secaggplus_mod(msg, context, call_next)
    except Exception as error:  # noqa: BLE001
        if not (isinstance(error, Declined) and str(error) == DECLINED):
            log.warning("declining the secure round: %s", error, exc_info=not isinstance(error, Declined))
        raise Declined(DECLINED) from None


def _number(record: ConfigRecord, key: str) -> int:
    value = record.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _numbers(record: ConfigRecord, key: str) -> set[int]:
    value = record.get(key, [])
    return {v for v in value if isinstance(v, int)} if isinstance(value, list) else set()


def _check_instructions(msg: Message, context: Context) -> None:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None:
        return
    stage = configs.get(Key.STAGE)
    if stage == Stage.UNMASK:
        alive = _numbers(configs, Key.ACTIVE_NODE_ID_LIST)
        dropped = _numbers(configs, Key.DEAD_NODE_ID_LIST)
        if alive & dropped:
            raise Declined(f"devices {sorted(alive & dropped)} are listed as alive and dropped: refusing to "
                           "reveal shares that would unmask one device's vector")
    if stage == Stage.COLLECT_MASKED_VECTORS and FIT_CONFIG in msg.content.config_records:
        protocol, signed = context.state.config_records[RECORD_KEY_STATE], msg.content.config_records[FIT_CONFIG]
        announced, survivors = _number(protocol, "sample_num"), _number(signed, "min-survivors")
        if survivors > announced:
            raise Declined(f"the round asks for {survivors} surviving shares but SecAgg+ announced only "
                           f"{announced} devices")
        shares, threshold = _number(protocol, "share_num"), _number(protocol, "threshold")
        colluders = _number(signed, "colluders")
        if not secure_sum.threshold_holds(shares, threshold, colluders):
            raise Declined(f"a reconstruction threshold of {threshold} of {shares} shares does not keep this "
                           f"device's vector from {colluders} colluders")


def make_secure_client_app(resolve: Callable[[Context], DeviceSettings]) -> ClientApp:
    harden()
    return ClientApp(client_fn=lambda context: SecureDevice(resolve(context)).to_client(), mods=[check_secure_round])
