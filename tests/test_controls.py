"""The person's controls: consent, pause, forget, erase, export, privacy summary, bad input."""

import json
import sqlite3
import time

import pytest
from flwr.app import Message, RecordDict

import attune.client.personalizer as personalizer_module
from attune.client.flower_app import handle_train
from attune.client.personalizer import Personalizer, PrivacyConfig
from attune.client.settings import DeviceSettings
from attune.shared.config import TrainConfig
from attune.shared.errors import AttuneError, ConfigError, InvalidEventError
from attune.shared.events import Event
from attune.shared.model import ModelConfig, Personalization
from attune.shared.records import state_to_arrays, to_config_record
from attune.shared.vocabulary import Vocabulary

MODEL = ModelConfig(num_items=40, dim=4)
VOCAB = Vocabulary.of([f"item{i}" for i in range(40)])
TRAIN = TrainConfig(sample_rate=1.0, local_epochs=1, user_epochs=1, noise_multiplier=2.0)


@pytest.fixture
def device(tmp_path):
    with Personalizer(str(tmp_path / "d.sqlite"), model=MODEL, vocabulary=VOCAB,
                      privacy=PrivacyConfig(min_events=5), seed=3) as opened:
        opened.grant_consent("test-policy-1")
        now = time.time()
        opened.record_many(Event(f"item{i % 12}", "click", now - 900 + i) for i in range(36))
        yield opened


def test_pause_stops_training_and_personal_ranking(device):
    assert device.train(TRAIN).status == "trained"
    personal = device.score(["item1", "item30"])
    spent = device.epsilon()
    device.pause()
    outcome = device.train(TRAIN)
    assert outcome.status == "refused" and "paused" in outcome.reason and outcome.update is None
    assert device.epsilon() == spent
    global_only = device.score(["item1", "item30"])
    assert not bool((global_only == personal).all())
    device.pause(False)
    assert bool((device.score(["item1", "item30"]) == personal).all())


def test_forget_item_deletes_only_that_item(device):
    assert device.forget_item("item3") == 3
    items = {e.item_id for e in device.store.events()}
    assert "item3" not in items and len(items) == 11
    with pytest.raises(InvalidEventError):
        device.forget_item("not in vocabulary")


def test_erase_leaves_no_trace_in_the_file_but_keeps_the_ledger(device, tmp_path):
    device.train(TRAIN)
    spent = device.epsilon()
    device.erase()
    assert device.store.count() == 0 and device.epsilon() == pytest.approx(spent)
    raw = (tmp_path / "d.sqlite").read_bytes()
    assert b"item7" not in raw  # neither live rows nor freed pages hold the erased ids
    assert not (tmp_path / "d.sqlite-wal").exists() and not (tmp_path / "d.sqlite-journal").exists()
    tables = sqlite3.connect(tmp_path / "d.sqlite").execute("SELECT key FROM state").fetchall()
    assert {k for (k,) in tables} == {"ledger", "participation", "consent"}
    assert device.export()["local_model"] is None


def test_export_is_one_json_document(device):
    device.train(TRAIN)
    document = json.loads(json.dumps(device.export()))
    assert len(document["events"]) == 36 and document["events"][0]["item_id"] == "item0"
    assert document["privacy"]["unit"] == "event" and document["privacy"]["rounds_trained"] == 1
    assert len(document["local_model"]["user_vector"]) == MODEL.dim


def test_training_needs_consent_and_withdrawal_stops_it(tmp_path):
    with Personalizer(str(tmp_path / "c.sqlite"), model=MODEL, vocabulary=VOCAB,
                      privacy=PrivacyConfig(min_events=5), seed=3) as device:
        device.record_many(Event(f"item{i % 12}", "click", time.time() - 900 + i) for i in range(36))
        outcome = device.train(TRAIN)
        assert outcome.status == "refused" and "consent" in outcome.reason and device.epsilon() == 0
        device.grant_consent("policy-2026-11")
        assert device.train(TRAIN).status == "trained"
        device.withdraw_consent()
        assert device.train(TRAIN).status == "refused"
        record = device.consent()
        assert record["granted"] is False and record["policy_version"] == "policy-2026-11"
        assert [h["granted"] for h in record["history"]] == [True, False]
        assert device.export()["consent"]["history"] == record["history"]
        with pytest.raises(ConfigError):
            device.grant_consent("")
        with pytest.raises(ConfigError):
            device.grant_consent("v1", purpose="advertising")


