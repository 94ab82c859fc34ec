"""A device with some events, and round requests as a coordinator would send them."""

import time

import torch

from attune.client.personalizer import Personalizer, PrivacyConfig
from attune.shared.config import preset
from attune.shared.events import Event
from attune.shared.model import ModelConfig, shared_model
from attune.shared.vocabulary import Vocabulary
from attune.shared.wire import RoundRequest

MODEL = ModelConfig(num_items=40, dim=4, use_context=True, trained_items=0)  # a row per item
VOCAB = Vocabulary.of([f"item{i}" for i in range(40)])


def open_device(path, *, consent: bool = True, events: int = 36, **privacy) -> Personalizer:
    device = Personalizer(path, model=MODEL, vocabulary=VOCAB, privacy=PrivacyConfig(**privacy),
                          simulation_seed=(0, 3))
    if consent:
        device.grant_consent("test-policy-1")
    now = time.time()
    device.record_many(Event(f"item{i % 12}", "click", now - 900 + i) for i in range(events))
    return device


def request(round: int = 1, run: str = "run-a", mode: str = "local", state=None, model=MODEL,
            **changes) -> RoundRequest:
    changes.setdefault("noise_multiplier", 3.0)
    changes.setdefault("user_noise_multiplier", 3.0)
    if mode == "off":
        changes.update(noise_multiplier=0.0, user_noise_multiplier=0.0)
    state = state or shared_model(model).init_state(torch.Generator().manual_seed(1))
    return RoundRequest(run, round, model, preset(mode, **changes), state)
