"""One device round, the same object whatever runs it: **admit -> reserve -> train -> send**.

- ``admit``: the device's own limits (``attune.client.policy``), the model it holds and whether its
  budget is spent; nothing here reads the person's events, so joining reveals nothing of them.
- ``reserve``: the ledger pays before anything is computed (a budget that cannot pay stops the
  device contributing).
- ``train``: the contribution (``attune.client.training``) and what the device keeps.
- ``send``: consent is checked once more just before the vector leaves; withdrawn meanwhile, the
  vector is withheld. The round stays charged either way (``docs/privacy.md``, "Charging").

``RoundDevice`` is what a round needs of a device: a phone's store and model (``Personalizer``) or a
block of simulated devices in the same standing (``attune.simulations.fast``). ``run_round`` is
the entry of the Message API ClientApp (``flower_app``) and the SecAgg+ client
(``secure_aggregation``): verify what the coordinator signed, open the device, run its round.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from attune.client.policy import PrivacyConfig, refusal
from attune.client.settings import DeviceSettings
from attune.client.store import Reservation
from attune.shared.config import RoundTask
from attune.shared.errors import AttuneError, ConfigError, SignatureError
from attune.shared.model import ModelConfig
from attune.shared.signing import load_public_key, verify
from attune.shared.vocabulary import Vocabulary
from attune.shared.wire import RoundRequest

if TYPE_CHECKING:
    from attune.client.personalizer import Personalizer

log = logging.getLogger(__name__)


class Status(str, Enum):
    CONTRIBUTED = "contributed"
    REFUSED = "refused"


@dataclass(frozen=True)
class Contribution:
    """What a round did. ``vector`` is set only when ``status`` is ``CONTRIBUTED``: the one thing
    to send. Its ledger entry is charged whether or not it is sent: it was computed from the
    events, and the user-vector refresh that shaped it is kept."""

    status: Status
    reason: str
    vector: torch.Tensor | None = None


@dataclass(frozen=True)
class Standing:
    """What decides whether a device joins a round, none of it from the person's events."""

    consented: bool
    paused: bool
    budget_exhausted: bool
    rounds_joined: int  # training rounds: the user vector's refresh schedule counts them


class RoundDevice(Protocol):
    """What a round needs of a device (or of simulated devices alike in their standing)."""

    @property
    def model_config(self) -> ModelConfig: ...

    @property
    def privacy(self) -> PrivacyConfig: ...

    def standing(self) -> Standing: ...

    def reserve(self, request: RoundRequest, refresh: bool) -> Reservation:
        """Pay for the round in the ledger, or say why it cannot be paid."""

    def stop_contributing(self) -> None:
        """The budget cannot pay for a round: join none from now on."""

    def train(self, request: RoundRequest, refresh: bool) -> torch.Tensor:
        """Compute the contribution and keep what the round fitted (vectors, the received model)."""

    def sent(self, nbytes: int) -> None:
        """The contribution left the device (for the person's report)."""


class DeviceRound:
    """One round of ``request`` on ``device``: ``run`` admits, reserves and trains; ``send``
    hands over the vector to send, if the person still consents."""

    def __init__(self, device: RoundDevice, request: RoundRequest) -> None:
        if not isinstance(request, RoundRequest):
            raise ConfigError(f"request must be a RoundRequest, got {type(request).__name__}")
        self.device, self.request = device, request

    def admit(self, standing: Standing) -> str | None:
        """Why the device declines the round before touching its ledger, or ``None``."""
        if self.request.model != self.device.model_config:
            return f"the round's model {self.request.model} is not this device's {self.device.model_config}"
        if standing.budget_exhausted:
            return "privacy budget exhausted: this device no longer contributes"
        return refusal(self.request, self.device.privacy, consented=standing.consented, paused=standing.paused)

    def run(self) -> Contribution:
        """Admit, reserve, train: the contribution, or why there is none (nothing charged then)."""
        standing = self.device.standing()
        reason = self.admit(standing)
        if reason is not None:
            return Contribution(Status.REFUSED, reason)
        refresh = self.request.config.task is RoundTask.TRAIN and self.request.config.refresh_due(
            standing.rounds_joined)
        reservation = self.device.reserve(self.request, refresh)
        if not reservation.paid:
            if reservation.over_budget:
                self.device.stop_contributing()
            return Contribution(Status.REFUSED, reservation.reason)
        return Contribution(Status.CONTRIBUTED, "ok", self.device.train(self.request, refresh))

    def send(self, outcome: Contribution) -> torch.Tensor | None:
        """The vector to send, once consent is checked again just before it leaves (``None``:
        refused, or consent withdrawn during the round; the round stays charged)."""
        if outcome.status is not Status.CONTRIBUTED:
            log.info("not contributing: %s", outcome.reason)
            return None
        if not self.device.standing().consented:
            log.info("consent was withdrawn during the round: nothing is sent")
            return None
        assert outcome.vector is not None
        self.device.sent(int(outcome.vector.numel() * outcome.vector.element_size()))
        return outcome.vector


def read_request(settings: DeviceSettings, arrays: Mapping[str, np.ndarray],
                 items: Mapping[str, object]) -> RoundRequest:
    """The round, once its signature over every array and config entry verifies."""
    if settings.coordinator_public_key is not None:
        verify(load_public_key(settings.coordinator_public_key), arrays, items)  # type: ignore[arg-type]
    elif not settings.allow_unsigned:
        raise SignatureError("this device has no coordinator public key (node config "
                             "'coordinator-public-key'); set allow-unsigned=true only for local experiments")
    return RoundRequest.parse(arrays, items)


def open_device(settings: DeviceSettings, request: RoundRequest) -> Personalizer:
    from attune.client.personalizer import Personalizer  # the facade runs its rounds through this module

    vocabulary = settings.read_vocabulary() or Vocabulary(request.model.num_items)
    return Personalizer(settings.store_path, model=request.model, vocabulary=vocabulary, privacy=settings.privacy,
                        encryption_key=settings.encryption_key(), simulation_seed=settings.simulation_seed,
                        ranking=settings.ranking)


def run_round(settings: DeviceSettings, arrays: Mapping[str, np.ndarray],
              items: Mapping[str, object]) -> torch.Tensor | None:
    """The contribution to send for this round, or ``None``: refused, a bad round, or a failure of
    any kind on the device. Whatever went wrong is logged on the device only; the coordinator
    learns that nothing came, exactly as from any device that declines (``docs/privacy.md``)."""
    try:
        request = read_request(settings, arrays, items)
        device = open_device(settings, request)
    except AttuneError as error:
        log.warning("refusing round: %s", error)
        return None
    except Exception:  # noqa: BLE001 - nothing may escape a device round (its text would reach the coordinator)
        log.exception("the round could not start on this device; declining it")
        return None
    try:
        with device:
            if settings.before_round is not None:
                settings.before_round(device, request)
            device_round = device.round(request)
            return device_round.send(device_round.run())
    except Exception:  # noqa: BLE001 - may depend on the events: it must end as an ordinary decline
        log.exception("the round failed on this device; declining it (what it computed stays charged)")
        return None
