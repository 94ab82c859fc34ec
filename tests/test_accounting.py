"""Every epsilon Attune prints recomputes with an independent accountant: dp-accounting's RDP
(integer orders, to 0.1%) and PLD (never above ours); the distributed discrete Gaussian's closed
form is checked against the exact Renyi divergence of summed discrete Gaussians."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from scipy.special import logsumexp

from attune.shared.accounting import (
    ORDERS,
    ZCDP,
    DiscreteGaussianSum,
    Entry,
    Gaussian,
    calibrate,
    distributed_tau,
    epsilon_of,
    ledger_from_json,
)
from attune.shared.errors import ConfigError

LEDGER = [Entry(DiscreteGaussianSum(z=6.3, dim=28_000), count=100),
          Entry(DiscreteGaussianSum(z=4.9, dim=16), count=20),
          Entry(Gaussian(z=1.1, q=0.05), count=10),
          Entry(ZCDP(rho=0.01), count=3)]


def _independent(ledger, delta):
    """dp-accounting's RDP and PLD accountants on the same mechanisms (a discrete Gaussian sum
    with tau * dim below 1e-12 is the Gaussian mechanism to within that)."""
    events = []
    for entry in ledger:
        mechanism = entry.mechanism
        if isinstance(mechanism, ZCDP):
            event = dp_accounting.ZCDpEvent(mechanism.rho)
        else:
            event = dp_accounting.GaussianDpEvent(mechanism.z)
            if isinstance(mechanism, Gaussian) and mechanism.q < 1:
                event = dp_accounting.PoissonSampledDpEvent(mechanism.q, event)
        events.append(dp_accounting.SelfComposedDpEvent(event, entry.count))
    composed = dp_accounting.ComposedDpEvent(events)
    by_rdp = rdp.RdpAccountant(orders=list(ORDERS)).compose(composed).get_epsilon(delta)
    gaussian = [e for e in events if not isinstance(e.event, dp_accounting.ZCDpEvent)]
    by_pld = pld.PLDAccountant().compose(dp_accounting.ComposedDpEvent(gaussian)).get_epsilon(delta)
    return by_rdp, by_pld


def test_epsilon_recomputes_with_dp_accounting():
    sums = [e.mechanism for e in LEDGER if isinstance(e.mechanism, DiscreteGaussianSum)]
    assert max(m.tau * m.dim for m in sums) < 1e-12
    ours = epsilon_of(LEDGER, 1e-5)
    by_rdp, _ = _independent(LEDGER, 1e-5)
    assert ours == pytest.approx(by_rdp, rel=1e-3)
    gaussian_only = [e for e in LEDGER if not isinstance(e.mechanism, ZCDP)]
    _, by_pld = _independent(gaussian_only, 1e-5)
    assert epsilon_of(gaussian_only, 1e-5) >= by_pld  # PLD is tighter: ours never reports less


def _log_sum_of_discrete_gaussians(share: float, shares: int, width: int) -> np.ndarray:
    """Log-pmf of the sum of ``shares`` discrete Gaussians on ``-shares*width..shares*width``,
    computed exactly in log space (no tail underflows to zero)."""
    support = np.arange(-width, width + 1)
    one = -(support.astype(float) ** 2) / (2 * share**2)
    one -= logsumexp(one)
    total = one
    for _ in range(shares - 1):
        size = len(total) + len(one) - 1
        total = np.array([logsumexp([total[i] + one[k - i] for i in range(max(0, k - len(one) + 1),
                                                                             min(k, len(total) - 1) + 1)])
                          for k in range(size)])
    return total


@pytest.mark.parametrize("share,shares", [(0.55, 2), (0.7, 3), (1.0, 4)])
@pytest.mark.parametrize("shift", [1, 2])
def test_distributed_discrete_gaussian_bound_holds_against_the_exact_divergence(share, shares, shift):
    """Kairouz, Liu and Steinke 2021 (Prop. 14 with Thm. 1): the closed form must bound the exact
    Renyi divergence of the summed noise against itself shifted by the sensitivity."""
    total = _log_sum_of_discrete_gaussians(share, shares, 40)
    mechanism = DiscreteGaussianSum(z=share * math.sqrt(shares) / shift, tau=distributed_tau(share, shares), dim=1)
    bound = mechanism.curve(np.asarray(ORDERS))
    log_p, log_q = total[shift:], total[:-shift]  # P(x) and P(x - shift) on the common support
    for index, alpha in enumerate(ORDERS[:30]):
        exact = logsumexp(alpha * log_p + (1 - alpha) * log_q) / (alpha - 1)
        assert exact <= bound[index] + 1e-12, (alpha, exact, bound[index])


def test_calibration_meets_the_target_and_no_less_noise_would():
    def plan(scale):
        return [Entry(Gaussian(z=scale), count=50)]

    z = calibrate(plan, 4.0, 1e-5)
    assert epsilon_of(plan(z), 1e-5) <= 4.0 < epsilon_of(plan(z * 0.995), 1e-5)


def test_entries_are_validated_and_round_trip():
    assert ledger_from_json([e.as_dict() for e in LEDGER]) == LEDGER
    for bad in ({"mechanism": "laplace"}, {"mechanism": "gaussian", "z": 0.0}, {"mechanism": "gaussian", "z": 1.0,
                                                                             "q": 2.0},
                {"mechanism": "gaussian", "z": float("nan")}, {"mechanism": "gaussian", "z": 1.0, "count": 1.5},
                {"mechanism": "zcdp", "rho": 1.0, "extra": 1}, "not a dict",
                {"mechanism": "zcdp", "rho": 1.0, "z": 2.0}, {"mechanism": "gaussian", "count": 1}):
        with pytest.raises(ConfigError):
            ledger_from_json([bad])
    assert epsilon_of([], 1e-5) == 0.0
    older = {"mechanism": "zcdp", "count": 2, "z": 0.0, "q": 1.0, "tau": 0.0, "dim": 0, "rho": 0.5, "pivot": 0.0}
    assert ledger_from_json([older]) == [Entry(ZCDP(rho=0.5), count=2)]  # a ledger from before typed entries


def test_without_tau_a_sum_of_few_small_shares_would_be_under_accounted():
    """The test above has teeth: the plain Gaussian curve is below the exact divergence here."""
    share, shares = 0.7, 3
    total = _log_sum_of_discrete_gaussians(share, shares, 40)
    log_p, log_q = total[1:], total[:-1]
    alpha = 4
    exact = logsumexp(alpha * log_p + (1 - alpha) * log_q) / (alpha - 1)
    assert exact > alpha / (2 * (share * math.sqrt(shares)) ** 2) + 5e-4
