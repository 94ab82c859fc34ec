"""Diverse ranking (MMR), explanations and the exported scorer, through the public API."""

import time

import numpy as np
import pytest
import torch
from device_helpers import request

from attune.client.device_round import Status, open_device
from attune.client.export import load_scorer
from attune.client.personalizer import Personalizer
from attune.client.ranking import mmr_order
from attune.client.settings import DeviceSettings
from attune.shared.errors import ConfigError
from attune.shared.events import Event, EventContext
from attune.shared.metrics import intra_list_diversity
from attune.shared.model import ModelConfig, shared_model
from attune.shared.vocabulary import Vocabulary

MODEL = ModelConfig(num_items=40, dim=4, trained_items=0)
VOCAB = Vocabulary.of([f"item{i}" for i in range(40)])


def _clustered_global() -> dict[str, torch.Tensor]:
    """Items 0-9 point one way, 10-19 another, 20-39 a third; bias favours cluster 0."""
    state = shared_model(MODEL).init_state(torch.Generator().manual_seed(0))
    axes = torch.eye(4)
    table = torch.cat([axes[0].repeat(10, 1), axes[1].repeat(10, 1), axes[2].repeat(20, 1)])
    table += 0.05 * torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    state["item_embedding.weight"] = table
    state["item_bias.weight"] = torch.cat([torch.full((10, 1), 2.0), torch.full((10, 1), 1.0),
                                           torch.zeros(20, 1)])
    return state


@pytest.fixture
def device(tmp_path):
    with Personalizer(tmp_path / "r.sqlite", model=MODEL, vocabulary=VOCAB, simulation_seed=(0, 5)) as opened:
        opened.set_global(_clustered_global())
        opened.grant_consent("policy-1")
        yield opened


def test_diversity_zero_is_score_order_and_more_diversity_mixes_clusters(device):
    items = [f"item{i}" for i in range(40)]
    plain = device.rank(items)
    assert [r.item_id for r in device.rank(items, diversity=0.0)] == [r.item_id for r in plain]
    assert [r.score for r in plain] == sorted((r.score for r in plain), reverse=True)
    table = device.global_state()["item_embedding.weight"].numpy()
    spread = []
    for diversity in (0.0, 0.3, 0.7):
        top = device.rank(items, diversity=diversity, limit=5)
        assert len(top) == 5 and top[0].item_id == plain[0].item_id  # the best item stays first
        spread.append(intra_list_diversity(table[[VOCAB.index(r.item_id) for r in top]]))
    assert spread[0] < 0.1 and spread[2] > 0.5 and spread[0] <= spread[1] <= spread[2]


def test_mmr_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(3)
    scores, vectors = torch.randn(12, generator=g), torch.randn(12, 3, generator=g)
    relevance = (scores - scores.min()) / (scores.max() - scores.min())
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    picked: list[int] = []
    for _ in range(6):  # the textbook definition, one candidate at a time
        def gain(i):
            closest = max([float(unit[i] @ unit[j]) for j in picked], default=0.0)
            return 0.6 * float(relevance[i]) - 0.4 * max(closest, 0.0)
        picked.append(max((i for i in range(12) if i not in picked), key=gain))
    assert mmr_order(scores, vectors, 0.4, 6) == picked


def test_explain_names_the_persons_events_behind_a_score(device):
    now = time.time()
    device.record_many([Event("item3", "purchase", now - 300), Event("item4", "view", now - 200),
                        Event("item15", "click", now - 100), Event("item25", "like", now - 50)])
    reasons = device.explain("item1")
    assert [r.item_id for r in reasons] == ["item3", "item4"]  # same cluster, purchase outweighs view
    assert reasons[0].event_type == "purchase" and reasons[0].support > reasons[1].support > 0
    assert [r.item_id for r in device.explain("item30", limit=1)] == ["item25"]


