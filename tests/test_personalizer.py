"""Personalizer: ranking, the round (its ledger, budget and refusals), persistence, reports."""

import time

import pytest
import torch
from device_helpers import MODEL, VOCAB, open_device, request

from attune.client.device_round import Status
from attune.client.personalizer import Personalizer
from attune.shared.accounting import Entry, epsilon_of
from attune.shared.errors import ConfigError, InvalidEventError, ModelMismatchError
from attune.shared.mechanism import local_entries, round_entries
from attune.shared.model import shared_model
from attune.shared.wire import RoundRequest


def test_rank_with_zero_events_uses_the_global_model(tmp_path):
    with open_device(tmp_path / "d.sqlite", events=0) as device:
        ranked = device.rank(["item1", "item2", "item3"])
        assert len(ranked) == 3 and device.state.rounds_joined == 0


def test_rank_rejects_ids_that_are_not_ids_and_scores_only_known_items(tmp_path):
    with open_device(tmp_path / "d.sqlite") as device:
        with pytest.raises(InvalidEventError):
            device.rank(["item1", ""])
        with pytest.raises(InvalidEventError):
            device.score(["item1", "nope"])  # a score is asked of the model: only for items it knows


def test_a_device_with_few_events_contributes_like_any_other(tmp_path):
    """No minimum event count: whether a device sends depends on consent, pause and budget only."""
    with open_device(tmp_path / "d.sqlite", events=1) as device:
        assert device.contribute(request()).status is Status.CONTRIBUTED
    with open_device(tmp_path / "e.sqlite", events=0) as device:
        assert device.contribute(request()).status is Status.CONTRIBUTED


def test_the_ledger_records_each_round_and_persists(tmp_path):
    path = tmp_path / "d.sqlite"
    with open_device(path) as device:
        first = device.contribute(request(round=1))
        second = device.contribute(request(round=2))
        assert first.status is second.status is Status.CONTRIBUTED
        expected = [*round_entries(MODEL, request().config, True), *round_entries(MODEL, request().config, False)]
        assert device.epsilon() == pytest.approx(epsilon_of(expected, 1e-5))
    with Personalizer(path, model=MODEL, vocabulary=VOCAB) as again:
        rows = again.store.ledger()
        assert [(r.run_id, r.round, r.mode) for r in rows] == [("run-a", 1, "local"), ("run-a", 2, "local")]
        assert again.epsilon() == pytest.approx(epsilon_of(expected, 1e-5))
        report = again.privacy_report()
        assert report.rounds_joined == 2 and [r.mode for r in report.rounds] == ["local", "local"]
        assert report.epsilon_local == pytest.approx(epsilon_of(
            [*local_entries(MODEL, request().config, True), *local_entries(MODEL, request().config, False)], 1e-5))


def test_budget_refusal_pays_nothing_and_stops_contributing(tmp_path):
    config = request().config
    first = round_entries(MODEL, config, True)
    budget = (epsilon_of(first, 1e-5) + epsilon_of([*first, *round_entries(MODEL, config, False)], 1e-5)) / 2
    with open_device(tmp_path / "d.sqlite", epsilon_budget=budget) as device:  # room for one round, not two
        assert device.contribute(request(round=1)).status is Status.CONTRIBUTED
        spent = device.epsilon()
        refused = device.contribute(request(round=2))
        assert refused.status is Status.REFUSED and "budget" in refused.reason and refused.vector is None
        assert device.epsilon() == pytest.approx(spent) and device.state.budget_exhausted
        assert device.contribute(request(round=3)).status is Status.REFUSED


def test_replayed_or_old_rounds_are_refused(tmp_path):
    with open_device(tmp_path / "d.sqlite") as device:
        assert device.contribute(request(round=2)).status is Status.CONTRIBUTED
        for old in (request(round=2), request(round=1)):
            outcome = device.contribute(old)
            assert outcome.status is Status.REFUSED and "replay" in outcome.reason
        assert device.contribute(request(round=1, run="run-b")).status is Status.CONTRIBUTED  # another run
        assert len(device.store.ledger()) == 2
        late = device.contribute(request(round=3))  # the earlier run's next round, signed, delivered late
        assert late.status is Status.REFUSED and "earlier run" in late.reason
        assert len(device.store.ledger()) == 2


def test_the_device_enforces_its_own_noise_floor_and_privacy(tmp_path):
    with open_device(tmp_path / "d.sqlite", min_noise_multiplier=2.0) as device:
        for low in (request(noise_multiplier=1.5), request(user_noise_multiplier=0.5)):
            outcome = device.contribute(low)
            assert outcome.status is Status.REFUSED and "floor" in outcome.reason
        off = device.contribute(request(mode="off"))
        assert off.status is Status.REFUSED and "non-private" in off.reason
        assert device.store.ledger() == []
    with open_device(tmp_path / "e.sqlite", allow_non_private=True) as device:
        assert device.contribute(request(mode="off")).status is Status.CONTRIBUTED
        assert device.epsilon() == 0.0


