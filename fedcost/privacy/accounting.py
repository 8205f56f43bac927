"""Privacy accounting for DP-SGD: how much (ε, δ) a site has spent, and what a round costs.

A thin wrapper around Opacus's RDP analysis of the sampled Gaussian mechanism
(Mironov 2017, "Rényi Differential Privacy"; Mironov, Talwar and Zhang 2019, "Rényi
Differential Privacy of the Sampled Gaussian Mechanism"), at Opacus's own RDP orders,
so every ε here equals ``opacus.accountants.RDPAccountant``'s for the same history.

RDP composes by addition, so a ledger keeps the history of (noise multiplier, sample
rate, steps) rather than an ε: the history is valid under any later δ, and the ε of
the whole history is computed once, tightly, from it. RDP is an upper bound; PRV
accounting would give a smaller ε but is numerical and harder to pin.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

import numpy as np

from fedcost.errors import PrivacyBudgetExhausted

# opacus.accountants.RDPAccountant.DEFAULT_ALPHAS (a test keeps them equal), written out so
# that importing this module does not import opacus: see _opacus_rdp.
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
MAX_NOISE_MULTIPLIER = 1e4  # no budget worth having needs more; beyond it the search gives up
NOISE_TOLERANCE = 1e-3  # relative precision of noise_multiplier_for

Step = tuple[float, float, int]


def _check(noise_multiplier: float, sample_rate: float, steps: int) -> Step:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier={noise_multiplier!r}: expected a finite number >= 0")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate!r}: expected 0 < sample_rate <= 1")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r}: expected an integer >= 0")
    return float(noise_multiplier), float(sample_rate), steps


def _opacus_rdp() -> ModuleType:
    """Opacus's RDP analysis, imported when first needed. Importing opacus loads
    ``torch.distributed`` and its optimizers (about 2.5 s), which a node that trains
    without DP never uses, and a deployed node pays every import once per message."""
    from opacus.accountants.analysis import rdp

    return rdp


def _rdp(step: Step) -> np.ndarray:
    """RDP of one run of steps at every order in ``ORDERS`` (inf without noise)."""
    noise_multiplier, sample_rate, steps = step
    if steps == 0:
        return np.zeros(len(ORDERS))
    if noise_multiplier == 0:
        return np.full(len(ORDERS), np.inf)
    return np.asarray(_opacus_rdp().compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=ORDERS))


def _check_delta(delta: float) -> float:
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r}: expected 0 < delta < 1")
    return float(delta)


def _to_epsilon(total_rdp: np.ndarray, delta: float) -> float:
    """ε at ``delta`` of composed RDP (Balle et al. 2020 conversion, as Opacus does it)."""
    if np.isinf(total_rdp).all():
        return math.inf
    if not total_rdp.any():
        return 0.0
    epsilon, _ = _opacus_rdp().get_privacy_spent(orders=ORDERS, rdp=total_rdp, delta=delta)
    return float(epsilon)


def epsilon_spent(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` DP-SGD steps with Poisson sampling at ``sample_rate`` (Abadi et al. 2016).

    ``noise_multiplier`` is the noise standard deviation over the clipping norm; 0 gives inf.
    """
    return _to_epsilon(_rdp(_check(noise_multiplier, sample_rate, steps)), _check_delta(delta))


def _smallest_noise(epsilon_of: Callable[[float], float], target: float) -> float:
    """The smallest noise multiplier (to ``NOISE_TOLERANCE``) whose ε is at most ``target``.

    Bisection on a decreasing function; the returned value is on the safe side. Opacus's
    warning that the best RDP order lies at the edge of its range is silenced here: the
    search visits such noise levels on purpose, and the bound stays valid (just looser).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        high = 1.0
        while epsilon_of(high) > target:
            high *= 2
            if high > MAX_NOISE_MULTIPLIER:
                raise ValueError(f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps epsilon within {target}")
        low = 0.0
        while high - low > NOISE_TOLERANCE * high:
            middle = (low + high) / 2
            if epsilon_of(middle) > target:
                low = middle
            else:
                high = middle
    return high


def noise_multiplier_for(*, epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to ``NOISE_TOLERANCE``) with which ``steps`` steps spend at most ``epsilon``."""
    _check(0.0, sample_rate, steps)
    if not epsilon > 0:
        raise ValueError(f"epsilon={epsilon!r}: expected a number > 0")
    return _smallest_noise(
        lambda sigma: epsilon_spent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta), epsilon
    )


