"""Hostile devices, careless apps and unlucky files (issue 13): every input gets a clear error or is
refused, nothing committed is lost, and one device never hurts the federation."""

import json
import sqlite3
import struct
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from in_process_grid import device_grid, simulated_devices

import attune.client.secure_aggregation as secure_client
from attune import (
    Event,
    InvalidEventError,
    ModelConfig,
    Personalizer,
    PrivacyConfig,
    Retention,
    StoreError,
    Vocabulary,
    WrongKeyError,
)
from attune.client.encryption import new_key
from attune.client.store import EventStore
from attune.server.app import transport_for
from attune.server.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from attune.server.config import ServerConfig
from attune.server.coordinator import run
from attune.shared.errors import AttuneError
from attune.shared.mechanism import device_bound
from attune.shared.records import contribution_content

NOW = time.time()


# -- careless apps: the public API never raises a raw exception ----------------------------------

@pytest.mark.parametrize("call", [
    lambda: Event("a", ["click"], NOW),
    lambda: Event("a", "click", 10**400),
    lambda: Event("a", "click", float("nan")),
    lambda: Event("a", "click", "yesterday"),
    lambda: Event(None),
    lambda: PrivacyConfig(delta="x"),
    lambda: PrivacyConfig(epsilon_budget=float("inf")),
    lambda: ModelConfig(num_items=1),
    lambda: ModelConfig(dim=0),
    lambda: Retention(max_age_days=float("nan")),
    lambda: Retention(max_events=0),
    lambda: Personalizer(None),
])
def test_bad_values_raise_attune_errors(call):
    with pytest.raises(AttuneError):
        call()


def test_numpy_timestamps_are_accepted_like_floats():
    assert Event("a", "click", np.int64(int(NOW) - 5)).timestamp == float(int(NOW) - 5)
    assert Event("a", "click", np.float64(NOW - 5)).timestamp == NOW - 5


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(item=st.one_of(st.text(max_size=200), st.integers(), st.none(), st.binary()),
       kind=st.one_of(st.text(max_size=20), st.integers(), st.none(), st.lists(st.text())),
       stamp=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-10**30,
                                                                                    max_value=10**30),
                       st.text(), st.none()))
def test_any_event_fields_give_a_valid_event_or_an_invalid_event_error(tmp_path, item, kind, stamp):
    try:
        event = Event(item, kind, stamp)
    except InvalidEventError:
        return
    with EventStore(tmp_path / "h.sqlite") as store:  # a valid event stores and reads back
        store.add(event)
        assert store.events()[-1] == event


# -- unlucky files --------------------------------------------------------------------------------

def _store_with_data(path, key=None):
    with EventStore(path, key=key) as store:
        store.add_many([Event(f"item{i}", "click", NOW - 100 + i) for i in range(5)])
        store.put_state({"consent": json.dumps({"granted": True}).encode()})
    return path


