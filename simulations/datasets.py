"""Behavior logs for simulations: the seeded synthetic generator, MovieLens-100K and CSV loaders.

Every loader returns an :class:`EventLog`: one row per interaction, users and items re-indexed
densely (``0..n-1``) in order of first appearance after sorting by the raw ids, so the same file
always gives the same indices.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import numpy as np

from attune.shared.errors import DataError
from attune.shared.events import EVENT_WEIGHTS
from attune.shared.tags import ItemTags


@dataclass(frozen=True)
class EventLog:
    """Interactions as parallel arrays (``users``, ``items`` are dense indices)."""

    users: np.ndarray  # int64 [n]
    items: np.ndarray  # int64 [n]
    timestamps: np.ndarray  # float64 [n], unix seconds
    weights: np.ndarray  # float32 [n]
    num_users: int
    num_items: int
    item_ids: tuple[str, ...]  # raw id of each item index
    name: str
    item_tags: ItemTags | None = None  # what the catalog says about each item (genres, a category)

    def __len__(self) -> int:
        return int(self.users.shape[0])


def _index(raw: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    def key(value: str) -> tuple[int, int | str]:
        return (0, int(value)) if re.fullmatch(r"-?[0-9]+", value) else (1, value)  # '--1' is a name

    vocabulary = tuple(sorted(set(raw), key=key))
    lookup = {value: i for i, value in enumerate(vocabulary)}
    return np.fromiter((lookup[v] for v in raw), dtype=np.int64, count=len(raw)), vocabulary


def _build(
    name: str, users: list[str], items: list[str], times: np.ndarray, weights: np.ndarray
) -> EventLog:
    if not users:
        raise DataError(f"{name}: no events found")
    user_index, user_ids = _index(users)
    item_index, item_ids = _index(items)
    return EventLog(
        users=user_index,
        items=item_index,
        timestamps=times.astype(np.float64),
        weights=weights.astype(np.float32),
        num_users=len(user_ids),
        num_items=len(item_ids),
        item_ids=item_ids,
        name=name,
    )


def load_movielens(directory: Path) -> EventLog:
    """MovieLens-100K ``u.data`` (user, item, rating, timestamp; tab-separated) as implicit feedback.

    GroupLens MovieLens 100K: F. M. Harper and J. A. Konstan, 2015, ACM TiiS 5(4):19.
    """
    path = Path(directory) / "u.data"
    if not path.is_file():
        raise DataError(f"{path} not found: --data must be the ml-100k folder holding u.data (a relative path "
                        f"starts from the folder you run from: {Path.cwd()})")
    users, items, times = [], [], []
    with path.open(encoding="latin-1") as handle:
        for number, line in enumerate(handle, 1):
            parts = line.split("\t")
            if len(parts) != 4:
                raise DataError(f"{path}:{number}: expected 4 tab-separated fields")
            users.append(parts[0])
            items.append(parts[1])
            try:
                times.append(float(parts[3]))
            except ValueError:
                raise DataError(f"{path}:{number}: timestamp {parts[3]!r} is not a number") from None
            if not (np.isfinite(times[-1]) and 0 <= times[-1] < 1e11):
                raise DataError(f"{path}:{number}: timestamp {parts[3].strip()!r} is not unix seconds")
    ones = np.ones(len(users), dtype=np.float32)
    log = _build("movielens-100k", users, items, np.asarray(times), ones)
    genres = Path(directory) / "u.item"
    return replace(log, item_tags=_movielens_genres(genres, log.item_ids)) if genres.is_file() else log


MOVIELENS_GENRES = 19  # u.item's last 19 fields: one 0/1 flag per genre ("unknown" first)


def _movielens_genres(path: Path, item_ids: tuple[str, ...]) -> ItemTags:
    """Each movie's genres from MovieLens-100K's ``u.item`` (id|title|date|video date|url|19 flags)."""
    flags: dict[str, list[int]] = {}
    with path.open(encoding="latin-1") as handle:
        for number, line in enumerate(handle, 1):
            parts = line.rstrip("\n").split("|")
            if len(parts) != 5 + MOVIELENS_GENRES or any(flag not in ("0", "1") for flag in parts[5:]):
                raise DataError(f"{path}:{number}: expected an id, 4 fields and {MOVIELENS_GENRES} genre flags, "
                                "separated by |")
            flags[parts[0]] = [g for g, flag in enumerate(parts[5:]) if flag == "1"]
    return ItemTags.of([flags.get(item, []) for item in item_ids], MOVIELENS_GENRES)


def load_tags(path: Path, item_ids: tuple[str, ...], *, item: str = "item", tag: str = "tag",
              delimiter: str = ",") -> ItemTags:
    """Item tags from a CSV with a header: one row per (item, tag) pair, tags named freely (an
    item may have several, or none; items the log does not know are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found (paths are relative to the folder you run from: {Path.cwd()})")
    index = {value: i for i, value in enumerate(item_ids)}
    lists: list[list[int]] = [[] for _ in item_ids]
    names: dict[str, int] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            missing = [c for c in (item, tag) if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: no column(s) {', '.join(missing)} (found: "
                                f"{', '.join(reader.fieldnames or [])})")
            for number, row in enumerate(reader, 2):
                if not row[item] or not row[tag]:
                    raise DataError(f"{path}:{number}: {item!r} and {tag!r} must not be empty")
                if row[item] in index:
                    lists[index[row[item]]].append(names.setdefault(row[tag], len(names)))
    except (UnicodeDecodeError, csv.Error, OSError) as error:
        raise DataError(f"{path}: not a UTF-8 CSV file this loader reads ({error})") from None
    if not names:
        raise DataError(f"{path}: no tag of an item in the log")
    return ItemTags.of(lists, len(names))


@dataclass(frozen=True)
class CsvColumns:
    """How to read an event log from CSV: the header's column names and the delimiter. Times are
    unix seconds or ISO 8601 (``2024-05-01T12:00:00Z``; without a zone, UTC); an event's weight is
    ``weight`` (a positive number), or its ``event_type``'s weight (view, click, like, purchase,
    ...: ``attune.shared.events.EVENT_WEIGHTS``), or 1."""

    user: str = "user"
    item: str = "item"
    time: str = "timestamp"
    weight: str | None = None
    event_type: str | None = None
    delimiter: str = ","

    def __post_init__(self) -> None:
        if self.weight is not None and self.event_type is not None:
            raise DataError("give a weight column or an event-type column, not both")
        delimiter = {"\\t": "\t", "tab": "\t"}.get(self.delimiter, self.delimiter)
        if len(delimiter) != 1 or delimiter in "\"\r\n":
            raise DataError(f"the delimiter must be one character (or 'tab'), got {self.delimiter!r}")
        object.__setattr__(self, "delimiter", delimiter)

    def wanted(self) -> list[str]:
        return [c for c in (self.user, self.item, self.time, self.weight, self.event_type) if c is not None]


def load_csv(path: Path, columns: CsvColumns | None = None) -> EventLog:
    """A generic event log with a header row (``CsvColumns``)."""
    columns = columns or CsvColumns()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found (paths are relative to the folder you run from: {Path.cwd()})")
    try:
        handle = path.open(newline="", encoding="utf-8-sig")  # Excel's "CSV UTF-8" starts with a BOM
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    try:
        return _read_csv(path, handle, columns)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); convert it with "
                        "iconv -f latin1 -t utf-8") from None
    except csv.Error as error:  # a field over the csv module's limit (128 KiB), a stray NUL
        raise DataError(f"{path}: not a CSV file this loader reads ({error})") from None
    finally:
        handle.close()


