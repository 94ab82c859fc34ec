"""The on-device event store: one SQLite file holding the person's events and the device's state.

Everything is written in transactions: a rejected event or batch, or a crash mid-write, leaves
the file as it was. The schema is versioned; a file of another version is refused, not guessed.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from attune.shared.errors import ConfigError, InvalidEventError, StoreError
from attune.shared.events import Event, EventContext

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    timestamp REAL NOT NULL,
    hour INTEGER,
    weekday INTEGER
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (timestamp);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


@dataclass(frozen=True)
class Retention:
    """How much history the device keeps: at most ``max_events``, none older than ``max_age_days``."""

    max_events: int = 10_000
    max_age_days: float = 365.0

    def __post_init__(self) -> None:
        if self.max_events < 1 or self.max_age_days <= 0:
            raise ConfigError("retention needs max_events >= 1 and max_age_days > 0")


class EventStore:
    """Durable store of events and of named state blobs (model, ledger) on the device."""

    def __init__(self, path: str | Path, retention: Retention | None = None) -> None:
        self.path = Path(path)
        self.retention = retention or Retention()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA secure_delete = ON")
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
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0])

    def _transaction(self) -> sqlite3.Connection:
        return _Transaction(self._db)  # type: ignore[return-value]

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
        rows = []
        for event in batch:
            context = event.resolved_context()
            rows.append(
                (event.item_id, event.event_type, float(event.timestamp), context.hour, context.weekday)
            )
        with self._transaction():
            self._db.executemany(
                "INSERT INTO events (item_id, event_type, timestamp, hour, weekday) VALUES (?,?,?,?,?)",
                rows,
            )
            self._apply_retention()
        return len(rows)

    def _apply_retention(self) -> None:
        cutoff = time.time() - self.retention.max_age_days * 86_400
        self._db.execute("DELETE FROM events WHERE timestamp < ?", (cutoff,))
        self._db.execute(
            "DELETE FROM events WHERE id NOT IN "
            "(SELECT id FROM events ORDER BY timestamp DESC, id DESC LIMIT ?)",
            (self.retention.max_events,),
        )

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def events(self) -> list[Event]:
        """All stored events, oldest first."""
        rows = self._db.execute(
            "SELECT item_id, event_type, timestamp, hour, weekday FROM events ORDER BY timestamp, id"
        ).fetchall()
        return [
            Event(item, kind, ts, EventContext(hour=hour, weekday=weekday))
            for item, kind, ts, hour, weekday in rows
        ]

    def forget_item(self, item_id: str) -> int:
        """Delete every event of ``item_id``; returns how many were deleted."""
        with self._transaction():
            cursor = self._db.execute("DELETE FROM events WHERE item_id = ?", (item_id,))
        return int(cursor.rowcount)

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
        return None if row is None else bytes(row[0])

    def get_json(self, key: str) -> object | None:
        raw = self.get_state(key)
        return None if raw is None else json.loads(raw)

    def put_state(self, values: dict[str, bytes]) -> None:
        """Write several state blobs in one transaction (e.g. user vector and ledger together)."""
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", list(values.items())
            )


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
