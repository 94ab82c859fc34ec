"""Privacy accounting: Renyi DP of every mechanism a ledger records, composed and converted to
(epsilon, delta) with Opacus's RDP analysis.

A ledger is a list of ``Entry``s, each a typed mechanism applied ``count`` times to the same data
(stored as its name and fields):

- ``Gaussian`` (``gaussian``): the (sampled) Gaussian mechanism with noise multiplier ``z`` (noise
  std over L2 sensitivity) and Poisson sampling rate ``q``: Opacus's ``compute_rdp`` (Mironov,
  Talwar and Zhang 2019). ``q = 1`` is the plain Gaussian mechanism, ``alpha / (2 z^2)``. With
  ``pivot`` ``p > 0`` the round also shows whether it released at all, and with probability at most
  ``p`` its release hinged on this device being sampled (exactly the needed number of others was):
  the others' outcome given away, that round is a plain Gaussian or nothing, so its curve is
  ``log((1 - p) e^{(alpha-1) R_q} + p (q e^{(alpha-1) alpha / (2 z^2)} + 1 - q)) / (alpha - 1)``
  with ``R_q`` the sampled Gaussian's.
- ``DiscreteGaussianSum`` (``discrete-gaussian-sum``): a sum of integer data plus discrete Gaussian
  noise shares from several devices (Kairouz, Liu and Steinke 2021, "The Distributed Discrete
  Gaussian Mechanism", Proposition 14 with the ``tau`` of their Theorem 1): ``min(alpha / (2 z^2) +
  tau * d, alpha / 2 * (1 / z + sqrt(d) * tau)^2)`` where ``z`` is the honest noise std over the L2
  sensitivity, ``d`` the dimension and ``tau = 10 * sum_{k<n} exp(-2 pi^2 s^2 k / (k + 1))`` for
  ``n`` shares of std ``s`` each. With ``tau = 0`` (one share) it is the discrete Gaussian, ``alpha
  / (2 z^2)`` (Canonne, Kamath and Steinke 2020).
- ``ZCDP`` (``zcdp``): a ``rho``-zCDP mechanism, ``alpha * rho`` (the exponential mechanism, Cesar
  and Rogers 2021).

Orders are the integers 2..256, where Opacus's and dp-accounting's RDP conversions agree, so any
epsilon this module prints recomputes with dp-accounting (``tests/test_accounting.py``).
Opacus is imported only when a number is needed (~1.5 s; a device process starts per message).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import ClassVar

import numpy as np

from attune.shared.errors import ConfigError

ACCOUNTANT_NAME = "rdp (opacus.accountants.analysis.rdp, integer orders 2-256)"
ORDERS: tuple[float, ...] = tuple(float(a) for a in range(2, 257))


def _finite(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class Gaussian:
    """The Gaussian mechanism with noise multiplier ``z`` (noise std over L2 sensitivity), Poisson
    sampled at rate ``q``; ``pivot``: the chance that whether the round released hinged on this
    device (module docstring)."""

    z: float
    q: float = 1.0
    pivot: float = 0.0
    name: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        _finite(self, "z", "q", "pivot")
        if self.z <= 0 or not 0 < self.q <= 1 or not 0 <= self.pivot <= 1:
            raise ConfigError(f"a gaussian entry needs z > 0, q in (0, 1] and pivot in [0, 1], got {self}")

    def curve(self, alphas: np.ndarray) -> np.ndarray:
        from opacus.accountants.analysis import rdp as rdp_analysis  # ~1.5 s to import

        sampled = np.asarray(rdp_analysis.compute_rdp(q=self.q, noise_multiplier=self.z, steps=1,
                                                      orders=alphas.tolist()))
        if not self.pivot:
            return sampled
        p, q = self.pivot, self.q
        terms = [np.log1p(-p) + (alphas - 1) * sampled if p < 1 else np.full(len(alphas), -np.inf),
                 np.full(len(alphas), math.log(p * q)) + (alphas - 1) * alphas / (2 * self.z**2),
                 np.full(len(alphas), math.log(p * (1 - q)) if q < 1 else -np.inf)]
        return np.logaddexp.reduce(terms) / (alphas - 1)


@dataclass(frozen=True)
class DiscreteGaussianSum:
    """A sum of integer data plus discrete Gaussian noise shares: ``z`` the honest noise std over
    the L2 sensitivity, ``tau`` the inflation of summing several shares, ``dim`` the dimension."""

    z: float
    tau: float = 0.0
    dim: int = 0
    name: ClassVar[str] = "discrete-gaussian-sum"

    def __post_init__(self) -> None:
        _finite(self, "z", "tau")
        if self.z <= 0 or self.tau < 0 or isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 0:
            raise ConfigError(f"a discrete-gaussian-sum entry needs z > 0, tau >= 0 and an integer dim >= 0, "
                              f"got {self}")

    def curve(self, alphas: np.ndarray) -> np.ndarray:
        first = alphas / (2 * self.z**2) + self.tau * self.dim
        second = alphas / 2 * (1 / self.z + math.sqrt(self.dim) * self.tau) ** 2
        return np.minimum(first, second)


@dataclass(frozen=True)
class ZCDP:
    """A ``rho``-zCDP mechanism."""

    rho: float
    name: ClassVar[str] = "zcdp"

    def __post_init__(self) -> None:
        _finite(self, "rho")
        if self.rho < 0:
            raise ConfigError(f"a zcdp entry needs rho >= 0, got {self.rho}")

    def curve(self, alphas: np.ndarray) -> np.ndarray:
        return alphas * self.rho


Mechanism = Gaussian | DiscreteGaussianSum | ZCDP
MECHANISMS: dict[str, type[Gaussian] | type[DiscreteGaussianSum] | type[ZCDP]] = {
    kind.name: kind for kind in (Gaussian, DiscreteGaussianSum, ZCDP)}
# Ledgers written before typed entries list every field, the other mechanisms' at these values.
_UNTYPED_DEFAULTS = {"z": 0.0, "q": 1.0, "tau": 0.0, "dim": 0, "rho": 0.0, "pivot": 0.0}


@dataclass(frozen=True)
class Entry:
    """One mechanism, applied ``count`` times."""

    mechanism: Mechanism
    count: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.mechanism, tuple(MECHANISMS.values())):
            raise ConfigError(f"a ledger entry's mechanism is one of {', '.join(MECHANISMS)}, got {self.mechanism!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ConfigError(f"count must be an integer >= 0, got {self.count!r}")

    def as_dict(self) -> dict[str, object]:
        """The stored form: the mechanism's name, the count and the mechanism's fields."""
        return {"mechanism": self.mechanism.name, "count": self.count, **asdict(self.mechanism)}

    @classmethod
    def from_dict(cls, raw: object) -> Entry:
        """Read a stored entry (ledgers written before typed entries list every mechanism's
        fields, the others' at their old defaults: accepted, and nothing else)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("mechanism"), str) \
                or raw["mechanism"] not in MECHANISMS or set(raw) - set(_UNTYPED_DEFAULTS) - {"mechanism", "count"}:
            raise ConfigError(f"not a ledger entry: {raw!r}")
        kind = MECHANISMS[raw["mechanism"]]
        own = {f.name for f in fields(kind)}
        foreign = {name: value for name, value in raw.items() if name not in own | {"mechanism", "count"}}
        if any(value != _UNTYPED_DEFAULTS[name] for name, value in foreign.items()):
            raise ConfigError(f"not a {kind.name} ledger entry: {raw!r}")
        try:
            return cls(kind(**{name: value for name, value in raw.items() if name in own}), raw.get("count", 1))
        except TypeError as error:
            raise ConfigError(f"not a ledger entry: {raw!r} ({error})") from None

    def times(self, count: int) -> Entry:
        return replace(self, count=count)


Ledger = Sequence[Entry]


@lru_cache(maxsize=256)
def distributed_tau(share_std: float, shares: int) -> float:
    """``tau`` of Kairouz, Liu and Steinke 2021 (Theorem 1) for ``shares`` discrete Gaussian
    shares of std ``share_std`` each (0 for a single share)."""
    return 10.0 * sum(math.exp(-2.0 * math.pi**2 * share_std**2 * k / (k + 1)) for k in range(1, shares))


@lru_cache(maxsize=4096)
def _curve(mechanism: Mechanism) -> tuple[float, ...]:
    """RDP of one application of ``mechanism`` at every order in ``ORDERS``."""
    return tuple(mechanism.curve(np.asarray(ORDERS)))


def binomial_pmf(k: int, n: int, p: float) -> float:
    """``P(Binomial(n, p) = k)``, in log space (no overflow at large ``n``)."""
    if not 0 <= k <= n:
        return 0.0
    if p in (0.0, 1.0):
        return float(k == (n if p else 0))
    return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                    + k * math.log(p) + (n - k) * math.log1p(-p))