class PrivacyLedger:
    """A site's record of DP spend against its (ε, δ) budget, persisted between rounds.

    Spend a round with ``spend`` *before* training it and persist ``to_dict()`` before
    anything leaves the site, so no round, even one that crashes, ever runs unpaid. When
    the site's policy changes its budget, keep the history:
    ``PrivacyLedger(new_epsilon, new_delta, history=old.history)``.
    """

    def __init__(self, epsilon_budget: float, delta: float, history: Iterable[Step] = ()):
        if not (math.isfinite(epsilon_budget) and epsilon_budget > 0):
            raise ValueError(
                f"epsilon_budget={epsilon_budget!r}: a ledger tracks a finite budget > 0 "
                "(epsilon = inf means no DP: keep no ledger)"
            )
        self.epsilon_budget = float(epsilon_budget)
        self.delta = _check_delta(delta)
        self._history = [_check(*step) for step in history]
        self._rdp = sum((_rdp(step) for step in self._history), np.zeros(len(ORDERS)))

    @property
    def history(self) -> tuple[Step, ...]:
        """(noise multiplier, sample rate, steps) of every round spent, in order."""
        return tuple(self._history)

    @property
    def epsilon(self) -> float:
        """ε spent so far at the ledger's δ."""
        return _to_epsilon(self._rdp, self.delta)

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε spent once a round of these parameters is added."""
        return _to_epsilon(self._rdp + _rdp(_check(noise_multiplier, sample_rate, steps)), self.delta)

    def can_afford(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        after = self.epsilon_after(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return after <= self.epsilon_budget

    def spend(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Record a round and return ε spent; ``PrivacyBudgetExhausted`` (nothing recorded) if over budget."""
        step = _check(noise_multiplier, sample_rate, steps)
        step_rdp = _rdp(step)
        after = _to_epsilon(self._rdp + step_rdp, self.delta)
        if after > self.epsilon_budget:
            raise PrivacyBudgetExhausted(
                f"the site's privacy budget is epsilon={self.epsilon_budget:g} at delta={self.delta:g}; "
                f"{self.epsilon:.4g} is spent and this round (noise multiplier {noise_multiplier:g}, "
                f"sample rate {sample_rate:g}, {steps} steps) would bring it to {after:.4g}"
            )
        self._history.append(step)
        self._rdp = self._rdp + step_rdp
        return after

    def noise_multiplier_for(self, *, sample_rate: float, steps: int) -> float:
        """The smallest noise multiplier with which ``steps`` more steps fit the budget left.

        ``PrivacyBudgetExhausted`` when no noise multiplier up to ``MAX_NOISE_MULTIPLIER`` does.
        """
        _check(0.0, sample_rate, steps)
        try:
            return _smallest_noise(
                lambda sigma: self.epsilon_after(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps),
                self.epsilon_budget,
            )
        except ValueError:
            raise PrivacyBudgetExhausted(
                f"the site's privacy budget is epsilon={self.epsilon_budget:g} at delta={self.delta:g}; "
                f"{self.epsilon:.4g} is spent and no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} "
                f"fits {steps} more steps at sample rate {sample_rate:g}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "accountant": "rdp",
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "history": [list(step) for step in self._history],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        """The strict inverse of ``to_dict``; ``ValueError`` on unknown keys or bad values."""
        if set(data) != {"accountant", "epsilon_budget", "delta", "history"}:
            raise ValueError(f"a ledger has keys accountant, epsilon_budget, delta, history; got {sorted(data)}")
        if data["accountant"] != "rdp":
            raise ValueError(f"accountant={data['accountant']!r}: this ledger is kept with 'rdp'")
        history = data["history"]
        if not isinstance(history, list) or not all(isinstance(s, list) and len(s) == 3 for s in history):
            raise ValueError("history must be a list of [noise_multiplier, sample_rate, steps]")
        return cls(data["epsilon_budget"], data["delta"], [tuple(step) for step in history])
