"""The mechanism's sensitivity holds for real contributions: adding one event to a device moves
what it releases by at most ``sensitivity`` (shared side) or ``user_sensitivity`` (a refresh step),
rounding and the per-device bound included; noise shares have the planned scale."""


from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attune.client.training import Cohort, LocalData, refresh_users, train_round
from attune.shared.accounting import epsilon_of
from attune.shared.config import Loss, RoundTask, preset
from attune.shared.errors import PrivacyError
from attune.shared.layout import Dense, DenseGradient, EventGradients, Layout, Param
from attune.shared.mechanism import (
    Side,
    add_noise,
    bound,
    calibrated,
    device_bound,
    planned_entries,
    round_entries,
    sensitivity,
    share_std,
    user_sensitivity,
)
from attune.shared.model import ModelConfig, shared_model
from attune.shared.randomness import Stream
from attune.shared.selection import count_gradients, count_layout, select


def _pair(n: int, seed: int, context: bool, trained_items: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = ModelConfig(num_items=40, dim=5, use_context=context, trained_items=trained_items)
    items = torch.randint(0, 40, (n + 1,), generator=g)
    weights = torch.rand(n + 1, generator=g) * 3 + 0.5
    features = torch.rand(n + 1, model.context_features, generator=g) if context else None
    small = LocalData(items[:n], weights[:n], None if features is None else features[:n])
    large = LocalData(items, weights, features)  # one more event, the last: shared events keep their negatives
    return model, small, large


def _selected(model: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """A state whose rows went to 12 of the 40 items (the rest rank by their prior)."""
    shared = shared_model(model)
    counts = torch.rand(model.num_items, generator=torch.Generator().manual_seed(seed)) * 30
    return shared.adopt(shared.init_state(torch.Generator().manual_seed(seed)),
                        select(counts, model.rows, min_count=3.0, negatives=2))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("norm", [1e6, 3.0])
@pytest.mark.parametrize("kind", ["a row per item", "selected rows", "count round"])
def test_one_more_event_moves_a_contribution_by_at_most_the_sensitivity(seed, norm, kind):
    model, small, large = _pair(n=5 + seed * 7, seed=seed, context=seed % 2 == 0,
                                trained_items=0 if kind == "a row per item" else 12)
    state = _selected(model, seed) if model.trained_items else shared_model(model).init_state(
        torch.Generator().manual_seed(seed))
    config = preset("local", negatives=1 + seed % 4, device_norm=norm, quantum_bits=8 + seed % 8, clip=0.5,
                    task=RoundTask.COUNT if kind == "count round" else RoundTask.TRAIN)
    user = torch.randn(1, 5, generator=torch.Generator().manual_seed(100 + seed)) * 3
    released = [train_round(state, model, user, Cohort.of([data]), config, [Stream.seeded_from(seed, "s")], [False],
                            shares=False).contributions[0] for data in (small, large)]
    moved = float((released[1] - released[0]).double().norm())
    assert 0 < moved <= sensitivity(model, config)
    assert float(released[1].double().norm()) <= device_bound(config)  # exactly: the projection truncates
    if kind == "count round" and norm > 1e5:  # unprojected, one event moves exactly its item's count by one clip
        assert released[1].shape == (40,) and moved == pytest.approx(2.0**config.quantum_bits, abs=1)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("bits", [10, 20, 24])  # float32 clipping was coarser than the grid from 20 bits
def test_one_more_event_moves_a_refresh_step_by_at_most_its_sensitivity(seed, bits):
    model, small, large = _pair(n=3 + seed * 5, seed=seed, context=False)
    state = shared_model(model).init_state(torch.Generator().manual_seed(seed))
    config = preset("local", user_steps=1, user_clip=0.3, quantum_bits=bits, user_noise_multiplier=1e-9)
    sums = []
    for data in (small, large):  # the step is user_lr along the noised sum: recover the sum itself
        captured = {}

        def capture(total, std, streams, captured=captured):
            captured["sum"] = total
            return total

        import attune.client.training as training

        real, training.add_noise = training.add_noise, capture
        try:
            refresh_users(state, shared_model(model), torch.ones(1, 5), Cohort.of([data]), config,
                           [Stream.seeded_from(seed, "u")], [0])
        finally:
            training.add_noise = real
        sums.append(captured["sum"][0])
    assert float((sums[1] - sums[0]).double().norm()) <= user_sensitivity(model, config)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bits", [20, 24])
def test_the_shared_side_keeps_its_sensitivity_on_the_finest_grids(seed, bits):
    model, small, large = _pair(n=4 + seed * 9, seed=seed, context=seed % 2 == 1)
    state = shared_model(model).init_state(torch.Generator().manual_seed(seed))
    config = preset("local", negatives=2, device_norm=1e6, quantum_bits=bits, clip=0.37)
    user = torch.randn(1, 5, generator=torch.Generator().manual_seed(seed)) * 3
    released = [train_round(state, model, user, Cohort.of([data]), config, [Stream.seeded_from(seed, "s")], [False],
                            shares=False).contributions[0] for data in (small, large)]
    assert float((released[1] - released[0]).double().norm()) <= sensitivity(model, config)


@pytest.mark.parametrize("bits", [16, 20, 24])
def test_one_event_alone_moves_a_refresh_by_at_most_its_sensitivity_on_fine_grids(bits):
    """10,000 single-event devices with float32 gradients of norms up to 1e4: clipping in float32
    left norms a few 1e-7 over the clip, which is units over at 24 bits."""
    g = torch.Generator().manual_seed(bits)
    grads = torch.randn(10_000, 5, generator=g) * torch.logspace(-2, 4, 10_000).unsqueeze(1)
    model = ModelConfig(num_items=40, dim=5, use_context=False, trained_items=0)
    config = preset("local", quantum_bits=bits, user_clip=0.3)
    gradients = EventGradients((DenseGradient(Dense("user"), grads.float()),))
    sums = bound(gradients, Layout((Param("user", (5,)),)), torch.arange(10_000), 10_000, config, clip=0.3,
                 project=False)
    assert float(sums.double().norm(dim=1).max()) <= user_sensitivity(model, config)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.floats(-1.0, 1.0), min_size=6, max_size=6), min_size=1, max_size=40),
       st.sampled_from([0.05, 0.5, 1.0, 2.0, 7.0]))
