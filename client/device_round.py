"""One device round, whatever carries it: adopt the received global side once its signature and
shape are checked, train locally with DP, and say what to send.

Shared by the Message API ClientApp (``flower_app``) and the SecAgg+ client (``secure_aggregation``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from attune.client.personalizer import Personalizer
from attune.client.settings import DeviceSettings
from attune.shared.errors import SignatureError
from attune.shared.model import MODEL_VERSION
from attune.shared.records import model_config_from, model_version_from, train_config_from
from attune.shared.signing import load_public_key, verify_model
from attune.shared.vocabulary import Vocabulary
from attune.shared.wire import check_global_state


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
