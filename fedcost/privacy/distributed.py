"""Distributed DP for integer sums: the Skellam mechanism, its RDP, its noise and each node's share.

Each node adds symmetric Skellam noise, Sk(v) = Pois(v/2) − Pois(v/2) (mean 0, variance v),
to the integer sums it releases (counts, sums in exact units) *before* secure-aggregation
masking. Poisson laws add, so Sk(v1) + Sk(v2) = Sk(v1 + v2): ``n`` shares of
``share_of_variance(v, n)`` sum to exactly Sk(v), and the coordinator, who sees only the
masked sum, sees the query plus Sk(v) (Agarwal, Kairouz and Liu 2021, "The Skellam Mechanism
for Differentially Private Federated Learning", NeurIPS; arXiv:2110.04995).

A site states one (ε, δ) budget for everything it releases: ``skellam_rdp`` prices a release
in Rényi DP at the same ``ORDERS`` as DP-SGD, so the accountant (:mod:`fedcost.privacy.accounting`)
composes both by adding RDP. The orders and the RDP → (ε, δ) conversion live here, in
numpy only, so that a node that releases statistics needs neither Opacus nor torch.
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from fedcost.errors import PrivacyBudgetExhausted

# opacus.accountants.RDPAccountant.DEFAULT_ALPHAS (a test keeps them equal), written out so
# that importing this module, or the accountant, does not import opacus.
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
# No budget worth having needs noise of standard deviation beyond 1e4 × the L2 sensitivity
# (as accounting.MAX_NOISE_MULTIPLIER for DP-SGD); beyond it skellam_variance_for gives up.
MAX_NOISE_TO_SENSITIVITY = 1e4
VARIANCE_TOLERANCE = 1e-3  # relative precision of skellam_variance_for
# numpy's Poisson sampler (Hörmann's PTRS for means >= 10) compares log-densities of size
# mean · log(mean) in doubles: up to this mean their rounding moves the law by a few parts in
# a million at most; at a mean of 1e15 the variance it draws is 3% too large. Larger noise is
# drawn in coarser units instead (see skellam_noise).
MAX_POISSON_MEAN = 1e9


def _real(name: str, value: object, *, positive: bool) -> float:
    """``value`` as a finite float, > 0 or >= 0; ``ValueError`` otherwise (bools and strings included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name}={value!r}: expected a number {'>' if positive else '>='} 0")
    return float(value)


def _check_delta(delta: float) -> float:
    if not (isinstance(delta, numbers.Real) and 0 < delta < 1):
        raise ValueError(f"delta={delta!r}: expected 0 < delta < 1")
    return float(delta)


def _check_rdp(rdp: np.ndarray, orders: Sequence[float]) -> np.ndarray:
    rdp = np.asarray(rdp, dtype=float)
    if rdp.shape != (len(orders),):
        raise ValueError(f"expected RDP at {len(orders)} orders; got an array of shape {rdp.shape}")
    if np.isnan(rdp).any() or (rdp < 0).any():
        raise ValueError("RDP values must be numbers >= 0 (inf for no privacy)")
    return rdp


def epsilon_from_rdp(*, rdp: np.ndarray, delta: float, orders: Sequence[float] = ORDERS) -> float:
    """ε at ``delta`` of RDP ``rdp`` at ``orders``: the best order of Balle et al. 2020, Theorem 21.

    ε = min over α of rdp(α) + log((α − 1)/α) − (log δ + log α)/(α − 1), as Opacus's
    ``get_privacy_spent`` computes it ("Hypothesis Testing Interpretations and Rényi Differential
    Privacy", AISTATS). Nothing spent is 0; inf at every order (no noise) is inf.
    """
    delta = _check_delta(delta)
    rdp = _check_rdp(rdp, orders)
    if np.isinf(rdp).all():
        return math.inf
    if not rdp.any():
        return 0.0
    alpha = np.asarray(orders, dtype=float)
    return float(np.min(rdp + np.log1p(-1 / alpha) - (math.log(delta) + np.log(alpha)) / (alpha - 1)))


def _check_skellam(variance: float, l1: float, l2: float) -> tuple[float, float, float]:
    return _real("variance", variance, positive=False), _real("l1", l1, positive=True), _real("l2", l2, positive=True)


