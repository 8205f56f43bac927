"""Risk-adjusted benchmarking: observed against expected readmissions and costs per site,
funnel-plot control limits, and value (outcome per cost).

Each site scores its own rows with the federated model and shares only six totals
(``site_totals``, in ``SITE_SLOTS`` order): rows n, observed readmissions O, expected
readmissions E = sum of predicted risks, observed cost C, expected cost C_E = sum of
predicted costs, and the sum of squared cost residuals sum (c - c_hat)^2. The coordinator
turns them into ``Benchmark`` (``benchmark``).

Risk adjustment uses patient-level case mix only. A model feature that describes the
site rather than the patient (``SITE_LEVEL_COLUMNS``: region) would soak up the very
quality effect a benchmark looks for wherever few sites share a level, so a site scores
its expected readmissions with those columns zeroed (``without_site_level``), and
``standardised`` then scales every site's E by the federation's sum O / sum E, and its
expected cost by sum C / sum C_E: indirect standardisation, each site against the
federation as a whole, whose O/E and cost O/E are then 1 (and its value index 1) in every
run, however well or badly the model's overall level fits (a DP-trained model's often
does not); ``calibration`` keeps the two factors, which say how far off it was. Costs
keep region: regional price levels are a legitimate adjustment, not a provider's doing.

In a federation the totals travel as one shared sum over the roster (``shared_vector``):
each site writes its totals, in exact integer units (``TOTAL_UNITS``) as 30-bit limbs, into
its own block and zeros elsewhere, so the sum is every site's totals side by side —
exactly what the sites agreed to share, and nothing finer.

Formulas
--------
- O/E readmissions, 95% CI by Byar's approximation to the exact Poisson interval:
  low = O (1 - 1/(9O) - z/(3 sqrt O))^3 / E, high = (O+1) (1 - 1/(9(O+1)) + z/(3 sqrt(O+1)))^3 / E.
- Funnel control limits around 1 (Spiegelhalter, Stat Med 2005;24:1185): the same Byar
  formulas at O = E, i.e. Poisson limits for a site whose readmissions are exactly as
  expected, at z = 1.96 (95%) and z = 3.09 (99.8%); volume on the funnel's x axis is E.
  A site is flagged ``above_998`` when its O/E lies above the upper 99.8% limit, etc.
- Cost ratio C / C_E with a normal-approximation CI: Var(C) is estimated by the sum of
  squared residuals (costs independent given case mix; the expected-cost model right on
  average), so SE = sqrt(sum (c - c_hat)^2) / C_E. No bootstrap; fine for hundreds of
  episodes, optimistic for a few dozen heavy-tailed ones.
- Value: risk-adjusted readmission rate RAR = O/E x federation rate (sum O / sum n),
  risk-adjusted cost RAC = C/C_E x federation mean cost (sum C / sum n), value =
  (1 - RAR) / RAC, readmission-free episodes per currency unit; ``value_index`` divides
  it by the federation's (1 - rate) / mean cost, so 1 is the federation average and
  above 1 is better value. Its 95% interval by the delta method on log value index, O
  Poisson (Var O/E = O / E^2) and the cost ratio's SE as above, taken as independent.
- Excess readmission ratio (ERR, shrunken toward the average site) and funnel limits
  widened for between-site variation: ``analytics.random_effects``, from n, O and E.
  The funnel position (``funnel``) is read against the widened limits; the ``above_*``
  and ``below_*`` flags against the Poisson ones.
- Totals that carry distributed DP noise (``noise_spread``: its standard deviation on
  each total): the O/E and cost O/E intervals add the noise's half-width to each side in
  quadrature (O/E's noise sd: sqrt(sd_O^2 + (O/E)^2 sd_E^2) / E), and the value index's
  delta-method variance adds the noise variance of O, E, C and C_E; ERR's Laplace interval
  takes O's information as seen through the noise (``excess_readmission_ratios``). The
  funnel limits, and the noise on E, are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np
import pandas as pd

from fedcost.analytics import exact
from fedcost.analytics.random_effects import (
    ERR_METHOD,
    FUNNEL_METHOD,
    excess_readmission_ratios,
    fit_random_intercept,
    funnel_tau2,
    overdispersed_limits,
    peer_medians,
)
from fedcost.errors import PolicyViolationError
from fedcost.privacy.policy import MIN_COHORT

SITE_SLOTS = ("n", "observed", "expected", "cost_observed", "cost_expected", "cost_residual_ss")
# Model features that describe the site, not the patient: left out of expected readmissions.
SITE_LEVEL_COLUMNS = ("region",)
# The unit each total travels in: rows and readmissions whole, expected readmissions in
# millionths, costs in cents, squared cost residuals in squared cents.
TOTAL_UNITS = (1.0, 1.0, 1e-6, 0.01, 0.01, 1e-4)
TOTAL_LIMBS = 3
Z_95 = NormalDist().inv_cdf(0.975)
Z_998 = NormalDist().inv_cdf(0.999)


def site_totals(
    readmitted: np.ndarray,
    expected_risk: np.ndarray,
    cost: np.ndarray,
    expected_cost: np.ndarray,
    *,
    min_cohort: int = MIN_COHORT,
) -> np.ndarray:
    """The six totals a site shares (``SITE_SLOTS``); refuses a cohort under ``min_cohort``."""
    readmitted, expected_risk, cost, expected_cost = (
        np.asarray(a, dtype="float64") for a in (readmitted, expected_risk, cost, expected_cost)
    )
    n = len(readmitted)
    if not len(expected_risk) == len(cost) == len(expected_cost) == n:
        raise ValueError("readmitted, expected_risk, cost and expected_cost need one value per row")
    if n < min_cohort:
        raise PolicyViolationError(f"a benchmark of {n} rows describes fewer than {min_cohort} patients; not shared")
    if not np.isin(readmitted, (0.0, 1.0)).all():
        raise ValueError("readmitted must be 0 or 1")
    if not ((expected_risk >= 0) & (expected_risk <= 1)).all():
        raise ValueError("expected_risk must be a probability in [0, 1]")
    if not ((cost >= 0) & (expected_cost >= 0)).all():
        raise ValueError("costs must be non-negative numbers")
    return np.array(
        [
            n,
            readmitted.sum(),
            expected_risk.sum(),
            cost.sum(),
            expected_cost.sum(),
            np.square(cost - expected_cost).sum(),
        ]
    )


def without_site_level(features: np.ndarray, names: list[str]) -> np.ndarray:
    """Encoded features with every site-level column (``SITE_LEVEL_COLUMNS``) zeroed."""
    site_level = [i for i, name in enumerate(names) if name.split("=")[0].split("__")[0] in SITE_LEVEL_COLUMNS]
    neutral = np.array(features, copy=True)
    neutral[:, site_level] = 0.0
    return neutral


# What each standardised expected total is scaled to match: (expected slot, observed slot).
STANDARDISED = {"readmission": ("expected", "observed"), "cost": ("cost_expected", "cost_observed")}


def calibration(sites: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The federation's observed over expected, per outcome, before standardising: the
    model's calibration-in-the-large, the factor ``standardised`` scales expected by."""

    def total(slot: str) -> float:
        return sum(float(t[SITE_SLOTS.index(slot)]) for t in sites.values())

    return {outcome: total(observed) / total(expected) for outcome, (expected, observed) in STANDARDISED.items()}


