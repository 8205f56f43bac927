"""Between-site variation from the totals sites already share: the random-intercept fit
recovers the between-site SD it was simulated with, excess readmission ratios shrink
small sites toward 1 and leave large ones near their O/E, and the DerSimonian-Laird
funnel limits hold about 95% of overdispersed sites where Poisson limits do not."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import expit

from fedcost.analytics.benchmarking import Z_95, benchmark, funnel_limits
from fedcost.analytics.random_effects import (
    excess_readmission_ratios,
    fit_random_intercept,
    funnel_tau2,
    overdispersed_limits,
    peer_medians,
)

RISK = 0.15


def _sites(
    rng: np.random.Generator, tau: float, k: int = 40, sizes: tuple[int, int] = (200, 5000)
) -> tuple[np.ndarray, ...]:
    """k sites with mean risk 0.15 and intercepts N(0, tau^2): (n, O, E, a)."""
    n = rng.integers(*sizes, k).astype("float64")
    effect = rng.normal(0, tau, k)
    observed = rng.binomial(n.astype(int), 1 / (1 + np.exp(-(math.log(RISK / (1 - RISK)) + effect)))).astype("float64")
    return n, observed, n * RISK, effect


@pytest.mark.parametrize("tau", [0.15, 0.4])
def test_the_random_intercept_fit_recovers_the_between_site_sd(tau: float) -> None:
    rng = np.random.default_rng(int(tau * 100))
    estimates = [fit_random_intercept(*_sites(rng, tau)[:3]) for _ in range(15)]
    assert all(fit.converged for fit in estimates)
    assert np.mean([fit.tau for fit in estimates]) == pytest.approx(tau, abs=0.04)
    assert abs(np.mean([fit.mu for fit in estimates])) < 0.05


def test_without_between_site_variation_tau_is_near_zero_and_every_err_near_one() -> None:
    n, observed, expected, _ = _sites(np.random.default_rng(5), 0.0)
    fit = fit_random_intercept(n, observed, expected)
    assert fit.tau < 0.06
    ratios = excess_readmission_ratios(n, observed, expected, fit, Z_95)
    assert max(abs(r.err - 1) for r in ratios) < max(abs(observed / expected - 1))
    assert max(abs(math.log(r.err)) for r in ratios) < 0.06


def test_a_small_site_is_pulled_toward_one_and_a_large_one_keeps_its_oe() -> None:
    # 30 ordinary sites, plus a small and a large site that each readmit 40% more than expected.
    rng = np.random.default_rng(11)
    n, observed, expected, _ = _sites(rng, 0.2, k=30, sizes=(1000, 3000))
    n = np.append(n, [60, 20000])
    expected = np.append(expected, [60 * RISK, 20000 * RISK])
    observed = np.append(observed, [round(1.4 * 60 * RISK), round(1.4 * 20000 * RISK)])
    fit = fit_random_intercept(n, observed, expected)
    small, large = excess_readmission_ratios(n, observed, expected, fit, Z_95)[-2:]
    small_oe, large_oe = observed[-2:] / expected[-2:]
    assert abs(math.log(small.err)) < 0.5 * abs(math.log(small_oe)), "a small site's own readmissions say little"
    assert large.err == pytest.approx(large_oe * math.exp(-fit.mu), rel=0.05), "a large site speaks for itself"
    assert small.low < small.err < small.high and large.low < large.err < large.high
    assert small.high - small.low > 5 * (large.high - large.low)


def test_err_intervals_cover_the_true_effect_about_95_percent() -> None:
    rng = np.random.default_rng(3)
    covered = []
    for _ in range(30):
        n, observed, expected, effect = _sites(rng, 0.3)
        fit = fit_random_intercept(n, observed, expected)
        p = 1 / (1 + np.exp(-(math.log(RISK / (1 - RISK)) + fit.mu)))
        truth = (1 / (1 + np.exp(-(math.log(RISK / (1 - RISK)) + effect)))) / p
        ratios = excess_readmission_ratios(n, observed, expected, fit, Z_95)
        covered += [r.low <= t <= r.high for r, t in zip(ratios, truth)]
    assert 0.9 <= np.mean(covered) <= 0.99


def test_dersimonian_laird_on_a_hand_computed_case() -> None:
    observed, expected = np.array([10.0, 30.0, 50.0]), np.array([20.0, 25.0, 40.0])
    z = np.log(observed / expected) * np.sqrt(expected)
    phi = np.mean(z**2)
    expected_tau2 = (3 * phi - 2) / (expected.sum() - np.square(expected).sum() / expected.sum())
    assert funnel_tau2(observed, expected, trim=0.0) == pytest.approx(expected_tau2)
    assert funnel_tau2([20.0, 25.0, 40.0], expected, trim=0.0) == 0.0, "no spread beyond Poisson: no widening"
    low, high = overdispersed_limits(40.0, Z_95, 0.0)
    assert (low, high) == pytest.approx((math.exp(-Z_95 / math.sqrt(40)), math.exp(Z_95 / math.sqrt(40))))


def test_overdispersed_limits_hold_about_95_percent_of_sites_where_poisson_limits_do_not() -> None:
    """Untrimmed, the DerSimonian-Laird limits hold about 95% of sites that differ only by a
    random intercept. FunnelPlotR's 10% truncation treats the extreme fifth of sites as
    possible outliers rather than variation, so it widens less, but still far more than
    no allowance at all."""
    rng = np.random.default_rng(8)
    inside: dict[str, list[bool]] = {"untrimmed": [], "truncated": [], "poisson": []}
    for _ in range(20):
        _, observed, expected, _ = _sites(rng, 0.2, k=60, sizes=(2000, 8000))
        oe = observed / expected
        for label, (low, high) in (
            ("untrimmed", overdispersed_limits(expected, Z_95, funnel_tau2(observed, expected, trim=0.0))),
            ("truncated", overdispersed_limits(expected, Z_95, funnel_tau2(observed, expected))),
            ("poisson", funnel_limits(expected, Z_95)),
        ):
            inside[label] += list((oe >= low) & (oe <= high))
    share = {label: float(np.mean(flags)) for label, flags in inside.items()}
    assert 0.92 <= share["untrimmed"] <= 0.98, share
    assert share["poisson"] < 0.7 < share["truncated"] < share["untrimmed"], share


def test_peer_groups_compare_each_err_with_its_groups_median() -> None:
    medians = peer_medians({"a": 0.9, "b": 1.1, "c": 1.3, "d": 0.8, "e": 1.0}, {"a": "low", "b": "low", "c": "low"})
    assert medians == {"a": 1.1, "b": 1.1, "c": 1.1, "d": 0.9, "e": 0.9}
    rng = np.random.default_rng(2)
    sites = {}
    for k in range(6):
        n = 1000 + 500 * k
        risk = np.full(n, RISK)
        readmitted = rng.random(n) < risk * (1.3 if k % 2 else 1.0)
        sites[f"h{k}"] = np.array([n, readmitted.sum(), risk.sum(), 1000.0 * n, 1000.0 * n, 1e6 * n])
    groups = {f"h{k}": "odd" if k % 2 else "even" for k in range(6)}
    result = benchmark(sites, peer_groups=groups)
    by_group = {g: np.median([s.err for s in result.sites if s.peer_group == g]) for g in ("odd", "even")}
    assert all(s.err_threshold == pytest.approx(by_group[s.peer_group]) for s in result.sites)
    assert by_group["odd"] > by_group["even"]
    assert all(s.err_threshold == 1.0 and s.peer_group == "" for s in benchmark(sites).sites)


def test_err_intervals_on_noisy_observed_counts_cover_about_95_percent_with_the_noise_in() -> None:
    """O released with DP noise (sd 5): the ERR interval that takes O's information as seen
    through the noise covers each site's true ratio at about its level; one that ignores
    the noise falls short."""
    rng = np.random.default_rng(7)
    covered: dict[float, list[bool]] = {5.0: [], 0.0: []}
    for _ in range(30):
        n = rng.integers(80, 400, 30).astype(float)
        case_mix = -1.7 + rng.normal(0, 0.3, 30)
        effect = rng.normal(0, 0.25, 30)
        expected = n * expit(case_mix)
        noisy = rng.binomial(n.astype(int), expit(case_mix + effect)) + rng.normal(0, 5.0, 30)
        fit = fit_random_intercept(n, noisy, expected)
        offset = np.log(expected / (n - expected))
        truth = expit(offset + fit.mu + effect) / expit(offset + fit.mu)
        for noise in covered:
            ratios = excess_readmission_ratios(n, noisy, expected, fit, Z_95, noise=noise)
            covered[noise] += [r.low <= t <= r.high for r, t in zip(ratios, truth, strict=True)]
    assert 0.91 <= np.mean(covered[5.0]) <= 0.98 and np.mean(covered[0.0]) < 0.9, {
        k: np.mean(v) for k, v in covered.items()
    }
