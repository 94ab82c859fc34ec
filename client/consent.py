"""The person's consent record, kept in the device's store.

A device trains and sends updates only while the record says ``granted``. The record keeps its
history (each grant and withdrawal, when, and under which policy version) so the app can show the
person, and the coordinator's operator can demonstrate, what was agreed to.
"""

from __future__ import annotations

import time
from typing import Any

from attune.client.store import EventStore
from attune.shared.errors import ConfigError

# The one purpose a device asks consent for: train on its events and send DP updates.
CONSENT_PURPOSE = "federated-personalization"
CONSENT_KEY = "consent"


def read_consent(store: EventStore) -> dict | None:
    record = store.get_json(CONSENT_KEY)
    return record if isinstance(record, dict) else None


def write_consent(store: EventStore, granted: bool, policy_version: str | None) -> dict:
    """Append a grant or withdrawal to the record and store it at once."""
    if granted and (not isinstance(policy_version, str) or not policy_version.strip()
                    or len(policy_version) > 64):
        raise ConfigError(f"policy_version must be a non-empty string of at most 64 characters, "
                          f"got {policy_version!r}")
    def change(current: object | None) -> dict:
        record: dict[str, Any] = current if isinstance(current, dict) else {"purpose": CONSENT_PURPOSE, "history": []}
        now = time.time()
        record.update(granted=granted, policy_version=policy_version, updated_at=now)
        record["history"].append({"granted": granted, "policy_version": policy_version, "at": now})
        return record

    return store.update_json(CONSENT_KEY, change)  # type: ignore[return-value]