def _withdraw_during_training(monkeypatch, path):
    """Make the next local round withdraw consent (as the app's settings screen would, through
    its own connection to the store) while it trains."""
    real = personalizer_module.train_round

    def withdrawing(*args, **kwargs):
        with Personalizer(str(path), model=MODEL, vocabulary=VOCAB) as other:
            other.withdraw_consent()
        return real(*args, **kwargs)

    monkeypatch.setattr(personalizer_module, "train_round", withdrawing)


def test_withdrawal_mid_round_discards_the_update(device, tmp_path, monkeypatch):
    assert device.train(TRAIN).status == "trained"
    spent, vector = device.epsilon(), device.export()["local_model"]["user_vector"]
    _withdraw_during_training(monkeypatch, tmp_path / "d.sqlite")
    outcome = device.train(TRAIN)
    assert outcome.status == "refused" and "withdrawn" in outcome.reason and outcome.update is None
    assert device.epsilon() == pytest.approx(spent)
    assert device.export()["local_model"]["user_vector"] == vector  # the round left nothing behind


def test_withdrawal_mid_round_sends_nothing_through_flower(tmp_path, monkeypatch):
    path = tmp_path / "f.sqlite"
    with Personalizer(str(path), model=MODEL, vocabulary=VOCAB) as device:
        device.record_many(Event(f"item{i % 12}", "click", time.time() - 900 + i) for i in range(36))
        device.grant_consent("policy-1")
    _withdraw_during_training(monkeypatch, path)
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(json.dumps(list(VOCAB.ids)))
    settings = DeviceSettings(store_path=path, privacy=PrivacyConfig(min_events=5), seed=1,
                              vocabulary_path=vocabulary, allow_unsigned=True)
    arrays = state_to_arrays(Personalization(MODEL).global_state())
    message = Message(content=RecordDict({"arrays": arrays, "config": to_config_record(MODEL, TRAIN)}),
                      dst_node_id=1, message_type="train")
    reply = handle_train(message, settings)
    assert "arrays" not in reply.content.array_records
    metrics = reply.content.metric_records["metrics"]
    assert metrics["trained"] == 0 and "error" not in metrics  # refused by consent, not an error


def test_forget_one_event_and_keep_an_item_as_negative(device):
    stored = device.stored_events()
    target = stored[5]
    device.forget_event(target.id)
    assert [s.id for s in device.stored_events()] == [s.id for s in stored if s.id != target.id]
    with pytest.raises(InvalidEventError, match="no stored event"):
        device.forget_event(target.id)
    with pytest.raises(InvalidEventError):
        device.forget_event("5")
    assert device.store.count() == 35
    device.train(TRAIN)
    favourite = device.rank(["item1", "item2", "item30"])[0].item_id
    device.forget_item(favourite, keep_as_negative=True)
    assert device.rank(["item1", "item2", "item30"])[-1].item_id == favourite
    assert device.not_interested() == [favourite]
    assert device.export()["not_interested"] == [favourite]
    device.erase()
    assert device.not_interested() == []


def test_privacy_summary_is_plain_text_for_the_person(device):
    device.train(TRAIN)
    device.note_update_sent(100, 400)
    device.note_user_level(1.5, 1e-6)
    text = device.privacy_summary()
    assert "taking part" in text and "updates sent: 1" in text and "400 bytes" in text
    assert f"epsilon {device.epsilon():.2f} of 8.00" in text and "epsilon 1.50" in text
    device.withdraw_consent()
    assert "not taking part" in device.privacy_summary()
    with pytest.raises(ConfigError):
        device.note_user_level(float("nan"), 1e-6)


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
        lambda: device.train({"lr": 1}),
        lambda: device.pause("yes"),
        lambda: device.refresh_ranking(steps=0),
        lambda: device.rotate_key(b"short"),
    ):
        with pytest.raises(AttuneError):
            call()
    assert device.stored_events() == before
