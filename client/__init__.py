"""On-device side: the Personalizer and what it returns (the app's names are also in ``attune``).
The ClientApp is ``attune.client.flower_app``."""

from attune.client.device_round import Contribution, Status
from attune.client.personalizer import Personalizer, Ranked, Support
from attune.client.policy import PrivacyConfig
from attune.client.report import PrivacyReport, RoundSpent
from attune.client.store import Retention, StoredEvent

__all__ = ["Contribution", "Personalizer", "PrivacyConfig", "PrivacyReport", "Ranked", "Retention", "RoundSpent",
           "Status", "StoredEvent", "Support"]