def standardised(sites: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every site's totals with E and C_E scaled so the federation's sums equal sum O and sum C."""
    factors = calibration(sites)
    scaled = {}
    for name, totals in sites.items():
        scaled[name] = np.array(totals, dtype="float64")
        for outcome, (expected, _) in STANDARDISED.items():
            scaled[name][SITE_SLOTS.index(expected)] *= factors[outcome]
    return scaled


def shared_vector(totals: np.ndarray, slot: int, sites: int, *, noisy: bool = False) -> np.ndarray:
    """A site's totals in block ``slot`` of a vector with one block per roster site: in exact
    units as limbs, or, for a noisy release, as they are (the noise makes exactness moot)."""
    if not 0 <= slot < sites:
        raise ValueError(f"slot {slot} is outside a roster of {sites} sites")
    if noisy:
        block = np.asarray(totals, dtype="float64")
    else:
        units = [round(float(total) / unit) for total, unit in zip(totals, TOTAL_UNITS, strict=True)]
        block = exact.split(units, TOTAL_LIMBS)
    vector = np.zeros(sites * block.size)
    vector[slot * block.size : (slot + 1) * block.size] = block
    return vector


def shared_vector_size(sites: int, *, noisy: bool = False) -> int:
    return sites * len(SITE_SLOTS) * (1 if noisy else TOTAL_LIMBS)


def noisy_bounds(sites: int, cost_clip: float) -> np.ndarray:
    """The most one row adds to each slot of a noisy shared vector (costs clipped at ``cost_clip``)."""
    return np.tile([1.0, 1.0, 1.0, cost_clip, cost_clip, cost_clip**2], sites)


# The most slots of a shared vector one row changes: its site's six totals.
NOISY_TOUCHED = len(SITE_SLOTS)


def totals_from_shared_vector(vector: np.ndarray, names: list[str], *, noisy: bool = False) -> dict[str, np.ndarray]:
    """Every site's six totals from the summed vector; a site whose block is all zero
    (it dropped out or shared nothing) is left out, and of a noisy vector, a block whose
    noisy row count is not positive."""
    if noisy:  # post-processing: no total reads below zero, and a ratio needs a positive denominator
        blocks = np.clip(np.asarray(vector, dtype="float64").reshape(len(names), len(SITE_SLOTS)), 0, None)
        usable = [SITE_SLOTS.index(slot) for slot in ("n", "expected", "cost_expected")]
        return {name: row for name, row in zip(names, blocks, strict=True) if (row[usable] >= 1).all()}
    units = np.array(exact.join(vector, TOTAL_LIMBS), dtype="float64").reshape(len(names), len(SITE_SLOTS))
    return {name: row * np.array(TOTAL_UNITS) for name, row in zip(names, units, strict=True) if row[0] > 0}


def byar_interval(observed: float, z: float) -> tuple[float, float]:
    """Byar's approximation to the exact Poisson interval for a count ``observed``."""
    low = 0.0 if observed <= 0 else observed * (1 - 1 / (9 * observed) - z / (3 * math.sqrt(observed))) ** 3
    upper = observed + 1
    high = upper * (1 - 1 / (9 * upper) + z / (3 * math.sqrt(upper))) ** 3
    return max(low, 0.0), high


def funnel_limits(expected: float | np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Control limits for O/E around 1 at volume ``expected`` (Byar at O = E)."""
    expected = np.asarray(expected, dtype="float64")
    low = expected * np.clip(1 - 1 / (9 * expected) - z / (3 * np.sqrt(expected)), 0, None) ** 3
    upper = expected + 1
    high = upper * (1 - 1 / (9 * upper) + z / (3 * np.sqrt(upper))) ** 3
    return low / expected, high / expected


@dataclass(frozen=True)
class SiteBenchmark:
    """One site's risk-adjusted results; ``oe_*``, ``cost_ratio_*``, ``value_index_*`` and
    ``err_*`` are 95% intervals; ``od_limit_*`` the overdispersed funnel limits and
    ``funnel`` the site's position against them; ``peer_group`` and ``err_threshold`` (the
    peer group's median ERR, or 1 without peer groups) as CMS compares hospitals."""

    site: str
    n: int
    observed: float
    expected: float
    oe: float
    oe_low: float
    oe_high: float
    limit_95_low: float
    limit_95_high: float
    limit_998_low: float
    limit_998_high: float
    od_limit_95_low: float
    od_limit_95_high: float
    od_limit_998_low: float
    od_limit_998_high: float
    funnel: str
    above_998: bool
    above_95: bool
    below_95: bool
    below_998: bool
    cost_observed: float
    cost_expected: float
    cost_ratio: float
    cost_ratio_low: float
    cost_ratio_high: float
    risk_adjusted_rate: float
    risk_adjusted_cost: float
    value: float
    value_index: float
    value_index_low: float
    value_index_high: float
    err: float
    err_low: float
    err_high: float
    peer_group: str
    err_threshold: float


@dataclass(frozen=True)
class Benchmark:
    """Every site's results and the federation figures they are scaled by: its rate and
    mean cost, the model's ``calibration`` before standardising (empty where the totals
    came standardised or not at all), the funnel's between-site variance ``funnel_tau2``
    and the random intercepts' ``average_intercept`` (mu) and ``between_site_sd`` (tau)."""

    sites: tuple[SiteBenchmark, ...]
    federation_rate: float
    federation_mean_cost: float
    funnel_tau2: float
    average_intercept: float
    between_site_sd: float
    calibration: dict[str, float] = field(default_factory=dict)
    funnel_method: str = FUNNEL_METHOD
    err_method: str = ERR_METHOD

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(site) for site in self.sites])

    def to_dict(self) -> dict:
        return {
            **{k: v for k, v in asdict(self).items() if k != "sites"},
            "sites": [asdict(site) for site in self.sites],
        }


