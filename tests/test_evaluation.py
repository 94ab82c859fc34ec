"""Federated evaluation (issue 22): devices rank each event when they record it, evaluation rounds
release the sums through the training rounds' mechanism and ledger, and the coordinator's
estimate carries an interval that covers the exact value as often as it says."""

import json
import math
import time

import numpy as np
import pytest
import torch
from device_helpers import open_device, request
from test_leaks import DELTA, TRIALS, _bound, _held_out_accuracy

from attune import Event
from attune.client.settings import DeviceSettings
from attune.client.training import evaluation_contributions
from attune.server.config import ServerConfig
from attune.server.planning import evaluation_rounds, plan
from attune.shared.accounting import epsilon_of
from attune.shared.config import PrivacyMode, RoundTask, preset
from attune.shared.evaluation import STATISTICS, estimate, in_events
from attune.shared.mechanism import dequantize, round_entries, share_std, units
from attune.shared.model import ModelConfig
from attune.shared.randomness import Stream
from attune.simulations.options import build
from attune.simulations.runner import simulate


def test_evaluation_rounds_follow_every_n_training_rounds_and_the_last():
    assert evaluation_rounds(10, 0) == (11,)
    assert evaluation_rounds(10, 5) == (6, 12)
    assert evaluation_rounds(7, 3) == (4, 8, 10)


def test_a_plan_evaluates_only_when_a_private_mode_gives_it_a_share():
    model = ModelConfig(num_items=300, dim=4, trained_items=0)
    none = plan(ServerConfig(model=model, rounds=6), 50)
    assert none.evaluation is None and none.evaluation_rounds == ()
    off = plan(ServerConfig(model=model, rounds=6, mode=PrivacyMode.OFF, eval_share=0.1), 50)
    assert off.evaluation_rounds == ()
    shared = plan(ServerConfig(model=model, rounds=6, eval_share=0.05, target_epsilon=8.0), 50)
    assert shared.evaluation_rounds == (7,) and shared.evaluation.task is RoundTask.EVALUATE
    alone = epsilon_of(round_entries(model, shared.evaluation, refresh=False), 1e-5)
    assert 1.0 < alone < 1.6  # a twentieth of the zCDP budget of epsilon 8: under a fifth of it


def _released(stats: torch.Tensor, devices: int, config, trial: int) -> torch.Tensor:
    """One evaluation round of ``devices`` devices holding one evaluated event each, the sum of
    their noised contributions, dequantized."""
    streams = [Stream.seeded_from(trial, "evaluation", d) for d in range(devices)]
    total = evaluation_contributions(stats, torch.arange(devices), devices, config, streams).sum(dim=0)
    return dequantize(total, config)


