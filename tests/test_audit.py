"""The one-run privacy audit finds leakage without DP and stays below the accounted epsilon with it."""

import math

import pytest
from scipy.stats import binom

from attune.shared.config import TrainConfig
from attune.shared.model import ModelConfig
from attune.simulations.audit import audit, epsilon_lower_bound
from attune.simulations.datasets import synthetic
from attune.simulations.evaluation import leave_one_out


def test_lower_bound_is_where_the_binomial_tail_crosses_beta():
    bound = epsilon_lower_bound(guesses=100, correct=90, beta=0.05)
    p = 1 / (1 + math.exp(-bound))
    assert binom.sf(89, 100, p) == pytest.approx(0.05, rel=1e-3)
    assert epsilon_lower_bound(guesses=100, correct=50) == 0.0  # chance level refutes nothing


@pytest.fixture(scope="module")
def population():
    log = synthetic(num_users=600, seed=5)
    return log, leave_one_out(log, seed=5)


def test_audit_without_dp_finds_a_clearly_positive_lower_bound(population):
    log, split = population
    model = ModelConfig(num_items=log.num_items, dim=4, use_context=False)
    result = audit(log, split, model, TrainConfig(private=False, sample_rate=1.0, local_epochs=2,
                                                  user_epochs=1, lr=1.0), seed=1)
    assert result.epsilon_accounted is None and result.correct > 0.9 * result.guesses
    assert result.epsilon_lower_bound > 1.5


def test_audit_with_dp_stays_below_the_accounted_epsilon(population):
    log, split = population
    model = ModelConfig(num_items=log.num_items, dim=4, use_context=False)
    result = audit(log, split, model, TrainConfig(noise_multiplier=1.0, sample_rate=1.0, local_epochs=2,
                                                  user_epochs=1, lr=1.0), seed=1)
    assert result.epsilon_accounted > 1.0
    assert result.epsilon_lower_bound < result.epsilon_accounted