def _seconds(text: str | None) -> float:
    """Unix seconds from a number or an ISO 8601 time (UTC when it names no zone)."""
    if text is None:
        raise ValueError("missing")
    try:
        return float(text)
    except ValueError:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _read_csv(path: Path, handle: TextIO, columns: CsvColumns) -> EventLog:
    reader = csv.DictReader(handle, delimiter=columns.delimiter)
    header = reader.fieldnames or []
    wanted = columns.wanted()
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"{path}: no column(s) {', '.join(missing)} (found: {', '.join(header)}; delimiter "
                        f"{columns.delimiter!r})")
    twice = sorted({c for c in wanted if header.count(c) > 1})
    if twice:
        raise DataError(f"{path}: the header names column(s) {', '.join(twice)} more than once")
    users, items, times, weights = [], [], [], []
    for number, row in enumerate(reader, 2):
        if not row[columns.user] or not row[columns.item]:  # None: a short row; "": a missing value
            raise DataError(f"{path}:{number}: {columns.user!r} and {columns.item!r} must not be empty")
        users.append(row[columns.user])
        items.append(row[columns.item])
        try:
            times.append(_seconds(row[columns.time]))
        except (TypeError, ValueError, OverflowError):
            raise DataError(f"{path}:{number}: {columns.time!r} must be unix seconds or an ISO 8601 time, got "
                            f"{str(row[columns.time])[:40]!r}") from None
        weights.append(_weight(path, number, row, columns))
    if any(w <= 0 or not np.isfinite(w) for w in weights):
        raise DataError(f"{path}: weights must be positive finite numbers")
    bad = [number for number, t in enumerate(times, 2) if not (np.isfinite(t) and 0 <= t < 1e11)]
    if bad:
        raise DataError(f"{path}:{bad[0]}: timestamps must be unix seconds (finite, 0 to 1e11); "
                        f"{len(bad)} row(s) are not")
    return _build(path.name, users, items, np.asarray(times), np.asarray(weights))


