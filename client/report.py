"""The person's privacy report: what their device spent, under which guarantee, and what it sent."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from attune.client.state import DeviceState
from attune.client.store import LedgerRow
from attune.shared.accounting import ACCOUNTANT_NAME, epsilon_of
from attune.shared.config import PrivacyMode
from attune.shared.model import MODEL_VERSION
from attune.shared.statements import DEVICE_LEVEL, statement


@dataclass(frozen=True)
class RoundSpent:
    """One round the device joined: when, which run and round, which mode protected it, and what
    it cost on its own."""

    at: float
    run_id: str
    round: int
    mode: str
    epsilon: float
    task: str = "train"  # train, count or evaluate


@dataclass(frozen=True)
class PrivacyReport:
    unit: str
    accountant: str
    epsilon_spent: float  # what the coordinator can learn about any one event (by the ledger)
    epsilon_local: float  # what the device's own contributions alone reveal (distributed rounds)
    epsilon_evaluation: float  # what its evaluation rounds alone cost (part of epsilon_spent)
    epsilon_budget: float
    epsilon_left: float
    delta: float
    statements: tuple[str, ...]  # the guarantee of every mode used so far
    rounds: tuple[RoundSpent, ...]
    entries: tuple[dict, ...]  # the whole ledger, for an independent recompute
    events_stored: int
    events_awaiting_evaluation: int  # ranked when recorded, kept for the next evaluation round
    rounds_joined: int
    contributions_sent: int
    bytes_sent: int
    last_sent_at: float | None
    shared_parameters: tuple[str, ...]
    budget_exhausted: bool
    device_level: dict | None  # the coordinator's signed device-level guarantee
    consented: bool
    paused: bool
    encrypted_at_rest: bool
    model_version: int

    def as_dict(self) -> dict:
        return asdict(self)


def build_report(rows: list[LedgerRow], state: DeviceState, *, budget: float, delta: float, events: int,
                 consented: bool, encrypted: bool, shared_parameters: tuple[str, ...],
                 awaiting_evaluation: int = 0) -> PrivacyReport:
    spent_entries = [entry for row in rows for entry in row.entries]
    local_entries = [entry for row in rows for entry in row.local_entries]
    spent = epsilon_of(spent_entries, delta)
    modes = list(dict.fromkeys(row.mode for row in rows))
    device_level = None
    if state.device_level_epsilon > 0:
        device_level = {"epsilon": state.device_level_epsilon, "delta": state.device_level_delta,
                        "statement": DEVICE_LEVEL}
    return PrivacyReport(
        unit="event", accountant=ACCOUNTANT_NAME, epsilon_spent=spent, epsilon_local=epsilon_of(local_entries, delta),
        epsilon_evaluation=epsilon_of([e for row in rows if row.task == "evaluate" for e in row.entries], delta),
        epsilon_budget=budget, epsilon_left=max(budget - spent, 0.0), delta=delta,
        statements=tuple(statement(mode) for mode in modes),
        rounds=tuple(RoundSpent(row.at, row.run_id, row.round, row.mode, epsilon_of(row.entries, delta), row.task)
                     for row in rows),
        entries=tuple(entry.as_dict() for entry in spent_entries), events_stored=events,
        events_awaiting_evaluation=awaiting_evaluation,
        rounds_joined=state.rounds_joined, contributions_sent=state.contributions_sent, bytes_sent=state.bytes_sent,
        last_sent_at=state.last_sent_at, shared_parameters=shared_parameters, budget_exhausted=state.budget_exhausted,
        device_level=device_level, consented=consented, paused=state.paused, encrypted_at_rest=encrypted,
        model_version=MODEL_VERSION)


def summary(report: PrivacyReport) -> str:
    """The report as plain text for the person (what the app shows in its settings)."""
    when = ("never" if report.last_sent_at is None else
            datetime.fromtimestamp(report.last_sent_at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    used_up = report.budget_exhausted or report.epsilon_spent >= report.epsilon_budget
    state = "paused" if report.paused else "not contributing (privacy budget used up)" if used_up else "taking part"
    state = state if report.consented else "not taking part (no consent)"
    modes = sorted({r.mode for r in report.rounds})
    lines = [
        f"Personalization training: {state}.",
        f"Events kept on this device: {report.events_stored} (they never leave it"
        f"{', and are encrypted' if report.encrypted_at_rest else ''}).",
        f"Rounds joined: {report.rounds_joined}; contributions sent: {report.contributions_sent} "
        f"({report.bytes_sent:,} bytes in all, last: {when}).",
        "What was sent: one noised, clipped sum of your events' effect on the shared item model per round; "
        "never your events, their number, your personal vector, a loss or a score.",
        f"Privacy spent on your events: epsilon {report.epsilon_spent:.2f} of {report.epsilon_budget:.2f} "
        f"({report.epsilon_left:.2f} left, delta {report.delta:g})."
        if report.epsilon_spent <= report.epsilon_budget else
        f"Privacy spent on your events: epsilon {report.epsilon_spent:.2f}, spent before your budget was lowered "
        f"to {report.epsilon_budget:.2f} (delta {report.delta:g}); nothing more is spent.",
    ]
    if report.epsilon_evaluation > 0:
        lines.append(f"Of that, measuring how well the shared model ranks (evaluation rounds, the same protection): "
                     f"epsilon {report.epsilon_evaluation:.2f}.")
    if PrivacyMode.DISTRIBUTED.value in modes:
        lines.append(f"Your contributions alone, without the secure sum's protection: epsilon "
                     f"{report.epsilon_local:.2f}.")
    lines += [f"Guarantee ({mode}): {statement(mode)}" for mode in modes]
    if report.device_level is not None:
        lines.append(f"Coordinator's guarantee for all your data together: epsilon "
                     f"{report.device_level['epsilon']:.2f} (delta {report.device_level['delta']:g}).")
    if used_up:
        lines.append("The privacy budget is used up: this device no longer contributes.")
    return "\n".join(lines)