def test_a_device_sum_never_exceeds_its_bound_at_four_bits(rows, device_norm):
    config = preset("local", quantum_bits=4, device_norm=device_norm, clip=1.0)
    layout = Layout((Param("w", (6,)),))
    gradients = EventGradients((DenseGradient(Dense("w"), torch.tensor(rows, dtype=torch.float32)),))
    bounded = bound(gradients, layout, torch.zeros(len(rows), dtype=torch.long), 1, config)
    assert float(bounded.double().norm()) <= device_bound(config)


def test_the_constructed_overshoot_of_a_rounding_projection_is_gone():
    """Four coordinates of one unit at radius 1.2 scale to 0.6 each: rounding gave norm 2 (1.67x)."""
    config = preset("local", quantum_bits=4, device_norm=1.2 / 16, clip=1.0)
    gradients = EventGradients((DenseGradient(Dense("w"), torch.eye(4) / 16),))
    bounded = bound(gradients, Layout((Param("w", (4,)),)), torch.zeros(4, dtype=torch.long), 1, config)
    assert float(bounded.double().norm()) <= 1.2


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_contribution_outside_its_bound_is_refused_not_sent(bad):
    config = preset("local", quantum_bits=8, clip=1.0)
    values = torch.tensor([[0.1, bad, 0.2]])
    gradients = EventGradients((DenseGradient(Dense("w"), values),))
    with pytest.raises(PrivacyError):
        bound(gradients, Layout((Param("w", (3,)),)), torch.zeros(1, dtype=torch.long), 1, config)


@pytest.mark.parametrize("weight", [1e-30, 1.0, 1e6])
def test_bpr_with_negatives_equal_to_the_positive_stays_within_its_bound(weight):
    """With two items most negatives are the positive item itself: the event's columns cancel and
    the closed-form squared norm can come out slightly negative (it gave NaN, then INT64_MIN)."""
    model = ModelConfig(num_items=2, dim=5, use_context=False, trained_items=0)
    state = shared_model(model).init_state(torch.Generator().manual_seed(0))
    config = preset("local", negatives=4, loss=Loss.BPR, quantum_bits=8, clip=0.5)
    items = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1] * 4)
    small = LocalData(items[:-1], torch.full((len(items) - 1,), weight), None)
    large = LocalData(items, torch.full((len(items),), weight), None)
    released = [train_round(state, model, torch.ones(1, 5), Cohort.of([data]), config,
                            [Stream.seeded_from(1, "s")], [False], shares=False).contributions[0]
                for data in (small, large)]
    assert all(float(r.double().norm()) <= device_bound(config) for r in released)
    assert float((released[1] - released[0]).double().norm()) <= sensitivity(model, config)


def test_noise_shares_have_the_planned_std_and_sum_to_the_full_noise():
    config = preset("distributed", noise_multiplier=0.001, quantum_bits=12, min_survivors=4)
    zero = torch.zeros(4, 50_000, dtype=torch.long)
    noisy = add_noise(zero, share_std(config), [Stream.seeded_from(9, k) for k in range(4)])
    assert float(noisy.double().std()) == pytest.approx(share_std(config), rel=0.02)
    assert float(noisy.sum(0).double().std()) == pytest.approx(0.001 * 2**12, rel=0.02)  # 4 shares: all the noise


