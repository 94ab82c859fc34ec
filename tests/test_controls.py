"""The person's controls: pause, forget an item, erase everything, export."""

import json
import sqlite3
import time

import pytest

from attune.client.personalizer import Personalizer, PrivacyConfig
from attune.shared.config import TrainConfig
from attune.shared.errors import InvalidEventError
from attune.shared.events import Event
from attune.shared.model import ModelConfig
from attune.shared.vocabulary import Vocabulary

MODEL = ModelConfig(num_items=40, dim=4)
VOCAB = Vocabulary.of([f"item{i}" for i in range(40)])
TRAIN = TrainConfig(sample_rate=1.0, local_epochs=1, user_epochs=1, noise_multiplier=2.0)


@pytest.fixture
def device(tmp_path):
    with Personalizer(str(tmp_path / "d.sqlite"), model=MODEL, vocabulary=VOCAB,
                      privacy=PrivacyConfig(min_events=5), seed=3) as opened:
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
    tables = sqlite3.connect(tmp_path / "d.sqlite").execute("SELECT key FROM state").fetchall()
    assert {k for (k,) in tables} == {"ledger", "participation"}
    assert device.export()["local_model"] is None


def test_export_is_one_json_document(device):
    device.train(TRAIN)
    document = json.loads(json.dumps(device.export()))
    assert len(document["events"]) == 36 and document["events"][0]["item_id"] == "item0"
    assert document["privacy"]["unit"] == "event" and document["privacy"]["rounds_trained"] == 1
    assert len(document["local_model"]["user_vector"]) == MODEL.dim
