"""Privacy accounting: how much (ε, δ) a site has spent, and what a release costs.

A site's releases are of two kinds, composed in Rényi DP at Opacus's own RDP orders:

- DP-SGD rounds, priced by Opacus's RDP analysis of the sampled Gaussian mechanism
  (Mironov 2017, "Rényi Differential Privacy"; Mironov, Talwar and Zhang 2019, "Rényi
  Differential Privacy of the Sampled Gaussian Mechanism"), so the ε of DP-SGD alone equals
  ``opacus.accountants.RDPAccountant``'s for the same history;
- integer sums released with Skellam noise, priced by :mod:`fedcost.privacy.distributed`.

RDP composes by addition, so a ledger keeps the history of releases rather than an ε:
the history is valid under any later δ, and the ε of the whole history is computed once,
tightly, from it (``distributed.epsilon_from_rdp``, the conversion Opacus uses). RDP is
an upper bound; PRV accounting would give a smaller ε but is numerical and harder to pin.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from fedcost.errors import PrivacyBudgetExhausted
from fedcost.privacy.distributed import ORDERS, SkellamRelease, epsilon_from_rdp, skellam_variance_for, smallest_within

MAX_NOISE_MULTIPLIER = 1e4  # no budget worth having needs more; beyond it the search gives up
NOISE_TOLERANCE = 1e-3  # relative precision of noise_multiplier_for


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _opacus_rdp() -> ModuleType:
    """Opacus's RDP analysis, imported when first needed. Importing opacus loads
    ``torch.distributed`` and its optimizers (about 2.5 s), which a node that trains
    without DP never uses, and a deployed node pays every import once per message."""
    from opacus.accountants.analysis import rdp

    return rdp


@dataclass(frozen=True)
class DpSgdSteps:
    """``steps`` DP-SGD steps with Poisson sampling at ``sample_rate`` (Abadi et al. 2016).

    ``noise_multiplier`` is the noise standard deviation over the clipping norm; 0 gives inf.
    """

    mechanism: ClassVar[str] = "dp-sgd"
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
        if not (_is_real(sigma) and math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"noise_multiplier={sigma!r}: expected a finite number >= 0")
        if not (_is_real(q) and 0 < q <= 1):
            raise ValueError(f"sample_rate={q!r}: expected 0 < sample_rate <= 1")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps={steps!r}: expected an integer >= 0")
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))

    def rdp(self) -> np.ndarray:
        """RDP at every order in ``ORDERS`` (inf without noise)."""
        if self.steps == 0:
            return np.zeros(len(ORDERS))
        if self.noise_multiplier == 0:
            return np.full(len(ORDERS), np.inf)
        analysis = _opacus_rdp()
        q, sigma = self.sample_rate, self.noise_multiplier
        return np.asarray(analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=self.steps, orders=ORDERS))

    def to_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, **asdict(self)}

    def __str__(self) -> str:
        sampling = f"sample rate {self.sample_rate:g}, {self.steps} steps"
        return f"round (noise multiplier {self.noise_multiplier:g}, {sampling})"


Release = DpSgdSteps | SkellamRelease
# The kinds of release a ledger holds, by the name its dict form gives them.
MECHANISMS: dict[str, type[DpSgdSteps] | type[SkellamRelease]] = {
    kind.mechanism: kind for kind in (DpSgdSteps, SkellamRelease)
}


def release_from_dict(data: Mapping[str, Any]) -> Release:
    """The strict inverse of a release's ``to_dict``; ``ValueError`` on unknown keys or bad values."""
    mechanism = data.get("mechanism") if isinstance(data, Mapping) else None
    if not isinstance(mechanism, str) or mechanism not in MECHANISMS:
        raise ValueError(f"a release is an object whose mechanism is one of {', '.join(MECHANISMS)}; got {data!r}")
    kind = MECHANISMS[mechanism]
    names = [field.name for field in fields(kind)]
    if set(data) != {"mechanism", *names}:
        raise ValueError(f"a {mechanism} release has keys mechanism, {', '.join(names)}; got {sorted(data)}")
    return kind(**{name: data[name] for name in names})


def _as_release(release: Release | tuple[float, float, int]) -> Release:
    """A history entry; a bare (noise multiplier, sample rate, steps) is DP-SGD, the ledger's first form."""
    if isinstance(release, (DpSgdSteps, SkellamRelease)):
        return release
    if isinstance(release, tuple) and len(release) == 3:
        return DpSgdSteps(*release)
    raise TypeError(f"a ledger's history holds DpSgdSteps and SkellamRelease entries; got {release!r}")


def _check_delta(delta: float) -> float:
    if not (_is_real(delta) and 0 < delta < 1):
        raise ValueError(f"delta={delta!r}: expected 0 < delta < 1")
    return float(delta)


