"""``Personalizer``: the one object an app developer uses on the device.

It records the person's events in the on-device store, ranks candidates with the global item side
plus the person's own user vector, trains locally with DP (Opacus), and reports what was spent.
Raw events and the user vector never leave the device; only ``TrainOutcome.update`` (the change of
the global side) is meant to be sent.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from attune.client.store import EventStore, Retention
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
    ) -> None:
        self.model_config = model or ModelConfig()
        self.vocabulary = vocabulary or Vocabulary(self.model_config.num_items)
        if self.vocabulary.num_items != self.model_config.num_items:
            raise ConfigError("vocabulary and model disagree on num_items")
        self.privacy = privacy or PrivacyConfig()
        self.seed = seed
        self.store = EventStore(store_path, retention)
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
            "budget_exhausted": False,
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
        items = torch.tensor(self.vocabulary.indices(item_ids), dtype=torch.long)
        features = context_features(context, RANKED_EVENT_TYPE).unsqueeze(0)
        with torch.no_grad():
            query = self._model.person(1, features) - self._model.user_vector.weight
            personal = not self.paused  # paused: the global model only
            if personal and self._rank_vector is not None:
                query = query + self._rank_vector
            elif personal and self._has_user_vector:
                query = query + self._model.user_vector.weight
            return self._model.score(query, items.unsqueeze(0))[0]

    def refresh_ranking(self, steps: int = 40) -> None:
        """Fit the ranking-only user vector to the current global side (on device, no DP needed:
        it never shapes anything that is sent). Starts from the DP user vector."""
        if not self._has_user_vector:
            return
        vector = fit_rank_vector(self._model, self.local_data(), steps=steps,
                                 generator=self._generator(seeding.RANK + self.participation["rounds"]))
        self._rank_vector = vector
        self.store.put_state({_RANK_KEY: _tensor_bytes({"rank": vector})})

    def rank(
        self, candidate_item_ids: Sequence[str], context: EventContext | None = None
    ) -> list[Ranked]:
        """Candidates ordered best first, with their scores."""
        candidates = list(candidate_item_ids)
        if not candidates:
            return []
        scores = self.score(candidates, context).tolist()
        order = sorted(range(len(candidates)), key=lambda i: -scores[i])
        return [Ranked(candidates[i], scores[i]) for i in order]

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

        Refused (nothing trained) when the round would exceed the epsilon budget or when the
        config is non-private but the device does not allow it; skipped with too few events.
        """
        config = config or TrainConfig()
        spent = self.epsilon()
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
        self.participation["paused"] = bool(paused)
        self.store.put_state({_PARTICIPATION_KEY: json.dumps(self.participation).encode()})

    def forget_item(self, item_id: str) -> int:
        """Delete every event of one item ("not interested"); returns how many were deleted."""
        self.vocabulary.index(item_id)  # validates the id
        return self.store.forget_item(item_id)

    def erase(self) -> None:
        """Delete everything stored about the person: events, user vectors, local model.

        The privacy ledger is kept: it records what was already sent, and forgetting it would let
        a later round spend budget that is already spent.
        """
        self.store.erase(keep_state=(_LEDGER_KEY, _PARTICIPATION_KEY))
        self._has_user_vector = False
        self._rank_vector = None
        with torch.no_grad():
            self._model.user_vector.weight.zero_()

    def export(self) -> dict:
        """Everything stored about the person, as one JSON-ready document (access, portability)."""
        events = [
            {"item_id": e.item_id, "event_type": e.event_type, "timestamp": e.timestamp,
             "hour": e.resolved_context().hour, "weekday": e.resolved_context().weekday}
            for e in self.store.events()
        ]
        local = None
        if self._has_user_vector:
            local = {"user_vector": self._model.user_vector.weight.detach()[0].tolist(),
                     "rank_vector": None if self._rank_vector is None else self._rank_vector.tolist()}
        return {"events": events, "privacy": self.privacy_report(), "local_model": local,
                "paused": self.paused}

    def note_update_sent(self, parameters: int) -> None:
        """Record that an update left the device (for the person's privacy report)."""
        self.participation["updates_sent"] += 1
        self.participation["parameters_per_update"] = parameters
        self.participation["last_update_at"] = time.time()
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
            "last_update_at": self.participation["last_update_at"],
            "shared_parameters": list(GLOBAL_PARAMS),
            "budget_exhausted": self.participation["budget_exhausted"],
            "model_version": MODEL_VERSION,
        }