def test_planned_ledger_adds_up_the_rounds_and_refreshes():
    model = ModelConfig(num_items=40, dim=5, use_context=False, trained_items=0)
    config = preset("distributed", min_survivors=10, user_every=3, noise_multiplier=4.0, user_noise_multiplier=3.0)
    rounds = [round_entries(model, config, config.refresh_due(k)) for k in range(7)]
    flat = [entry for entries in rounds for entry in entries]
    planned = planned_entries(model, config, 7)
    user = [sum(e.count for e in entries if e.mechanism.dim == model.dim) for entries in (planned, flat)]
    assert user == [6, 6]
    assert sum(e.count for e in planned if e.mechanism.dim != model.dim) == 7


def test_a_planned_ledger_holds_the_count_round_once():
    model = ModelConfig(num_items=40, dim=5, use_context=False)
    config = preset("distributed", min_survivors=10, user_every=3, noise_multiplier=4.0, user_noise_multiplier=3.0)
    count = preset("distributed", min_survivors=10, noise_multiplier=2.0, task=RoundTask.COUNT)
    planned = planned_entries(model, config, 7, count=count)
    (counting,) = [e for e in planned if e.mechanism.dim == model.num_items]  # one number per catalog item
    assert counting.count == 1 and counting.mechanism.z == pytest.approx(2.0 * 2**16 / sensitivity(model, count))
    assert planned[1:] == planned_entries(model, config, 7)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_the_budget_split_holds_in_accounted_terms_at_any_grid(bits):
    """Issue 19, item 9: the split was on the nominal multiplier (refreshes got 0.0085 of the
    budget at 4 bits instead of 0.3); now each part's share of rho = 1/(2 z^2) is as planned."""
    model = ModelConfig(num_items=200, dim=8, use_context=False, trained_items=0)
    config = preset("distributed", min_survivors=20, quantum_bits=bits, user_every=2, user_steps=1)
    count = preset("distributed", min_survivors=20, quantum_bits=bits, task=RoundTask.COUNT)
    evaluation = preset("distributed", min_survivors=20, quantum_bits=bits, task=RoundTask.EVALUATE)
    train, counting, evaluating = calibrated(model, config, epsilon=4.0, delta=1e-5, participations=10,
                                             user_share=0.3, count=Side(count, 1, 0.1),
                                             evaluation=Side(evaluation, 3, 0.05))
    entries = planned_entries(model, train, 10, count=counting, evaluation=evaluating, evaluations=3)
    assert epsilon_of(entries, 1e-5) == pytest.approx(4.0, rel=1e-3)
    rho = {"user": 0.0, "count": 0.0, "evaluation": 0.0, "train": 0.0}
    for e in entries:
        part = {model.dim: "user", model.num_items: "count", 5: "evaluation"}.get(e.mechanism.dim, "train")
        rho[part] += e.count / (2 * e.mechanism.z**2)
    total = sum(rho.values())
    assert rho["user"] / total == pytest.approx(0.3, rel=1e-6)
    assert rho["count"] / total == pytest.approx(0.1, rel=1e-6)
    assert rho["evaluation"] / total == pytest.approx(0.05, rel=1e-6)


@pytest.mark.parametrize("bits", [4, 16])
def test_the_device_floor_is_on_the_accounted_noise_multiplier(bits):
    """At 4 bits a nominal multiplier of 1 was accounted as z = 0.06 (342 epsilon in one round)."""
    from attune.client.policy import PrivacyConfig, noise_refusal

    model = ModelConfig(num_items=200, dim=8, use_context=False, trained_items=0)
    floor = PrivacyConfig(min_noise_multiplier=1.0)
    nominal = preset("local", quantum_bits=bits, noise_multiplier=1.0, user_noise_multiplier=1.0)
    accounted = min(e.mechanism.z for e in round_entries(model, nominal, refresh=True))
    assert (noise_refusal(model, nominal, floor) is None) == (accounted >= 1.0)
    lifted = replace(nominal, noise_multiplier=1.0 * sensitivity(model, nominal) / 2**bits,
                     user_noise_multiplier=1.0 * user_sensitivity(model, nominal) / 2**bits)
    assert noise_refusal(model, lifted, floor) is None
    assert min(e.mechanism.z for e in round_entries(model, lifted, refresh=True)) == pytest.approx(1.0)
    if bits == 4:
        assert noise_refusal(model, nominal, floor) is not None


def test_a_catalog_wide_count_is_projected_as_a_whole_not_per_slice():
    """A count over more columns than one pass of the projection (65,536: here 131,072) is scaled
    by its whole norm: the same as one float64 pass over the row, and within its bound."""
    config = preset("local", quantum_bits=4, device_norm=3.0, clip=1.0)
    items = torch.tensor([5, 5, 9, 70_000, 70_000, 70_000, 131_000] * 3)
    layout = count_layout(131_072)
    device = torch.zeros(len(items), dtype=torch.long)
    raw = bound(count_gradients(items, config.clip), layout, device, 1, config, project=False)
    projected = bound(count_gradients(items, config.clip), layout, device, 1, config)
    expected = torch.trunc(raw.double() * (device_bound(config) / raw.double().norm())).long()
    assert float(raw.double().norm()) > device_bound(config)
    assert torch.equal(projected, expected) and float(projected.double().norm()) <= device_bound(config)
