"""Between-site variation in readmission: shrunken excess readmission ratios and
overdispersed funnel limits, from the per-site totals the benchmark step already shares.

Both read only each site's rows n, observed readmissions O and expected readmissions E
(``benchmarking.SITE_SLOTS``), which every site already releases, as exact or noisy
secure sums, under its policy and the small-cell rule. Nothing new leaves a site.

Excess readmission ratio (ERR), as CMS's Hospital Readmissions Reduction Program defines
it: predicted readmissions (the patients' risk plus the site's own random intercept) over
expected (the patients' risk plus the average site's intercept), from a random-intercept
logistic model whose fixed part is the federated model, held fixed as an offset. The
model here is

    O_i | a_i ~ Binomial(n_i, expit(logit(E_i / n_i) + a_i)),    a_i ~ N(mu, tau^2),

i.e. each site's patient-level offsets are summarised by their mean risk E_i / n_i. That
is exact in the term a_i O_i of the log-likelihood and matches its slope at a_i = 0
(the expected count); it slightly overstates the information a site carries about a_i
(n p(1 - p) >= sum p_j (1 - p_j)), so it shrinks a little less than the patient-level
model would. mu and tau^2 are maximum marginal likelihood estimates, the integral over
a_i by adaptive Gauss-Hermite quadrature (Pinheiro & Bates, J Comput Graph Stat 1995;4:12;
lme4's nAGQ). Each site's effect is its empirical Bayes posterior mode given mu and tau^2;
ERR_i = expit(t_i + mu + u_i) / expit(t_i + mu) with u_i = a_i - mu and t_i = logit(E_i/n_i),
and its 95% interval is the Laplace (normal) approximation to the posterior of u_i mapped
through the same ratio. The interval leaves out the uncertainty in mu and tau^2 (CMS
bootstraps hospitals for that), so it is a little narrow when there are few sites.

Where the effects are estimated: under this model a site's posterior depends on its data
only through its n, O and E, which it has already shared, so the coordinator computes
every site's effect; the site itself, given mu and tau, would get the same number. The
patient-level model (each patient's own offset) would have to run at the site and release
the site's ERR: a new release, left out on purpose.

Overdispersed funnel limits: the DerSimonian-Laird additive between-site variance on the
log O/E scale with 10% truncation, FunnelPlotR's default ("SHMI") method (Spiegelhalter,
Qual Saf Health Care 2005;14:347): z_i = log(O_i / E_i) sqrt(E_i); the lowest and highest
10% of z dropped; phi = mean z^2 over the rest; tau^2 = max(0, (k phi - (k - 1)) /
(sum w - sum w^2 / sum w)), w_i = E_i; limits exp(+-z sqrt(1/E + tau^2)). Sites with no
readmission (log O/E undefined) are left out of the estimate. The truncation treats the
extreme fifth of sites as possible outliers rather than variation, so the limits widen
less than an untrimmed estimate's (``trim=0``): in tests/test_analytics_random_effects.py
about 0.8 of sites that differ only by a random intercept fall inside the 95% limits,
against 0.95 untrimmed and under 0.7 with Poisson limits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, log_expit

QUADRATURE_NODES = 15
FUNNEL_TRIM = 0.1
# tau is searched on the log scale between these: 0.001 (no between-site variation worth
# the name) and 5 (sites differ by orders of magnitude in odds).
TAU_RANGE = (1e-3, 5.0)
FUNNEL_METHOD = "additive between-site variance, DerSimonian-Laird on log O/E, 10% truncated (FunnelPlotR 'SHMI')"
ERR_METHOD = (
    "random-intercept logistic model with the federated model as offset; between-site variance by maximum "
    "marginal likelihood (adaptive Gauss-Hermite); each site's effect its empirical Bayes posterior mode"
)
_NODES, _WEIGHTS = np.polynomial.hermite.hermgauss(QUADRATURE_NODES)


def funnel_tau2(observed: Sequence[float], expected: Sequence[float], trim: float = FUNNEL_TRIM) -> float:
    """The DerSimonian-Laird between-site variance of log O/E (FunnelPlotR's SHMI method)."""
    observed, expected = np.asarray(observed, dtype="float64"), np.asarray(expected, dtype="float64")
    keep = (observed > 0) & (expected > 0)
    z, weight = np.log(observed[keep] / expected[keep]) * np.sqrt(expected[keep]), expected[keep]
    order = np.argsort(z)
    cut = math.floor(trim * len(z))
    kept = order[cut : len(z) - cut]
    k = len(kept)
    if k < 2:
        return 0.0
    phi = float(np.mean(z[kept] ** 2))
    w = weight[kept]
    return max(0.0, (k * phi - (k - 1)) / (w.sum() - np.square(w).sum() / w.sum()))


def overdispersed_limits(expected: float | np.ndarray, z: float, tau2: float) -> tuple[np.ndarray, np.ndarray]:
    """Funnel limits for O/E around 1 at volume ``expected``, widened by ``tau2`` on the log scale."""
    spread = z * np.sqrt(1 / np.asarray(expected, dtype="float64") + tau2)
    return np.exp(-spread), np.exp(spread)


@dataclass(frozen=True)
class RandomIntercept:
    """The fitted between-site distribution of intercepts, a_i ~ N(mu, tau^2), relative to
    the federated model's own intercept."""

    mu: float
    tau: float
    converged: bool


@dataclass(frozen=True)
class ExcessRatio:
    """One site's excess readmission ratio and its 95% interval."""

    err: float
    low: float
    high: float


def _offsets(n: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """logit of each site's mean expected risk E / n, kept inside (0, 1)."""
    risk = np.clip(expected / n, 1e-9, 1 - 1e-9)
    return np.log(risk / (1 - risk))


def _posterior_mode(
    n: np.ndarray, observed: np.ndarray, offset: np.ndarray, mu: float, tau: float
) -> tuple[np.ndarray, np.ndarray]:
    """Every site's posterior mode of u = a - mu and the curvature there (Newton, concave)."""
    u = np.zeros_like(offset)
    for _ in range(100):
        p = expit(offset + mu + u)
        gradient = observed - n * p - u / tau**2
        curvature = n * p * (1 - p) + 1 / tau**2
        step = np.clip(gradient / curvature, -1.0, 1.0)
        u = u + step
        if np.abs(step).max() < 1e-10:
            break
    p = expit(offset + mu + u)
    return u, n * p * (1 - p) + 1 / tau**2


def _log_joint(
    n: np.ndarray, observed: np.ndarray, offset: np.ndarray, mu: float, tau: float, u: np.ndarray
) -> np.ndarray:
    """log p(O | a = mu + u) + log N(u; 0, tau^2), binomial coefficients left out."""
    eta = offset + mu + u
    return (
        observed * log_expit(eta)
        + (n - observed) * log_expit(-eta)
        - 0.5 * (u / tau) ** 2
        - math.log(tau * math.sqrt(2 * math.pi))
    )


def marginal_log_likelihood(n: np.ndarray, observed: np.ndarray, expected: np.ndarray, mu: float, tau: float) -> float:
    """log prod_i integral p(O_i | a) N(a; mu, tau^2) da by adaptive Gauss-Hermite quadrature."""
    offset = _offsets(n, expected)
    mode, curvature = _posterior_mode(n, observed, offset, mu, tau)
    scale = np.sqrt(2 / curvature)
    points = mode[:, None] + scale[:, None] * _NODES[None, :]
    terms = _log_joint(n[:, None], observed[:, None], offset[:, None], mu, tau, points) + _NODES[None, :] ** 2
    peak = terms.max(axis=1, keepdims=True)
    return float(np.sum(np.log(scale) + peak[:, 0] + np.log(np.exp(terms - peak) @ _WEIGHTS)))


def fit_random_intercept(n: Sequence[float], observed: Sequence[float], expected: Sequence[float]) -> RandomIntercept:
    """Maximum marginal likelihood mu and tau from every site's n, O and E."""
    from scipy.optimize import minimize  # 0.5 s to import: not for every command that reads a config

    n, observed, expected = (np.asarray(a, dtype="float64") for a in (n, observed, expected))
    observed = np.clip(observed, 0, n)  # a noisy release may read outside [0, n]
    low, high = (math.log(t) for t in TAU_RANGE)

    def objective(parameters: np.ndarray) -> float:
        mu, log_tau = parameters
        return -marginal_log_likelihood(n, observed, expected, mu, math.exp(min(max(log_tau, low), high)))

    result = minimize(
        objective,
        x0=np.array([0.0, math.log(0.2)]),
        method="Nelder-Mead",
        options={"xatol": 1e-6, "fatol": 1e-8, "maxiter": 2000},
    )
    mu, log_tau = result.x
    return RandomIntercept(float(mu), math.exp(min(max(float(log_tau), low), high)), bool(result.success))


def excess_readmission_ratios(
    n: Sequence[float],
    observed: Sequence[float],
    expected: Sequence[float],
    fit: RandomIntercept,
    z: float,
    noise: float = 0.0,
) -> list[ExcessRatio]:
    """Each site's ERR (posterior mode) with its Laplace interval at ``z``.

    ``noise``: the sd of DP noise on each O. The interval then takes the information O
    carries about a site's effect as a count seen through that noise, (npq)^2 / (npq +
    noise^2) instead of npq (the normal approximation's Fisher information), so it widens
    where the noise is large against the site's own binomial spread.
    """
    n, observed, expected = (np.asarray(a, dtype="float64") for a in (n, observed, expected))
    offset = _offsets(n, expected)
    mode, curvature = _posterior_mode(n, np.clip(observed, 0, n), offset, fit.mu, fit.tau)
    if noise > 0:
        binomial = curvature - 1 / fit.tau**2
        curvature = binomial**2 / (binomial + noise**2) + 1 / fit.tau**2
    spread = z / np.sqrt(curvature)
    average = expit(offset + fit.mu)

    def ratio(u: np.ndarray) -> np.ndarray:
        return expit(offset + fit.mu + u) / average

    return [ExcessRatio(*map(float, values)) for values in zip(ratio(mode), ratio(mode - spread), ratio(mode + spread))]


def peer_medians(values: Mapping[str, float], groups: Mapping[str, str]) -> dict[str, float]:
    """Each site's peer-group median of ``values`` (CMS's threshold within a peer group);
    a site with no group is compared with every site without one."""
    members: dict[str, list[float]] = {}
    for site, value in values.items():
        members.setdefault(groups.get(site, ""), []).append(value)
    return {site: float(np.median(members[groups.get(site, "")])) for site in values}
