"""The one-run privacy audit measures something: without DP it certifies a clearly positive
epsilon close to what the run could certify at most; with DP its bound stays below the accounted
epsilon, and the audit says how much it could have shown."""

import math

import pytest
from scipy.stats import binom

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
    log = synthetic(num_users=1000, events_per_user=40, num_items=300, seed=5)
    return log, leave_one_out(log, seed=5)


def test_audit_without_dp_certifies_nearly_all_it_can(population):
    result = audit(*population, noise_multiplier=None, seed=1)
    assert result.epsilon_accounted is None and result.correct >= 0.95 * result.guesses
    assert result.epsilon_lower_bound > 0.7 * result.epsilon_certifiable > 2.5


def test_audit_with_dp_finds_signal_but_stays_below_the_accounted_epsilon(population):
    result = audit(*population, noise_multiplier=1.0, seed=1)
    assert result.epsilon_accounted > 4.0  # one round at noise 1: a large epsilon to audit against
    assert result.correct > 0.6 * result.guesses  # the canaries are seen through the noise
    assert 0 < result.epsilon_lower_bound < min(result.epsilon_accounted, result.epsilon_certifiable)
