"""``Personalizer``: the one object an app developer uses on the device, a facade over its parts.

- events: ``record`` into the store (``attune.client.store``);
- ranking: ``rank``, ``score``, ``explain``, ``export_scorer`` with the person's ranking vector;
- the round: ``round(request)`` is the device's ``DeviceRound`` (``attune.client.device_round``):
  it decides (``attune.client.policy``), pays (the ledger), computes (``attune.client.training``)
  and hands over what the device sends; ``contribute`` runs it short of sending;
- the person's controls: consent, pause, forget, erase, export, key rotation;
- the report: ``privacy_report`` and ``privacy_summary`` (``attune.client.report``).

Raw events, their number and the person's vectors never leave the device; only
``Contribution.vector`` is meant to be sent.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from attune.client import state as device_state
from attune.client.consent import CONSENT_KEY, CONSENT_PURPOSE, read_consent, write_consent
from attune.client.device_round import Contribution, DeviceRound, Standing
from attune.client.export import PersonalScorer, save_scorer
from attune.client.policy import PrivacyConfig, replayed, slice_refusal
from attune.client.ranking import device_ranking, mmr_order, personal_scores
from attune.client.report import PrivacyReport, build_report, summary
from attune.client.state import DeviceState, decode_tensors, encode_tensors, read_state, update_state
from attune.client.store import EventStore, LedgerRow, Reservation, Retention, StoredEvent, file_path
from attune.client.training import (
    Cohort,
    LocalData,
    evaluation_contributions,
    initial_user_vector,
    train_round,
)
from attune.shared.accounting import Entry, epsilon_of
from attune.shared.config import RoundTask
from attune.shared.errors import ConfigError, InvalidEventError
from attune.shared.evaluation import NEGATIVES, STATISTICS, statistics
from attune.shared.events import (
    EVENT_TYPES,
    RANKED_EVENT_TYPE,
    Event,
    EventContext,
    context_features,
    context_matrix,
    validate_item_id,
)
from attune.shared.mechanism import local_entries, round_entries
from attune.shared.model import MODEL_VERSION, ModelConfig, shared_model
from attune.shared.randomness import Stream, device_stream
from attune.shared.tags import ItemTags, TagAffinity, person_tags, tag_lift
from attune.shared.vocabulary import Vocabulary
from attune.shared.wire import RoundRequest, check_global_state

log = logging.getLogger(__name__)
# Below this cosine an event's item is unrelated to the explained one and is not given as a reason.
_MIN_EXPLAINING_SIMILARITY = 0.2
_BIAS_CHUNK = 1 << 16  # items scored at once for the tag shares and lifts (a 1M-item catalog in chunks)
DIVERSIFIED = 1000  # results MMR orders when rank() has no limit
HISTORY_HALF_LIFE_DAYS = 30.0  # ranking by the person's own history, before the first global model
# Kept by ``erase``: the ledger (a table of its own), participation, and the person's choice.
_KEPT_BY_ERASE = (device_state.DEVICE_KEY, CONSENT_KEY)


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


class Personalizer:
    """On-device personalization for one person. Open it on the device's store file.

    ``simulation_seed`` (``(run seed, device index)``) makes every draw reproducible for
    simulations; a real device leaves it unset and draws from the OS's secure source.
    """

    def __init__(
        self,
        store_path: str | Path,
        *,
        model: ModelConfig | None = None,
        vocabulary: Vocabulary | None = None,
        privacy: PrivacyConfig | None = None,
        retention: Retention | None = None,
        encryption_key: bytes | None = None,
        simulation_seed: tuple[int, int] | None = None,
        tags: ItemTags | None = None,
        tag_affinity: TagAffinity | None = None,
        ranking: str = "partial-local",
    ) -> None:
        """Open (or create) the person's store at ``store_path``.

        ``model`` must be the coordinator's (``ModelConfig()`` is its default; without it, a
        ``vocabulary`` sizes it); ``vocabulary`` maps the app's item ids to the model's items
        (``Vocabulary.of(ids)``; without it ids are hashed); ``privacy`` is the device's own limits
        (its budget binds every process that opens this store: the smallest given wins);
        ``retention`` how long events are kept; ``encryption_key`` (32 bytes, from the platform
        keystore) seals the store; ``tags`` the catalog's item tags (genres, categories: public
        metadata, one list per model item), which ranking combines with the person's affinity to
        them as ``tag_affinity`` says (``attune.shared.tags``: on the device, no budget). Raises
        ``ConfigError`` for a bad argument, ``StoreError`` for a file that is not a usable store and
        ``WrongKeyError`` for a wrong or missing key. ``ranking`` is what the device fits for its
        person after each round (``attune.client.ranking``: ``partial-local``, ``ditto``, ``global``).
        """
        for name, value, kind in (("model", model, ModelConfig), ("vocabulary", vocabulary, Vocabulary),
                                  ("privacy", privacy, PrivacyConfig), ("tags", tags, ItemTags),
                                  ("tag_affinity", tag_affinity, TagAffinity)):
            if value is not None and not isinstance(value, kind):
                raise ConfigError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
        self.model_config = model or (ModelConfig(num_items=vocabulary.num_items) if vocabulary else ModelConfig())
        self.vocabulary = vocabulary or Vocabulary(self.model_config.num_items)
        if self.vocabulary.num_items != self.model_config.num_items:
            raise ConfigError(f"the vocabulary has {self.vocabulary.num_items} items but the model's num_items is "
                              f"{self.model_config.num_items}; give ModelConfig(num_items={self.vocabulary.num_items}, "
                              "...) or leave model out to take the vocabulary's size")
        if tags is not None and tags.num_items != self.model_config.num_items:
            raise ConfigError(f"the tags list {tags.num_items} items but the model's num_items is "
                              f"{self.model_config.num_items}")
        self.tags, self.tag_affinity = tags, tag_affinity or TagAffinity()
        if not isinstance(ranking, str):
            raise ConfigError(f"ranking must be a name, got {type(ranking).__name__}")
        self.ranking = device_ranking(ranking)
        self._tag_shares: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None  # of the model they came from
        self.privacy = privacy or PrivacyConfig()
        if simulation_seed is not None and not (
                isinstance(simulation_seed, tuple) and len(simulation_seed) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in simulation_seed)):
            raise ConfigError(f"simulation_seed must be None or (run seed, device index), two integers >= 0, "
                              f"got {simulation_seed!r}")
        self.simulation_seed = simulation_seed
        self.store = EventStore(store_path, retention, key=encryption_key)
        self._bind_budget()
        self._shared = shared_model(self.model_config)
        self._load()

    def close(self) -> None:
        """Close the store (``with Personalizer(...) as device:`` does it); any later call says so."""
        self.store.close()

    @staticmethod
    def destroy(store_path: str | Path) -> None:
        """Delete a device's store without opening it (for a store that is corrupt or whose key
        is lost): overwritten with zeros, then removed."""
        EventStore.destroy(store_path)

    def __enter__(self) -> Personalizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state -----------------------------------------------------------------------------------

    def _bind_budget(self) -> None:
        """The person's budget lives in the store and binds every process that opens it: the
        smaller of the stored one and this object's wins, and is stored."""
        stored = self.state.epsilon_budget
        if stored is None or self.privacy.epsilon_budget < stored:
            update_state(self.store, epsilon_budget=lambda current: min(
                self.privacy.epsilon_budget, self.privacy.epsilon_budget if current is None else current))

    @property
    def epsilon_budget(self) -> float:
        """The lifetime event-level budget in force: the store's (see ``set_epsilon_budget``)."""
        stored = self.state.epsilon_budget
        return self.privacy.epsilon_budget if stored is None else min(stored, self.privacy.epsilon_budget)

    def set_epsilon_budget(self, epsilon: float) -> None:
        """Set the person's lifetime budget explicitly, up or down, for every process that opens
        this store (a budget given when opening can only lower it). Lowering it under what was
        spent stops contributions."""
        privacy = replace(self.privacy, epsilon_budget=epsilon)  # validated like any PrivacyConfig
        self.privacy = privacy
        update_state(self.store, epsilon_budget=privacy.epsilon_budget,
                     budget_exhausted=lambda _: self.epsilon() >= privacy.epsilon_budget)

    def _stream(self, *labels: int | str) -> Stream:
        if self.simulation_seed is None:
            return Stream.secure()
        seed, device = self.simulation_seed
        return device_stream(seed, device, *labels)

    def _fresh(self, *, global_model: bool = True) -> None:
        """Reload the cached model and vectors when the store changed under this object (another
        object on the same store erased the person's data, say): a stale cache never ranks, trains
        or writes back what was erased. ``global_model=False`` leaves the global side to the caller,
        which replaces it at once (a round adopting its own: no model-sized decode to throw away)."""
        if self.store.generation() != self._loaded_at:
            self._load(global_model)

    def _load(self, global_model: bool = True) -> None:
        self._loaded_at = self.store.generation()  # read first: a write during the load reloads next time
        if global_model:
            stored = device_state.read_global(self.store)
            self._has_global = stored is not None
            self._state = self._initial_state() if stored is None else check_global_state(
                stored, self.model_config, MODEL_VERSION)
        user = self.store.get_state(device_state.USER_KEY)
        self._user = decode_tensors(user)["user"] if user is not None else None
        rank = self.store.get_state(device_state.RANK_KEY)
        fitted = decode_tensors(rank) if rank is not None else {}
        self._rank, self._rank_bias = fitted.get("rank"), fitted.get("bias")

    def _initial_state(self) -> dict[str, torch.Tensor]:
        """The shared side before any round: fixed (seed 0), so ranking is stable until then."""
        return self._shared.init_state(torch.Generator().manual_seed(0))

    def global_state(self) -> dict[str, torch.Tensor]:
        return {name: value.clone() for name, value in self._state.items()}

    def set_global(self, state: dict[str, torch.Tensor], version: int = MODEL_VERSION) -> None:
        """Adopt a global model published by the coordinator outside a round (validated first;
        a round adopts its own model through ``contribute``)."""
        checked = check_global_state(state, self.model_config, version)
        self._state, self._has_global = checked, True
        self._store_global(checked)

    def _store_global(self, state: dict[str, torch.Tensor], written: dict[str, bytes] | None = None) -> None:
        """Store ``state`` as the global model, with the other ``written`` values, in one write."""
        buffers = [p.name for p in self._shared.layout.buffers]
        self.store.put_state_after(lambda stored: device_state.global_values(state, buffers, stored) | (written or {}))

    @property
    def state(self) -> DeviceState:
        return read_state(self.store)

    # -- events ----------------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        """Store one interaction. Invalid events raise ``InvalidEventError`` and store nothing."""
        self.record_many([event])

    def record_many(self, events: Iterable[Event]) -> int:
        """Record a batch atomically (all or none: one invalid event raises ``InvalidEventError``
        and stores nothing); returns how many of them the retention policy kept. Once the device
        holds a global model, each is also ranked for the next evaluation round (``docs/privacy.md``)."""
        if isinstance(events, (str, bytes)) or not isinstance(events, Iterable):
            raise InvalidEventError(f"events must be an iterable of Event, got {type(events).__name__}")
        batch = list(events)
        for event in batch:
            if isinstance(event, Event):
                self.vocabulary.index(event.item_id)
        rows = self.store.add_rows(batch)
        try:
            self._evaluate_recorded([(e, row) for e, row in zip(batch, rows, strict=True) if row is not None])
        except Exception:  # noqa: BLE001 - the events are stored; their statistics are not worth failing for
            log.exception("could not rank the recorded events for evaluation; they are left out of it")
        return sum(row is not None for row in rows)

    def _evaluate_recorded(self, recorded: list[tuple[Event, int]]) -> None:
        """Rank each new event's item against ``NEGATIVES`` items with the model held now (before
        any training saw the event) and keep its statistics, by its event id, for the next
        evaluation round (``attune.shared.evaluation``); only once a round brought a global model.

        A row depends on its own event alone (beside the global model, the DP user vector and
        fresh randomness), so one event more or less changes one row: the negatives are drawn from
        the whole catalog but the event's own item (not from the items the person never used,
        which other events decide), and the query is the DP user vector's, never the ranking
        vector fitted without noise (``docs/privacy.md``, "Evaluation rounds")."""
        self._fresh()
        if not self._has_global or not recorded:
            return
        items = torch.tensor([self.vocabulary.index(e.item_id) for e, _ in recorded], dtype=torch.long)
        generator = torch.Generator().manual_seed(int.from_bytes(self._stream("evaluate").key_bytes()[:8], "little"))
        drawn = torch.randint(0, self.model_config.num_items - 1, (len(recorded), NEGATIVES), generator=generator)
        drawn += (drawn >= items.unsqueeze(1)).long()  # every item but the event's own, uniformly
        candidates = torch.cat([items.unsqueeze(1), drawn], 1)
        with torch.no_grad():
            queries = self._queries([e.resolved_context() for e, _ in recorded], self._user)
            model_scores = self._shared.score(self._state, queries, candidates)
            _, popular = self._shared.item_side(self._state, candidates)
        ids, stats = self._pending_evaluation()
        new_ids = torch.tensor([row for _, row in recorded], dtype=torch.long)
        self.store.put_state({device_state.EVALUATION_KEY: encode_tensors({
            "ids": torch.cat([ids, new_ids]), "stats": torch.cat([stats, statistics(model_scores, popular)]).float()})})

    def _pending_evaluation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The event ids and statistics waiting for an evaluation round: only of events still
        stored (a deleted event's row goes with it, whatever deleted it)."""
        raw = self.store.get_state(device_state.EVALUATION_KEY)
        if raw is None:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, len(STATISTICS), dtype=torch.float64)
        saved = decode_tensors(raw)
        present = self.store.ids()
        keep = torch.tensor([int(i) in present for i in saved["ids"].tolist()], dtype=torch.bool)
        return saved["ids"][keep], saved["stats"].double()[keep]

    def stored_events(self) -> list[StoredEvent]:
        """The person's events with their ids (for showing them and deleting single ones)."""
        return self.store.stored()

    def local_data(self) -> LocalData:
        """The training events as tensors. An event whose item the current vocabulary no longer
        lists is left out, as if deleted: a map of each event on its own, so one event still
        moves a contribution by at most its sensitivity, and no round fails because of an event."""
        rows = [(event, self.vocabulary.find(event.item_id)) for event in self.store.events()]
        events = [event for event, index in rows if index is not None]
        items = torch.tensor([index for _, index in rows if index is not None], dtype=torch.long)
        weights = torch.tensor([e.weight for e in events], dtype=torch.float32)
        context = None
        if self.model_config.use_context and events:
            contexts = [e.resolved_context() for e in events]
            context = context_matrix(torch.tensor([c.hour for c in contexts]),
                                     torch.tensor([c.weekday for c in contexts]),
                                     torch.tensor([EVENT_TYPES.index(e.event_type) for e in events]))
        return LocalData(items=items, weights=weights, context=context)

    # -- ranking ---------------------------------------------------------------------------------

    def score(self, item_ids: Sequence[str], context: EventContext | None = None) -> torch.Tensor:
        """Scores of ``item_ids`` for this person: by their own history before the device holds any
        global model, then by the model (its global side only until the device has joined)."""
        return self._score(torch.tensor(self.vocabulary.indices(_candidates(item_ids)), dtype=torch.long), context)

    def _score(self, items: torch.Tensor, context: EventContext | None) -> torch.Tensor:
        if context is not None and not isinstance(context, EventContext):
            raise InvalidEventError("context must be an EventContext or None")
        self._fresh()
        if not self._has_global:  # before the first round: the person's own history, not a random model
            return self._history_scores(items)
        with torch.no_grad():
            query = self._query(context)  # first: it refreshes a stale cache
            own = None if (bias := self._own_bias()) is None else bias.unsqueeze(0)
            return personal_scores(self._state, self.model_config, query, items.unsqueeze(0), own)[0] \
                + self._tag_lift(items)

    def _own_bias(self) -> torch.Tensor | None:
        """The person's own item biases ``[num_items]`` when the ranking fitted some (not while paused)."""
        return None if self._rank_bias is None or self.state.paused else self._rank_bias

    def _tag_lift(self, items: torch.Tensor) -> torch.Tensor:
        """The person's tag affinity on ``items`` (0 without tags, while paused, or with strength 0)."""
        if self.tags is None or not self.tag_affinity.tag_strength or self.state.paused:
            return torch.zeros(len(items))
        if self._tag_shares is None or self._tag_shares[0] is not self._state:  # once per model: 1M items
            biases = torch.cat([self._shared.item_side(self._state, chunk)[1]
                                for chunk in torch.arange(self.model_config.num_items).split(_BIAS_CHUNK)])
            self._tag_shares = (self._state, self.tags.shares(biases))
        data = self.local_data()
        own = person_tags(self.tags, data.items, torch.zeros(len(data.items), dtype=torch.long), 1)
        return torch.cat([tag_lift(self.tags, self._tag_shares[1], own, chunk.unsqueeze(0), self.tag_affinity)[0]
                          for chunk in items.split(_BIAS_CHUNK)])

    def _query(self, context: EventContext | None) -> torch.Tensor:
        """The person's query ``[1, dim]``: their ranking vector (none while paused or before the
        first round) at ``context``."""
        self._fresh()
        return self._queries([context], self._own_vector())

    def _own_vector(self) -> torch.Tensor | None:
        """The person's vector for ranking: the ranking vector, or the DP user vector before one is fitted."""
        return self._rank if self._rank is not None else self._user

    def _queries(self, contexts: Sequence[EventContext | None], own: torch.Tensor | None) -> torch.Tensor:
        """The queries ``[n, dim]`` of the person's vector ``own`` (none while paused or before
        the first round) at each of ``contexts``, in one pass."""
        features = torch.stack([context_features(context, RANKED_EVENT_TYPE) for context in contexts])
        if own is None or self.state.paused:
            own = torch.zeros(self.model_config.dim)
        return self._shared.query(self._state, own.float().unsqueeze(0).expand(len(contexts), -1), features)

    def _history_scores(self, items: torch.Tensor) -> torch.Tensor:
        """Each item's weight in the person's own events, the newest counting most (half-life
        ``HISTORY_HALF_LIFE_DAYS``): how a device ranks before it holds any global model."""
        totals = torch.zeros(self.model_config.num_items, dtype=torch.float64)
        now = time.time()
        for event in self.store.events():
            index = self.vocabulary.find(event.item_id)
            if index is not None:
                age_days = max(now - event.timestamp, 0.0) / 86400
                totals[index] += event.weight * 0.5 ** (age_days / HISTORY_HALF_LIFE_DAYS)
        return totals[items].float()

    def refresh_ranking(self, steps: int = 40) -> None:
        """Fit the ranking vector to the current global side, on the device and without DP: it
        never shapes anything that is sent. Starts from the DP user vector."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {steps!r}")
        self._fresh()
        if self._user is None:
            return
        self.store.put_state({device_state.RANK_KEY: self._fit_ranking(self._user, steps)})

    def _fit_ranking(self, user: torch.Tensor, steps: int = 40) -> bytes:
        """Fit and cache the ranking vector from ``user`` against the cached global side (not a
        copy of it: a 1M-item model is not duplicated); its stored form."""
        generator = torch.Generator().manual_seed(int.from_bytes(self._stream("rank").key_bytes()[:8], "little"))
        side = self.ranking.fit(self._state, self.model_config, user.unsqueeze(0), Cohort.of([self.local_data()]),
                                generator, steps=steps)
        self._rank, self._rank_bias = side.vectors[0], None if side.biases is None else side.biases[0]
        return encode_tensors({"rank": self._rank} | ({} if self._rank_bias is None else {"bias": self._rank_bias}))

    def rank(self, candidate_item_ids: Sequence[str], context: EventContext | None = None, *,
             diversity: float = 0.0, limit: int | None = None) -> list[Ranked]:
        """Candidates ordered best first, with their scores (at most ``limit`` of them).

        ``diversity`` in [0, 1] trades score for variety (maximal marginal relevance over item
        vectors; 0 is plain score order) in the first ``limit`` results (the first 1,000 without
        a limit); the rest follow by score. Items the person marked "not interested" come last, and
        after them ids the model's vocabulary does not list (a new item, say), in the order given,
        with score ``-inf``.
        """
        given = _candidates(candidate_item_ids)
        candidates = [item for item in given if self.vocabulary.find(item) is not None]
        unknown = [Ranked(item, -math.inf) for item in given if self.vocabulary.find(item) is None]
        if isinstance(diversity, bool) or not isinstance(diversity, (int, float)) or not 0.0 <= diversity <= 1.0:
            raise ConfigError(f"diversity must be a number in [0, 1], got {diversity!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
        if not candidates:
            return unknown[:limit]
        items = torch.tensor(self.vocabulary.indices(candidates), dtype=torch.long)
        scores = self._score(items, context)
        dismissed = set(self.not_interested())
        wanted = [i for i, item in enumerate(candidates) if item not in dismissed]
        keep = torch.tensor(wanted, dtype=torch.long)
        vectors = self._shared.item_side(self._state, items[keep])[0]
        head = min(len(wanted), limit or DIVERSIFIED)  # MMR costs O(candidates) per pick
        picked = mmr_order(scores[keep], vectors, float(diversity), head)
        chosen = set(picked)
        picked += [p for p in torch.argsort(scores[keep], descending=True, stable=True).tolist() if p not in chosen]
        unwanted = sorted(set(range(len(candidates))) - set(wanted), key=lambda i: -float(scores[i]))
        order = [wanted[p] for p in picked] + unwanted
        values = scores.tolist()
        return ([Ranked(candidates[i], values[i]) for i in order] + unknown)[:limit]

    def explain(self, item_id: str, *, limit: int = 3, recent: int = 200) -> list[Support]:
        """The person's own recent events that most support ``item_id``'s score, strongest first.

        An event supports an item in proportion to the event's weight and the similarity (cosine)
        of the two item vectors (unrelated items, below cosine 0.2, are left out). Before the
        device holds a global model, only the item's own events (what its score is made of).
        Computed on the device from the local store; nothing is sent.
        """
        target = self.vocabulary.index(item_id)
        for name, value in (("limit", limit), ("recent", recent)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self._fresh()
        known = [(event, self.vocabulary.find(event.item_id)) for event in self.store.events()[-recent:]]
        if not self._has_global:  # no model yet: only the item's own events support its score
            known = [(event, index) for event, index in known if index == target]
        events = [event for event, index in known if index is not None]
        if not events:
            return []
        similarity = [1.0] * len(events)  # the item's own events, before any model
        if self._has_global:
            indices = torch.tensor([index for _, index in known if index is not None], dtype=torch.long)
            vectors = torch.nn.functional.normalize(self._shared.item_side(self._state, indices)[0], dim=1)
            wanted = torch.nn.functional.normalize(self._shared.item_side(self._state, torch.tensor([target]))[0],
                                                   dim=1)
            similarity = (vectors @ wanted[0]).tolist()
        latest: dict[str, Support] = {}  # one line per item: its latest event, summed support
        for event, sim in zip(events, similarity, strict=True):
            if sim < _MIN_EXPLAINING_SIMILARITY:
                continue
            total = event.weight * sim + (latest[event.item_id].support if event.item_id in latest else 0.0)
            latest[event.item_id] = Support(event.item_id, event.event_type, event.timestamp, total)
        return sorted(latest.values(), key=lambda s: -s.support)[:limit]

    def export_scorer(self, path: str | Path) -> Path:
        """Write this person's scorer (global item side plus their vector) as a ``torch.export``
        program (``.pt2``) for inference outside Python. Same scores as ``score`` for a context.

        The program takes ``(items, hour, weekday)``: item indices (a 1-D long tensor) and the
        hour (0-23) and weekday (0 is Monday) as 0-dim long tensors, and returns one float score
        per item. The id -> index map travels inside the file as ``vocabulary.json``
        (``{"num_items", "ids", "hashing"}``: ``ids[i]`` is index ``i``)."""
        target = file_path(path, "the scorer path")
        if target.suffix != ".pt2":
            raise ConfigError(f"the scorer file must end in .pt2, got {target.name!r}")
        if not target.parent.is_dir():
            raise ConfigError(f"the scorer's folder {target.parent} does not exist (or is a file)")
        with torch.no_grad():
            self._fresh()
            queries = self._queries([EventContext(hour=h, weekday=w) for h in range(24) for w in range(7)],
                                    self._own_vector())
            vectors, bias = self._shared.all_items(self._state)
            bias = bias if (own := self._own_bias()) is None else own
            if not self._has_global:  # before any model: the history scores, as score() gives them
                vectors = torch.zeros_like(vectors)
                bias = self._history_scores(torch.arange(self.model_config.num_items))
            else:  # the person's tag affinity does not depend on the moment: part of each item's bias
                bias = bias + self._tag_lift(torch.arange(self.model_config.num_items))
            scorer = PersonalScorer(vectors, bias, queries.reshape(24, 7, -1))
        save_scorer(scorer, self.vocabulary, target)
        return target

    # -- the round -------------------------------------------------------------------------------

    def round(self, request: RoundRequest) -> DeviceRound:
        """The device's round of ``request`` (``attune.client.device_round``): ``run()`` it to
        join, ``send(outcome)`` for the vector to send."""
        return DeviceRound(_Phone(self), request)

    def contribute(self, request: RoundRequest) -> Contribution:
        """Join one round (``round(request).run()``): check the device's own limits, pay for the
        round in the ledger (one transaction: budget check and append, before anything can leave),
        adopt the received global side, and compute the contribution (``attune.client.training``).

        Refused, with nothing stored, without the person's consent, while paused, for a replayed
        round, for noise under the device's floor, for a non-private round the device does not
        allow, or when the round would cross the budget (then the device stops contributing).
        """
        return self.round(request).run()

    def epsilon(self) -> float:
        """Event-level epsilon spent so far (what the coordinator can learn, by the ledger)."""
        return epsilon_of([e for row in self.store.ledger() for e in row.entries], self.privacy.delta)

    # -- the person's controls -------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self.state.paused

    def pause(self, paused: bool = True) -> None:
        """While paused nothing is computed or sent, and ``rank`` uses the global model only."""
        if not isinstance(paused, bool):
            raise ConfigError(f"paused must be True or False, got {paused!r}")
        update_state(self.store, paused=paused)

    def consent(self) -> dict | None:
        """The stored consent record (purpose, policy version, history of grants and withdrawals)."""
        return read_consent(self.store)

    @property
    def consented(self) -> bool:
        """Read from the store each time, so a withdrawal by another part of the app counts at once."""
        record = self.consent()
        return record is not None and record.get("granted") is True

    def grant_consent(self, policy_version: str, purpose: str = CONSENT_PURPOSE) -> dict:
        """Record the person's opt-in to ``purpose`` under the app's privacy policy version."""
        if purpose != CONSENT_PURPOSE:
            raise ConfigError(f"Attune asks consent for {CONSENT_PURPOSE!r} only, got {purpose!r}")
        return write_consent(self.store, True, policy_version)

    def withdraw_consent(self) -> dict:
        """Stop participating now: no round computes or sends after this, including one in progress."""
        record = self.consent()
        return write_consent(self.store, False, record["policy_version"] if record else None)

    def not_interested(self) -> list[str]:
        """Items the person dismissed and asked to keep as negative feedback."""
        stored = self.store.get_json(device_state.NOT_INTERESTED_KEY)
        return [str(item) for item in stored] if isinstance(stored, list) else []

    def forget_item(self, item_id: str, *, keep_as_negative: bool = False) -> int:
        """Delete every event of one item; returns how many were deleted. With
        ``keep_as_negative`` the item is remembered as "not interested" and ranked last."""
        self.vocabulary.index(item_id)  # validates the id
        if not isinstance(keep_as_negative, bool):
            raise ConfigError("keep_as_negative must be True or False")
        deleted = self.store.forget_item(item_id)
        if keep_as_negative:
            self.store.update_json(device_state.NOT_INTERESTED_KEY, lambda current: [
                *(current if isinstance(current, list) else []),
                *([] if isinstance(current, list) and item_id in current else [item_id])])
        return deleted

    def forget_event(self, event_id: int) -> None:
        """Delete one event by its id (see ``stored_events``)."""
        if isinstance(event_id, bool) or not isinstance(event_id, int) or not 0 < event_id < 2**63:
            raise InvalidEventError(f"event_id must be a positive integer, got {event_id!r}")
        if not self.store.forget_event(event_id):
            raise InvalidEventError(f"no stored event has id {event_id}")

    def rotate_key(self, new_key: bytes | None, *, decrypt: bool = False) -> None:
        """Re-encrypt the store under ``new_key`` (or encrypt a plain store; ``None`` with
        ``decrypt=True`` decrypts it). Keep the old key until this returns: if interrupted, the
        file is still whole under the old key."""
        self.store.rotate_key(new_key, decrypt=decrypt)

    def erase(self) -> None:
        """Delete everything stored about the person: events, user vectors, received model,
        "not interested" items.

        Kept: the privacy ledger and participation (they record what already left the device;
        forgetting them would let a later round spend budget that is already spent) and the
        consent record (the person's choice, which erasing data does not change).
        """
        self.store.erase(keep_state=_KEPT_BY_ERASE)
        self._user = self._rank = self._rank_bias = None
        self._state, self._has_global = self._initial_state(), False

    def export(self) -> dict:
        """Everything stored about the person, as one JSON-ready document (access, portability)."""
        events = [{"id": s.id, "item_id": s.event.item_id, "event_type": s.event.event_type,
                   "timestamp": s.event.timestamp, "hour": s.event.resolved_context().hour,
                   "weekday": s.event.resolved_context().weekday} for s in self.store.stored()]
        local = None
        if self._user is not None:
            local = {"user_vector": self._user.tolist(),
                     "rank_vector": None if self._rank is None else self._rank.tolist(),
                     "own_item_biases": None if self._rank_bias is None else self._rank_bias.tolist(),
                     "dim": self.model_config.dim, "model_version": MODEL_VERSION}
        awaiting = [dict(zip(STATISTICS, row, strict=True)) for row in self._pending_evaluation()[1].tolist()]
        return {"events": events, "consent": self.consent(), "not_interested": self.not_interested(),
                "privacy": self.privacy_report().as_dict(), "local_model": local, "paused": self.paused,
                "awaiting_evaluation": awaiting}

    # -- the report ------------------------------------------------------------------------------

    def privacy_report(self) -> PrivacyReport:
        """What this device has spent and shared, and under which guarantee, in plain terms."""
        return build_report(self.store.ledger(), self.state, budget=self.epsilon_budget,
                            delta=self.privacy.delta, events=self.store.count(), consented=self.consented,
                            encrypted=self.store.encrypted, shared_parameters=self._shared.layout.names,
                            awaiting_evaluation=len(self._pending_evaluation()[0]))

    def privacy_summary(self) -> str:
        """The privacy report as plain text for the person (what the app shows in its settings)."""
        return summary(self.privacy_report())


class _Phone:
    """A ``Personalizer``'s store and model as a round sees them (``RoundDevice``)."""

    def __init__(self, person: Personalizer) -> None:
        self.person = person
        self.model_config, self.privacy = person.model_config, person.privacy

    def standing(self) -> Standing:
        current = self.person.state
        return Standing(consented=self.person.consented, paused=current.paused,
                        budget_exhausted=current.budget_exhausted, rounds_joined=current.rounds_joined)

    def reserve(self, request: RoundRequest, refresh: bool) -> Reservation:
        person, config = self.person, request.config
        counting = config.task is RoundTask.COUNT
        part, vocabulary = (config.count_part, person.vocabulary.fingerprint) if counting else (0, "")
        entries, local = round_entries(request.model, config, refresh), local_entries(request.model, config, refresh)
        first: list[Entry] = []
        if part:  # a later slice of a count pass: paid for with its first slice (parallel composition)
            first, entries, local = round_entries(request.model, replace(config, count_part=0), refresh), [], []

        def check(rows: list[LedgerRow]) -> str | None:
            return replayed(request, rows) or (slice_refusal(request, rows, first, vocabulary) if part else None)

        return person.store.reserve(entries, local, budget=person.epsilon_budget, delta=self.privacy.delta,
                                    run_id=request.run_id, round=request.round, mode=config.mode,
                                    task=config.task.value, part=part, vocabulary=vocabulary, check=check)

    def stop_contributing(self) -> None:
        update_state(self.person.store, budget_exhausted=True)

    def train(self, request: RoundRequest, refresh: bool) -> torch.Tensor:
        person, task = self.person, request.config.task
        person._fresh(global_model=False)
        person._state, person._has_global = dict(request.state), True
        start = person._user if person._user is not None else initial_user_vector(
            self.model_config.dim, person._stream("user-init"))
        written: dict[str, bytes] = {}  # the global side is encoded last, after the work: never both at once
        if task is RoundTask.EVALUATE:  # the events ranked since the last one, then none pending
            _, stats = person._pending_evaluation()
            vector = evaluation_contributions(stats, torch.zeros(len(stats), dtype=torch.long), 1, request.config,
                                              [person._stream(request.round)])[0]
            written[device_state.EVALUATION_KEY] = encode_tensors({"ids": torch.zeros(0, dtype=torch.long),
                                                                   "stats": torch.zeros(0, len(STATISTICS))})
        else:  # a count round trains nothing: its items are counted by the same function
            output = train_round(request.state, request.model, start.unsqueeze(0),
                                 Cohort.of([person.local_data()]), request.config, [person._stream(request.round)],
                                 [refresh])
            vector = output.contributions[0]
            if task is RoundTask.TRAIN:
                person._user = output.users[0].float()
                written[device_state.USER_KEY] = encode_tensors({"user": person._user})
                if refresh or person._rank is None:  # the ranking vector follows the user vector's refreshes
                    written[device_state.RANK_KEY] = person._fit_ranking(person._user)
        person._store_global(request.state, written)  # the model with what the round fitted, in one write
        update_state(person.store, rounds_joined=lambda n: n + int(task is RoundTask.TRAIN),
                     last_run=request.run_id, last_round=request.round,
                     device_level_epsilon=request.device_level_epsilon,
                     device_level_delta=request.device_level_delta)
        return vector

    def sent(self, nbytes: int) -> None:
        update_state(self.person.store, contributions_sent=lambda n: n + 1, bytes_sent=lambda n: n + int(nbytes),
                     last_sent_at=time.time())


def _candidates(item_ids: object) -> list:
    """Candidate ids as a list, or ``InvalidEventError`` for anything that is not a sequence of them."""
    if isinstance(item_ids, (str, bytes)) or not isinstance(item_ids, Iterable):
        raise InvalidEventError(f"candidates must be a sequence of item ids, got {type(item_ids).__name__}")
    candidates = list(item_ids)
    for item in candidates:
        validate_item_id(item)
    return candidates