def test_the_interval_covers_the_exact_value_as_often_as_it_says():
    """500 devices, each with one evaluated event; 200 releases of the same statistics under fresh
    noise: the 95% interval of HR@10 covers the exact HR@10 about 95% of the time."""
    devices = 500
    config = preset("distributed", min_survivors=devices, noise_multiplier=3.0, task=RoundTask.EVALUATE)
    g = torch.Generator().manual_seed(0)
    hits = (torch.rand(devices, generator=g) < 0.6).double()
    stats = torch.stack([torch.ones(devices), hits, hits * 0.5, hits * 0.3, hits * 0.1], 1)
    exact = float(hits.mean())
    std = share_std(config) * math.sqrt(devices) / units(config)
    covered, widths = 0, []
    for trial in range(200):
        result = estimate(in_events(_released(stats, devices, config, trial), config.clip),
                          float(in_events(torch.tensor(std), config.clip)), devices)
        covered += abs(result.hr - exact) <= result.hr_half_width
        widths.append(result.hr_half_width)
    assert 0.90 <= covered / 200 <= 0.99, covered
    assert np.mean(widths) < 0.05


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_an_evaluation_round_leaks_no_more_than_its_accounted_epsilon(mode):
    """One more evaluated event, a hit on every statistic (the largest change one event makes):
    no attack on the released sums beats the accounted epsilon, and the same attacks do at a
    tenth of the noise (the test can fail)."""
    devices = 1 if mode == "local" else 5
    config = preset(mode, noise_multiplier=4.8, min_survivors=devices, task=RoundTask.EVALUATE)
    epsilon = epsilon_of(round_entries(ModelConfig(), config, refresh=False), DELTA)
    assert 0.8 < epsilon < 1.2
    base = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5]]).repeat(10, 1)
    canary = torch.cat([base, torch.ones(1, len(STATISTICS))])

    def releases(stats: torch.Tensor, side: str, noise: float) -> torch.Tensor:
        weak = preset(mode, noise_multiplier=noise, min_survivors=devices, task=RoundTask.EVALUATE)
        rows = []
        for trial in range(TRIALS):
            others = torch.tensor([[1.0, 1.0, 0.5, 0.0, 0.0]]).repeat(devices - 1, 1)
            everything = torch.cat([stats, others])
            owner = torch.cat([torch.zeros(len(stats), dtype=torch.long), torch.arange(1, devices)])
            streams = [Stream.seeded_from(trial, side, d) for d in range(devices)]
            rows.append(evaluation_contributions(everything, owner, devices, weak, streams).sum(dim=0))
        return torch.stack(rows).double()

    attacks = {"the sum of all five": lambda x: x.sum(dim=1).numpy(), "events": lambda x: x[:, 0].numpy(),
               "norm": lambda x: x.norm(dim=1).numpy()}
    small, large = releases(base, "a", 4.8), releases(canary, "b", 4.8)
    for name, attack in attacks.items():
        accuracy = _held_out_accuracy(attack(small), attack(large))
        assert accuracy <= _bound(epsilon) + 3 * math.sqrt(0.25 / TRIALS), (name, accuracy)
    weak = [releases(stats, side, 0.48) for stats, side in ((base, "a"), (canary, "b"))]
    assert _held_out_accuracy(*(attacks["the sum of all five"](x) for x in weak)) > _bound(epsilon) + 0.1


def test_a_device_ranks_events_it_records_once_it_holds_a_model_and_an_evaluation_round_sends_them(tmp_path):
    device = open_device(tmp_path / "d.sqlite")
    assert device.privacy_report().events_awaiting_evaluation == 0  # recorded before any round: no model yet
    assert device.contribute(request(1)).status.value == "contributed"
    now = time.time()
    device.record_many([Event("item20", "click", now), Event("item21", "click", now)])
    assert device.privacy_report().events_awaiting_evaluation == 2
    assert [row["events"] for row in device.export()["awaiting_evaluation"]] == [1.0, 1.0]  # the person sees them
    before = device.epsilon()
    evaluation = request(2, task=RoundTask.EVALUATE)
    outcome = device.contribute(evaluation)
    assert outcome.status.value == "contributed" and outcome.vector.shape == (len(STATISTICS),)
    charged = epsilon_of(round_entries(evaluation.model, evaluation.config, refresh=False), DELTA)
    assert device.epsilon() > before and charged > 0
    assert list(device.store.ledger()[-1].entries) == round_entries(evaluation.model, evaluation.config, refresh=False)
    assert device.privacy_report().events_awaiting_evaluation == 0  # each is sent in one evaluation round
    device.record(Event("item22", "click", now))
    assert device.privacy_report().events_awaiting_evaluation == 1
    device.forget_item("item22")
    assert device.privacy_report().events_awaiting_evaluation == 0  # what was derived from it goes with it
    device.close()


def test_a_device_declines_evaluation_rounds_without_consent_or_by_its_own_policy(tmp_path):
    device = open_device(tmp_path / "d.sqlite")
    device.contribute(request(1))
    device.withdraw_consent()
    assert device.contribute(request(2, task=RoundTask.EVALUATE)).status.value == "refused"
    device.close()
    mine = open_device(tmp_path / "e.sqlite", allow_evaluation=False)
    mine.contribute(request(1))
    spent = mine.epsilon()
    refused = mine.contribute(request(2, task=RoundTask.EVALUATE))
    assert refused.status.value == "refused" and "allow_evaluation" in refused.reason and mine.epsilon() == spent
    assert mine.contribute(request(3)).status.value == "contributed"  # training rounds go on
    mine.close()
    node = DeviceSettings.from_node_config({"store-path": "x.sqlite", "allow-evaluation": False})
    assert node.privacy.allow_evaluation is False


