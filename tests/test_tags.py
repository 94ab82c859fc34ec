"""Item tags: the affinity a device ranks with against a plain reference, the Personalizer's use of
it (paused, exported), the loaders that read tags, and a simulation where tags change the ranking
and nothing a device sends."""

import math
import time

import numpy as np
import pytest
import torch

from attune import ConfigError, DataError, Event, ItemTags, ModelConfig, Personalizer, TagAffinity, Vocabulary
from attune.client.export import load_scorer
from attune.server.checkpoint import load_checkpoint
from attune.server.config import ServerConfig
from attune.shared.model import shared_model
from attune.shared.tags import person_tags, tag_lift
from attune.simulations.datasets import load_movielens, load_tags, synthetic
from attune.simulations.runner import DataSource, SimulationConfig, simulate

MODEL = ModelConfig(num_items=12, dim=3, trained_items=0)
VOCAB = Vocabulary.of([f"item{i}" for i in range(12)])
TAGS = ItemTags.of([[i % 3] for i in range(10)] + [[0, 1], []], 3)  # item 10 has two tags, item 11 none


def test_the_lift_matches_a_plain_reference():
    bias = torch.linspace(-1.0, 2.0, 12)
    own_items = [[0, 3, 3, 10], [], [5]]
    config = TagAffinity(tag_strength=0.7, tag_prior_events=4.0)
    popularity = [math.exp(b) for b in bias.tolist()]
    lists = [[i % 3] for i in range(10)] + [[0, 1], []]
    shares = [sum(p / len(tags) for p, tags in zip(popularity, lists, strict=True) if t in tags) for t in range(3)]
    shares = [s / sum(shares) for s in shares]
    items = torch.arange(12)
    owners = torch.tensor([k for k, person in enumerate(own_items) for _ in person], dtype=torch.long)
    own = person_tags(TAGS, torch.tensor([i for person in own_items for i in person], dtype=torch.long), owners, 3)
    lift = tag_lift(TAGS, TAGS.shares(bias), own, items.repeat(3, 1), config)
    for k, person in enumerate(own_items):
        totals = [sum(1 / len(lists[i]) for i in person if t in lists[i]) for t in range(3)]
        affinity = [(totals[t] + 4.0 * shares[t]) / (len(person) + 4.0) / shares[t] for t in range(3)]
        for i in range(12):
            expected = 0.7 * sum(math.log(affinity[t]) / len(lists[i]) for t in lists[i]) if lists[i] else 0.0
            assert lift[k, i].item() == pytest.approx(expected, abs=1e-5)
    assert bool((lift[1] == 0).all())  # no events: no affinity either way


def test_tags_are_refused_when_they_do_not_fit():
    with pytest.raises(ConfigError, match="0..2"):
        ItemTags.of([[0], [3]], 3)
    for bad in ([[0]], 0), ("ab", 2), ([[0, "a"]], 2), ([], 2), ([[True]], 2):
        with pytest.raises(ConfigError):
            ItemTags.of(*bad)
    with pytest.raises(ConfigError, match="ItemTags.of"):
        ItemTags(num_tags=2, starts=torch.tensor([0, 3]), tags=torch.tensor([0]))
    with pytest.raises(ConfigError, match="tag_strength"):
        TagAffinity(tag_strength=-1.0)
    with pytest.raises(ConfigError, match="tags list 12 items"):
        Personalizer("unused.sqlite", model=ModelConfig(num_items=20, dim=3), tags=TAGS)


@pytest.fixture
def device(tmp_path):
    with Personalizer(tmp_path / "d.sqlite", model=MODEL, vocabulary=VOCAB, tags=TAGS) as opened:
        opened.grant_consent("policy-1")
        state = shared_model(MODEL).init_state(torch.Generator().manual_seed(0))
        state["item_embedding.weight"] = torch.zeros(12, 3)  # every item scores the same without tags
        opened.set_global(state)
        yield opened


def test_a_device_ranks_its_persons_tags_first_and_not_while_paused(device, tmp_path):
    device.record_many(Event(f"item{i}", "click", time.time() - 100 + i) for i in (1, 4, 7, 4))  # tag 1
    ranked = [r.item_id for r in device.rank(VOCAB.ids)]
    assert set(ranked[:3]) == {"item1", "item4", "item7"} and ranked[3] == "item10"  # half tag 1 next
    device.pause()
    assert set(device.score(list(VOCAB.ids)).tolist()) == {0.0}
    device.pause(False)
    scorer, _ = load_scorer(device.export_scorer(tmp_path / "scorer.pt2"))  # the lift travels in the biases
    expected = device.score(list(VOCAB.ids))
    np.testing.assert_allclose(scorer(torch.arange(12), torch.tensor(9), torch.tensor(1)).numpy(), expected.numpy(),
                               rtol=1e-5, atol=1e-6)


def test_the_loaders_read_tags(tmp_path):
    plain, tagged = synthetic(num_users=8, num_items=200, seed=4), synthetic(num_users=8, num_items=200, tags=6,
                                                                             seed=4)
    assert np.array_equal(plain.items, tagged.items) and plain.item_tags is None  # tags drawn apart
    assert tagged.item_tags is not None and tagged.item_tags.num_tags == 6 and len(tagged.item_tags.tags) == 200
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "u.data").write_text("1\t10\t5\t881250949\n2\t20\t3\t881250950\n")
    (tmp_path / "ml" / "u.item").write_text("10|A (1995)|01-Jan-1995||url|" + "|".join("0100" + "0" * 14 + "1") +
                                            "\n20|B (1995)|01-Jan-1995||url|" + "|".join("0" * 19) + "\n")
    movies = load_movielens(tmp_path / "ml")
    assert movies.item_tags is not None and movies.item_tags.tags.tolist() == [1, 18]
    (tmp_path / "ml" / "u.item").write_text("10|A|x||url|0|1\n")
    with pytest.raises(DataError, match="u.item:1"):
        load_movielens(tmp_path / "ml")
    catalog = tmp_path / "tags.csv"
    catalog.write_text("item,tag\nb,comedy\na,drama\nb,drama\nzzz,horror\n")
    tags = load_tags(catalog, ("a", "b", "c"))
    position, tag, weight = tags.entries(torch.tensor([0, 1, 2]))
    assert tags.num_tags == 2 and list(zip(position.tolist(), tag.tolist(), weight.tolist(), strict=True)) == [
        (0, 1, 1.0), (1, 0, 0.5), (1, 1, 0.5)]  # the unknown item and its tag are skipped
    catalog.write_text("item,genre\na,drama\n")
    with pytest.raises(DataError, match="no column"):
        load_tags(catalog, ("a",))


def test_tags_change_the_ranking_and_nothing_a_device_sends(tmp_path):
    source = DataSource("synthetic", synthetic_users=40, synthetic_tags=5)
    server = ServerConfig(mode="distributed", rounds=3, seed=1)
    runs = {strength: simulate(SimulationConfig(source, server, tmp_path / str(strength), evaluations=1,
                                                tag_affinity=TagAffinity(tag_strength=strength)))
            for strength in (0.0, 1.0)}
    assert runs[1.0]["tags"]["used"] and not runs[0.0]["tags"]["used"]
    assert runs[1.0]["final"] != runs[0.0]["final"]
    assert runs[1.0]["privacy"] == runs[0.0]["privacy"]
    models = [load_checkpoint(tmp_path / str(s) / "checkpoints" / "global_final.pt").state for s in (0.0, 1.0)]
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][name], models[1][name]) for name in models[0])
