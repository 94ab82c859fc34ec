"""The device's side of secure aggregation: Flower's SecAgg+ (``secaggplus_mod``) around a legacy
``NumPyClient`` that runs the same local round as the Message API handler.

In flwr 1.42 SecAgg+ is reachable only through the legacy fit protocol, so this adapter speaks it;
the training, signature checks and consent checks are ``attune.client.device_round``'s. Each device
weighs 1 in the secure sum (the coordinator learns only the mean of the updates that took part),
which is also what user-level DP needs. A device that does not train this round sends zeros with
weight 0, so it adds nothing to the sum and the protocol still completes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from attune.client.device_round import open_device, train_on_device
from attune.client.settings import DeviceSettings
from attune.shared.errors import AttuneError

# The config key naming the arrays, in order (the legacy protocol sends a bare list).
PARAM_NAMES_KEY = "param-names"


class SecureDevice(NumPyClient):
    def __init__(self, settings: DeviceSettings) -> None:
        self.settings = settings

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        names = str(config[PARAM_NAMES_KEY]).split(",")
        arrays = dict(zip(names, parameters, strict=True))
        nothing = [np.zeros_like(a) for a in parameters]
        try:
            personalizer = open_device(self.settings, arrays, config)
        except AttuneError as error:
            return nothing, 0, {"trained": 0, "error": 1, "reason": str(error)[:200]}
        with personalizer:
            metrics, update = train_on_device(personalizer, config)
        if update is None:
            return nothing, 0, metrics
        return [update[name].numpy() for name in names], 1, metrics


def make_secure_client_app(resolve: Callable[[Context], DeviceSettings]) -> ClientApp:
    return ClientApp(client_fn=lambda context: SecureDevice(resolve(context)).to_client(),
                     mods=[secaggplus_mod])