def test_exported_scorer_gives_the_same_scores_outside_the_personalizer(device, tmp_path):
    now = time.time()
    device.record_many(Event(f"item{i % 7}", "click", now - 900 + i) for i in range(30))
    outcome = device.contribute(request(state=_clustered_global(), model=MODEL))
    assert outcome.status is Status.CONTRIBUTED
    path = device.export_scorer(tmp_path / "scorer.pt2")
    scorer, vocabulary = load_scorer(path)
    assert vocabulary["ids"] == list(VOCAB.ids)
    candidates = ["item0", "item5", "item17", "item33", "item39"]
    indices = torch.tensor([vocabulary["ids"].index(c) for c in candidates])
    for hour, weekday in ((0, 0), (8, 2), (23, 6)):
        expected = device.score(candidates, EventContext(hour=hour, weekday=weekday))
        exported = scorer(indices, torch.tensor(hour), torch.tensor(weekday))
        np.testing.assert_allclose(exported.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_before_any_round_the_exported_scorer_gives_the_history_scores(tmp_path):
    from attune import Personalizer

    with Personalizer(tmp_path / "d.sqlite", model=MODEL, vocabulary=VOCAB) as device:
        device.record_many([Event("item3", "purchase", time.time() - 10), Event("item5", "view", time.time())])
        scorer, _ = load_scorer(device.export_scorer(tmp_path / "scorer.pt2"))
        candidates = ["item3", "item5", "item9"]
        indices = torch.tensor(VOCAB.indices(candidates))
        expected = device.score(candidates)
        assert expected[0] > expected[1] > expected[2] == 0.0
        np.testing.assert_allclose(scorer(indices, torch.tensor(9), torch.tensor(1)).numpy(), expected.numpy(),
                                   rtol=1e-5)


@pytest.mark.parametrize("ranking", ["partial-local", "ditto", "global"])
def test_every_ranking_runs_on_a_device_and_ditto_keeps_the_persons_own_biases(tmp_path, ranking):
    with Personalizer(tmp_path / "d.sqlite", model=MODEL, vocabulary=VOCAB, simulation_seed=(0, 5),
                      ranking=ranking) as device:
        device.grant_consent("policy-1")
        device.record_many(Event("item33", "click", time.time() - 900 + i) for i in range(30))  # one item, often
        assert device.contribute(request(state=_clustered_global(), model=MODEL)).status is Status.CONTRIBUTED
        items = [f"item{i}" for i in range(40)]
        scores = device.score(items)
        device.pause()
        global_scores = device.score(items)  # paused: the global model alone
        device.pause(False)
        own = device.export()["local_model"]["own_item_biases"]  # the person's export holds what was fitted
        assert (own is not None and len(own) == MODEL.num_items) == (ranking == "ditto")
    with Personalizer(tmp_path / "d.sqlite", model=MODEL, vocabulary=VOCAB, ranking=ranking) as reopened:
        assert torch.equal(reopened.score(items), scores)  # what was fitted is stored
    lift = scores - global_scores
    if ranking == "global":
        assert torch.equal(scores, global_scores)
    else:
        assert lift[33] > lift[32]  # the person's item rises above its cluster's (same vector, own bias)
    own_bias = lift[33] - (lift[32] + lift[34]) / 2
    assert (own_bias > 0.5) == (ranking == "ditto")  # only ditto moves one item's bias on its own


def test_an_unknown_ranking_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown ranking"):
        Personalizer(tmp_path / "d.sqlite", model=MODEL, vocabulary=VOCAB, ranking="magic")


def test_a_supernode_picks_its_devices_ranking_in_its_node_config(tmp_path):
    settings = DeviceSettings.from_node_config({"store-path": str(tmp_path / "d.sqlite"), "ranking": "ditto"})
    with open_device(settings, request(model=MODEL)) as device:
        assert device.ranking.name == "ditto"
    assert DeviceSettings.from_node_config({"store-path": "x.sqlite"}).ranking == "partial-local"
    with pytest.raises(ConfigError, match="ranking must be one of"):
        DeviceSettings.from_node_config({"store-path": "x.sqlite", "ranking": "best"})
