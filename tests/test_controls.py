"""The person's controls: consent, pause, forget, erase, export, privacy summary, bad input; and
any number of objects and processes on one store never lose a ledger entry or a pause."""

import json
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from device_helpers import MODEL, VOCAB, open_device, request
from flwr.app import Message

import attune.client.personalizer as personalizer_module
from attune.client.device_round import Status
from attune.client.flower_app import handle_train
from attune.client.personalizer import Personalizer, PrivacyConfig
from attune.client.settings import DeviceSettings
from attune.client.state import RANK_KEY, USER_KEY
from attune.shared.accounting import epsilon_of
from attune.shared.errors import AttuneError, ConfigError, InvalidEventError
from attune.shared.mechanism import round_entries
from attune.shared.records import request_content


@pytest.fixture
def device(tmp_path):
    with open_device(tmp_path / "d.sqlite") as opened:
        yield opened


def test_pause_stops_rounds_and_personal_ranking(device):
    assert device.contribute(request(round=1)).status is Status.CONTRIBUTED
    personal = device.score(["item1", "item30"])
    spent = device.epsilon()
    device.pause()
    outcome = device.contribute(request(round=2))
    assert outcome.status is Status.REFUSED and "paused" in outcome.reason and outcome.vector is None
    assert device.epsilon() == spent
    assert not bool((device.score(["item1", "item30"]) == personal).all())
    device.pause(False)
    assert bool((device.score(["item1", "item30"]) == personal).all())


def test_forget_item_deletes_only_that_item(device):
    assert device.forget_item("item3") == 3
    items = {e.item_id for e in device.store.events()}
    assert "item3" not in items and len(items) == 11
    with pytest.raises(InvalidEventError):
        device.forget_item("not in vocabulary")


def test_erase_leaves_no_trace_in_the_file_but_keeps_the_ledger(device, tmp_path):
    device.contribute(request(round=1))
    spent = device.epsilon()
    device.erase()
    assert device.store.count() == 0 and device.epsilon() == pytest.approx(spent)
    raw = (tmp_path / "d.sqlite").read_bytes()
    assert b"item7" not in raw  # neither live rows nor freed pages hold the erased ids
    assert not (tmp_path / "d.sqlite-wal").exists() and not (tmp_path / "d.sqlite-journal").exists()
    keys = sqlite3.connect(tmp_path / "d.sqlite").execute("SELECT key FROM state").fetchall()
    assert {k for (k,) in keys} == {"device", "consent"}
    assert len(device.store.ledger()) == 1 and device.export()["local_model"] is None


def test_export_is_one_json_document(device):
    device.contribute(request(round=1))
    document = json.loads(json.dumps(device.export()))
    assert len(document["events"]) == 36 and document["events"][0]["item_id"] == "item0"
    assert document["privacy"]["unit"] == "event" and document["privacy"]["rounds_joined"] == 1
    assert len(document["local_model"]["user_vector"]) == MODEL.dim


def test_rounds_need_consent_and_withdrawal_stops_them(tmp_path):
    with open_device(tmp_path / "c.sqlite", consent=False) as device:
        outcome = device.contribute(request(round=1))
        assert outcome.status is Status.REFUSED and "consent" in outcome.reason and device.epsilon() == 0
        device.grant_consent("policy-2026-11")
        assert device.contribute(request(round=1)).status is Status.CONTRIBUTED
        device.withdraw_consent()
        assert device.contribute(request(round=2)).status is Status.REFUSED
        record = device.consent()
        assert record["granted"] is False and record["policy_version"] == "policy-2026-11"
        assert [h["granted"] for h in record["history"]] == [True, False]
        with pytest.raises(ConfigError):
            device.grant_consent("")
        with pytest.raises(ConfigError):
            device.grant_consent("v1", purpose="advertising")