def skellam_rdp(*, variance: float, l1: float, l2: float, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP at each order of releasing q(D) + Z, Z i.i.d. Sk(``variance``) per coordinate.

    q is integer-valued with L1 sensitivity ``l1`` and L2 sensitivity ``l2`` (in its integer
    units). The bound of Agarwal, Kairouz and Liu 2021 for the multi-dimensional Skellam
    mechanism (Theorem 3.5 and Corollary 3.6; μ there is the total variance, Sk_μ =
    Pois(μ/2) − Pois(μ/2)), stated for integer α > 1:

        ε(α) ≤ α Δ₂² / (2μ) + min( ((2α − 1) Δ₂² + 6 Δ₁) / (4μ²),  3 Δ₁ / (2μ) ).

    The first term is the Gaussian mechanism's RDP at the same variance. At a non-integer
    order the bound is taken at ⌈α⌉: Rényi divergence does not decrease with α (van Erven
    and Harremoës 2014, Theorem 3). Cross-checked against the authors' code (google-research/
    federated, distributed_dp/accounting_utils.py, ``_skellam_rdp`` at scale 1) and C. Harrison's
    restatement ("Distributed noise addition and infinite divisibility", 2024), and in the
    tests against the exact divergence. Variance 0 (no noise) gives inf.
    """
    variance, l1, l2 = _check_skellam(variance, l1, l2)
    alpha = np.asarray(orders, dtype=float)
    if not (alpha.ndim == 1 and (alpha > 1).all() and np.isfinite(alpha).all()):
        raise ValueError(f"orders={orders!r}: expected finite RDP orders > 1")
    if variance == 0:
        return np.full(len(alpha), np.inf)
    alpha = np.ceil(alpha)
    gaussian = alpha * l2**2 / (2 * variance)
    return gaussian + np.minimum(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance))


@dataclass(frozen=True)
class SkellamRelease:
    """One release of an integer query with Skellam noise of total ``variance`` (see ``skellam_rdp``)."""

    mechanism: ClassVar[str] = "skellam"
    variance: float
    l1: float
    l2: float

    def __post_init__(self) -> None:
        for name, value in zip(("variance", "l1", "l2"), _check_skellam(self.variance, self.l1, self.l2)):
            object.__setattr__(self, name, value)

    def rdp(self) -> np.ndarray:
        """RDP at every order in ``ORDERS`` (inf without noise)."""
        return skellam_rdp(variance=self.variance, l1=self.l1, l2=self.l2)

    def to_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, **asdict(self)}

    def __str__(self) -> str:
        sensitivities = f"L1 sensitivity {self.l1:g}, L2 sensitivity {self.l2:g}"
        return f"release (Skellam noise of variance {self.variance:g}, {sensitivities})"


def skellam_variance_for(
    *, epsilon: float, delta: float, l1: float, l2: float, prior_rdp: np.ndarray | None = None
) -> float:
    """The smallest total variance (to ``VARIANCE_TOLERANCE``, on the safe side) with which a
    Skellam release of sensitivities ``l1``, ``l2``, composed after ``prior_rdp`` (RDP at
    ``ORDERS`` already spent), keeps the total within (``epsilon``, ``delta``).

    Bisection on a decreasing function, like ``accounting.noise_multiplier_for``.
    ``PrivacyBudgetExhausted`` when no variance up to (``MAX_NOISE_TO_SENSITIVITY`` · l2)² does.
    """
    epsilon = _real("epsilon", epsilon, positive=True)
    delta = _check_delta(delta)
    _check_skellam(0.0, l1, l2)
    prior = np.zeros(len(ORDERS)) if prior_rdp is None else _check_rdp(prior_rdp, ORDERS)

    def epsilon_of(variance: float) -> float:
        return epsilon_from_rdp(rdp=prior + skellam_rdp(variance=variance, l1=l1, l2=l2), delta=delta)

    maximum = (MAX_NOISE_TO_SENSITIVITY * l2) ** 2
    low, high = 0.0, float(l2) ** 2
    while epsilon_of(high) > epsilon:
        if high >= maximum:
            raise PrivacyBudgetExhausted(
                f"no Skellam noise of variance up to {maximum:g} (standard deviation {MAX_NOISE_TO_SENSITIVITY:g} "
                f"x the L2 sensitivity {l2:g}) keeps epsilon within {epsilon:g} at delta={delta:g}; "
                f"{epsilon_from_rdp(rdp=prior, delta=delta):.4g} is already spent"
            )
        low, high = high, min(2 * high, maximum)
    return smallest_within(lambda variance: epsilon_of(variance) > epsilon, low, high, VARIANCE_TOLERANCE)


def smallest_within(exceeds: Callable[[float], bool], low: float, high: float, tolerance: float) -> float:
    """The smallest noise in (``low``, ``high``] (to ``tolerance`` relative) for which
    ``exceeds`` is false, by bisection on a monotone test; the value returned is on the
    safe side (``exceeds(high)`` is false on entry and stays so)."""
    while high - low > tolerance * high:
        middle = (low + high) / 2
        if exceeds(middle):
            low = middle
        else:
            high = middle
    return high


def share_of_variance(variance: float, nodes: int) -> float:
    """The variance each of ``nodes`` nodes adds so that the sum of their shares is Sk(``variance``).

    Trust: only the noise of nodes whose inputs make up the sum, and who added it honestly,
    protects the sum. A node that drops out takes its share with it; a node that adds none,
    or colludes with the coordinator (who can then subtract its share), leaves the sum
    with less. Pass the fewest honest nodes whose inputs the sum can be made of (the
    survivors secure aggregation guarantees, less any you do not trust), not the nodes
    invited; and a node must not sign a survivor set smaller than the ``nodes`` it assumed.
    """
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes={nodes!r}: expected a positive integer")
    return _real("variance", variance, positive=False) / nodes


def secure_generator() -> np.random.Generator:
    """A numpy generator (PCG64) seeded with 128 bits from ``secrets``, for deployments.

    Nobody can predict its noise from a run seed, but PCG64 is not a CSPRNG: its state can
    be recovered from enough of its outputs. Here those outputs are never seen alone (the
    noise is added to the node's sum, masked by secure aggregation, and only revealed
    summed with every other node's noise), as ``dp.py`` says of torch's generator; a
    deployment that wants the textbook guarantee needs a generator backed by the OS CSPRNG.
    """
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def skellam_noise(shape: int | tuple[int, ...], variance: float, *, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise of ``variance`` per coordinate: Pois(v/2) − Pois(v/2), as int64.

    Pass ``secure_generator()`` in deployments; tests and simulations may pass a seeded one.
    numpy's Poisson sampler works in floating point, exact in law only up to rounding (Mironov
    2012 shows how such gaps can leak): one more reason the noise must stay masked. A variance
    beyond 2 · ``MAX_POISSON_MEAN`` is refused: release such a sum in coarser integer units
    (values and sensitivities divided by f divide the variance by f²).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (e.g. secure_generator()); got {type(rng).__name__}")
    half = _real("variance", variance, positive=False) / 2
    if half > MAX_POISSON_MEAN:
        raise ValueError(
            f"variance={variance:g} needs Poisson draws of mean {half:g}, beyond the {MAX_POISSON_MEAN:g} up to which "
            "numpy draws them accurately; release the sum in coarser integer units (dividing values and "
            "sensitivities by f divides the variance by f squared)"
        )
    return rng.poisson(half, shape).astype(np.int64) - rng.poisson(half, shape).astype(np.int64)


def with_noise_share(vector: np.ndarray, variance: float, bits: int, *, rng: np.random.Generator) -> np.ndarray:
    """A quantised vector (``Quantizer.encode``: its last entry the weight, left as it is) with
    Skellam noise of ``variance`` added to every other entry, modulo 2**``bits``: a node's
    share of a noisy sum, before masking."""
    shares = skellam_noise(vector.size - 1, variance, rng=rng)
    noisy = vector.astype(np.uint64)
    noisy[:-1] += shares.astype(np.uint64)  # two's complement: mod 2**64, then mod 2**bits
    return (noisy & np.uint64(2**bits - 1)).astype(vector.dtype)


# A noisy sum travels in steps of 1/NOISE_GRID of a record's largest contribution to a
# slot: far finer than any useful noise, and coarse enough that the noise's Poisson draws
# stay below MAX_POISSON_MEAN for standard deviations up to thousands of records.
NOISE_GRID = 16
# Every slot of a noisy sum is normalised to at most one unit per record; a sum then never
# exceeds the federation's rows, which this clip leaves room for.
NOISE_CLIP = float(2**30)


@dataclass(frozen=True)
class StatisticsNoise:
    """The noise a job adds to every sum that is not a training update, as its plan states it.

    Each slot of such a sum is *normalised*: divided by the most one record can add to it
    (values clipped; ``cost_clip`` bounds a record's cost, in currency units), so one record
    moves a slot by at most 1. The summed vector carries, on every slot, symmetric Skellam
    noise of standard deviation ``sd`` normalised units; each node adds ``1 / sites`` of its
    variance (``share``), so a sum over at least ``sites`` honest nodes carries all of it, and
    a node signs no survivor set smaller than ``sites``.
    """

    sd: float
    sites: int
    cost_clip: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "sd", _real("sd", self.sd, positive=True))
        object.__setattr__(self, "cost_clip", _real("cost_clip", self.cost_clip, positive=True))
        if isinstance(self.sites, bool) or not isinstance(self.sites, int) or self.sites < 3:
            raise ValueError(f"sites={self.sites!r}: a noisy sum is shared among at least 3 sites")

    @property
    def variance(self) -> float:
        """The total noise variance per slot, in grid units (1 / ``NOISE_GRID`` of a normalised unit)."""
        return (self.sd * NOISE_GRID) ** 2

    def share(self, sites: int | None = None) -> float:
        """The variance one node adds: its share among ``sites`` (default: the plan's; 1 for a
        contribution that leaves in the clear, which must carry all of the noise itself)."""
        return share_of_variance(self.variance, self.sites if sites is None else sites)

    def release(self, touched: int) -> SkellamRelease:
        """One noisy sum in which a record changes at most ``touched`` slots, each by at most
        one normalised unit: ``NOISE_GRID`` + 1 grid units once stochastic rounding is counted."""
        if isinstance(touched, bool) or not isinstance(touched, int) or touched < 1:
            raise ValueError(f"touched={touched!r}: expected a positive integer")
        step = NOISE_GRID + 1
        return SkellamRelease(variance=self.variance, l1=touched * step, l2=math.sqrt(touched) * step)


def plan_epsilon(noise: StatisticsNoise, *, touched: Sequence[int], delta: float) -> float:
    """ε at ``delta`` of a job's noisy sums composed: one per entry of ``touched``."""
    rdp = sum((noise.release(t).rdp() for t in touched), np.zeros(len(ORDERS)))
    return epsilon_from_rdp(rdp=rdp, delta=delta)


def calibrate_noise(
    *, epsilon: float, delta: float, touched: Sequence[int], sites: int, cost_clip: float
) -> StatisticsNoise:
    """The least noise (to ``VARIANCE_TOLERANCE`` in standard deviation, on the safe side) with
    which a job's noisy sums, one per entry of ``touched``, spend at most (``epsilon``, ``delta``)
    at every site."""
    epsilon = _real("epsilon", epsilon, positive=True)
    if not touched:
        raise ValueError("a job with no noisy sum needs no noise")

    def spent(sd: float) -> float:
        return plan_epsilon(StatisticsNoise(sd, sites, cost_clip), touched=touched, delta=delta)

    low, high = 0.0, 1.0
    while spent(high) > epsilon:
        if high > MAX_NOISE_TO_SENSITIVITY:
            raise PrivacyBudgetExhausted(
                f"no noise up to {MAX_NOISE_TO_SENSITIVITY:g} records' worth keeps the job's {len(touched)} noisy "
                f"sums within epsilon={epsilon:g} at delta={delta:g}; raise the job's statistics epsilon"
            )
        low, high = high, 2 * high
    variance = smallest_within(lambda variance: spent(variance) > epsilon, low, high, VARIANCE_TOLERANCE)
    return StatisticsNoise(variance, sites, cost_clip)


# The finest grid a Newton sum travels on (steps of 1/grid of a record's bound per slot):
# rounding then adds little to the sensitivity. Coarser grids are taken where the noise
# would need Poisson draws beyond MAX_POISSON_MEAN.
NEWTON_GRID = 1024


@dataclass(frozen=True)
class NewtonNoise:
    """The noise an exact GLM's Newton sums carry, as the job's plan states it.

    Each round, a node sends per task its score and the upper triangle of its information
    (and, for a family whose dispersion is estimated, its Pearson sum): ``blocks`` blocks in
    all, of at most p(p+1)/2 slots each for the at most ``parameters`` coefficients p. Each
    block is divided by the most one record adds to it in L2 (``glm.NoisyBounds``: features
    scaled to a norm of at most ``feature_clip`` x √features, per-row score factors and
    weights clipped at ``response_clip`` for log links), so one record moves every block by
    at most 1 and the round's vector by √``blocks``. The sum carries Skellam noise of
    standard deviation ``sd`` such units per slot, on a grid of 1/``grid``; each node adds
    ``1 / sites`` of its variance.
    """

    sd: float
    sites: int
    grid: int
    parameters: int
    blocks: int
    feature_clip: float = 1.0
    response_clip: float = 10.0

    def __post_init__(self) -> None:
        for name in ("sd", "feature_clip", "response_clip"):
            object.__setattr__(self, name, _real(name, getattr(self, name), positive=True))
        for name, least in (("sites", 3), ("grid", 1), ("parameters", 1), ("blocks", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name}={value!r}: expected a whole number >= {least}")

    @property
    def variance(self) -> float:
        """The total noise variance per slot, in grid units."""
        return (self.sd * self.grid) ** 2

    def share(self) -> float:
        """The variance one node adds."""
        return share_of_variance(self.variance, self.sites)

    def release(self) -> SkellamRelease:
        """One round's sums. In grid units a record moves each block by at most ``grid`` in L2,
        and stochastic rounding each of the at most ``slots`` slots by one more: L2 at most
        grid·√blocks + √slots, L1 at most grid·blocks·√(p(p+1)/2) + slots."""
        block = self.parameters * (self.parameters + 1) // 2
        slots = self.blocks * block
        l2 = self.grid * math.sqrt(self.blocks) + math.sqrt(slots)
        return SkellamRelease(variance=self.variance, l1=self.grid * self.blocks * math.sqrt(block) + slots, l2=l2)

    def quantizer_clip(self, rows: int) -> float:
        """The fixed point's clip for a sum over about ``rows`` records (a noisy count may be
        low: twice it): a normalised slot holds at most the rows plus the noise (beyond 20
        standard deviations: never), as a power of 2."""
        return float(2 ** math.ceil(math.log2(2 * rows + 20 * self.sd + 1)))


def plan_newton_epsilon(noise: NewtonNoise, *, rounds: int, delta: float, prior_rdp: np.ndarray | None = None) -> float:
    """ε at ``delta`` of ``rounds`` Newton rounds at ``noise``, composed after ``prior_rdp``."""
    prior = np.zeros(len(ORDERS)) if prior_rdp is None else _check_rdp(prior_rdp, ORDERS)
    return epsilon_from_rdp(rdp=prior + rounds * noise.release().rdp(), delta=delta)


def calibrate_newton_noise(
    *,
    epsilon: float,
    delta: float,
    rounds: int,
    sites: int,
    parameters: int,
    blocks: int,
    feature_clip: float,
    response_clip: float,
) -> NewtonNoise:
    """The least noise (to ``VARIANCE_TOLERANCE`` in sd, on the safe side) with which ``rounds``
    Newton rounds spend at most (``epsilon``, ``delta``): on the finest grid (at most
    ``NEWTON_GRID``) whose noise numpy still draws accurately."""
    epsilon = _real("epsilon", epsilon, positive=True)
    grid = NEWTON_GRID
    while True:

        def noise(sd: float, grid: int = grid) -> NewtonNoise:
            return NewtonNoise(sd, sites, grid, parameters, blocks, feature_clip, response_clip)

        def spent(sd: float) -> float:
            return plan_newton_epsilon(noise(sd), rounds=rounds, delta=delta)

        low, high = 0.0, 1.0
        while spent(high) > epsilon:
            if high > MAX_NOISE_TO_SENSITIVITY:
                raise PrivacyBudgetExhausted(
                    f"no noise up to {MAX_NOISE_TO_SENSITIVITY:g} records' worth keeps {rounds} Newton rounds "
                    f"within epsilon={epsilon:g} at delta={delta:g}; raise the job's [glm_privacy] epsilon or "
                    "lower its rounds"
                )
            low, high = high, 2 * high
        planned = noise(smallest_within(lambda sd: spent(sd) > epsilon, low, high, VARIANCE_TOLERANCE))
        if planned.share() / 2 <= MAX_POISSON_MEAN or grid == 1:
            return planned
        grid //= 2
