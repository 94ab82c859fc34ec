"""Nothing unaccounted leaves a device: what the coordinator receives cannot tell a device with n
events from one with n + 1, or a canary event from none, better than the round's accounted
epsilon allows; nor can its size.

Each check runs 1,000 independent rounds per side at a per-round epsilon near 1, attacks them
with several statistics (noise scale of untouched rows, norm, projection on the extra event's
own gradient: the Neyman-Pearson test), picks each attack's threshold on one half of the trials
and measures its accuracy on the other half. For (epsilon, delta)-DP no test is right more often
than ``(e^eps + delta) / (e^eps + 1)``. A control runs the same attacks on the old normalisation
(dividing by the number of events, as before this issue's fix) and must exceed that bound: the
test can fail.
"""

import math

import numpy as np
import pytest
import torch

from attune.client.training import Cohort, LocalData, initial_user_vector, train_round
from attune.shared.accounting import epsilon_of
from attune.shared.config import RoundTask, preset
from attune.shared.mechanism import local_entries, round_entries, units
from attune.shared.model import ModelConfig, shared_model
from attune.shared.randomness import Stream, integers
from attune.shared.records import contribution_content

MODEL = ModelConfig(num_items=200, dim=4, use_context=False, trained_items=0)
TRIALS = 1000
DELTA = 1e-5


def _bound(epsilon: float) -> float:
    return (math.exp(epsilon) + DELTA) / (math.exp(epsilon) + 1)


def _held_out_accuracy(a: np.ndarray, b: np.ndarray) -> float:
    """Best threshold (either direction) chosen on the first half of each side, accuracy on the rest."""
    half = len(a) // 2
    fit_a, fit_b, test_a, test_b = a[:half], b[:half], a[half:], b[half:]
    best, rule = 0.0, (0.0, 1)
    for threshold in np.concatenate([fit_a, fit_b]):
        for sign in (1, -1):
            accuracy = ((sign * fit_b > sign * threshold).mean() + (sign * fit_a <= sign * threshold).mean()) / 2
            if accuracy > best:
                best, rule = accuracy, (threshold, sign)
    threshold, sign = rule
    return float(((sign * test_b > sign * threshold).mean() + (sign * test_a <= sign * threshold).mean()) / 2)


def _rounds(data: LocalData, config, side: str, user: torch.Tensor, devices: int = 1) -> torch.Tensor:
    """``TRIALS`` independent releases: each the sum over ``devices`` devices (the first holding
    ``data``, the others a fixed log) of one round's contribution, noise included."""
    state = shared_model(MODEL).init_state(torch.Generator().manual_seed(0))
    others = [LocalData(torch.arange(10 * k, 10 * k + 10), torch.ones(10), None) for k in range(1, devices)]
    total = None
    for k, dataset in enumerate([data, *others]):
        out = train_round(state, MODEL, user.expand(TRIALS, -1), Cohort.of([dataset] * TRIALS), config,
                          [Stream.seeded_from(trial, side, k) for trial in range(TRIALS)], [False] * TRIALS)
        total = out.contributions if total is None else total + out.contributions
    return total.double()


def _attacks(small: torch.Tensor, large: torch.Tensor, data: LocalData, extra: int, config,
             user: torch.Tensor) -> dict[str, float]:
    """Accuracy of each attack at telling ``large`` (one more event, item ``extra``) from ``small``."""
    touched = torch.zeros(MODEL.num_items, dtype=torch.bool)
    touched[data.items] = True
    touched[extra] = True
    rows = torch.arange(MODEL.num_items * MODEL.dim).view(MODEL.num_items, MODEL.dim)
    untouched = torch.cat([rows[~touched].reshape(-1), MODEL.num_items * MODEL.dim + (~touched).nonzero().squeeze(1)])
    direction = torch.zeros(small.shape[1], dtype=torch.float64)
    direction[extra * MODEL.dim:(extra + 1) * MODEL.dim] = -user[0].double()  # the positive's gradient: -(u, 1)
    direction[MODEL.num_items * MODEL.dim + extra] = -1.0

    def scale(x: torch.Tensor) -> np.ndarray:
        values = x[:, untouched]
        return (values - values.median(dim=1, keepdim=True).values).abs().median(dim=1).values.numpy()

    statistics = {"noise scale of untouched rows": scale, "norm": lambda x: x.norm(dim=1).numpy(),
                  "projection on the extra event": lambda x: (x @ direction).numpy()}
    return {name: _held_out_accuracy(f(small), f(large)) for name, f in statistics.items()}