def test_withdrawal_mid_round_sends_nothing_and_keeps_what_was_computed_charged(tmp_path, monkeypatch):
    """One charging rule: a round's entry is released only if nothing derived from the events was
    computed, kept or sent. Withdrawn mid-round, the contribution is not sent, but the refreshed
    user vector is kept, so the whole round stays paid for (issue 19, item 2)."""
    path = tmp_path / "f.sqlite"
    open_device(path).close()
    real = personalizer_module.train_round

    def withdrawing(*args, **kwargs):  # the app's settings screen, through its own connection
        with Personalizer(path, model=MODEL, vocabulary=VOCAB) as other:
            other.withdraw_consent()
        return real(*args, **kwargs)

    monkeypatch.setattr(personalizer_module, "train_round", withdrawing)
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(json.dumps(list(VOCAB.ids)))
    settings = DeviceSettings(store_path=path, privacy=PrivacyConfig(), vocabulary_path=vocabulary,
                              allow_unsigned=True)
    first = request(round=1)
    reply = handle_train(Message(content=request_content(first, None), dst_node_id=1, message_type="train"),
                         settings)
    assert not reply.has_error() and not reply.content.array_records  # nothing sent
    due = round_entries(MODEL, first.config, refresh=True)
    with Personalizer(path, model=MODEL, vocabulary=VOCAB) as device:
        assert [list(row.entries) for row in device.store.ledger()] == [due]
        assert device.state.contributions_sent == 0 and device.state.rounds_joined == 1
        assert device.epsilon() == pytest.approx(epsilon_of(due, 1e-5))
        device.grant_consent("policy-2026-12")
    monkeypatch.setattr(personalizer_module, "train_round", real)
    second = request(round=2)
    reply = handle_train(Message(content=request_content(second, None), dst_node_id=1, message_type="train"),
                         settings)
    assert reply.content.array_records
    with Personalizer(path, model=MODEL, vocabulary=VOCAB) as device:
        both = [*due, *round_entries(MODEL, second.config, refresh=second.config.refresh_due(1))]
        assert device.epsilon() == pytest.approx(epsilon_of(both, 1e-5))


def test_forget_one_event_and_keep_an_item_as_negative(device):
    stored = device.stored_events()
    target = stored[5]
    device.forget_event(target.id)
    assert [s.id for s in device.stored_events()] == [s.id for s in stored if s.id != target.id]
    for bad in (target.id, "5", 10**30, True, -1):
        with pytest.raises(InvalidEventError):
            device.forget_event(bad)
    assert device.store.count() == 35
    device.contribute(request(round=1))
    favourite = device.rank(["item1", "item2", "item30"])[0].item_id
    device.forget_item(favourite, keep_as_negative=True)
    device.forget_item(favourite, keep_as_negative=True)
    assert device.rank(["item1", "item2", "item30"])[-1].item_id == favourite
    assert device.not_interested() == [favourite] == device.export()["not_interested"]
    device.erase()
    assert device.not_interested() == []


def test_privacy_summary_is_plain_text_for_the_person(device):
    device_round = device.round(request(round=1, mode="distributed", min_survivors=10))
    sent = device_round.send(device_round.run())
    assert sent is not None
    text = device.privacy_summary()
    assert "taking part" in text and "contributions sent: 1" in text and f"{8 * sent.numel():,} bytes" in text
    assert f"epsilon {device.epsilon():.2f} of 8.00" in text and "alone" in text and "(distributed)" in text
    assert "never your events, their number" in text
    device.withdraw_consent()
    assert "not taking part" in device.privacy_summary()


def test_bad_arguments_raise_clear_errors_and_change_nothing(device):
    before = device.stored_events()
    for call in (
        lambda: device.rank(["item1"], diversity=1.5),
        lambda: device.rank(["item1"], limit=0),
        lambda: device.rank("item1"),
        lambda: device.rank(["item1"], context="morning"),
        lambda: device.explain("item1", limit=0),
        lambda: device.explain("not in vocabulary"),
        lambda: device.export_scorer("scorer.txt"),
        lambda: device.forget_item("item1", keep_as_negative="yes"),
        lambda: device.contribute({"lr": 1}),
        lambda: device.pause("yes"),
        lambda: device.refresh_ranking(steps=0),
        lambda: device.rotate_key(b"short"),
        lambda: device.record_many(None),
    ):
        with pytest.raises(AttuneError):
            call()
    assert device.stored_events() == before