def test_swapped_copied_or_rolled_back_encrypted_values_fail_to_open(tmp_path):
    key = new_key()
    path = _store_with_data(tmp_path / "e.sqlite", key)
    db = sqlite3.connect(path)
    rows = db.execute("SELECT id, payload FROM events ORDER BY id").fetchall()
    db.execute("UPDATE events SET payload = ? WHERE id = ?", (rows[1][1], rows[0][0]))  # swap into another row
    db.commit()
    with EventStore(path, key=key) as store, pytest.raises(WrongKeyError):
        store.events()
    path = _store_with_data(tmp_path / "f.sqlite", key)
    db = sqlite3.connect(path)
    first = db.execute("SELECT payload FROM events ORDER BY id LIMIT 1").fetchone()[0]
    for _ in range(5):  # one blob copied into new rows
        db.execute("INSERT INTO events (day, payload) VALUES (?, ?)", (int(NOW // 86400), first))
    db.commit()
    with EventStore(path, key=key) as store, pytest.raises(WrongKeyError):
        store.events()
    path = _store_with_data(tmp_path / "g.sqlite", key)
    old = sqlite3.connect(path).execute("SELECT generation, value FROM state WHERE key='consent'").fetchone()
    with EventStore(path, key=key) as store:
        store.put_state({"consent": json.dumps({"granted": False}).encode()})  # a withdrawal
    db = sqlite3.connect(path)
    db.execute("UPDATE state SET generation = ?, value = ? WHERE key = 'consent'", old)  # the old grant back
    db.commit()
    with EventStore(path, key=key) as store, pytest.raises(WrongKeyError, match="rolled back"):
        store.get_state("consent")


def test_a_corrupt_store_gives_a_clear_error_and_a_way_to_delete_it(tmp_path):
    path = _store_with_data(tmp_path / "c.sqlite")
    data = bytearray(path.read_bytes())
    data[4096:4112] = b"\xff" * 16  # 16 bytes over the start of a page
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"Personalizer\.destroy"):  # the public name (issue 23)
        with EventStore(path) as store:
            store.events()
    document = tmp_path / "notes.txt"
    document.write_text("a person's own file, given as the store path by mistake")
    with pytest.raises(StoreError, match="Check the path"):
        Personalizer(document)
    assert document.read_text().startswith("a person's own file")
    Personalizer.destroy(path)
    assert not path.exists()
    with Personalizer(path) as device:  # and a fresh store can take its place
        assert device.store.count() == 0


def test_garbage_state_is_a_store_error_not_a_decoder_crash(tmp_path):
    path = tmp_path / "g.sqlite"
    with Personalizer(path, model=ModelConfig(num_items=20, dim=2)):
        pass
    with EventStore(path) as store:
        store.put_state({"global_model": b"\x80\x04garbage", "device": b"{not json"})
    with pytest.raises(StoreError):
        Personalizer(path, model=ModelConfig(num_items=20, dim=2))


def test_another_apps_database_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "other.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (text TEXT)")
    db.execute("INSERT INTO notes VALUES ('hello')")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not an Attune store"):
        EventStore(path)
    assert path.read_bytes() == before


def test_an_emptied_meta_is_refused_not_restamped(tmp_path):
    path = _store_with_data(tmp_path / "m.sqlite")
    db = sqlite3.connect(path)
    db.execute("DELETE FROM meta")
    db.commit()
    with pytest.raises(StoreError, match="metadata is missing"):
        EventStore(path)
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM meta").fetchone()[0] == 0


def test_a_locked_store_waits_then_says_it_is_busy(tmp_path):
    path = _store_with_data(tmp_path / "l.sqlite")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    started = time.monotonic()
    with pytest.raises(StoreError, match="busy"):
        EventStore(path, timeout=0.5)
    assert time.monotonic() - started >= 0.4
    holder.execute("ROLLBACK")
    with EventStore(path) as store:
        assert store.count() == 5


def test_checkpoints_with_bad_checksums_or_many_rounds_are_read_right(tmp_path):
    state = {"w": torch.zeros(2)}
    for round in (9999, 10000):
        save_checkpoint(tmp_path, Checkpoint(round=round, state=state))
    assert latest_checkpoint(tmp_path).round == 10000  # by number, not by name
    (tmp_path / "global_round_10000.pt.sha256").write_bytes(b"\xff\xfe not ascii")
    assert latest_checkpoint(tmp_path).round == 9999  # a checksum file that cannot be read: skipped


# -- hostile devices through the real coordinator loop ---------------------------------------------

HOSTILE = 2


def _hostile(tmp_path, monkeypatch, payload, secure):
    """A federation of six where device ``HOSTILE`` sends ``payload`` instead of its contribution."""
    log, _, vocabulary = simulated_devices(tmp_path, users=6, seed=8)
    grid = device_grid(tmp_path, 6, vocabulary, seed=8)
    config = ServerConfig(mode="distributed" if secure else "local", rounds=2, min_devices=6, target_epsilon=2.0,
                                 signing_key=tmp_path / "coordinator.pem", noise_seed=8, seed=8,
                                 **({"min_survivor_fraction": 0.8} if secure else {}))
    config = replace(config, model=replace(config.model, num_items=log.num_items, dim=4, trained_items=0))
    if secure:
        real = secure_client.run_round

        def lying(settings, arrays, items):
            vector = real(settings, arrays, items)
            if settings.simulation_seed[1] == HOSTILE and vector is not None:
                return payload(vector)
            return vector

        monkeypatch.setattr(secure_client, "run_round", lying)
    else:
        real_app = grid.app

        def app(message, context):
            reply = real_app(message, context)
            if context.node_id == HOSTILE and reply.content.array_records:
                vector = torch.from_numpy(reply.content.array_records["contribution"]["contribution"].numpy())
                reply.content = payload(vector)
            return reply

        grid.app = app
    states = []
    history = run(transport_for(grid, config), config, lambda record, state: states.append(state))
    return history, states, config


@pytest.mark.parametrize("name,payload", [
    ("huge", lambda v: contribution_content(torch.full_like(v, 2**38))),
    ("nan", lambda v: contribution_content(torch.full(v.shape, float("nan"), dtype=torch.float64))),
    ("wrong shape", lambda v: contribution_content(v[:-3])),
    ("list-valued metrics", lambda v: _with_metrics(contribution_content(v))),
    ("empty", lambda v: contribution_content(torch.zeros(0, dtype=torch.long))),
])
def test_a_hostile_device_among_honest_ones_plain(tmp_path, monkeypatch, name, payload):
    history, states, config = _hostile(tmp_path, monkeypatch, payload, secure=False)
    assert all(r.contributed >= 5 for r in history)  # the coordinator is alive and the honest devices count
    if name != "list-valued metrics":
        assert all(r.rejected == 1 for r in history)
    for state in states:
        assert all(bool(torch.isfinite(v).all()) for v in state.values())


def _with_metrics(content):
    from flwr.app import ConfigRecord, MetricRecord

    content["metrics"] = MetricRecord({"loss": [0.5, 0.5], "num-examples": 10**30})
    content["config"] = ConfigRecord({"epsilon": "nan"})
    return content


def test_a_hostile_device_under_secure_aggregation_gets_the_round_refused(tmp_path, monkeypatch):
    """The coordinator cannot see one contribution under SecAgg+, but an unmasked sum beyond what
    honest devices can produce is refused whole; the model does not move."""
    history, states, config = _hostile(tmp_path, monkeypatch, lambda v: torch.full_like(v, 2**36), secure=True)
    assert all(r.contributed == 0 and "over the bound" in r.aborted for r in history)
    from attune.server.coordinator import initial_state

    for name, value in initial_state(config).items():
        torch.testing.assert_close(states[-1][name], value)


def test_within_its_bound_a_hostile_device_goes_unseen_under_secure_aggregation(tmp_path, monkeypatch):
    """The limit docs/privacy.md states: a device may add anything up to device_norm * clip to a
    round's sum, and no check on the sum alone can tell."""
    from attune.shared.config import preset

    bound = device_bound(preset("distributed"))

    def within(vector):
        boosted = torch.zeros_like(vector)
        boosted[0] = int(bound * 0.99)
        return boosted

    history, _, _ = _hostile(tmp_path, monkeypatch, within, secure=True)
    assert all(r.contributed == 6 and r.aborted == "" for r in history)


def _raw(array: np.ndarray):
    from flwr.app import Array, ArrayRecord, RecordDict

    return RecordDict({"contribution": ArrayRecord({"contribution": Array(array)})})


REPLIES = {  # every reply that is not exactly the native int64 vector a private round expects
    "big-endian int64": lambda v: v.numpy().astype(">i8"),
    "float64": lambda v: v.numpy().astype(np.float64),
    "float32": lambda v: v.numpy().astype(np.float32),
    "int32": lambda v: v.numpy().astype(np.int32),
    "uint64": lambda v: v.numpy().astype(np.uint64),
    "longdouble": lambda v: v.numpy().astype(np.longdouble),
    "datetime64": lambda v: v.numpy().astype("datetime64[s]"),
    "timedelta64": lambda v: v.numpy().astype("timedelta64[s]"),
    "unicode": lambda v: v.numpy().astype(str),
    "bytes": lambda v: v.numpy().astype(bytes),
    "structured": lambda v: np.zeros(len(v), dtype=[("a", "<i8")]),
    "bool": lambda v: v.numpy() > 0,
    "two-dimensional": lambda v: v.numpy().reshape(1, -1),
    "scalar": lambda v: np.array(7, dtype=np.int64),
    "long": lambda v: np.concatenate([v.numpy(), v.numpy()]),
}


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_no_reply_of_any_dtype_or_shape_stops_the_coordinator(tmp_path, monkeypatch, name):
    """Issue 20: big-endian, datetime, text, structured or longdouble replies raised raw errors in
    torch.from_numpy and killed run(). Each is now a rejected device; the honest five count."""
    history, states, _ = _hostile(tmp_path, monkeypatch, lambda v: _raw(REPLIES[name](v)), secure=False)
    assert all(r.rejected == 1 and r.contributed == 5 for r in history)
    for state in states:
        assert all(bool(torch.isfinite(v).all()) for v in state.values())


@pytest.mark.parametrize("name,payload", [
    ("short", lambda v: v[:-3]), ("long", lambda v: torch.cat([v, v])), ("empty", lambda v: v[:0]),
])
def test_a_masked_vector_of_the_wrong_length_drops_that_device_not_the_round(tmp_path, monkeypatch, name, payload):
    """Issue 20: one such vector broke the secure sum ("operands could not be broadcast") and
    killed the coordinator. The device counts as dropped; the five others are summed."""
    history, states, config = _hostile(tmp_path, monkeypatch, payload, secure=True)
    assert all(r.contributed == 5 and r.aborted == "" for r in history)
    from attune.server.coordinator import initial_state

    moved = any(not torch.equal(states[-1][k], v) for k, v in initial_state(config).items())
    assert moved  # the honest devices' sum was released and applied


def _every_read_and_write(path):
    """Open a store and use all of it; what it may raise is the test's business."""
    with Personalizer(path, model=ModelConfig(num_items=20, dim=2)) as device:
        device.store.events()
        device.store.ledger()
        device.store.get_state("consent")
        device.record(Event("item1", "click", NOW))
        device.rank(["item1", "item2"])


@pytest.mark.parametrize("width", [1, 16])
def test_a_byte_offset_sweep_of_store_corruption_gives_only_attune_errors(tmp_path, width):
    """Issue 20: damaged data pages leaked raw sqlite3.DatabaseError (63 of 96 offsets). Every
    offset of the file, overwritten, gives a store that works or an Attune error."""
    clean = tmp_path / "clean.sqlite"
    with Personalizer(clean, model=ModelConfig(num_items=20, dim=2)) as device:
        device.grant_consent("v1")
        device.record_many(Event(f"item{i % 20}", "click", NOW - 100 + i) for i in range(60))
    data = clean.read_bytes()
    raw = []
    for offset in range(0, len(data), max(1, len(data) // 160)):
        damaged = bytearray(data)
        damaged[offset:offset + width] = bytes((b ^ 0xA5) for b in damaged[offset:offset + width])
        path = tmp_path / f"d{offset}.sqlite"
        path.write_bytes(bytes(damaged))
        try:
            _every_read_and_write(path)
        except AttuneError:
            pass
        except Exception as error:  # noqa: BLE001 - what the test looks for
            raw.append((offset, f"{type(error).__name__}: {error}"))
        path.unlink(missing_ok=True)
        Path(str(path) + "-journal").unlink(missing_ok=True)
    assert raw == []


def test_a_store_that_cannot_be_written_says_so(tmp_path):
    path = _store_with_data(tmp_path / "r.sqlite")
    with EventStore(path) as store:
        store._db.db.execute("PRAGMA query_only = ON")  # what a read-only file gives, even as root (no public way)
        assert len(store.events()) == 5  # reading still works
        with pytest.raises(StoreError, match="cannot be written"):
            store.add(Event("item9", "click", NOW))
        assert store.count() == 5


def test_a_clock_moved_back_does_not_turn_a_stored_event_into_corruption(tmp_path, monkeypatch):
    """Issue 20: an event stamped now + 23 h (allowed), then the clock corrected back by 2 h,
    and every read raised StoreError(... destroy). The future check is a recording check now."""
    path = tmp_path / "c.sqlite"
    with Personalizer(path, model=ModelConfig(num_items=20, dim=2)) as device:
        device.record(Event("item1", "click", NOW + 23 * 3600))
        with pytest.raises(InvalidEventError, match="future"):
            device.record(Event("item2", "click", NOW + 25 * 3600))
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 2 * 3600)
    with Personalizer(path, model=ModelConfig(num_items=20, dim=2)) as device:
        assert [e.item_id for e in device.store.events()] == ["item1"]
        device.rank(["item1", "item2"])


API_MISUSE = {  # issue 20: each raised a raw exception (or was accepted and failed later)
    "rank(None)": lambda d, t: d.rank(None),
    "rank(5)": lambda d, t: d.rank(5),
    "score(None)": lambda d, t: d.score(None),
    "export to None": lambda d, t: d.export_scorer(None),
    "export into a missing folder": lambda d, t: d.export_scorer(t / "nope" / "x.pt2"),
    "export under a file": lambda d, t: d.export_scorer(t / "afile" / "x.pt2"),
    "store under a file": lambda d, t: Personalizer(t / "afile" / "s.sqlite"),
    "store path with NUL": lambda d, t: Personalizer(str(t / "a\x00b.sqlite")),
    "destroy a folder": lambda d, t: Personalizer.destroy(t),
    "destroy None": lambda d, t: Personalizer.destroy(None),
    "use after close": lambda d, t: (d.close(), d.rank(["item1"])),
    "Retention(max_events=2**63)": lambda d, t: Retention(max_events=2**63),
    "simulation_seed='abc'": lambda d, t: Personalizer(t / "s.sqlite", simulation_seed="abc"),
    "Vocabulary(0)": lambda d, t: Vocabulary(0),
    "Vocabulary(-3)": lambda d, t: Vocabulary(-3),
    "Vocabulary.of(5)": lambda d, t: Vocabulary.of(5),
    "rotate_key(None) without decrypt": lambda d, t: d.rotate_key(None),
}


@pytest.mark.parametrize("name", sorted(API_MISUSE))
def test_public_entry_points_raise_only_attune_errors(tmp_path, name):
    (tmp_path / "afile").write_text("x")
    device = Personalizer(tmp_path / "d.sqlite", model=ModelConfig(num_items=20, dim=2))
    try:
        with pytest.raises(AttuneError):
            API_MISUSE[name](device, tmp_path)
    finally:
        device.close()
    assert (tmp_path / "afile").read_text() == "x" and tmp_path.is_dir()  # nothing destroyed


def test_a_store_used_from_another_thread_says_so(tmp_path):
    import threading

    errors = []
    with Personalizer(tmp_path / "d.sqlite", model=ModelConfig(num_items=20, dim=2)) as device:
        thread = threading.Thread(target=lambda: errors.append(_raised(lambda: device.rank(["item1"]))))
        thread.start()
        thread.join()
    assert isinstance(errors[0], StoreError) and "thread" in str(errors[0])


def _raised(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - returned to the test
        return error
    return None


def test_record_many_returns_what_retention_kept_and_decrypting_is_explicit(tmp_path):
    key = new_key()
    with Personalizer(tmp_path / "d.sqlite", model=ModelConfig(num_items=20, dim=2), encryption_key=key,
                      retention=Retention(max_age_days=30)) as device:
        old = [Event("item1", "click", NOW - 90 * 86400), Event("item2", "click", NOW - 60 * 86400)]
        assert device.record_many(old) == 0  # both older than the retention keeps
        assert device.record_many([Event("item3", "click", NOW), *old]) == 1
        device.rotate_key(None, decrypt=True)
        assert not device.store.encrypted
    with Personalizer(tmp_path / "d.sqlite", model=ModelConfig(num_items=20, dim=2)) as device:
        assert [e.item_id for e in device.store.events()] == ["item3"]


def test_diverse_ranking_of_many_candidates_needs_no_square_matrix(tmp_path):
    """100k candidates with diversity built a 100k x 100k similarity matrix (40 GB)."""
    with Personalizer(tmp_path / "d.sqlite", model=ModelConfig(num_items=100_000, dim=2)) as device:
        ranked = device.rank([f"item{i}" for i in range(100_000)], diversity=0.5, limit=10)
    assert len(ranked) == 10 and len({r.item_id for r in ranked}) == 10


def _with_view(path):
    db = sqlite3.connect(path)
    db.execute("CREATE VIEW mine AS SELECT 1 AS one")
    db.commit()
    db.close()


def _with_trigger(path):
    db = sqlite3.connect(path)
    db.execute("CREATE TRIGGER spy AFTER INSERT ON events BEGIN DELETE FROM ledger; END")
    db.commit()
    db.close()


def _meta(value):
    def change(path):
        db = sqlite3.connect(path)
        db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (value,))
        db.commit()
        db.close()
    return change


@pytest.mark.parametrize("damage", [
    lambda path: path.write_bytes(path.read_bytes()[:1]),  # truncated: it opened as a fresh empty store
    lambda path: (path.unlink(), _with_view(path)),  # another app's file holding only a view
    _with_trigger,
    _meta("abc"),
    _meta("9" * 40),
])
def test_damaged_or_foreign_stores_are_refused_and_left_as_they_are(tmp_path, damage):
    path = _store_with_data(tmp_path / "s.sqlite")
    damage(path)
    before = path.read_bytes()
    with pytest.raises(StoreError):
        with EventStore(path) as store:
            store.add(Event("item9", "click", NOW))
    assert path.read_bytes() == before


def test_a_stored_vector_with_nan_is_a_store_error_not_a_nan_ranking(tmp_path):
    from attune.client.state import USER_KEY, encode_tensors

    path = tmp_path / "n.sqlite"
    with Personalizer(path, model=ModelConfig(num_items=20, dim=2)):
        pass
    with EventStore(path) as store:
        store.put_state({USER_KEY: encode_tensors({"user": torch.tensor([float("nan"), 1.0])})})
    with pytest.raises(StoreError, match="NaN"):
        Personalizer(path, model=ModelConfig(num_items=20, dim=2)).rank(["item1"])


def test_stored_tensors_read_back_as_written_and_a_nan_deep_in_a_large_one_is_refused():
    from attune.client.state import decode_tensors, encode_tensors

    values = {"prior": torch.randn(300_000), "rows": torch.arange(7, dtype=torch.long).reshape(7, 1)}
    back = decode_tensors(encode_tensors(values))
    assert all(torch.equal(back[name], value) for name, value in values.items())
    values["prior"][250_000] = float("inf")  # past the finiteness check's first chunks
    with pytest.raises(StoreError, match="NaN or infinity"):
        decode_tensors(encode_tensors(values))


@pytest.mark.parametrize("deleted", ["state:device", "state:not_interested", "state:__manifest__", "ledger"])
def test_rows_deleted_from_an_encrypted_store_are_seen(tmp_path, deleted):
    """Issue 20: deleting the device state undid pause(True), deleting ledger rows reset epsilon
    to 0, deleting the not-interested list brought dismissed items back, all unnoticed. The sealed
    manifest covers absence now (and the ledger's extent)."""
    from device_helpers import request

    key = new_key()
    path = tmp_path / "e.sqlite"
    with Personalizer(path, model=ModelConfig(num_items=20, dim=2), encryption_key=key) as device:
        device.grant_consent("v1")
        device.record_many(Event(f"item{i}", "click", NOW - 100 + i) for i in range(6))
        device.contribute(request(round=1, model=ModelConfig(num_items=20, dim=2)))
        device.forget_item("item1", keep_as_negative=True)
        device.pause(True)
        assert device.store.ledger()
    db = sqlite3.connect(path)
    if deleted == "ledger":
        db.execute("DELETE FROM ledger")
    else:
        db.execute("DELETE FROM state WHERE key = ?", (deleted.removeprefix("state:"),))
    db.commit()
    db.close()
    with pytest.raises(WrongKeyError, match="outside Attune"):
        with Personalizer(path, model=ModelConfig(num_items=20, dim=2), encryption_key=key) as device:
            device.store.ledger()
            assert device.paused
            device.not_interested()


def test_stored_tensors_read_back_from_parts_split_anywhere_after_the_header_and_a_cut_short_one_is_refused():
    from attune.client.state import decode_parts, encode_tensors, tensor_parts

    values = {"prior": torch.randn(1000), "rows": torch.arange(9, dtype=torch.long)}
    whole = encode_tensors(values)
    header = len(next(tensor_parts(values)))
    assert b"".join(tensor_parts(values, part_bytes=64)) == whole
    for cuts in ([header], [header + 1, header + 3, 4000], list(range(header, len(whole), 333))):
        pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
        back = decode_parts(pieces)
        assert all(torch.equal(back[name], value) for name, value in values.items())
    with pytest.raises(StoreError, match="cut short"):
        decode_parts([whole[:-1]])
    with pytest.raises(StoreError, match="trailing"):
        decode_parts([whole, b"\x00"])
    vast = json.dumps({"prior": [[10**13], "<f4"]}).encode()  # a damaged header: no 40 TB allocation escapes
    with pytest.raises(StoreError, match="damaged"):
        decode_parts([struct.pack("<I", len(vast)) + vast, bytes(64)])
