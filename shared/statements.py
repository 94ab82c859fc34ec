"""One sentence per guarantee, the same everywhere it is printed (README, the person's report,
``results.json``). ``docs/privacy.md`` states each in full: unit, neighbouring relation, who sees
what, sensitivity, accountant and what is disclosed on purpose.
"""

from __future__ import annotations

from attune.shared.config import PrivacyMode

STATEMENTS: dict[PrivacyMode, str] = {
    PrivacyMode.DISTRIBUTED: (
        "Event-level (epsilon, delta)-DP (add or remove one event) for everything the coordinator observes, "
        "the secure sums of each round, provided the coordinator follows the protocol, SecAgg+ holds and "
        "at least min_survivors - colluders devices whose noise shares are in a released sum are honest; "
        "each device's own contribution is also (epsilon_local, delta)-DP on its own."),
    PrivacyMode.LOCAL: (
        "Event-level (epsilon, delta)-DP (add or remove one event) for each device's contribution on its "
        "own, against anyone who sees it, the coordinator included; no trust needed."),
    PrivacyMode.OFF: (
        "NON-PRIVATE: no differential privacy; contributions are bounded per device but not noised."),
}

DEVICE_LEVEL = ("Device-level (epsilon, delta)-DP of the released model for all of one device's data "
                "together (its data replaced by none), provided the coordinator adds its noise as signed.")

DISCLOSED = ("Disclosed on purpose: whether a device took part in a round (consent, pause and budget decide "
             "it, never its events), the round config it was sent, and message sizes, which do not depend "
             "on events.")


def statement(mode: PrivacyMode | str) -> str:
    return STATEMENTS[PrivacyMode(mode)]
