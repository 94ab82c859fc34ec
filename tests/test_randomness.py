"""Noise and sampling: the right distributions, from the right stream, in the same order alone or
batched; secure streams are unpredictable, seeded ones repeat."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from attune.shared.randomness import (
    Stream,
    add_discrete_gaussian,
    bernoulli,
    discrete_gaussian,
    gumbel,
    integers,
    normal,
)


def _discrete_gaussian_pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    wide = np.arange(-int(20 * sigma) - 5, int(20 * sigma) + 6)
    mass = np.exp(-(wide.astype(float) ** 2) / (2 * sigma**2))
    table = dict(zip(wide.tolist(), (mass / mass.sum()).tolist(), strict=True))
    return np.array([table.get(int(x), 0.0) for x in support])


@pytest.mark.parametrize("sigma", [0.7, 3.0, 40.0])
def test_discrete_gaussian_has_the_exact_distribution(sigma):
    draws = discrete_gaussian([Stream.seeded_from(1, "dg", sigma)], 60_000, sigma)[0].numpy()
    support = np.arange(-int(4 * sigma) - 1, int(4 * sigma) + 2)
    counts = np.array([(draws == x).sum() for x in support])
    expected = _discrete_gaussian_pmf(sigma, support) * len(draws)
    keep = expected > 20  # chi-square on the cells with enough mass, the tails merged into one
    observed = np.append(counts[keep], len(draws) - counts[keep].sum())
    wanted = np.append(expected[keep], len(draws) - expected[keep].sum())
    assert stats.chisquare(observed, wanted).pvalue > 1e-3
    assert float(draws.var()) == pytest.approx(float((_discrete_gaussian_pmf(sigma, support) * support**2).sum()),
                                               rel=0.05)


def test_rows_are_drawn_from_their_own_stream_alone_or_together():
    together = discrete_gaussian([Stream.seeded_from(0, k) for k in range(3)], 500, 7.0)
    alone = torch.cat([discrete_gaussian([Stream.seeded_from(0, k)], 500, 7.0) for k in range(3)])
    assert torch.equal(together, alone)


def test_gaussian_noise_has_the_asked_std_and_no_bias():
    draws = normal(Stream.seeded_from(2, "n"), (200_000,), 3.0)
    assert float(draws.std()) == pytest.approx(3.0, rel=0.01)
    assert abs(float(draws.mean())) < 0.03
    assert stats.kstest(draws.numpy() / 3.0, "norm").pvalue > 1e-3


def test_masks_integers_and_gumbel_are_uniform_where_they_should_be():
    stream = Stream.seeded_from(3, "u")
    u = stream.uniform(100_000).numpy()
    assert 0 < u.min() and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-3
    picks = integers(stream, (60_000,), 7).numpy()
    assert set(np.unique(picks)) == set(range(7))
    assert stats.chisquare(np.bincount(picks, minlength=7)).pvalue > 1e-3
    assert float(bernoulli(stream, 100_000, 0.3).double().mean()) == pytest.approx(0.3, abs=0.01)
    euler = 0.5772156649
    assert float(gumbel(stream, 200_000).mean()) == pytest.approx(euler, abs=0.02)


def test_seeded_streams_repeat_and_secure_ones_do_not():
    assert torch.equal(Stream.seeded_from(5, "a").uniform(10), Stream.seeded_from(5, "a").uniform(10))
    assert not torch.equal(Stream.seeded_from(5, "a").uniform(10), Stream.seeded_from(5, "b").uniform(10))
    first, second = Stream.secure(), Stream.secure()
    assert not first.seeded and Stream.seeded_from(1).seeded
    assert not torch.equal(first.uniform(4), second.uniform(4))


def test_a_stream_never_repeats_its_words():
    words = Stream.seeded_from(6).words(1 << 17)
    assert len(np.unique(words)) == len(words)
    assert math.isclose(float(np.mean(words / 2.0**64)), 0.5, abs_tol=0.01)


def test_noise_added_in_place_is_the_same_draws():
    values = torch.arange(40_000, dtype=torch.long).reshape(2, 20_000)  # over one chunk of the sampler
    expected = values + discrete_gaussian([Stream.seeded_from(3, k) for k in range(2)], 20_000, 5.0)
    out = add_discrete_gaussian(values, [Stream.seeded_from(3, k) for k in range(2)], 5.0)
    assert out is values and torch.equal(values, expected)
