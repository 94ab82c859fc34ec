"""Code shared by devices, coordinator and simulations: model, mechanism, accounting, events, wire."""

from attune.shared.config import PrivacyMode, RoundConfig
from attune.shared.events import Event, EventContext
from attune.shared.model import ModelConfig, SharedModel, register, shared_model
from attune.shared.vocabulary import Vocabulary

__all__ = ["Event", "EventContext", "ModelConfig", "PrivacyMode", "RoundConfig", "SharedModel", "Vocabulary",
           "register", "shared_model"]
