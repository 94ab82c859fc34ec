"""The on-device store: one SQLite file holding the person's events, the device's state and its
privacy ledger.

Everything is written in transactions: a rejected event or batch, or a crash mid-write, leaves
the file as it was. Read-modify-write of state (``update``) and the ledger's budget check and
append (``reserve``) run inside one ``BEGIN IMMEDIATE`` transaction, so any number of objects and
processes on one store never lose a step or a pause. A busy store is waited for (``timeout``),
then reported as busy. The schema is versioned; a file that is not an Attune store (its SQLite
``application_id``) is refused before anything is written to it.

With a key every value is sealed (``attune.client.encryption``) and bound to its place: an event
to its row id, a state value to its key and the write that produced it (a sealed manifest lists
the current write of each key), so swapped, copied or rolled-back values fail to open. A large
value can be written in parts (``Parts``): each part is a value of its own, sealed and listed
the same way, so neither the device nor SQLite ever holds a catalog-sized value whole. Restoring
a whole older copy of the file cannot be seen from inside it: anchor a counter outside it (the
platform keystore) if that matters to you.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attune.client.encryption import Sealer
from attune.shared.accounting import Entry, epsilon_of, ledger_from_json, ledger_to_json, load_analysis
from attune.shared.errors import ConfigError, InvalidEventError, StoreError, WrongKeyError
from attune.shared.events import Event, EventContext, check_recordable

SCHEMA_VERSION = 3
APPLICATION_ID = 0x41544E45  # "ATNE": marks a file as an Attune store
_DAY_S = 86_400
_MANIFEST = "__manifest__"
_LEDGER = "~ledger"  # the manifest's entry for the ledger's extent
_PART, _AFTER_PARTS = "#", "$"  # a value written in parts: rows KEY#0, KEY#1, ... (all before KEY$)

# Only the insertion order and the day of each event are stored in the clear (retention needs
# them); what was done, to which item and at what time is in ``payload``, sealed when a key is set.
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, day INTEGER NOT NULL, payload BLOB NOT NULL);
CREATE INDEX events_by_day ON events (day);
CREATE TABLE state (key TEXT PRIMARY KEY, generation INTEGER NOT NULL, value BLOB NOT NULL);
CREATE TABLE ledger (id INTEGER PRIMARY KEY AUTOINCREMENT, payload BLOB NOT NULL);
"""
_TABLES = {"meta", "events", "state", "ledger", "sqlite_sequence"}
_OBJECTS = {("table", name) for name in _TABLES} | {("index", "events_by_day")} | {
    ("index", f"sqlite_autoindex_{name}_1") for name in ("meta", "state")}  # what the schema creates


@dataclass(frozen=True)
class Retention:
    """How much history the device keeps: at most ``max_events``, none older than ``max_age_days``
    (applied by whole days, since only the day of an event is stored in the clear)."""

    max_events: int = 10_000
    max_age_days: float = 365.0

    def __post_init__(self) -> None:
        events, days = self.max_events, self.max_age_days
        if isinstance(events, bool) or not isinstance(events, int) or not 1 <= events <= 10**9:
            raise ConfigError(f"max_events must be an integer in 1..10**9, got {events!r}")
        if isinstance(days, bool) or not isinstance(days, (int, float)) or not 0 < days < 1e6:
            raise ConfigError(f"max_age_days must be a number in (0, 1e6), got {days!r}")


@dataclass(frozen=True)
class StoredEvent:
    """An event as stored, with the id that ``forget_event`` takes."""

    id: int
    event: Event


@dataclass(frozen=True)
class Reservation:
    """What ``EventStore.reserve`` did: the ledger row it wrote (the round is paid), or why it
    wrote none (``over_budget``: the budget could not pay)."""

    row: int | None
    reason: str = ""
    over_budget: bool = False

    @property
    def paid(self) -> bool:
        return self.row is not None


@dataclass(frozen=True)
class LedgerRow:
    """What one round cost the device, and which round it was."""

    id: int
    at: float
    run_id: str
    round: int
    mode: str
    entries: tuple[Entry, ...]  # what the coordinator's view of the round cost
    local_entries: tuple[Entry, ...]  # what the device's own contribution alone reveals
    task: str = "train"  # train, count or evaluate
    part: int = 0  # a count round: the slice of the catalog it counted
    vocabulary: str = ""  # a count round: the fingerprint of the item ids it counted by


