"""One device round, whatever carries it: verify what the coordinator signed, open the device,
let it decide and compute (``Personalizer.contribute``), and hand back the one vector to send.

Shared by the Message API ClientApp (``flower_app``) and the SecAgg+ client (``secure_aggregation``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from attune.client.personalizer import Contribution, Personalizer, Status
from attune.client.settings import DeviceSettings
from attune.shared.errors import AttuneError, SignatureError
from attune.shared.signing import load_public_key, verify
from attune.shared.vocabulary import Vocabulary
from attune.shared.wire import RoundRequest

log = logging.getLogger(__name__)


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
            outcome = device.contribute(request)
            if outcome.status is not Status.CONTRIBUTED:
                log.info("not contributing: %s", outcome.reason)
                return None
            return _send(device, outcome)
    except Exception:  # noqa: BLE001 - may depend on the events: it must end as an ordinary decline
        log.exception("the round failed on this device; declining it (what it computed stays charged)")
        return None


def _send(device: Personalizer, outcome: Contribution) -> torch.Tensor | None:
    """Check consent once more just before the contribution leaves: withdrawn meanwhile, nothing
    is sent. The round stays charged: its user-vector refresh was computed from the events and is
    kept (no ledger entry is ever released, docs/privacy.md "Charging")."""
    if not device.consented:
        log.info("consent was withdrawn during the round: nothing is sent")
        return None
    assert outcome.vector is not None
    device.note_sent(outcome, int(outcome.vector.numel() * outcome.vector.element_size()))
    return outcome.vector