def test_the_persons_report_shows_what_evaluation_cost(tmp_path):
    device = open_device(tmp_path / "d.sqlite")
    device.contribute(request(1))
    assert device.privacy_report().epsilon_evaluation == 0.0
    device.contribute(request(2, task=RoundTask.EVALUATE))
    report = device.privacy_report()
    evaluation = request(2, task=RoundTask.EVALUATE)
    alone = epsilon_of(round_entries(evaluation.model, evaluation.config, refresh=False), DELTA)
    assert report.epsilon_evaluation == pytest.approx(alone) and report.rounds[-1].task == "evaluate"
    assert "evaluation rounds" in device.privacy_summary()
    device.close()


def test_a_simulation_reports_the_dp_estimate_beside_the_exact_value(tmp_path):
    config = build({"rounds": 20, "synthetic_users": 100, "dim": 8, "eval_share": 0.05, "eval_every": 10,
                    "target_epsilon": 8.0}, out=tmp_path)
    results = simulate(config)
    federated = results["federated_evaluation"]
    assert federated["rounds"] == [11, 22] and [r["task"] for r in results["rounds"]].count("evaluate") == 2
    assert all(r["contributed"] == 100 for r in results["rounds"])  # each device's budget pays for every round
    estimate_ = federated["estimate"]
    assert estimate_["devices"] == 100 and abs(estimate_["events"] - 100) < 5 * estimate_["noise_std"]
    assert federated["exact_hr@10"] == results["final"]["hr@10"]
    # within three standard deviations of its noise (how often the 95% interval covers is tested above)
    assert abs(estimate_["hr"] - federated["exact_hr@10"]) <= 1.5 * estimate_["hr_half_width"]
    assert federated["epsilon_alone"] < 8.0 / 5
    assert results["privacy"]["epsilon"] == pytest.approx(8.0, abs=0.01)  # the split stays within the target
    config_ = results["config"]  # settings as given (None: absent), then the plan: no two values for one knob
    assert config_["server"]["round"]["noise_multiplier"] is None and config_["round"]["noise_multiplier"] > 1
    assert not any(key.endswith("_col") for key in config_["source"])  # only what a synthetic source reads
    lines = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert lines[-1]["task"] == "evaluate" and lines[-1]["evaluation"]["hr"] == pytest.approx(estimate_["hr"],
                                                                                              abs=1e-5)


def test_one_event_more_changes_one_evaluation_row_and_the_ranking_vector_changes_none(tmp_path):
    """What an evaluation round releases is the sum of per-event rows, so one event may change one
    row only. Two devices alike but for one extra event (and a ranking vector refitted on it,
    without noise) give every other event the same row: negatives never depend on the other
    events, and the query is the DP user vector's, never the ranking vector's."""
    import shutil

    from device_helpers import MODEL, VOCAB

    from attune import Personalizer

    with open_device(tmp_path / "b.sqlite") as device:
        device.contribute(request(1))
    shutil.copy(tmp_path / "b.sqlite", tmp_path / "a.sqlite")
    now = time.time()
    rows = {}
    for name in ("a", "b"):
        with Personalizer(tmp_path / f"{name}.sqlite", model=MODEL, vocabulary=VOCAB, simulation_seed=(0, 3)) as device:
            if name == "a":
                device.record(Event("item39", "purchase", now - 5))  # the one extra event
                device.refresh_ranking()  # a ranking vector fitted on it, without noise
            for k in range(20):
                device.record(Event(f"item{(3 * k) % 40}", "click", now - 4 + k / 100))
            rows[name] = device.export()["awaiting_evaluation"]
    assert len(rows["a"]) == 21 and len(rows["b"]) == 20
    assert rows["a"][1:] == rows["b"]
    assert len({tuple(r.values()) for r in rows["b"]}) > 1  # the rows are not all alike: the check has teeth