def test_two_objects_on_one_store_lose_neither_a_round_nor_a_pause(tmp_path):
    path = tmp_path / "d.sqlite"
    first, second = open_device(path), Personalizer(path, model=MODEL, vocabulary=VOCAB, simulation_seed=(0, 3))
    with first, second:
        assert first.contribute(request(round=1)).status is Status.CONTRIBUTED
        second.pause()
        second.pause(False)
        assert second.contribute(request(round=2)).status is Status.CONTRIBUTED
        first.pause()
        assert first.contribute(request(round=3)).status is Status.REFUSED  # paused by... itself
        assert second.paused and len(second.store.ledger()) == 2 == len(first.store.ledger())
        assert second.state.rounds_joined == 2


def test_a_stale_second_object_never_writes_erased_data_back(tmp_path):
    """Issue 20: A.erase() then B.refresh_ranking() or B.contribute() wrote B's cached vectors
    (computed from the erased events) back into the store, and B kept ranking with them."""
    path = tmp_path / "d.sqlite"
    first, second = open_device(path), Personalizer(path, model=MODEL, vocabulary=VOCAB, simulation_seed=(0, 3))
    with first, second:
        assert second.contribute(request(round=1)).status is Status.CONTRIBUTED
        assert second.store.get_state(USER_KEY) is not None
        blank = [r.score for r in Personalizer(tmp_path / "blank.sqlite", model=MODEL, vocabulary=VOCAB).rank(
            VOCAB.ids[:5])]
        first.erase()
        second.refresh_ranking()
        assert second.store.get_state(USER_KEY) is None and second.store.get_state(RANK_KEY) is None
        assert [r.score for r in second.rank(VOCAB.ids[:5])] == pytest.approx(blank)  # nothing personal left
        assert second.contribute(request(round=2)).status is Status.CONTRIBUTED  # from the events there are now
        assert second.store.count() == 0


_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[3])
    from pathlib import Path
    from device_helpers import MODEL, VOCAB, request
    from attune.client.personalizer import Personalizer, PrivacyConfig
    go = Path(sys.argv[2])
    with Personalizer(sys.argv[1], model=MODEL, vocabulary=VOCAB,
                      privacy=PrivacyConfig(epsilon_budget=float(sys.argv[4]))) as device:
        while not go.exists():
            time.sleep(0.01)
        print(device.contribute(request(run=sys.argv[5], user_steps=0)).status.value)
""")


def test_processes_contributing_at_once_never_lose_a_ledger_entry(tmp_path):
    """Three processes on one store join three runs' rounds at the same moment; the budget pays
    for two, so exactly one is refused and the ledger holds both others: no whole-ledger
    write-back loses a step."""
    path, go = tmp_path / "d.sqlite", tmp_path / "go"
    open_device(path).close()
    one = round_entries(MODEL, request(user_steps=0).config, False)
    budget = (epsilon_of(one * 2, 1e-5) + epsilon_of(one * 3, 1e-5)) / 2
    tests = str(__import__("pathlib").Path(__file__).parent)
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(go), tests, str(budget), run],
                                 stdout=subprocess.PIPE, text=True) for run in ("run-a", "run-b", "run-c")]
    time.sleep(3.0)  # every child has opened the store and waits
    go.touch()
    outcomes = sorted(child.communicate(timeout=120)[0].strip() for child in children)
    assert outcomes == ["contributed", "contributed", "refused"]
    with Personalizer(path, model=MODEL, vocabulary=VOCAB) as device:
        assert len(device.store.ledger()) == 2 and device.epsilon() <= budget
        assert device.state.rounds_joined == 2