def test_a_contribution_holds_only_the_shared_side_and_the_model_learns(tmp_path):
    with open_device(tmp_path / "d.sqlite", epsilon_budget=1e2, allow_non_private=True) as device:
        state = device.global_state()
        device.set_global(state)  # the model's scores, not the history's (no global model yet)
        before = device.score(["item1", "item35"])
        for round in range(1, 6):  # a non-private server step at this device's own gradient
            outcome = device.contribute(request(round=round, mode="off", state=state))
            layout = shared_model(MODEL).layout
            state = {k: v.float() for k, v in layout.unflatten(layout.flatten(state) - 0.02 * outcome.vector).items()}
        device.contribute(request(round=6, mode="off", state=state))
        device.refresh_ranking()
        after = device.score(["item1", "item35"])
        assert (after[0] - after[1]) > (before[0] - before[1])  # its own item gains on one it never used


def test_a_mismatched_round_is_refused_before_anything_changes(tmp_path):
    with open_device(tmp_path / "d.sqlite") as device:
        other = MODEL.__class__(num_items=40, dim=5)
        outcome = device.contribute(request(model=other, state=None))
        assert outcome.status is Status.REFUSED and "model" in outcome.reason
        with pytest.raises(ConfigError):
            device.contribute({"round": 1})
        assert device.store.ledger() == []
    bad = request().state
    bad["item_bias.weight"] = torch.zeros(39, 1)
    with pytest.raises(ModelMismatchError, match=r"item_bias.weight has shape \(39, 1\)"):
        RoundRequest.parse({k: v.numpy() for k, v in bad.items()}, request().items())


def test_the_report_says_what_left_and_under_which_guarantee(tmp_path):
    with open_device(tmp_path / "d.sqlite") as device:
        device_round = device.round(request(mode="distributed", min_survivors=10))
        sent = device_round.send(device_round.run())
        assert sent is not None and sent.dtype == torch.long
        report = device.privacy_report()
        assert report.unit == "event" and report.contributions_sent == 1 and report.bytes_sent == 8 * sent.numel()
        assert report.epsilon_spent == pytest.approx(device.epsilon())
        assert report.epsilon_spent < report.epsilon_local  # one share alone is much less private
        assert "user_vector.weight" not in report.shared_parameters
        assert any("secure sums" in s for s in report.statements)
        recomputed = epsilon_of([Entry.from_dict(e) for e in report.entries], report.delta)
        assert recomputed == pytest.approx(report.epsilon_spent)


def test_before_any_round_a_device_ranks_by_its_own_history_and_explains_only_that(tmp_path):
    """Issue 23: with 200 events and no round yet every score was 0.0 (input order) and explain()
    cited unrelated items through a random model."""
    from attune import Event, ModelConfig, Personalizer, Vocabulary

    now = time.time()
    vocabulary = Vocabulary.of([f"item{i}" for i in range(30)])
    with Personalizer(tmp_path / "d.sqlite", model=ModelConfig(num_items=30, dim=4), vocabulary=vocabulary) as device:
        device.record_many([Event("item7", "click", now - 60 * k) for k in range(5)]
                           + [Event("item3", "purchase", now - 100), Event("item9", "view", now - 86400 * 90)])
        order = [r.item_id for r in device.rank(["item1", "item9", "item3", "item7", "item2"])]
        assert order[:3] == ["item7", "item3", "item9"]  # most weight first; an old view counts little
        assert device.score(["item1"]).tolist() == [0.0]
        assert [s.item_id for s in device.explain("item7")] == ["item7"]  # its own events, nothing else
        assert device.explain("item1") == []


def test_unknown_candidates_rank_last_and_the_vocabulary_sizes_the_model(tmp_path):
    """Issue 23: one unknown id failed the whole rank(), and a vocabulary of 30 ids needed
    ModelConfig(num_items=30) spelled out."""
    from attune import InvalidEventError, Personalizer, Vocabulary

    vocabulary = Vocabulary.of([f"item{i}" for i in range(30)])
    with Personalizer(tmp_path / "d.sqlite", vocabulary=vocabulary) as device:
        assert device.model_config.num_items == 30
        ranked = device.rank(["new-item", "item1", "item2"])
        assert [r.item_id for r in ranked][-1] == "new-item" and ranked[-1].score == float("-inf")
        assert {r.item_id for r in ranked[:2]} == {"item1", "item2"}
        assert device.rank(["new-item"], limit=1)[0].item_id == "new-item"
        with pytest.raises(InvalidEventError):
            device.rank(["item1", 5])
        with pytest.raises(InvalidEventError, match="milliseconds"):
            from attune import Event

            device.record(Event("item1", "click", time.time() * 1000))