def _encode(event: Event) -> bytes:
    context = event.resolved_context()
    return json.dumps([event.item_id, event.event_type, float(event.timestamp), context.hour,
                       context.weekday]).encode()


def _decode(raw: bytes) -> Event:
    item, kind, timestamp, hour, weekday = json.loads(raw)
    return Event(item, kind, timestamp, EventContext(hour=hour, weekday=weekday))


def _corrupt(path: Path, what: str, error: Exception) -> StoreError:
    return StoreError(f"{path}: {what} is corrupt ({type(error).__name__}: {error}); the store cannot "
                      f"be used as it is: Personalizer.destroy({str(path)!r}) deletes it")


def _sqlite_error(path: Path, error: sqlite3.Error) -> StoreError:
    """What a sqlite error means for the person, as a ``StoreError`` that says what to do."""
    text = str(error)
    if isinstance(error, sqlite3.ProgrammingError):  # the app's use of the object, not the file
        if "closed" in text:
            return StoreError(f"{path}: this store was closed; open a new Personalizer")
        return StoreError(f"{path}: a store must be used from the thread that opened it; open one "
                          f"Personalizer per thread ({text})")
    if "locked" in text or "busy" in text:
        return StoreError(f"{path} is busy: another process holds it; try again")
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        return StoreError(f"{path} cannot be written ({text}): check the file's and its folder's permissions")
    if not _sqlite_header(path):  # a document given as the store path, say: never offered for deletion lightly
        return StoreError(f"{path} is not a store (not a SQLite file); nothing was changed. Check the path: if it "
                          f"is a store that was damaged, Personalizer.destroy({str(path)!r}) deletes it")
    return _corrupt(path, "the file", error)