def position_in_funnel(oe: float, limits_95: tuple[float, float], limits_998: tuple[float, float]) -> str:
    """Where an O/E lies against a funnel's limits, in words; above is worse (more readmissions)."""
    for bound, above, words in (
        (limits_998[1], True, "above 99.8% limit"),
        (limits_95[1], True, "above 95% limit"),
        (limits_998[0], False, "below 99.8% limit"),
        (limits_95[0], False, "below 95% limit"),
    ):
        if (oe > bound) if above else (oe < bound):
            return words
    return "within limits"


def noise_spread(sd: float, cost_clip: float, calibration: Mapping[str, float]) -> np.ndarray:
    """The standard deviation of the DP noise on each of a site's totals (``SITE_SLOTS``
    order) after ``standardised``: ``sd`` bounds of a row per total, expected totals scaled
    by the ``calibration`` factors as they were."""
    spread = sd * noisy_bounds(1, cost_clip)
    for outcome, (expected, _) in STANDARDISED.items():
        spread[SITE_SLOTS.index(expected)] *= calibration[outcome]
    return spread


def _widened(centre: float, low: float, high: float, noise: float) -> tuple[float, float]:
    """An interval with the noise's half-width added to each side in quadrature."""
    return max(centre - math.hypot(centre - low, noise), 0.0), centre + math.hypot(high - centre, noise)


