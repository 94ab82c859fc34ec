"""The private choice of segment (IFCA): the exponential mechanism and its accounting, checked
against closed forms computed independently here."""

import numpy as np
import pytest
import torch

from attune.client.training import LocalData
from attune.shared.accounting import calibrate_noise, epsilon_of
from attune.shared.model import ModelConfig, Personalization
from attune.shared.selection import choice_entry, choices, private_choice
from attune.simulations.algorithms import SEGMENT_LOSS_BOUND, choose_segment, segment_scores


def _probabilities(scores: np.ndarray, sensitivity: float, epsilon: float) -> np.ndarray:
    weights = np.exp(epsilon * (scores - scores.max()) / (2 * sensitivity))
    return weights / weights.sum()


def test_choices_follow_the_exponential_mechanism():
    scores = torch.tensor([-3.0, -1.0, -2.5])
    generator = torch.Generator().manual_seed(0)
    draws = [private_choice(scores, sensitivity=1.0, epsilon=2.0, generator=generator) for _ in range(20_000)]
    observed = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(observed, _probabilities(scores.numpy(), 1.0, 2.0), atol=0.012)


def test_one_event_moves_each_probability_by_at_most_e_to_the_epsilon():
    rng = np.random.default_rng(1)
    epsilon, bound = 0.7, 2.0
    for _ in range(200):
        scores = rng.uniform(-20, 0, size=4)
        neighbour = scores - rng.uniform(0, bound, size=4)  # one more event: each score drops by <= bound
        ratio = np.log(_probabilities(scores, bound, epsilon) / _probabilities(neighbour, bound, epsilon))
        assert np.abs(ratio).max() <= epsilon + 1e-9


def test_a_choice_is_ledgered_as_epsilon_squared_over_8_zcdp():
    from opacus.accountants.analysis.rdp import compute_rdp

    epsilon = 0.3
    sigma, rate, steps = choice_entry(epsilon)
    orders = [1.5, 2.0, 8.0, 32.0]
    rdp = compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=orders)
    np.testing.assert_allclose(rdp, [a * epsilon**2 / 8 for a in orders], rtol=1e-9)
    assert choices(epsilon, 0) == [] and choices(epsilon, 5) == [(sigma, 1.0, 5)]


def test_noise_calibrated_with_choices_lands_on_the_budget():
    also = choices(0.3, 10)
    sigma = calibrate_noise(epsilon=8.0, delta=1e-5, sample_rate=1.0, steps=50, also=also)
    assert epsilon_of([(sigma, 1.0, 50), *also], 1e-5) <= 8.0
    assert epsilon_of([(sigma * 0.99, 1.0, 50), *also], 1e-5) > 8.0
    assert sigma > calibrate_noise(epsilon=8.0, delta=1e-5, sample_rate=1.0, steps=50)
    with pytest.raises(ValueError, match="no budget"):
        calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=1.0, steps=50, also=choices(0.3, 100))


def test_one_event_moves_a_segment_score_by_at_most_the_bound():
    config = ModelConfig(num_items=30, dim=4, use_context=False)
    model = Personalization(config, torch.Generator().manual_seed(0))
    states = []
    for seed in range(3):
        with torch.no_grad():
            model.item_embedding.weight.normal_(0, 3, generator=torch.Generator().manual_seed(seed))
            model.item_bias.weight.normal_(0, 3, generator=torch.Generator().manual_seed(seed + 10))
        states.append(model.global_state())
    items = torch.randint(0, 30, (12,), generator=torch.Generator().manual_seed(5))
    vector = torch.randn(4, generator=torch.Generator().manual_seed(6)) * 3
    data = LocalData(items=items, weights=torch.ones(12), context=None)
    fewer = LocalData(items=items[:-1], weights=torch.ones(11), context=None)
    change = segment_scores(model, states, fewer, vector) - segment_scores(model, states, data, vector)
    assert bool((change >= 0).all()) and float(change.max()) <= SEGMENT_LOSS_BOUND + 1e-6


def test_without_dp_a_device_joins_the_best_fitting_segment():
    config = ModelConfig(num_items=30, dim=4, use_context=False)
    model = Personalization(config, torch.Generator().manual_seed(0))
    liked = model.global_state()
    with torch.no_grad():
        liked["item_bias.weight"][:10] += 5.0  # this segment scores items 0-9 far higher
    data = LocalData(items=torch.arange(10), weights=torch.ones(10), context=None)
    states = [model.global_state(), liked]
    vector = torch.zeros(4)
    assert choose_segment(model, states, data, vector, None, torch.Generator().manual_seed(0)) == 1
