"""On-device side: event store, Personalizer, local DP training. (The ClientApp is ``flower_app``.)"""

from attune.client.personalizer import Personalizer, PrivacyConfig, Ranked, TrainOutcome
from attune.client.store import EventStore, Retention

__all__ = ["EventStore", "Personalizer", "PrivacyConfig", "Ranked", "Retention", "TrainOutcome"]
