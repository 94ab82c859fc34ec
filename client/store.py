"""The on-device event store: one SQLite file holding the person's events and the device's state.

Everything is written in transactions: a rejected event or batch, or a crash mid-write, leaves
the file as it was. The schema is versioned; a file of another version is refused, not guessed.
Values can be encrypted at rest (see ``attune.client.encryption``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from attune.client.encryption import Sealer
from attune.shared.errors import ConfigError, InvalidEventError, StoreError, WrongKeyError
from attune.shared.events import Event, EventContext

SCHEMA_VERSION = 2
_DAY_S = 86_400

# Only the insertion order and the day of each event are stored in the clear (retention needs
# them); what was done, to which item and at what time is in ``payload``, sealed when a key is set.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    day INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_day ON events (day);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""
_EVENT_LABEL = "event"


@dataclass(frozen=True)
class Retention:
    """How much history the device keeps: at most ``max_events``, none older than ``max_age_days``
    (applied by whole days, since only the day of an event is stored in the clear)."""

    max_events: int = 10_000
    max_age_days: float = 365.0

    def __post_init__(self) -> None:
        if self.max_events < 1 or self.max_age_days <= 0:
            raise ConfigError("retention needs max_events >= 1 and max_age_days > 0")


@dataclass(frozen=True)
class StoredEvent:
    """An event as stored, with the id that ``forget_event`` takes."""

    id: int
    event: Event


def _encode(event: Event) -> bytes:
    context = event.resolved_context()
    return json.dumps([event.item_id, event.event_type, float(event.timestamp), context.hour,
                       context.weekday]).encode()


def _decode(raw: bytes) -> Event:
    item, kind, timestamp, hour, weekday = json.loads(raw)
    return Event(item, kind, timestamp, EventContext(hour=hour, weekday=weekday))


class EventStore:
    """Durable store of events and of named state blobs (model, ledger) on the device.

    With ``key`` (32 bytes from the platform keystore) every event payload and state blob is
    sealed with AES-256-GCM; opening with a missing or wrong key raises ``WrongKeyError`` before
    anything is read or written.
    """

    def __init__(self, path: str | Path, retention: Retention | None = None,
                 key: bytes | None = None) -> None:
        self.path = Path(path)
        self.retention = retention or Retention()
        self._sealer = Sealer(key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA secure_delete = ON")  # freed pages are zeroed
            self._db.execute("PRAGMA journal_mode = DELETE")  # no WAL file left holding old pages
            version = self._open_schema()
        except sqlite3.DatabaseError as error:
            raise StoreError(f"{self.path} is not a usable Attune store: {error}") from None
        if version != SCHEMA_VERSION:
            self._db.close()
            raise StoreError(
                f"{self.path} has schema version {version}; this Attune reads {SCHEMA_VERSION}"
            )

    def _open_schema(self) -> int:
        self._db.executescript(_SCHEMA)  # idempotent: every statement is IF NOT EXISTS
        with self._transaction():
            for key, value in (("schema_version", str(SCHEMA_VERSION)),
                               ("key_check", self._sealer.key_check)):
                self._db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if meta["key_check"] != self._sealer.key_check:
            self._db.close()
            if not meta["key_check"]:
                raise WrongKeyError(f"{self.path} is not encrypted: open it without a key, then "
                                    "call rotate_key(key) to encrypt it")
            raise WrongKeyError(f"{self.path} is encrypted under another key"
                                if self._sealer.encrypted else f"{self.path} is encrypted: give its key")
        return int(meta["schema_version"])

    def _transaction(self) -> sqlite3.Connection:
        return _Transaction(self._db)  # type: ignore[return-value]

    @property
    def encrypted(self) -> bool:
        return self._sealer.encrypted

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, event: Event) -> None:
        self.add_many([event])

    def add_many(self, events: Iterable[Event]) -> int:
        """Store a batch atomically: if any event is invalid, none is stored."""
        batch = list(events)
        for position, event in enumerate(batch):
            if not isinstance(event, Event):
                raise InvalidEventError(f"event #{position} is a {type(event).__name__}, not an Event")
        rows = [(int(event.timestamp // _DAY_S), self._sealer.seal(_encode(event), _EVENT_LABEL))
                for event in batch]
        with self._transaction():
            self._db.executemany("INSERT INTO events (day, payload) VALUES (?, ?)", rows)
            self._apply_retention()
        return len(rows)

    def _apply_retention(self) -> None:
        cutoff_day = int((time.time() - self.retention.max_age_days * _DAY_S) // _DAY_S)
        self._db.execute("DELETE FROM events WHERE day < ?", (cutoff_day,))
        self._db.execute(
            "DELETE FROM events WHERE id NOT IN "
            "(SELECT id FROM events ORDER BY day DESC, id DESC LIMIT ?)",
            (self.retention.max_events,),
        )

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def stored(self) -> list[StoredEvent]:
        """All stored events with their ids, oldest first."""
        rows = self._db.execute("SELECT id, payload FROM events").fetchall()
        stored = [StoredEvent(row_id, _decode(self._sealer.open(payload, _EVENT_LABEL)))
                  for row_id, payload in rows]
        return sorted(stored, key=lambda s: (s.event.timestamp, s.id))

    def events(self) -> list[Event]:
        """All stored events, oldest first."""
        return [s.event for s in self.stored()]

    def forget_event(self, event_id: int) -> bool:
        """Delete one event by id; False when no event has that id."""
        with self._transaction():
            cursor = self._db.execute("DELETE FROM events WHERE id = ?", (event_id,))
        return cursor.rowcount == 1

    def forget_item(self, item_id: str) -> int:
        """Delete every event of ``item_id``; returns how many were deleted."""
        ids = [(s.id,) for s in self.stored() if s.event.item_id == item_id]
        with self._transaction():
            self._db.executemany("DELETE FROM events WHERE id = ?", ids)
        return len(ids)

    def erase(self, keep_state: tuple[str, ...] = ()) -> None:
        """Delete every event and every state blob except ``keep_state``, then rewrite the file
        (``VACUUM``) so no deleted page survives; ``secure_delete`` already zeroes freed pages."""
        with self._transaction():
            self._db.execute("DELETE FROM events")
            marks = ",".join("?" * len(keep_state))
            self._db.execute(f"DELETE FROM state WHERE key NOT IN ({marks})", keep_state)
        self._db.execute("VACUUM")

    def get_state(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
        return None if row is None else self._sealer.open(bytes(row[0]), f"state:{key}")

    def get_json(self, key: str) -> object | None:
        raw = self.get_state(key)
        return None if raw is None else json.loads(raw)

    def put_state(self, values: dict[str, bytes]) -> None:
        """Write several state blobs in one transaction (e.g. user vector and ledger together)."""
        rows = [(key, self._sealer.seal(value, f"state:{key}")) for key, value in values.items()]
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", rows)

    def rotate_key(self, new_key: bytes) -> None:
        """Re-encrypt everything under ``new_key`` (also: encrypt a plain store) in one transaction.

        Interrupted at any point, the file still holds every value under the old key: keep the
        old key in the keystore until this returns, then replace it.
        """
        new = Sealer(new_key)
        with self._transaction():
            events = self._db.execute("SELECT id, payload FROM events").fetchall()
            self._db.executemany("UPDATE events SET payload = ? WHERE id = ?", [
                (new.seal(self._sealer.open(p, _EVENT_LABEL), _EVENT_LABEL), i) for i, p in events])
            state = self._db.execute("SELECT key, value FROM state").fetchall()
            self._db.executemany("UPDATE state SET value = ? WHERE key = ?", [
                (new.seal(self._sealer.open(v, f"state:{k}"), f"state:{k}"), k) for k, v in state])
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'key_check'", (new.key_check,))
        self._sealer = new
        self._db.execute("VACUUM")  # no page of the old ciphertexts (or plaintext) stays behind


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