def _weight(path: Path, number: int, row: dict, columns: CsvColumns) -> float:
    if columns.event_type is not None:
        kind = str(row[columns.event_type] or "").strip().lower()
        if kind not in EVENT_WEIGHTS:
            raise DataError(f"{path}:{number}: event type {kind!r} is not one of {', '.join(EVENT_WEIGHTS)}")
        return EVENT_WEIGHTS[kind]
    if columns.weight is None:
        return 1.0
    try:
        return float(row[columns.weight])
    except (TypeError, ValueError):
        raise DataError(f"{path}:{number}: {columns.weight!r} must be a number") from None


def synthetic(
    *,
    num_users: int = 150,
    num_items: int = 600,
    events_per_user: int | tuple[int, int] = 150,
    zipf: float = 0.8,
    taste: float = 3.0,
    dim: int = 8,
    tags: int = 0,
    seed: int = 0,
) -> EventLog:
    """Seeded behavior log: users with latent tastes, power-law popularity, timestamps, event types.

    The defaults (150 people with about 150 events each over 600 items) are the demo's data: an
    app whose people interact often, small enough for Flower's simulation runtime with real
    SecAgg+ to run 30 rounds in a few minutes on two cores. ``num_items``, ``zipf`` (item ``r`` of
    the catalog has popularity ``1 / r**zipf``, in a random order) and ``events_per_user`` (a
    Poisson mean, or a ``(low, high)`` range drawn uniformly) set the data's shape; ``taste`` how
    strongly a person's taste decides what they pick, against popularity.

    Each user draws items from ``softmax(taste . item + log popularity)`` without repeats, so both
    personal taste and popularity matter (and a personalized model can beat the popular list).
    The weight of each event is its type's weight (view, click, like, purchase). Every catalog
    item is in the vocabulary, touched or not.

    ``tags`` > 0: the catalog lists one of ``tags`` categories per item, the nearest of as many
    random directions to the item's taste vector, and a random one for 30% of items (catalogs
    mislabel); drawn from a stream of their own, so the events are those of ``tags=0``.
    """
    if num_items < 2 or num_users < 1 or not zipf >= 0:
        raise DataError("synthetic data needs at least 1 user, 2 items and a zipf exponent >= 0")
    rng = np.random.default_rng(seed)
    tastes = rng.normal(size=(num_users, dim))
    items = rng.normal(size=(num_items, dim))
    popularity = 1.0 / np.arange(1, num_items + 1) ** zipf
    rng.shuffle(popularity)
    type_weights = np.array([0.5, 1.0, 2.0, 3.0], dtype=np.float32)
    type_probs = np.array([0.4, 0.4, 0.15, 0.05])
    start = 1.7e9
    users, chosen, times, weights = [], [], [], []
    for user in range(num_users):
        if isinstance(events_per_user, tuple):
            count = int(rng.integers(events_per_user[0], events_per_user[1] + 1))
        else:
            count = max(12, int(rng.poisson(events_per_user)))
        logits = taste * items @ tastes[user] / np.sqrt(dim) + np.log(popularity)
        # the largest logits after Gumbel noise: a draw without replacement from softmax(logits)
        # (Efraimidis and Spirakis 2006), in time linear in the catalog; shuffled so that time
        # order (and so the held-out latest event) is independent of how much the person likes it
        keys = logits + rng.gumbel(size=num_items)
        size = min(count, num_items)
        picks = rng.permutation(np.argpartition(-keys, size - 1)[:size])
        stamps = np.sort(start + rng.uniform(0, 90 * 86400, size=picks.shape[0]))
        users += [str(user)] * picks.shape[0]
        chosen.append(picks)
        times.append(stamps)
        weights.append(type_weights[rng.choice(4, size=picks.shape[0], p=type_probs)])
    log = _build("synthetic", users, [str(i) for i in np.concatenate(chosen)], np.concatenate(times),
                 np.concatenate(weights))
    return replace(_whole_catalog(log, num_items), item_tags=_categories(items, tags, seed) if tags else None)


MISLABELLED = 0.3  # share of synthetic items whose category is drawn at random


def _categories(items: np.ndarray, count: int, seed: int) -> ItemTags:
    rng = np.random.default_rng([seed, 1])
    category = np.argmax(items @ rng.normal(size=(items.shape[1], count)), axis=1)
    wrong = rng.random(len(items)) < MISLABELLED
    category[wrong] = rng.integers(0, count, int(wrong.sum()))
    return ItemTags.of([[int(c)] for c in category], count)


def _whole_catalog(log: EventLog, num_items: int) -> EventLog:
    """``log`` over every item ``0..num_items-1`` (ids are the item numbers), touched or not."""
    numbers = np.array([int(i) for i in log.item_ids])
    return EventLog(users=log.users, items=numbers[log.items], timestamps=log.timestamps, weights=log.weights,
                    num_users=log.num_users, num_items=num_items, item_ids=tuple(str(i) for i in range(num_items)),
                    name=log.name)