def _data(n: int) -> tuple[LocalData, LocalData, int]:
    g = torch.Generator().manual_seed(7)
    items = torch.randint(0, MODEL.num_items // 2, (n,), generator=g)
    extra = MODEL.num_items - 1  # an item the device never used
    return (LocalData(items, torch.ones(n), None),
            LocalData(torch.cat([items, torch.tensor([extra])]), torch.ones(n + 1), None), extra)


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_event_count_and_canary_leak_no_more_than_the_accounted_epsilon(mode):
    devices = 1 if mode == "local" else 5
    config = preset(mode, noise_multiplier=4.8, negatives=1, min_survivors=devices)
    epsilon = epsilon_of(round_entries(MODEL, config, refresh=False), DELTA)
    assert 0.8 < epsilon < 1.2  # a per-round epsilon near 1: the bound below is tight enough to fail
    user = initial_user_vector(MODEL.dim, Stream.seeded_from(0, "user")).unsqueeze(0) * 3
    small, large, extra = _data(10)  # 10 events, or the same 10 and a canary: add one event
    seen = _attacks(_rounds(small, config, "a", user, devices), _rounds(large, config, "b", user, devices),
                    small, extra, config, user)
    slack = 3 * math.sqrt(0.25 / TRIALS)  # three standard deviations of a held-out accuracy
    for attack, accuracy in seen.items():
        assert accuracy <= _bound(epsilon) + slack, (attack, accuracy, _bound(epsilon))


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_a_count_round_leaks_no_more_than_its_accounted_epsilon(mode):
    """The count round releases the most direct trace of an event, its item's count: the canary's
    own coordinate is the Neyman-Pearson test."""
    devices = 1 if mode == "local" else 5
    config = preset(mode, noise_multiplier=4.8, min_survivors=devices, task=RoundTask.COUNT)
    epsilon = epsilon_of(round_entries(MODEL, config, refresh=False), DELTA)
    assert 0.8 < epsilon < 1.2
    small, large, extra = _data(10)
    user = torch.zeros(1, MODEL.dim)
    counted = [_rounds(data, config, side, user, devices) for data, side in ((small, "a"), (large, "b"))]
    untouched = torch.ones(MODEL.num_items, dtype=torch.bool)
    untouched[small.items] = False
    untouched[extra] = False
    statistics = {"canary's count": lambda x: x[:, extra].numpy(), "norm": lambda x: x.norm(dim=1).numpy(),
                  "spread of untouched counts": lambda x: x[:, untouched].std(dim=1).numpy()}
    for attack, f in statistics.items():
        accuracy = _held_out_accuracy(f(counted[0]), f(counted[1]))
        assert accuracy <= _bound(epsilon) + 3 * math.sqrt(0.25 / TRIALS), (attack, accuracy, _bound(epsilon))
    weak = preset(mode, noise_multiplier=0.3, min_survivors=devices, task=RoundTask.COUNT)  # control: power
    seen = [_rounds(data, weak, side, user, devices) for data, side in ((small, "a"), (large, "b"))]
    assert _held_out_accuracy(seen[0][:, extra].numpy(), seen[1][:, extra].numpy()) > _bound(epsilon) + 0.1


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_a_count_pass_in_slices_leaks_no_more_than_its_one_charge(mode, monkeypatch):
    """A 200-item catalog counted in two slices of 100: the device pays the first slice's entry
    once for the pass. The canary's item lies in the second slice, so the first slice's release is
    the very same with or without it, and the two releases together are no easier to tell apart
    than that one charge allows."""
    from attune.shared import selection

    monkeypatch.setattr(selection, "SLICE_ITEMS", 100)
    devices = 1 if mode == "local" else 5
    slices = [preset(mode, noise_multiplier=4.8, min_survivors=devices, task=RoundTask.COUNT, count_part=part)
              for part in range(2)]
    epsilon = epsilon_of(round_entries(MODEL, slices[0], refresh=False), DELTA)  # what the pass is charged
    assert 0.8 < epsilon < 1.2
    small, large, extra = _data(10)  # the device's items in the first slice, the canary in the second
    user = torch.zeros(1, MODEL.dim)
    first = _rounds(small, slices[0], "a0", user, devices)
    assert torch.equal(first, _rounds(large, slices[0], "a0", user, devices))  # same noise: the canary is unseen
    passes = [torch.cat([_rounds(data, config, f"{side}{config.count_part}", user, devices) for config in slices],
                        dim=1) for data, side in ((small, "a"), (large, "b"))]
    statistics = {"canary's count": lambda x: x[:, extra].numpy(), "norm": lambda x: x.norm(dim=1).numpy(),
                  "first slice's norm": lambda x: x[:, :100].norm(dim=1).numpy()}
    for attack, f in statistics.items():
        accuracy = _held_out_accuracy(f(passes[0]), f(passes[1]))
        assert accuracy <= _bound(epsilon) + 3 * math.sqrt(0.25 / TRIALS), (attack, accuracy, _bound(epsilon))


def test_each_share_alone_leaks_no_more_than_epsilon_local():
    config = preset("distributed", noise_multiplier=4.8 * math.sqrt(5), negatives=1, min_survivors=5)
    epsilon_local = epsilon_of(local_entries(MODEL, config, refresh=False), DELTA)
    user = initial_user_vector(MODEL.dim, Stream.seeded_from(0, "user")).unsqueeze(0) * 3
    small, large, extra = _data(10)
    seen = _attacks(_rounds(small, config, "a", user), _rounds(large, config, "b", user), small, extra, config, user)
    for attack, accuracy in seen.items():
        assert accuracy <= _bound(epsilon_local) + 3 * math.sqrt(0.25 / TRIALS), (attack, accuracy)


def test_the_attacks_catch_the_old_normalisation():
    """Control: dividing the noised sum by the number of events (what the round did before) leaks
    the count far beyond the bound, and these attacks see it."""
    config = preset("local", noise_multiplier=4.8, negatives=1)
    epsilon = epsilon_of(round_entries(MODEL, config, refresh=False), DELTA)
    user = initial_user_vector(MODEL.dim, Stream.seeded_from(0, "user")).unsqueeze(0) * 3
    small, large, extra = _data(10)
    old = [_rounds(data, config, side, user) / len(data) for data, side in ((small, "a"), (large, "b"))]
    seen = _attacks(*old, small, extra, config, user)
    assert max(seen.values()) > _bound(epsilon) + 0.1


def test_what_is_sent_has_the_same_size_whatever_the_events():
    config = preset("local", noise_multiplier=4.8)
    user = initial_user_vector(MODEL.dim, Stream.seeded_from(0, "user")).unsqueeze(0)
    state = shared_model(MODEL).init_state(torch.Generator().manual_seed(0))
    sizes = set()
    for n in (0, 1, 40, 400):
        data = LocalData(integers(Stream.seeded_from(n, "i"), (n,), MODEL.num_items), torch.ones(n), None)
        out = train_round(state, MODEL, user, Cohort.of([data]), config, [Stream.seeded_from(n)], [False])
        content = contribution_content(out.contributions[0])
        (record,) = content.array_records.values()
        sizes.add((tuple(record.keys()), len(record["contribution"].data)))
        assert set(content.metric_records) == set() and set(content.config_records) == set()
    assert len(sizes) == 1 and units(config) > 0


def test_what_a_device_ranks_with_never_enters_what_it_sends(tmp_path):
    """The ranking a device fits after a round (ditto's own item biases) and the catalog's tags are
    on-device post-processing: two devices alike but for them send the same vectors, pay the same
    ledger and keep the same DP user vector, round after round, ranking in between."""
    from device_helpers import MODEL as DEVICE_MODEL
    from device_helpers import VOCAB, request

    from attune.client.personalizer import Personalizer
    from attune.shared.events import Event
    from attune.shared.tags import ItemTags

    tags = ItemTags.of([[i % 3] for i in range(DEVICE_MODEL.num_items)], 3)
    sent, paid, users = [], [], []
    for ranking, item_tags in (("partial-local", None), ("ditto", tags), ("global", tags)):
        with Personalizer(tmp_path / f"{ranking}.sqlite", model=DEVICE_MODEL, vocabulary=VOCAB, tags=item_tags,
                          ranking=ranking, simulation_seed=(0, 3)) as device:
            device.grant_consent("test-policy-1")
            device.record_many(Event(f"item{i % 12}", "click", 1.7e9 + i) for i in range(36))
            vectors = []
            for number in (1, 2, 3):
                outcome = device.contribute(request(number, model=DEVICE_MODEL, user_every=1))
                assert outcome.vector is not None
                vectors.append(outcome.vector)
                device.rank(list(VOCAB.ids))  # ranking between rounds reads the tags and the fitted side
            sent.append(torch.stack(vectors))
            paid.append([row.entries for row in device.store.ledger()])
            users.append(device.export()["local_model"]["user_vector"])
    for other in (1, 2):
        assert torch.equal(sent[0], sent[other]) and paid[0] == paid[other] and users[0] == users[other]
