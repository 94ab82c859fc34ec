"""Attune: private, on-device personalization.

The app developer's names live here (``from attune import Personalizer, Event``), with every error
Attune raises on purpose (``attune.shared.errors``). Coordinators use ``attune.server``;
researchers the ``attune`` command and ``attune.simulations``.
"""

from attune.client.device_round import Contribution, Status
from attune.client.encryption import new_key
from attune.client.personalizer import Personalizer, Ranked, Support
from attune.client.policy import PrivacyConfig
from attune.client.report import PrivacyReport, RoundSpent
from attune.client.store import Retention, StoredEvent
from attune.shared.config import PrivacyMode, RoundConfig
from attune.shared.errors import (
    AttuneError,
    ConfigError,
    DataError,
    InvalidEventError,
    ModelMismatchError,
    PrivacyError,
    SignatureError,
    StoreError,
    WrongKeyError,
)
from attune.shared.events import Event, EventContext
from attune.shared.model import ModelConfig
from attune.shared.tags import ItemTags, TagAffinity
from attune.shared.vocabulary import Vocabulary

__all__ = [
    "AttuneError",
    "ConfigError",
    "Contribution",
    "DataError",
    "Event",
    "EventContext",
    "InvalidEventError",
    "ItemTags",
    "ModelConfig",
    "ModelMismatchError",
    "Personalizer",
    "PrivacyConfig",
    "PrivacyError",
    "PrivacyMode",
    "PrivacyReport",
    "Ranked",
    "Retention",
    "RoundConfig",
    "RoundSpent",
    "SignatureError",
    "Status",
    "StoreError",
    "StoredEvent",
    "Support",
    "TagAffinity",
    "Vocabulary",
    "WrongKeyError",
    "new_key",
]