def value_index_interval(
    value_index: float, t: Mapping[str, float], rate: float, z: float, noise: Mapping[str, float]
) -> tuple[float, float]:
    """The delta-method interval of a value index on the log scale (O Poisson, cost SE from
    the squared residuals, each total's DP noise of sd ``noise``, all independent)."""
    oe, ratio = t["observed"] / t["expected"], t["cost_observed"] / t["cost_expected"]
    readmission_free = 1 - oe * rate
    if readmission_free <= 0 or ratio <= 0:
        return value_index, value_index
    oe_variance = (t["observed"] + noise["observed"] ** 2 + (oe * noise["expected"]) ** 2) / t["expected"] ** 2
    cost_variance = (
        max(t["cost_residual_ss"], 0.0) + noise["cost_observed"] ** 2 + (ratio * noise["cost_expected"]) ** 2
    ) / t["cost_expected"] ** 2
    variance = rate**2 * oe_variance / readmission_free**2 + cost_variance / ratio**2
    spread = z * math.sqrt(variance)
    return value_index * math.exp(-spread), value_index * math.exp(spread)


def benchmark(
    sites: Mapping[str, np.ndarray],
    *,
    peer_groups: Mapping[str, str] | None = None,
    calibration: Mapping[str, float] | None = None,
    noise: np.ndarray | None = None,
) -> Benchmark:
    """Risk-adjusted results for every site from the totals each shared (``site_totals``).

    ``peer_groups`` maps sites to their peer group (a site left out is in a group of its
    own kind, "": every unnamed site together); ``calibration``: the factors the totals
    were standardised by, kept for the report; ``noise``: the DP noise's sd on each total
    (``noise_spread``), for totals that carry it.
    """
    spread = dict(zip(SITE_SLOTS, np.zeros(len(SITE_SLOTS)) if noise is None else noise, strict=True))
    totals = {
        name: dict(zip(SITE_SLOTS, np.asarray(vector, dtype="float64").tolist(), strict=True))
        for name, vector in sites.items()
    }
    n_all = sum(t["n"] for t in totals.values())
    rate = sum(t["observed"] for t in totals.values()) / n_all
    mean_cost = sum(t["cost_observed"] for t in totals.values()) / n_all
    counts = [[t[slot] for t in totals.values()] for slot in ("n", "observed", "expected")]
    tau2 = funnel_tau2(counts[1], counts[2])
    intercepts = fit_random_intercept(*counts)
    errs = excess_readmission_ratios(*counts, intercepts, Z_95, noise=float(spread["observed"]))
    ratios = dict(zip(totals, errs, strict=True))
    thresholds = (
        peer_medians({name: r.err for name, r in ratios.items()}, peer_groups)
        if peer_groups is not None
        else dict.fromkeys(totals, 1.0)
    )
    results = []
    for name, t in totals.items():
        observed, expected = t["observed"], t["expected"]
        oe = observed / expected
        low, high = (bound / expected for bound in byar_interval(observed, Z_95))
        noise_half_width = Z_95 * math.hypot(spread["observed"], oe * spread["expected"]) / expected
        oe_low, oe_high = _widened(oe, low, high, noise_half_width)
        (l95,), (h95,) = funnel_limits([expected], Z_95)
        (l998,), (h998,) = funnel_limits([expected], Z_998)
        od95, od998 = (tuple(float(b) for b in overdispersed_limits(expected, z, tau2)) for z in (Z_95, Z_998))
        ratio = t["cost_observed"] / t["cost_expected"]
        cost_variance = max(t["cost_residual_ss"], 0.0) + spread["cost_observed"] ** 2
        half_width = Z_95 * math.sqrt(cost_variance + (ratio * spread["cost_expected"]) ** 2) / t["cost_expected"]
        rar, rac = oe * rate, ratio * mean_cost
        if rac > 0 and mean_cost > 0:
            value = (1 - rar) / rac
            value_index = value / ((1 - rate) / mean_cost)
            vi_low, vi_high = value_index_interval(value_index, t, rate, Z_95, spread)
        else:  # a noisy cost total at or below zero (DP on few rows): no value to speak of
            value = value_index = vi_low = vi_high = math.nan
        results.append(
            SiteBenchmark(
                site=name,
                n=int(t["n"]),
                observed=observed,
                expected=expected,
                oe=oe,
                oe_low=oe_low,
                oe_high=oe_high,
                limit_95_low=float(l95),
                limit_95_high=float(h95),
                limit_998_low=float(l998),
                limit_998_high=float(h998),
                od_limit_95_low=od95[0],
                od_limit_95_high=od95[1],
                od_limit_998_low=od998[0],
                od_limit_998_high=od998[1],
                funnel=position_in_funnel(oe, od95, od998),
                above_998=bool(oe > h998),
                above_95=bool(oe > h95),
                below_95=bool(oe < l95),
                below_998=bool(oe < l998),
                cost_observed=t["cost_observed"],
                cost_expected=t["cost_expected"],
                cost_ratio=ratio,
                cost_ratio_low=max(ratio - half_width, 0.0),
                cost_ratio_high=ratio + half_width,
                risk_adjusted_rate=rar,
                risk_adjusted_cost=rac,
                value=value,
                value_index=value_index,
                value_index_low=vi_low,
                value_index_high=vi_high,
                err=ratios[name].err,
                err_low=ratios[name].low,
                err_high=ratios[name].high,
                peer_group=(peer_groups or {}).get(name, ""),
                err_threshold=thresholds[name],
            )
        )
    return Benchmark(tuple(results), rate, mean_cost, tau2, intercepts.mu, intercepts.tau, dict(calibration or {}))
