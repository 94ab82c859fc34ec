"""Privacy accounting: a thin, serializable shell around Opacus's RDP accountant.

The ledger's state is Opacus's own ``RDPAccountant.state_dict()`` (a history of
``(noise_multiplier, sample_rate, steps)``). Epsilon is Opacus's RDP-to-(epsilon, delta)
conversion of that history. The per-step RDP curve of each ``(sample_rate, noise_multiplier)``
pair is cached in-process: RDP composes additively, so ``steps * rdp(q, sigma, 1)`` is exactly
what ``compute_rdp(q, sigma, steps)`` returns, at a fraction of the cost (Opacus's
``get_epsilon`` costs about 0.2-0.5 s of CPU per call).

Opacus is imported only when a number is needed (it takes ~1.5 s to import, and a device opens
its store and ranks in a fresh process for every Flower message).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant

ACCOUNTANT_NAME = "opacus.rdp"
MECHANISM = "rdp"  # RDPAccountant.mechanism()
History = list[tuple[float, float, int]]


def _orders() -> list[float]:
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


@lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_orders()
    )
    return np.asarray(curve, dtype=np.float64)


def epsilon_of(history: History, delta: float) -> float:
    """Epsilon at ``delta`` of an Opacus RDP history (0 for an empty history)."""
    if not history:
        return 0.0
    from opacus.accountants.analysis import rdp as rdp_analysis

    rdp = sum(steps * _rdp_per_step(q, sigma) for sigma, q, steps in history)
    with warnings.catch_warnings():  # Opacus warns when the best order is at the range's edge
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=_orders(), rdp=rdp, delta=delta)
    return float(eps)


def calibrate_noise(
    *, epsilon: float, delta: float, sample_rate: float, steps: int, also: History = ()
) -> float:
    """Smallest noise multiplier so that ``steps`` steps, composed with the entries ``also``
    (other mechanisms the same events go through), stay within epsilon. Without ``also`` this
    is Opacus's own search."""
    if also:
        return _calibrate_with(epsilon, delta, sample_rate, steps, list(also))
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps
            )
        )


def _calibrate_with(epsilon: float, delta: float, sample_rate: float, steps: int, also: History) -> float:
    if epsilon_of(also, delta) >= epsilon:
        raise ValueError(f"the other mechanisms alone spend epsilon >= {epsilon}: no budget to train")
    low, high = 0.0, 1.0
    while epsilon_of([(high, sample_rate, steps), *also], delta) > epsilon:
        low, high = high, 2 * high
    while high - low > 1e-3 * high:  # bisection; ``high`` always stays within the budget
        middle = (low + high) / 2
        if epsilon_of([(middle, sample_rate, steps), *also], delta) > epsilon:
            low = middle
        else:
            high = middle
    return high


class PrivacyLedger:
    """Opacus's RDP accountant whose state persists (``state_dict``/``load_state_dict``)."""

    def __init__(self) -> None:
        self._accountant: RDPAccountant | None = None
        self._history: History = []

    @property
    def accountant(self) -> RDPAccountant:
        """The Opacus accountant itself (created on first use; its optimizer hook logs steps)."""
        if self._accountant is None:
            from opacus.accountants import RDPAccountant

            self._accountant = RDPAccountant()
            self._accountant.history = self._history
        return self._accountant

    @property
    def history(self) -> History:
        source = self._accountant.history if self._accountant is not None else self._history
        return [(float(s), float(q), int(n)) for s, q, n in source]

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.history, delta)

    def epsilon_after(
        self, delta: float, *, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """Epsilon if ``steps`` more steps were taken: used to refuse training beyond budget."""
        return epsilon_of([*self.history, (noise_multiplier, sample_rate, steps)], delta)

    def record(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Log one step taken (what the optimizer hook does)."""
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def state_dict(self) -> dict[str, Any]:
        """Exactly ``RDPAccountant.state_dict()``: ``{"history": [...], "mechanism": "rdp"}``."""
        return {"history": [list(h) for h in self.history], "mechanism": MECHANISM}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mechanism") != MECHANISM or "history" not in state:
            raise ValueError(f"not an RDP accountant state: {sorted(state)}")
        self._history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        if self._accountant is not None:
            self._accountant.history = self._history
