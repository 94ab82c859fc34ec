"""Code shared by devices, coordinator and simulations: model, mechanism, accounting, events, wire."""

from attune.shared.config import PrivacyMode, RoundConfig
from attune.shared.events import Event, EventContext
from attune.shared.model import GLOBAL_PARAMS, LOCAL_PARAMS, ModelConfig, Personalization
from attune.shared.vocabulary import Vocabulary

__all__ = ["Event", "EventContext", "GLOBAL_PARAMS", "LOCAL_PARAMS", "ModelConfig", "Personalization",
           "PrivacyMode", "RoundConfig", "Vocabulary"]
