"""``Personalizer``: the one object an app developer uses on the device.

It records the person's events in the on-device store, ranks candidates with the global item side
plus the person's own user vector, trains locally with DP (Opacus), and reports what was spent.
Raw events and the user vector never leave the device; only ``TrainOutcome.update`` (the change of
the global side) is meant to be sent.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from attune.client.consent import CONSENT_KEY, CONSENT_PURPOSE, read_consent, write_consent
from attune.client.export import PersonalScorer, save_scorer
from attune.client.ranking import mmr_order
from attune.client.store import EventStore, Retention, StoredEvent
from attune.client.training import LocalData, fit_rank_vector, train_round
from attune.shared import seeding
from attune.shared.accounting import ACCOUNTANT_NAME, PrivacyLedger
from attune.shared.config import TrainConfig
from attune.shared.errors import ConfigError, InvalidEventError
from attune.shared.events import (
    EVENT_TYPES,
    RANKED_EVENT_TYPE,
    Event,
    EventContext,
    context_features,
    context_matrix,
)
from attune.shared.model import GLOBAL_PARAMS, MODEL_VERSION, ModelConfig, Personalization
from attune.shared.vocabulary import Vocabulary
from attune.shared.wire import check_global_state

_GLOBAL_KEY = "global_model"
_USER_KEY = "user_vector"
_RANK_KEY = "rank_vector"
_LEDGER_KEY = "ledger"
_PARTICIPATION_KEY = "participation"
_NOT_INTERESTED_KEY = "not_interested"
# Kept by ``erase``: what was already sent (so no budget is spent twice) and the person's choice.
# Below this cosine an event's item is unrelated to the explained one and is not given as a reason.
_MIN_EXPLAINING_SIMILARITY = 0.2
_KEPT_BY_ERASE = (_LEDGER_KEY, _PARTICIPATION_KEY, CONSENT_KEY)


@dataclass(frozen=True)
class PrivacyConfig:
    """The device's own privacy limits; the coordinator cannot override them.

    ``epsilon_budget`` and ``delta`` bound the event-level guarantee over the device's lifetime.
    Training without DP needs ``allow_non_private=True`` *and* a non-private ``TrainConfig``.
    """

    epsilon_budget: float = 8.0
    delta: float = 1e-5
    min_events: int = 10
    allow_non_private: bool = False

    def __post_init__(self) -> None:
        if not self.epsilon_budget > 0:
            raise ConfigError(f"epsilon_budget must be > 0, got {self.epsilon_budget}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.min_events < 1:
            raise ConfigError(f"min_events must be >= 1, got {self.min_events}")


@dataclass(frozen=True)
class TrainOutcome:
    """What a call to ``train`` did. ``update`` is set only when ``status == "trained"``."""

    status: str  # "trained" | "skipped" | "refused"
    reason: str
    private: bool
    examples: int = 0
    steps: int = 0
    loss: float | None = None
    clipped_fraction: float | None = None
    epsilon: float = 0.0
    update: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class Ranked:
    item_id: str
    score: float


@dataclass(frozen=True)
class Support:
    """One of the person's own events and how much it supports an item's score."""

    item_id: str
    event_type: str
    timestamp: float
    support: float


def _tensor_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _tensor_load(raw: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(raw), weights_only=True)  # never unpickle code


class Personalizer:
    """On-device personalization for one person. Open it on the device's store file."""

    def __init__(
        self,
        store_path: str,
        *,
        model: ModelConfig | None = None,
        vocabulary: Vocabulary | None = None,
        privacy: PrivacyConfig | None = None,
        retention: Retention | None = None,
        seed: int | None = None,
        encryption_key: bytes | None = None,
    ) -> None:
        self.model_config = model or ModelConfig()
        self.vocabulary = vocabulary or Vocabulary(self.model_config.num_items)
        if self.vocabulary.num_items != self.model_config.num_items:
            raise ConfigError("vocabulary and model disagree on num_items")
        self.privacy = privacy or PrivacyConfig()
        self.seed = seed
        self.store = EventStore(store_path, retention, key=encryption_key)
        self._model = Personalization(self.model_config, generator=self._generator(seeding.MODEL_INIT))
        self._has_user_vector = False
        self._rank_vector: torch.Tensor | None = None
        self._load()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Personalizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state ---------------------------------------------------------------------------------

    def _generator(self, salt: int) -> torch.Generator:
        """Seeded for simulations; from the OS's secure source on real devices."""
        return seeding.generator(self.seed, salt)

    def _load(self) -> None:
        raw = self.store.get_state(_GLOBAL_KEY)
        if raw is not None:
            saved = _tensor_load(raw)
            version = int(saved.pop("__version__").item())
            self._model.load_global_state(check_global_state(saved, self.model_config, version))
        raw_user = self.store.get_state(_USER_KEY)
        if raw_user is not None:
            with torch.no_grad():
                self._model.user_vector.weight.copy_(_tensor_load(raw_user)["user"])
            self._has_user_vector = True
        raw_rank = self.store.get_state(_RANK_KEY)
        if raw_rank is not None:
            self._rank_vector = _tensor_load(raw_rank)["rank"]
        self.ledger = PrivacyLedger()
        ledger_state = self.store.get_json(_LEDGER_KEY)
        if ledger_state is not None:
            self.ledger.load_state_dict(ledger_state)  # type: ignore[arg-type]
        self.participation: dict = self.store.get_json(_PARTICIPATION_KEY) or {  # type: ignore[assignment]
            "rounds": 0,
            "updates_sent": 0,
            "parameters_per_update": 0,
            "last_update_at": None,
            "bytes_sent": 0,
            "budget_exhausted": False,
            "user_level": None,
        }

    def set_global(self, state: dict[str, torch.Tensor], version: int = MODEL_VERSION) -> None:
        """Adopt a global model received from the coordinator (validated first)."""
        checked = check_global_state(state, self.model_config, version)
        self._model.load_global_state(checked)
        payload = {name: t.clone() for name, t in checked.items()}
        payload["__version__"] = torch.tensor(version)
        self.store.put_state({_GLOBAL_KEY: _tensor_bytes(payload)})

    def global_state(self) -> dict[str, torch.Tensor]:
        return self._model.global_state()

    # -- events ---------------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        """Store one interaction. Invalid events raise ``InvalidEventError`` and store nothing."""
        self.record_many([event])

    def record_many(self, events: Iterable[Event]) -> int:
        batch = list(events)
        for event in batch:
            if isinstance(event, Event):
                self.vocabulary.index(event.item_id)
        return self.store.add_many(batch)

    # -- ranking --------------------------------------------------------------------------------

    def score(self, item_ids: Sequence[str], context: EventContext | None = None) -> torch.Tensor:
        """Scores of ``item_ids`` for this person (global side only until the device has trained)."""
        if isinstance(item_ids, str):
            raise InvalidEventError("candidates must be a sequence of item ids, not one string")
        return self._score(torch.tensor(self.vocabulary.indices(item_ids), dtype=torch.long), context)

    def _score(self, items: torch.Tensor, context: EventContext | None) -> torch.Tensor:
        if context is not None and not isinstance(context, EventContext):
            raise InvalidEventError("context must be an EventContext or None")
        with torch.no_grad():
            return self._model.score(self._query(context), items.unsqueeze(0))[0]

    def _query(self, context: EventContext | None) -> torch.Tensor:
        """The person's query vector ``[1, dim]``: context part plus their own vector (the
        ranking-only one when fitted; none while paused or before the first round)."""
        features = context_features(context, RANKED_EVENT_TYPE).unsqueeze(0)
        query = self._model.person(1, features) - self._model.user_vector.weight
        if self.paused:
            return query
        if self._rank_vector is not None:
            return query + self._rank_vector
        if self._has_user_vector:
            return query + self._model.user_vector.weight
        return query

    def refresh_ranking(self, steps: int = 40) -> None:
        """Fit the ranking-only user vector to the current global side (on device, no DP needed:
        it never shapes anything that is sent). Starts from the DP user vector."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {steps!r}")
        if not self._has_user_vector:
            return
        vector = fit_rank_vector(self._model, self.local_data(), steps=steps,
                                 generator=self._generator(seeding.RANK + self.participation["rounds"]))
        self._rank_vector = vector
        self.store.put_state({_RANK_KEY: _tensor_bytes({"rank": vector})})

    def rank(
        self,
        candidate_item_ids: Sequence[str],
        context: EventContext | None = None,
        *,
        diversity: float = 0.0,
        limit: int | None = None,
    ) -> list[Ranked]:
        """Candidates ordered best first, with their scores (at most ``limit`` of them).

        ``diversity`` in [0, 1] trades score for variety (maximal marginal relevance over item
        vectors; 0 is plain score order). Items the person marked "not interested" come last.
        """
        if isinstance(candidate_item_ids, str):
            raise InvalidEventError("candidates must be a sequence of item ids, not one string")
        candidates = list(candidate_item_ids)
        if isinstance(diversity, bool) or not isinstance(diversity, (int, float)) \
                or not 0.0 <= diversity <= 1.0:
            raise ConfigError(f"diversity must be a number in [0, 1], got {diversity!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
        if not candidates:
            return []
        items = torch.tensor(self.vocabulary.indices(candidates), dtype=torch.long)
        scores = self._score(items, context)
        dismissed = set(self.not_interested())
        wanted = [i for i, item in enumerate(candidates) if item not in dismissed]
        keep = torch.tensor(wanted, dtype=torch.long)
        vectors = self._model.item_embedding.weight.detach()[items[keep]]
        picked = mmr_order(scores[keep], vectors, float(diversity), len(wanted))
        unwanted = sorted(set(range(len(candidates))) - set(wanted), key=lambda i: -float(scores[i]))
        order = [wanted[p] for p in picked] + unwanted
        values = scores.tolist()
        return [Ranked(candidates[i], values[i]) for i in order[:limit]]

    def explain(self, item_id: str, *, limit: int = 3, recent: int = 200) -> list[Support]:
        """The person's own recent events that most support ``item_id``'s score, strongest first.

        The user vector is fitted to the items the person interacted with, so an event supports
        an item in proportion to the event's weight and the similarity (cosine) of the two item
        vectors (unrelated items, below cosine 0.2, are left out). Computed on the device from the
        local store; nothing is sent.
        """
        target = self.vocabulary.index(item_id)
        for name, value in (("limit", limit), ("recent", recent)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        events = self.store.events()[-recent:]
        if not events:
            return []
        table = torch.nn.functional.normalize(self._model.item_embedding.weight.detach(), dim=1)
        indices = torch.tensor(self.vocabulary.indices([e.item_id for e in events]), dtype=torch.long)
        similarity = (table[indices] @ table[target]).tolist()
        latest: dict[str, Support] = {}  # one line per item: its latest event, summed support
        for event, sim in zip(events, similarity, strict=True):
            if sim < _MIN_EXPLAINING_SIMILARITY:
                continue
            total = event.weight * sim + (latest[event.item_id].support if event.item_id in latest else 0.0)
            latest[event.item_id] = Support(event.item_id, event.event_type, event.timestamp, total)
        ranked = sorted(latest.values(), key=lambda s: -s.support)
        return ranked[:limit]

    def export_scorer(self, path: str | Path) -> Path:
        """Write this person's scorer (global item side plus their vector) as a ``torch.export``
        program (``.pt2``) for inference outside Python. Same scores as ``score`` for a context."""
        target = Path(path)
        if target.suffix != ".pt2":
            raise ConfigError(f"the scorer file must end in .pt2, got {target.name!r}")
        with torch.no_grad():
            queries = torch.stack([
                self._query(EventContext(hour=h, weekday=w))[0] for h in range(24) for w in range(7)])
            scorer = PersonalScorer(self._model.item_embedding.weight, self._model.item_bias.weight,
                                    queries.reshape(24, 7, -1))
        save_scorer(scorer, self.vocabulary, target)
        return target

    # -- training -------------------------------------------------------------------------------

    def local_data(self) -> LocalData:
        events = self.store.events()
        items = torch.tensor(self.vocabulary.indices([e.item_id for e in events]), dtype=torch.long)
        weights = torch.tensor([e.weight for e in events], dtype=torch.float32)
        context = None
        if self.model_config.use_context and events:
            contexts = [e.resolved_context() for e in events]
            context = context_matrix(
                torch.tensor([c.hour for c in contexts]),
                torch.tensor([c.weekday for c in contexts]),
                torch.tensor([EVENT_TYPES.index(e.event_type) for e in events]),
            )
        return LocalData(items=items, weights=weights, context=context)

    def epsilon(self) -> float:
        return self.ledger.epsilon(self.privacy.delta)

    def train(self, config: TrainConfig | None = None) -> TrainOutcome:
        """One local round against the current global model. Persists user vector and ledger.

        Refused (nothing trained or kept) without the person's consent (also when it is withdrawn
        during the round), while paused, when the round would exceed the epsilon budget, or when
        the config is non-private but the device does not allow it; skipped with too few events.
        """
        config = config or TrainConfig()
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
        spent = self.epsilon()
        if not self.consented:
            return TrainOutcome("refused", "no consent: the person has not opted in to "
                                f"{CONSENT_PURPOSE!r} (or withdrew)", private=config.private,
                                epsilon=spent)
        if self.paused:
            return TrainOutcome("refused", "paused by the person: nothing is trained or sent",
                                private=config.private, epsilon=spent)
        if not config.private and not self.privacy.allow_non_private:
            return TrainOutcome("refused", "non-private training is not allowed on this device",
                                private=False, epsilon=spent)
        if self.participation["budget_exhausted"]:
            return TrainOutcome("refused", "privacy budget exhausted: this device no longer "
                                "contributes", private=config.private, epsilon=spent)
        data = self.local_data()
        if len(data) < self.privacy.min_events:
            return TrainOutcome("skipped", f"{len(data)} events stored; at least "
                                f"{self.privacy.min_events} are needed to train privately",
                                private=config.private, epsilon=spent)
        if config.private:
            after = self.ledger.epsilon_after(
                self.privacy.delta, noise_multiplier=config.noise_multiplier,
                sample_rate=config.sample_rate, steps=config.steps_per_round,
            )
            if after > self.privacy.epsilon_budget:
                self.participation["budget_exhausted"] = True
                self.store.put_state({_PARTICIPATION_KEY: json.dumps(self.participation).encode()})
                return TrainOutcome("refused", f"this round would bring epsilon to {after:.3f}, "
                                    f"over the budget of {self.privacy.epsilon_budget}",
                                    private=True, epsilon=spent)
        if not self._has_user_vector:
            with torch.no_grad():  # a fresh start: small random user vector
                scale, init = self.model_config.dim**-0.5, self._generator(seeding.USER_INIT)
                self._model.user_vector.weight.normal_(0.0, scale, generator=init)
        generator = self._generator(seeding.TRAIN + self.participation["rounds"])
        result = train_round(self._model, data, config, self.ledger, generator)
        if not self.consented:  # withdrawn while training: drop the round, nothing is kept or sent
            self._has_user_vector = False
            self._load()
            return TrainOutcome("refused", "consent was withdrawn during the round: its update "
                                "was discarded", private=config.private, epsilon=spent)
        self._has_user_vector = True
        self.participation["rounds"] += 1
        self.refresh_ranking()
        self.store.put_state({
            _USER_KEY: _tensor_bytes({"user": self._model.user_vector.weight.detach().clone()}),
            _LEDGER_KEY: json.dumps(self.ledger.state_dict()).encode(),
            _PARTICIPATION_KEY: json.dumps(self.participation).encode(),
        })
        return TrainOutcome("trained", "ok", private=config.private, examples=result.examples,
                            steps=result.steps, loss=result.mean_loss,
                            clipped_fraction=result.clipped_fraction, epsilon=self.epsilon(),
                            update=result.update)

    # -- the person's controls --------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return bool(self.participation.get("paused", False))

    def pause(self, paused: bool = True) -> None:
        """While paused nothing is trained or sent, and ``rank`` uses the global model only."""
        if not isinstance(paused, bool):
            raise ConfigError(f"paused must be True or False, got {paused!r}")
        self.participation["paused"] = bool(paused)
        self.store.put_state({_PARTICIPATION_KEY: json.dumps(self.participation).encode()})

    def consent(self) -> dict | None:
        """The stored consent record (purpose, policy version, history of grants and withdrawals)."""
        return read_consent(self.store)

    @property
    def consented(self) -> bool:
        """Read from the store each time, so a withdrawal by another part of the app counts at once."""
        record = self.consent()
        return record is not None and record["granted"]

    def grant_consent(self, policy_version: str, purpose: str = CONSENT_PURPOSE) -> dict:
        """Record the person's opt-in to ``purpose`` under the app's privacy policy version."""
        if purpose != CONSENT_PURPOSE:
            raise ConfigError(f"Attune asks consent for {CONSENT_PURPOSE!r} only, got {purpose!r}")
        return write_consent(self.store, True, policy_version)

    def withdraw_consent(self) -> dict:
        """Stop participating now: no round trains or sends after this, including one in progress."""
        record = self.consent()
        return write_consent(self.store, False, record["policy_version"] if record else None)

    def not_interested(self) -> list[str]:
        """Items the person dismissed and asked to keep as negative feedback."""
        return list(self.store.get_json(_NOT_INTERESTED_KEY) or [])  # type: ignore[call-overload]

    def forget_item(self, item_id: str, *, keep_as_negative: bool = False) -> int:
        """Delete every event of one item; returns how many were deleted. With
        ``keep_as_negative`` the item is remembered as "not interested" and ranked last."""
        self.vocabulary.index(item_id)  # validates the id
        if not isinstance(keep_as_negative, bool):
            raise ConfigError("keep_as_negative must be True or False")
        deleted = self.store.forget_item(item_id)
        if keep_as_negative and item_id not in (dismissed := self.not_interested()):
            self.store.put_state({_NOT_INTERESTED_KEY: json.dumps(dismissed + [item_id]).encode()})
        return deleted

    def stored_events(self) -> list[StoredEvent]:
        """The person's events with their ids (for showing them and deleting single ones)."""
        return self.store.stored()

    def forget_event(self, event_id: int) -> None:
        """Delete one event by its id (see ``stored_events``)."""
        if isinstance(event_id, bool) or not isinstance(event_id, int):
            raise InvalidEventError(f"event_id must be an integer, got {event_id!r}")
        if not self.store.forget_event(event_id):
            raise InvalidEventError(f"no stored event has id {event_id}")

    def rotate_key(self, new_key: bytes) -> None:
        """Re-encrypt the store under ``new_key`` (or encrypt a plain store). Keep the old key
        until this returns: if interrupted, the file is still whole under the old key."""
        self.store.rotate_key(new_key)

    def erase(self) -> None:
        """Delete everything stored about the person: events, user vectors, local model,
        "not interested" items.

        Kept: the privacy ledger and participation counts (they record what already left the
        device; forgetting them would let a later round spend budget that is already spent) and
        the consent record (the person's choice, which erasing data does not change).
        """
        self.store.erase(keep_state=_KEPT_BY_ERASE)
        self._has_user_vector = False
        self._rank_vector = None
        with torch.no_grad():
            self._model.user_vector.weight.zero_()

    def export(self) -> dict:
        """Everything stored about the person, as one JSON-ready document (access, portability)."""
        events = [
            {"id": s.id, "item_id": s.event.item_id, "event_type": s.event.event_type,
             "timestamp": s.event.timestamp, "hour": s.event.resolved_context().hour,
             "weekday": s.event.resolved_context().weekday}
            for s in self.store.stored()
        ]
        local = None
        if self._has_user_vector:
            local = {"user_vector": self._model.user_vector.weight.detach()[0].tolist(),
                     "rank_vector": None if self._rank_vector is None else self._rank_vector[0].tolist(),
                     "dim": self.model_config.dim, "model_version": MODEL_VERSION}
        return {"events": events, "consent": self.consent(), "not_interested": self.not_interested(),
                "privacy": self.privacy_report(), "local_model": local, "paused": self.paused}

    def note_update_sent(self, parameters: int, nbytes: int) -> None:
        """Record that an update left the device (for the person's privacy report)."""
        self.participation["updates_sent"] += 1
        self.participation["parameters_per_update"] = parameters
        self.participation["bytes_sent"] = self.participation.get("bytes_sent", 0) + nbytes
        self.participation["last_update_at"] = time.time()
        self.store.put_state({_PARTICIPATION_KEY: json.dumps(self.participation).encode()})

    def note_user_level(self, epsilon: float, delta: float) -> None:
        """Record the user-level guarantee the coordinator reports for the aggregate."""
        if not (math.isfinite(epsilon) and epsilon >= 0 and 0 < delta < 1):
            raise ConfigError(f"bad user-level guarantee: epsilon={epsilon}, delta={delta}")
        self.participation["user_level"] = {"epsilon": float(epsilon), "delta": float(delta)}
        self.store.put_state({_PARTICIPATION_KEY: json.dumps(self.participation).encode()})

    def privacy_report(self) -> dict:
        """What this device has spent and shared, in plain terms."""
        spent = self.epsilon()
        return {
            "unit": "event",
            "accountant": ACCOUNTANT_NAME,
            "epsilon_spent": spent,
            "epsilon_budget": self.privacy.epsilon_budget,
            "epsilon_left": max(self.privacy.epsilon_budget - spent, 0.0),
            "delta": self.privacy.delta,
            "steps": self.ledger.steps,
            "history": [list(h) for h in self.ledger.history],
            "events_stored": self.store.count(),
            "rounds_trained": self.participation["rounds"],
            "updates_sent": self.participation["updates_sent"],
            "parameters_per_update": self.participation["parameters_per_update"],
            "bytes_sent": self.participation.get("bytes_sent", 0),
            "last_update_at": self.participation["last_update_at"],
            "shared_parameters": list(GLOBAL_PARAMS),
            "budget_exhausted": self.participation["budget_exhausted"],
            "user_level": self.participation.get("user_level"),
            "consented": self.consented,
            "paused": self.paused,
            "encrypted_at_rest": self.store.encrypted,
            "model_version": MODEL_VERSION,
        }

    def privacy_summary(self) -> str:
        """The privacy report as plain text for the person (what the app shows in its settings)."""
        r = self.privacy_report()
        when = ("never" if r["last_update_at"] is None else
                datetime.fromtimestamp(r["last_update_at"], tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        state = "paused" if r["paused"] else "taking part"
        state = state if r["consented"] else "not taking part (no consent)"
        lines = [
            f"Personalization training: {state}.",
            f"Events kept on this device: {r['events_stored']} (they never leave it"
            f"{', and are encrypted' if r['encrypted_at_rest'] else ''}).",
            f"Training rounds joined: {r['rounds_trained']}; model updates sent: {r['updates_sent']} "
            f"({r['bytes_sent']:,} bytes in all, {r['parameters_per_update']:,} numbers each, last: {when}).",
            "What was sent: only the change to the shared item model, with calibrated noise; never your "
            "events or your personal vector.",
            f"Privacy spent on your events: epsilon {r['epsilon_spent']:.2f} of {r['epsilon_budget']:.2f} "
            f"({r['epsilon_left']:.2f} left, delta {r['delta']:g}).",
        ]
        if r["user_level"] is not None:
            lines.append(f"Coordinator's guarantee for all your data together: epsilon "
                         f"{r['user_level']['epsilon']:.2f} (delta {r['user_level']['delta']:g}).")
        if r["budget_exhausted"]:
            lines.append("The privacy budget is used up: this device no longer sends updates.")
        return "\n".join(lines)