def _sqlite_header(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(16) == b"SQLite format 3\x00"
    except OSError:
        return True  # unreadable: the error says so


def file_path(path: object, what: str) -> Path:
    """``path`` as a ``Path`` to a file, or ``ConfigError``."""
    if not isinstance(path, (str, Path)) or not str(path) or "\x00" in str(path):
        raise ConfigError(f"{what} must be a file path, got {path!r}")
    return Path(path)


class _Result:
    """A statement's rows, read in full while errors are still caught (sqlite reads pages lazily)."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self.rows: list[Any] = cursor.fetchall()
        self.lastrowid: int = cursor.lastrowid or 0
        self.rowcount: int = cursor.rowcount

    def fetchone(self) -> Any:  # a row (a tuple of sqlite values) or None
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Any]:
        return self.rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)


class _Guarded:
    """The store's connection: every sqlite error, whatever the statement, becomes a
    ``StoreError`` (a damaged page, a read-only file, a dropped table, a locked database)."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self.db, self.path = db, path

    def execute(self, sql: str, parameters: tuple = ()) -> _Result:
        try:
            return _Result(self.db.execute(sql, parameters))
        except sqlite3.Error as error:
            raise _sqlite_error(self.path, error) from None
        except UnicodeDecodeError as error:  # a damaged text value
            raise _corrupt(self.path, "the file", error) from None

    def executemany(self, sql: str, rows: Iterable[tuple]) -> _Result:
        try:
            return _Result(self.db.executemany(sql, rows))
        except sqlite3.Error as error:
            raise _sqlite_error(self.path, error) from None
        except UnicodeDecodeError as error:
            raise _corrupt(self.path, "the file", error) from None

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction

    def close(self) -> None:
        self.db.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


@dataclass(frozen=True)
class Parts:
    """A state value given a part at a time, each part sealed and stored on its own (bound to its
    key, position and write): a catalog-sized value is never held whole by the caller, the sealer
    or SQLite. Read back with ``EventStore.get_parts``."""

    parts: Iterable[bytes]


class EventStore:
    """Durable store of events, named state values and the privacy ledger on the device.

    With ``key`` (32 bytes from the platform keystore) every payload is sealed with AES-256-GCM;
    opening with a missing or wrong key raises ``WrongKeyError`` before anything is read or
    written. ``timeout``: seconds to wait for another process holding the store.
    """

    def __init__(self, path: str | Path, retention: Retention | None = None,
                 key: bytes | None = None, timeout: float = 10.0) -> None:
        self.path = file_path(path, "the store path")
        self.retention = retention or Retention()
        if not isinstance(self.retention, Retention):
            raise ConfigError(f"retention must be a Retention, got {type(retention).__name__}")
        self._sealer = Sealer(key)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"{self.path}: its folder cannot be created ({error.strerror})") from None
        if self.path.is_dir():
            raise ConfigError(f"the store path {self.path} is a folder; give a file path")
        self._was_empty = not self.path.exists() or self.path.stat().st_size == 0  # only then is one created
        try:
            self._db = _Guarded(sqlite3.connect(self.path, isolation_level=None, timeout=timeout), self.path)
        except sqlite3.Error as error:
            raise StoreError(f"{self.path} cannot be opened: {error}") from None
        try:
            self._open()
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        """Check the file is an Attune store of this schema (or empty) before writing anything."""
        application = self._db.execute("PRAGMA application_id").fetchone()[0]
        objects = set(self._db.execute("SELECT type, name FROM sqlite_master").fetchall())
        tables = {name for kind, name in objects if kind == "table"}
        if not objects and application == 0:
            if not self._was_empty:  # a damaged (truncated) store, or another app's file: never overwritten
                raise StoreError(f"{self.path} is not empty but holds no store; nothing was changed. Check the "
                                 "path: if it is a store that was damaged (truncated), "
                                 f"Personalizer.destroy({str(self.path)!r}) deletes it")
            self._db.execute("PRAGMA secure_delete = ON")  # freed pages are zeroed
            self._db.execute("PRAGMA journal_mode = DELETE")  # no WAL file left holding old pages
            with self.transaction():
                for statement in _SCHEMA.strip().split(";\n"):  # executescript would commit
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                self._db.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("schema_version", str(SCHEMA_VERSION)), ("key_check", self._sealer.key_check),
                    ("generation", "0")])
            return
        if application != APPLICATION_ID or not objects <= _OBJECTS:
            raise StoreError(f"{self.path} is not an Attune store (another application's file, or objects "
                             "added to it: views, triggers?); nothing was changed")
        self._db.execute("PRAGMA secure_delete = ON")
        self._db.execute("PRAGMA journal_mode = DELETE")
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
        if "schema_version" not in meta or "key_check" not in meta or "generation" not in meta:
            raise StoreError(f"{self.path}: the store's metadata is missing (damaged file); "
                             f"Personalizer.destroy({str(self.path)!r}) deletes it")
        if meta["schema_version"] != str(SCHEMA_VERSION):
            raise StoreError(f"{self.path} has schema version {meta['schema_version']!r}; this Attune reads "
                             f"{str(SCHEMA_VERSION)!r}")
        if not meta["generation"].isdecimal() or len(meta["generation"]) > 18:
            raise _corrupt(self.path, "the store's metadata", ValueError(f"generation {meta['generation']!r}"))
        if meta["key_check"] != self._sealer.key_check:
            if not meta["key_check"]:
                raise WrongKeyError(f"{self.path} is not encrypted: open it without a key, then "
                                    "call rotate_key(key) to encrypt it")
            raise WrongKeyError(f"{self.path} is encrypted under another key"
                                if self._sealer.encrypted else f"{self.path} is encrypted: give its key")

    @staticmethod
    def destroy(path: str | Path) -> None:
        """Delete a store file without opening it as a store (for a corrupt or foreign-looking
        file the person wants gone): overwritten with zeros, then removed, with its journal."""
        path = file_path(path, "the store path")
        if path.is_dir():
            raise ConfigError(f"{path} is a folder, not a store: nothing was deleted")
        for target in (path, Path(str(path) + "-journal"), Path(str(path) + "-wal")):
            if target.exists():
                with target.open("r+b") as handle:
                    handle.write(bytes(target.stat().st_size))
                    handle.flush()
                target.unlink()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db  # type: ignore[misc]
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads that all see one write: ``BEGIN`` (deferred: other readers are not held up) ...
        ``COMMIT``."""
        self._db.execute("BEGIN")
        try:
            yield
        finally:
            if self._db.in_transaction:
                self._db.execute("COMMIT")

    @property
    def encrypted(self) -> bool:
        return self._sealer.encrypted

    def generation(self) -> str:
        """Moves with every state write, by any object or process: what a cache of state checks."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        if row is None or not str(row[0]).isdecimal():  # a damaged page took the row (checked at open)
            raise _corrupt(self.path, "the store's metadata", ValueError("no generation"))
        return str(row[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- events --------------------------------------------------------------------------------

    def add(self, event: Event) -> None:
        self.add_many([event])

    def add_many(self, events: Iterable[Event]) -> int:
        """Store a batch atomically: if any event is invalid, none is stored. Returns how many of
        them retention kept."""
        return sum(row is not None for row in self.add_rows(events))

    def add_rows(self, events: Iterable[Event]) -> list[int | None]:
        """``add_many``, returning each event's row id (``None``: retention dropped it at once)."""
        if isinstance(events, (str, bytes)) or not isinstance(events, Iterable):
            raise InvalidEventError(f"events must be an iterable of Event, got {type(events).__name__}")
        batch = list(events)
        now = time.time()
        for position, event in enumerate(batch):
            if not isinstance(event, Event):
                raise InvalidEventError(f"event #{position} is a {type(event).__name__}, not an Event")
            check_recordable(event, now)
        if not batch:
            return []
        with self.transaction():
            rows = []
            for event in batch:  # the row id is known before sealing: each blob is bound to its row
                row = self._db.execute("INSERT INTO events (day, payload) VALUES (?, x'')",
                                       (int(event.timestamp // _DAY_S),)).lastrowid
                self._db.execute("UPDATE events SET payload = ? WHERE id = ?",
                                 (self._sealer.seal(_encode(event), f"event:{row}"), row))
                rows.append(row)
            self._apply_retention()
            present = {int(r) for (r,) in self._db.execute("SELECT id FROM events WHERE id >= ?",
                                                           (min(rows),)).fetchall()}
        return [row if row in present else None for row in rows]

    def _apply_retention(self) -> None:
        cutoff_day = int((time.time() - self.retention.max_age_days * _DAY_S) // _DAY_S)
        self._db.execute("DELETE FROM events WHERE day < ?", (cutoff_day,))
        self._db.execute("DELETE FROM events WHERE id NOT IN "
                         "(SELECT id FROM events ORDER BY day DESC, id DESC LIMIT ?)", (self.retention.max_events,))

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def stored(self) -> list[StoredEvent]:
        """All stored events with their ids, oldest first."""
        rows = self._db.execute("SELECT id, payload FROM events").fetchall()
        try:
            stored = [StoredEvent(row_id, _decode(self._sealer.open(bytes(payload), f"event:{row_id}")))
                      for row_id, payload in rows]
        except (ValueError, TypeError) as error:
            raise _corrupt(self.path, "an event", error) from None
        return sorted(stored, key=lambda s: (s.event.timestamp, s.id))

    def ids(self) -> set[int]:
        """The ids of the stored events (nothing decoded)."""
        return {int(r) for (r,) in self._db.execute("SELECT id FROM events").fetchall()}

    def events(self) -> list[Event]:
        """All stored events, oldest first."""
        return [s.event for s in self.stored()]

    def forget_event(self, event_id: int) -> bool:
        """Delete one event by id; False when no event has that id."""
        with self.transaction():
            cursor = self._db.execute("DELETE FROM events WHERE id = ?", (event_id,))
        return cursor.rowcount == 1

    def forget_item(self, item_id: str) -> int:
        """Delete every event of ``item_id``; returns how many were deleted."""
        ids = [(s.id,) for s in self.stored() if s.event.item_id == item_id]
        with self.transaction():
            self._db.executemany("DELETE FROM events WHERE id = ?", ids)
        return len(ids)

    # -- state -----------------------------------------------------------------------------------

    def _manifest(self) -> dict:
        """Encrypted stores: the sealed list of what state holds (key -> generation, and the
        ledger's row count and last id under ``_LEDGER``), so a deleted row is seen as well as a
        rolled-back one. It exists once anything was written (generation > 0)."""
        row = self._db.execute("SELECT generation, value FROM state WHERE key = ?", (_MANIFEST,)).fetchone()
        if row is None:
            if self.encrypted and self.generation() != "0":
                raise WrongKeyError(f"{self.path}: the sealed list of stored values was deleted outside Attune")
            return {}
        try:
            return json.loads(self._sealer.open(bytes(row[1]), f"state:{_MANIFEST}:{row[0]}"))
        except (ValueError, TypeError) as error:
            raise _corrupt(self.path, "the state manifest", error) from None

    def get_state(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT generation, value FROM state WHERE key = ?", (key,)).fetchone()
        if row is None:
            if self.encrypted and key in self._manifest():
                raise WrongKeyError(f"{self.path}: the stored {key!r} was deleted outside Attune")
            return None
        value = self._sealer.open(bytes(row[1]), f"state:{key}:{row[0]}")
        if self.encrypted and self._manifest().get(key) != row[0]:
            raise WrongKeyError(f"{self.path}: the stored {key!r} is not its latest write (rolled back?)")
        return value

    def get_json(self, key: str) -> object | None:
        raw = self.get_state(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as error:
            raise _corrupt(self.path, f"the stored {key!r}", error) from None

    def get_parts(self, key: str) -> Iterator[bytes] | None:
        """The parts of a value written as ``Parts``, read lazily (None: never written). Read them
        inside one ``snapshot()``, so that no write falls between two of them."""
        header = self.get_json(key)
        if header is None:
            return None
        if not isinstance(header, dict) or set(header) != {"parts"} or not isinstance(header["parts"], int):
            raise _corrupt(self.path, f"the stored {key!r}", ValueError(f"not a list of parts: {header!r}"))
        return (self._part(key, index) for index in range(header["parts"]))

    def _part(self, key: str, index: int) -> bytes:
        value = self.get_state(f"{key}{_PART}{index}")
        if value is None:
            raise _corrupt(self.path, f"the stored {key!r}", ValueError(f"its part {index} is missing"))
        return value

    def put_state(self, values: Mapping[str, bytes | Parts]) -> None:
        """Write several state values in one transaction (e.g. user vector and device state)."""
        self.put_state_after(lambda _: values)

    def put_state_after(self, change: Callable[[Callable[[str], bytes | None]], Mapping[str, bytes | Parts]]) -> None:
        """Write what ``change`` returns, given a reader of the stored values, in one transaction:
        a value written only when it differs from the stored one cannot go stale between the two."""
        with self.transaction():
            self._write_state(change(self.get_state))

    def _write_state(self, values: Mapping[str, bytes | Parts], *, fresh: bool = False) -> None:
        """Inside a transaction: seal and write ``values`` under a new generation (``fresh``: they
        are all the state there is, the rest was just deleted). A value's earlier parts go."""
        base = {} if fresh or not self.encrypted else self._manifest()  # read before the generation moves
        generation = int(self.generation()) + 1
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(generation),))
        written = []

        def write(key: str, value: bytes) -> None:
            self._db.execute("INSERT OR REPLACE INTO state (key, generation, value) VALUES (?, ?, ?)",
                             (key, generation, self._sealer.seal(value, f"state:{key}:{generation}")))
            written.append(key)

        for key, value in values.items():
            if not fresh:
                self._db.execute("DELETE FROM state WHERE key > ? AND key < ?", (key + _PART, key + _AFTER_PARTS))
            if isinstance(value, Parts):
                count = 0
                for count, part in enumerate(value.parts, 1):  # one part in memory at a time
                    write(f"{key}{_PART}{count - 1}", part)
                value = json.dumps({"parts": count}).encode()
            write(key, value)
        if self.encrypted:
            earlier_parts = tuple(key + _PART for key in values)
            kept = {key: value for key, value in base.items() if not key.startswith(earlier_parts)}
            manifest = {**kept, **dict.fromkeys(written, generation), _LEDGER: self._ledger_extent()}
            write(_MANIFEST, json.dumps(manifest).encode())

    def update_json(self, key: str, change: Callable[[object | None], object]) -> object:
        """Read ``key``, apply ``change`` and write the result, all in one transaction (so no
        concurrent writer's change is lost); returns the new value."""
        with self.transaction():
            value = change(self.get_json(key))
            self._write_state({key: json.dumps(value).encode()})
        return value

    # -- ledger ----------------------------------------------------------------------------------

    def _ledger_extent(self) -> list[int]:
        count, last = self._db.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM ledger").fetchone()
        return [int(count), int(last)]

    def ledger(self) -> list[LedgerRow]:
        """Every round this device paid for, oldest first."""
        recorded = self._manifest().get(_LEDGER) if self.encrypted else None  # None: a store from before it
        if recorded is not None and recorded != self._ledger_extent():
            raise WrongKeyError(f"{self.path}: privacy ledger rows were deleted or added outside Attune")
        rows = self._db.execute("SELECT id, payload FROM ledger ORDER BY id").fetchall()
        out = []
        try:
            for row_id, payload in rows:
                raw = json.loads(self._sealer.open(bytes(payload), f"ledger:{row_id}"))
                out.append(LedgerRow(row_id, float(raw["at"]), str(raw["run_id"]), int(raw["round"]),
                                     str(raw["mode"]), tuple(ledger_from_json(raw["entries"])),
                                     tuple(ledger_from_json(raw["local_entries"])), str(raw.get("task", "train")),
                                     int(raw.get("part", 0)), str(raw.get("vocabulary", ""))))
        except (ValueError, TypeError, KeyError) as error:
            raise _corrupt(self.path, "the privacy ledger", error) from None
        return out

    def reserve(self, entries: list[Entry], local_entries: list[Entry], *, budget: float, delta: float,
                run_id: str, round: int, mode: str, task: str = "train", part: int = 0, vocabulary: str = "",
                check: Callable[[list[LedgerRow]], str | None] = lambda rows: None) -> Reservation:
        """Append a round's ledger entries if they fit the budget, atomically: the row, or why not.

        ``check(rows)`` may refuse for another reason (a replayed round). Recorded before anything
        leaves the device, so what was spent is never under-reported.
        """
        load_analysis()  # not while holding the store's write lock
        with self.transaction():
            rows = self.ledger()
            if (reason := check(rows)) is not None:
                return Reservation(None, reason)
            spent = [entry for row in rows for entry in row.entries]
            after = epsilon_of([*spent, *entries], delta)
            if after > budget * (1 + 1e-9):
                return Reservation(None, f"this round would bring epsilon to {after:.3f}, over the budget of {budget}",
                                   over_budget=True)
            row = self._db.execute("INSERT INTO ledger (payload) VALUES (x'')").lastrowid
            payload = json.dumps({"at": time.time(), "run_id": run_id, "round": round, "mode": mode, "task": task,
                                  "part": part, "vocabulary": vocabulary, "entries": ledger_to_json(entries),
                                  "local_entries": ledger_to_json(local_entries)}).encode()
            self._db.execute("UPDATE ledger SET payload = ? WHERE id = ?",
                             (self._sealer.seal(payload, f"ledger:{row}"), row))
            if self.encrypted:
                self._write_state({})  # the manifest, with the ledger's new extent
        return Reservation(int(row))

    # -- whole store -----------------------------------------------------------------------------

    def erase(self, keep_state: tuple[str, ...] = ()) -> None:
        """Delete every event and every state value except ``keep_state`` (the ledger stays), then
        rewrite the file (``VACUUM``) so no deleted page survives; ``secure_delete`` already
        zeroes freed pages."""
        with self.transaction():
            kept = {key: value for key in keep_state if (value := self.get_state(key)) is not None}
            self._db.execute("DELETE FROM events")
            self._db.execute("DELETE FROM state")
            self._write_state(kept, fresh=True)
        self._db.execute("VACUUM")

    def rotate_key(self, new_key: bytes | None, *, decrypt: bool = False) -> None:
        """Re-encrypt everything under ``new_key`` (also: encrypt a plain store) in one transaction;
        ``rotate_key(None, decrypt=True)`` stores everything in the clear (never by accident).

        Interrupted at any point, the file still holds every value under the old key: keep the
        old key in the keystore until this returns, then replace it.
        """
        if (new_key is None) != decrypt:
            raise ConfigError("rotate_key takes a new key, or None with decrypt=True to store everything in the clear")
        new = Sealer(new_key)
        with self.transaction():
            events = self._db.execute("SELECT id, payload FROM events").fetchall()
            self._db.executemany("UPDATE events SET payload = ? WHERE id = ?", [
                (new.seal(self._sealer.open(bytes(p), f"event:{i}"), f"event:{i}"), i) for i, p in events])
            ledger = self._db.execute("SELECT id, payload FROM ledger").fetchall()
            self._db.executemany("UPDATE ledger SET payload = ? WHERE id = ?", [
                (new.seal(self._sealer.open(bytes(p), f"ledger:{i}"), f"ledger:{i}"), i) for i, p in ledger])
            values = {key: self.get_state(key) for (key,) in
                      self._db.execute("SELECT key FROM state WHERE key != ?", (_MANIFEST,)).fetchall()}
            self._db.execute("DELETE FROM state")
            self._sealer, old = new, self._sealer
            try:
                self._write_state(values, fresh=True)  # type: ignore[arg-type]
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'key_check'", (new.key_check,))
            except BaseException:
                self._sealer = old
                raise
        self._db.execute("VACUUM")  # no page of the old ciphertexts (or plaintext) stays behind
