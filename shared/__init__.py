"""Code shared by devices, coordinator and simulations: model, DP step, accounting, events."""

from attune.shared.config import PrivacyMode, RoundConfig
from attune.shared.events import Event, EventContext
from attune.shared.model import GLOBAL_PARAMS, LOCAL_PARAMS, ModelConfig, Personalization
from attune.shared.vocabulary import Vocabulary

__all__ = [
    "GLOBAL_PARAMS",
    "LOCAL_PARAMS",
    "Event",
    "EventContext",
    "ModelConfig",
    "Personalization",
    "PrivacyMode",
    "RoundConfig",
    "Vocabulary",
]