def rdp_of(ledger: Ledger) -> np.ndarray:
    """The composed RDP curve of a ledger (RDP adds up under composition)."""
    total = np.zeros(len(ORDERS))
    for entry in ledger:
        if entry.count:
            total += entry.count * np.asarray(_curve(entry.mechanism))
    return total


def load_analysis() -> None:
    """Import Opacus's analysis now (about 1.5 s), not inside a caller's store transaction."""
    from opacus.accountants.analysis import rdp  # noqa: F401


def epsilon_of(ledger: Ledger, delta: float) -> float:
    """Epsilon at ``delta`` of everything in the ledger (0 for an empty one)."""
    if not any(entry.count for entry in ledger):
        return 0.0
    from opacus.accountants.analysis import rdp as rdp_analysis

    with warnings.catch_warnings():  # Opacus warns when the best order is at the range's edge
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=rdp_of(ledger), delta=delta)
    return float(eps)


def calibrate(plan: Callable[[float], Ledger], epsilon: float, delta: float) -> float:
    """The smallest scale ``s`` (to 0.1%) with ``epsilon_of(plan(s)) <= epsilon``; ``plan``
    must spend less as ``s`` grows (``s`` scales every noise multiplier of the plan)."""
    if not epsilon > 0 or not 0 < delta < 1:
        raise ConfigError(f"calibration needs epsilon > 0 and delta in (0, 1), got {epsilon}, {delta}")
    low, high = 0.0, 1.0
    while epsilon_of(plan(high), delta) > epsilon:
        low, high = high, 2 * high
        if high > 1e7:
            raise ConfigError(f"no noise reaches epsilon {epsilon}: a part of the plan spends it alone")
    while high - low > 1e-3 * high:  # bisection; ``high`` always stays within the budget
        middle = (low + high) / 2
        if epsilon_of(plan(middle), delta) > epsilon:
            low = middle
        else:
            high = middle
    return high


def ledger_to_json(ledger: Ledger) -> list[dict[str, object]]:
    return [entry.as_dict() for entry in ledger]


def ledger_from_json(raw: object) -> list[Entry]:
    if not isinstance(raw, list):
        raise ConfigError(f"a ledger is a list of entries, got {type(raw).__name__}")
    return [Entry.from_dict(item) for item in raw]