def epsilon_spent(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` DP-SGD steps with Poisson sampling at ``sample_rate`` (Abadi et al. 2016).

    ``noise_multiplier`` is the noise standard deviation over the clipping norm; 0 gives inf.
    """
    steps_rdp = DpSgdSteps(noise_multiplier, sample_rate, steps).rdp()
    return epsilon_from_rdp(rdp=steps_rdp, delta=_check_delta(delta))


def _smallest_noise(epsilon_of: Callable[[float], float], target: float) -> float:
    """The smallest noise multiplier (to ``NOISE_TOLERANCE``) whose ε is at most ``target``.

    Bisection on a decreasing function; the returned value is on the safe side.
    """
    high = 1.0
    while epsilon_of(high) > target:
        high *= 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps epsilon within {target}")
    return smallest_within(lambda multiplier: epsilon_of(multiplier) > target, 0.0, high, NOISE_TOLERANCE)


def noise_multiplier_for(*, epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to ``NOISE_TOLERANCE``) with which ``steps`` steps spend at most ``epsilon``."""
    DpSgdSteps(0.0, sample_rate, steps)
    if not epsilon > 0:
        raise ValueError(f"epsilon={epsilon!r}: expected a number > 0")
    return _smallest_noise(
        lambda sigma: epsilon_spent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta), epsilon
    )


class PrivacyLedger:
    """A site's record of DP spend against its (ε, δ) budget, persisted between releases.

    Spend a DP-SGD round with ``spend`` *before* training it, and a noisy sum with
    ``spend_skellam`` before its noise is drawn, and persist ``to_dict()`` before anything
    leaves the site, so no release, even one that crashes, ever goes out unpaid. When the
    site's policy changes its budget, keep the history:
    ``PrivacyLedger(new_epsilon, new_delta, history=old.history)``.
    """

    def __init__(self, epsilon_budget: float, delta: float, history: Iterable[Release | tuple[float, float, int]] = ()):
        if not (_is_real(epsilon_budget) and math.isfinite(epsilon_budget) and epsilon_budget > 0):
            raise ValueError(
                f"epsilon_budget={epsilon_budget!r}: a ledger tracks a finite budget > 0 "
                "(epsilon = inf means no DP: keep no ledger)"
            )
        self.epsilon_budget = float(epsilon_budget)
        self.delta = _check_delta(delta)
        self._history = [_as_release(release) for release in history]
        self._rdp = sum((release.rdp() for release in self._history), np.zeros(len(ORDERS)))

    @property
    def history(self) -> tuple[Release, ...]:
        """Every release spent (DP-SGD rounds and Skellam releases), in order."""
        return tuple(self._history)

    @property
    def epsilon(self) -> float:
        """ε spent so far at the ledger's δ."""
        return epsilon_from_rdp(rdp=self._rdp, delta=self.delta)

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε spent once a round of these parameters is added."""
        round_rdp = DpSgdSteps(noise_multiplier, sample_rate, steps).rdp()
        return epsilon_from_rdp(rdp=self._rdp + round_rdp, delta=self.delta)

    def epsilon_after_releases(self, releases: Iterable[Release]) -> float:
        """ε spent once ``releases`` are added, recording nothing: what a job's plan would cost."""
        rdp = sum((release.rdp() for release in releases), self._rdp)
        return epsilon_from_rdp(rdp=rdp, delta=self.delta)

    def can_afford(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        after = self.epsilon_after(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return after <= self.epsilon_budget

    def spend(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Record a round and return ε spent; ``PrivacyBudgetExhausted`` (nothing recorded) if over budget."""
        return self._spend(DpSgdSteps(noise_multiplier, sample_rate, steps))

    def spend_skellam(self, *, variance: float, l1: float, l2: float) -> float:
        """Record a Skellam release (``distributed.skellam_rdp``) and return ε spent;
        ``PrivacyBudgetExhausted`` (nothing recorded) if over budget."""
        return self._spend(SkellamRelease(variance, l1, l2))

    def _spend(self, release: Release) -> float:
        release_rdp = release.rdp()
        after = epsilon_from_rdp(rdp=self._rdp + release_rdp, delta=self.delta)
        if after > self.epsilon_budget:
            raise PrivacyBudgetExhausted(
                f"the site's privacy budget is epsilon={self.epsilon_budget:g} at delta={self.delta:g}; "
                f"{self.epsilon:.4g} is spent and this {release} would bring it to {after:.4g}"
            )
        self._history.append(release)
        self._rdp = self._rdp + release_rdp
        return after

    def noise_multiplier_for(self, *, sample_rate: float, steps: int) -> float:
        """The smallest noise multiplier with which ``steps`` more steps fit the budget left.

        ``PrivacyBudgetExhausted`` when no noise multiplier up to ``MAX_NOISE_MULTIPLIER`` does.
        """
        DpSgdSteps(0.0, sample_rate, steps)
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

    def skellam_variance_for(self, *, l1: float, l2: float) -> float:
        """The smallest Skellam variance with which a release of these sensitivities fits the budget left.

        ``PrivacyBudgetExhausted`` when none up to ``distributed.MAX_NOISE_TO_SENSITIVITY`` (in std) does.
        """
        return skellam_variance_for(epsilon=self.epsilon_budget, delta=self.delta, l1=l1, l2=l2, prior_rdp=self._rdp)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accountant": "rdp",
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "history": [release.to_dict() for release in self._history],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        """The strict inverse of ``to_dict``; ``ValueError`` on unknown keys or bad values."""
        if set(data) != {"accountant", "epsilon_budget", "delta", "history"}:
            raise ValueError(f"a ledger has keys accountant, epsilon_budget, delta, history; got {sorted(data)}")
        if data["accountant"] != "rdp":
            raise ValueError(f"accountant={data['accountant']!r}: this ledger is kept with 'rdp'")
        history = data["history"]
        if not isinstance(history, list):
            raise ValueError(f"history must be a list of releases; got {type(history).__name__}")
        releases = []
        for index, entry in enumerate(history):
            try:
                releases.append(release_from_dict(entry))
            except ValueError as e:
                raise ValueError(f"history[{index}]: {e}") from e
        return cls(data["epsilon_budget"], data["delta"], releases)
