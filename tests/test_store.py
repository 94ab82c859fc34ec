"""The event store validates every event and never half-writes."""

import sqlite3
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attune.client.store import EventStore, Retention
from attune.shared.errors import InvalidEventError, StoreError, WrongKeyError
from attune.shared.events import Event, EventContext

NOW = time.time()

bad_events = st.one_of(
    st.builds(dict, item_id=st.one_of(st.just(""), st.text(min_size=129, max_size=140),
                                      st.integers(), st.just("has space"), st.none())),
    st.builds(dict, event_type=st.text().filter(lambda s: s not in
                                                ("view", "click", "like", "add_to_cart", "purchase"))),
    st.builds(dict, timestamp=st.one_of(
        st.floats(allow_nan=True).filter(lambda x: not (946_684_800 <= x <= NOW + 3600)),
        st.just(float("nan")), st.text(), st.booleans())),
    st.builds(dict, context=st.builds(dict, hour=st.integers(24, 100) | st.integers(-50, -1),
                                      weekday=st.integers(0, 6))),
    st.builds(dict, context=st.builds(dict, hour=st.integers(0, 23),
                                      weekday=st.integers(7, 50) | st.integers(-9, -1))),
)


def make(**overrides):
    fields = {"item_id": "item-1", "event_type": "click", "timestamp": NOW - 60}
    context = overrides.pop("context", None)
    fields.update(overrides)
    if context is not None:
        fields["context"] = EventContext(**context)
    return Event(**fields)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=bad_events)
def test_bad_event_in_a_batch_is_rejected_and_store_unchanged(tmp_path, bad):
    path = tmp_path / "store.sqlite"
    with EventStore(path) as store:
        store.add_many([make(item_id="a"), make(item_id="b")])
        before = store.events()
        with pytest.raises(InvalidEventError):
            store.add_many([make(item_id="c"), make(**bad)])
        assert store.events() == before


def test_non_event_objects_are_rejected_atomically(tmp_path):
    with EventStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(InvalidEventError, match="not an Event"):
            store.add_many([make(), {"item_id": "x"}])
        assert store.count() == 0


def test_events_and_state_survive_reopen(tmp_path):
    path = tmp_path / "s.sqlite"
    with EventStore(path) as store:
        store.add(make(item_id="a", timestamp=NOW - 10))
        store.add(make(item_id="b", event_type="purchase", timestamp=NOW - 5))
        store.put_state({"k": b"v"})
    with EventStore(path) as store:
        assert [e.item_id for e in store.events()] == ["a", "b"]
        assert store.events()[1].weight == 3.0
        assert store.get_state("k") == b"v"


def test_retention_by_count_and_age(tmp_path):
    with EventStore(tmp_path / "s.sqlite", Retention(max_events=3, max_age_days=1)) as store:
        store.add(make(item_id="old", timestamp=NOW - 3 * 86400))
        store.add_many([make(item_id=f"i{k}", timestamp=NOW - 100 + k) for k in range(5)])
        assert [e.item_id for e in store.events()] == ["i2", "i3", "i4"]


def test_foreign_schema_version_is_refused(tmp_path):
    path = tmp_path / "s.sqlite"
    EventStore(path).close()
    with sqlite3.connect(path) as raw:  # another program's change to the file
        raw.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="schema version '99'"):
        EventStore(path)


def test_not_a_database_is_a_store_error(tmp_path):
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        EventStore(path)


def _part_rows(path, key):
    with sqlite3.connect(path) as db:  # the file itself, not the store's view of it
        return sorted(k for (k,) in db.execute("SELECT key FROM state WHERE key LIKE ?", (key + "#%",)))


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_value_in_parts_reads_back_and_a_shorter_rewrite_leaves_no_part_behind(tmp_path, encrypted):
    from attune.client.encryption import new_key
    from attune.client.store import Parts

    path, key = tmp_path / "p.sqlite", new_key() if encrypted else None
    parts = [b"a" * 10, b"b" * 10, b"c"]
    with EventStore(path, key=key) as store:
        store.put_state({"big": Parts(iter(parts)), "small": b"s"})
        with store.snapshot():
            assert list(store.get_parts("big")) == parts and store.get_state("small") == b"s"
        assert _part_rows(path, "big") == ["big#0", "big#1", "big#2"]
        store.put_state({"big": Parts([b"d"])})
        assert _part_rows(path, "big") == ["big#0"]
    with EventStore(path, key=key) as store:  # reopened (encrypted: the manifest lists what is left)
        with store.snapshot():
            assert list(store.get_parts("big")) == [b"d"] and store.get_parts("none") is None
        store.put_state({"big": Parts([b"e", b"f"])})
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM state WHERE key = 'big#1'")
    with EventStore(path, key=key) as store, store.snapshot():
        with pytest.raises(WrongKeyError if encrypted else StoreError, match="big"):
            list(store.get_parts("big"))


def test_rotating_the_key_keeps_a_value_in_parts(tmp_path):
    from attune.client.encryption import new_key
    from attune.client.store import Parts

    path, old, new = tmp_path / "r.sqlite", new_key(), new_key()
    with EventStore(path, key=old) as store:
        store.put_state({"big": Parts([b"x" * 7, b"y"])})
        store.rotate_key(new)
    with EventStore(path, key=new) as store, store.snapshot():
        assert list(store.get_parts("big")) == [b"x" * 7, b"y"]
