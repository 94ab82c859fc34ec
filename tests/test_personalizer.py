"""Personalizer: ranking, DP training, budget, persistence of the ledger, reports."""

import time

import pytest
import torch
from opacus.accountants import RDPAccountant

from attune.client.personalizer import Personalizer, PrivacyConfig
from attune.shared.accounting import epsilon_of
from attune.shared.config import TrainConfig
from attune.shared.errors import InvalidEventError, ModelMismatchError
from attune.shared.events import Event
from attune.shared.model import ModelConfig
from attune.shared.vocabulary import Vocabulary

MODEL = ModelConfig(num_items=50, dim=8)
VOCAB = Vocabulary.of([f"item{i}" for i in range(50)])
TRAIN = TrainConfig(local_epochs=1, user_epochs=1, sample_rate=0.3, noise_multiplier=3.0)


def open_device(path, **privacy):
    device = Personalizer(str(path), model=MODEL, vocabulary=VOCAB,
                          privacy=PrivacyConfig(**privacy), seed=7)
    device.grant_consent("test-policy-1")
    return device


def fill(device, count=30):
    now = time.time()
    device.record_many(Event(f"item{i % 20}", "click", now - 1000 + i) for i in range(count))


def test_rank_with_zero_events_uses_global_model(tmp_path):
    with open_device(tmp_path / "d.sqlite") as device:
        state = device.global_state()
        state["item_bias.weight"] = torch.arange(50, dtype=torch.float32).unsqueeze(1)
        device.set_global(state)
        ranked = device.rank(["item3", "item40", "item10"])
        assert [r.item_id for r in ranked] == ["item40", "item10", "item3"]


def test_rank_rejects_unknown_items(tmp_path):
    with open_device(tmp_path / "d.sqlite") as device:
        with pytest.raises(InvalidEventError, match="not in the model's vocabulary"):
            device.rank(["item1", "nope"])
        with pytest.raises(InvalidEventError):
            device.record(Event("nope"))
        assert device.store.count() == 0


def test_too_few_events_skips(tmp_path):
    with open_device(tmp_path / "d.sqlite", min_events=10) as device:
        fill(device, 5)
        outcome = device.train(TRAIN)
        assert outcome.status == "skipped" and "at least 10" in outcome.reason
        assert device.epsilon() == 0.0


def test_reported_epsilon_equals_opacus_accountant_and_persists(tmp_path):
    path = tmp_path / "d.sqlite"
    with open_device(path) as device:
        fill(device)
        first = device.train(TRAIN)
        second = device.train(TRAIN)
        assert first.status == second.status == "trained"
        steps = 2 * TRAIN.steps_per_round
        reference = RDPAccountant()
        reference.history = [(TRAIN.noise_multiplier, TRAIN.sample_rate, steps)]
        assert device.ledger.steps == steps
        assert second.epsilon == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    with open_device(path) as reopened:  # the ledger survives a restart
        assert reopened.epsilon() == pytest.approx(second.epsilon, rel=1e-12)
        third = reopened.train(TRAIN)
        assert third.epsilon > second.epsilon


def test_budget_refusal_trains_nothing_and_stops_contributing(tmp_path):
    two_rounds = epsilon_of([(3.0, 0.3, 2 * TRAIN.steps_per_round)], 1e-5)
    with open_device(tmp_path / "d.sqlite", epsilon_budget=two_rounds * 1.0001) as device:
        fill(device)
        outcomes = [device.train(TRAIN) for _ in range(6)]
        statuses = [o.status for o in outcomes]
        assert statuses == ["trained", "trained", "refused", "refused", "refused", "refused"]
        refused = outcomes[statuses.index("refused")]
        assert "over the budget" in refused.reason and refused.update is None
        assert device.epsilon() == pytest.approx(two_rounds)
        spent = device.epsilon()
        assert device.train(TRAIN).status == "refused"  # stays refused
        assert device.epsilon() == spent
        assert device.privacy_report()["budget_exhausted"] is True


def test_non_private_training_needs_explicit_permission(tmp_path):
    plain = TrainConfig(private=False)
    with open_device(tmp_path / "a.sqlite") as device:
        fill(device)
        assert device.train(plain).status == "refused"
    with open_device(tmp_path / "b.sqlite", allow_non_private=True) as device:
        fill(device)
        outcome = device.train(plain)
        assert outcome.status == "trained" and outcome.private is False


def test_update_holds_only_global_parameters_and_training_learns(tmp_path):
    with open_device(tmp_path / "d.sqlite", epsilon_budget=1e6) as device:
        fill(device)
        before = device.score(["item1", "item45"])
        outcome = device.train(TrainConfig(sample_rate=1.0, local_epochs=5, user_epochs=5,
                                           noise_multiplier=0.3, lr=2.0, user_lr=2.0))
        assert set(outcome.update) == {"item_embedding.weight", "item_bias.weight",
                                       "context_encoder.weight"}
        after = device.score(["item1", "item45"])
        # item1 was interacted with, item45 never: the gap must move in its favour
        assert (after[0] - after[1]) > (before[0] - before[1])


def test_mismatched_global_model_is_refused_and_nothing_changes(tmp_path):
    with open_device(tmp_path / "d.sqlite") as device:
        state = device.global_state()
        bad = dict(state, **{"item_bias.weight": torch.zeros(49, 1)})
        with pytest.raises(ModelMismatchError, match=r"item_bias.weight has shape \(49, 1\)"):
            device.set_global(bad)
        with pytest.raises(ModelMismatchError, match="model version 99"):
            device.set_global(state, version=99)
        wrong_dtype = dict(state, **{"item_bias.weight": torch.zeros(50, 1, dtype=torch.float64)})
        with pytest.raises(ModelMismatchError, match="dtype"):
            device.set_global(wrong_dtype)
        missing = {k: v for k, v in state.items() if k != "context_encoder.weight"}
        with pytest.raises(ModelMismatchError, match="missing context_encoder.weight"):
            device.set_global(missing)
        torch.testing.assert_close(device.global_state(), state)


def test_privacy_report_says_what_left(tmp_path):
    with open_device(tmp_path / "d.sqlite") as device:
        fill(device)
        device.train(TRAIN)
        parameters = MODEL.num_items * (MODEL.dim + 1) + MODEL.dim * 9
        device.note_update_sent(parameters, 4 * parameters)
        report = device.privacy_report()
        assert report["unit"] == "event" and report["updates_sent"] == 1
        assert report["bytes_sent"] == 4 * parameters and report["consented"]
        assert report["epsilon_spent"] == pytest.approx(device.epsilon())
        assert "user_vector.weight" not in report["shared_parameters"]
