"""Encryption at rest: nothing readable in the file, wrong keys refused, rotation and erase are
crash-safe (the process is killed in the middle, the reopened store is consistent)."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from attune.client.encryption import new_key
from attune.client.personalizer import Personalizer
from attune.client.settings import DeviceSettings
from attune.client.store import EventStore
from attune.shared.errors import ConfigError, WrongKeyError
from attune.shared.events import Event

EVENTS = 3000


def _fill(path, key):
    with EventStore(path, key=key) as store:
        now = time.time()
        store.add_many(Event(f"secret-item-{i % 97}", "purchase", now - 10_000 + i) for i in range(EVENTS))
        store.put_state({"user_vector": b"personal-vector-bytes", "ledger": b"ledger-bytes"})


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nothing_personal_is_readable_in_the_encrypted_file(tmp_path):
    path, key = tmp_path / "e.sqlite", new_key()
    _fill(path, key)
    raw = path.read_bytes()
    assert b"secret-item" not in raw and b"purchase" not in raw and b"personal-vector" not in raw
    with EventStore(path, key=key) as store:
        assert store.count() == EVENTS and store.events()[0].item_id == "secret-item-0"
        assert store.get_state("user_vector") == b"personal-vector-bytes"


def test_wrong_or_missing_key_is_refused_and_changes_nothing(tmp_path):
    path, key = tmp_path / "e.sqlite", new_key()
    _fill(path, key)
    before = _digest(path)
    with pytest.raises(WrongKeyError, match="another key"):
        EventStore(path, key=new_key())
    with pytest.raises(WrongKeyError, match="give its key"):
        Personalizer(str(path))
    with pytest.raises(ConfigError, match="32 bytes"):
        EventStore(path, key=b"short")
    assert _digest(path) == before
    plain = tmp_path / "p.sqlite"
    _fill(plain, None)
    with pytest.raises(WrongKeyError, match="not encrypted"):
        EventStore(plain, key=key)


def test_a_tampered_value_fails_authentication(tmp_path):
    import sqlite3

    path, key = tmp_path / "e.sqlite", new_key()
    _fill(path, key)
    db = sqlite3.connect(path)  # swap two sealed blobs: each is bound to its own name
    vector, ledger = (db.execute("SELECT value FROM state WHERE key=?", (k,)).fetchone()[0]
                      for k in ("user_vector", "ledger"))
    db.execute("UPDATE state SET value=? WHERE key='ledger'", (vector,))
    db.commit()
    db.close()
    with EventStore(path, key=key) as store:
        assert store.get_state("user_vector") == b"personal-vector-bytes"
        with pytest.raises(WrongKeyError, match="ledger"):
            store.get_state("ledger")


def test_rotation_re_encrypts_everything_and_encrypts_a_plain_store(tmp_path):
    path, old, new = tmp_path / "e.sqlite", new_key(), new_key()
    _fill(path, old)
    with EventStore(path, key=old) as store:
        expected = store.events()
        store.rotate_key(new)
        assert store.events() == expected  # usable at once under the new key
    with pytest.raises(WrongKeyError):
        EventStore(path, key=old)
    with EventStore(path, key=new) as store:
        assert store.events() == expected and store.get_state("ledger") == b"ledger-bytes"
    plain = tmp_path / "p.sqlite"
    _fill(plain, None)
    with EventStore(plain) as store:
        store.rotate_key(new)
    assert b"secret-item" not in plain.read_bytes()
    with EventStore(plain, key=new) as store:
        assert store.count() == EVENTS


def test_the_flower_device_reads_its_key_file(tmp_path):
    key = new_key()
    key_file = tmp_path / "store.key"
    key_file.write_text(key.hex())
    settings = DeviceSettings.from_node_config({"store-path": str(tmp_path / "s.sqlite"),
                                                "encryption-key-file": str(key_file)})
    assert settings.encryption_key() == key
    key_file.write_text("not hex")
    with pytest.raises(ConfigError, match="store key"):
        settings.encryption_key()


# A child process runs one operation and is SIGKILLed from inside SQLite's progress handler after
# a given number of VM steps: a deterministic point in the middle of the transaction or VACUUM.
_CHILD = textwrap.dedent("""
    import os, sys, time
    from attune.client.store import EventStore
    path, key, new, operation, after = sys.argv[1:6]
    store = EventStore(path, key=bytes.fromhex(key))
    calls = 0
    def progress():
        global calls
        calls += 1
        if calls == int(after):
            os.kill(os.getpid(), 9)
        return 0
    store._db.set_progress_handler(progress, 1)  # a crash at a chosen SQLite step: no public hook for it
    if operation == "rotate":
        store.rotate_key(bytes.fromhex(new))
    else:
        store.erase(keep_state=("ledger",))
    print("finished")
""")


def _run_child(path, key, new, operation, after):
    result = subprocess.run([sys.executable, "-c", _CHILD, str(path), key.hex(), new.hex(), operation,
                             str(after)], capture_output=True, text=True, timeout=120)
    return result.returncode == -signal.SIGKILL


@pytest.mark.parametrize("after", [5, 500, 5000, 10**8])
def test_rotation_killed_midway_leaves_the_store_whole_under_one_key(tmp_path, after):
    path, old, new = tmp_path / "e.sqlite", new_key(), new_key()
    _fill(path, old)
    with EventStore(path, key=old) as store:
        expected = store.events()
    killed = _run_child(path, old, new, "rotate", after)
    assert killed == (after < 10**8)
    opened = []
    for key in (old, new):
        try:
            with EventStore(path, key=key) as store:
                assert store.events() == expected and store.get_state("ledger") == b"ledger-bytes"
                opened.append(key)
        except WrongKeyError:
            pass
    # Exactly one key opens it, and under it every value is intact: killed inside the
    # transaction, the store rolls back to the old key on reopen.
    assert opened == ([old] if killed else [new])
    assert not os.path.exists(str(path) + "-wal")


@pytest.mark.parametrize("after", [5, 50, 500, 10**8])
def test_erase_killed_midway_leaves_all_or_nothing(tmp_path, after):
    path, key = tmp_path / "e.sqlite", new_key()
    _fill(path, key)
    killed = _run_child(path, key, key, "erase", after)
    assert killed == (after < 10**8)
    with EventStore(path, key=key) as store:
        count, vector = store.count(), store.get_state("user_vector")
        assert store.get_state("ledger") == b"ledger-bytes"
    assert (count, vector) in {(EVENTS, b"personal-vector-bytes"), (0, None)}
    if not killed:
        assert count == 0
