"""Exact federated GLMs: the federated fit is the pooled one, statsmodels is the reference."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import optimize

from fedcost.errors import ModelFitError
from fedcost.models import glm
from fedcost.secagg.prg import word
from fedcost.secagg.quantize import MAX_BITS

# 11 sites: four under 30 rows, one (4 rows) with fewer rows than the 6 coefficients.
SITE_ROWS = (400, 260, 25, 4, 310, 180, 28, 350, 90, 12, 150)
DROPPED = 5  # the site that drops out of every sum
FEATURES = 5
TRUE_BETA = np.array([0.3, 0.5, -0.4, 0.2, 0.0, 0.15])
Site = tuple[np.ndarray, np.ndarray]

FAMILIES = {
    "binomial": (glm.BINOMIAL, lambda: sm.families.Binomial()),
    "poisson": (glm.POISSON, lambda: sm.families.Poisson()),
    "gamma": (glm.GAMMA, lambda: sm.families.Gamma(link=sm.families.links.Log())),
    "tweedie": (glm.tweedie(1.5), lambda: sm.families.Tweedie(var_power=1.5, link=sm.families.links.Log())),
    "gaussian": (glm.GAUSSIAN, lambda: sm.families.Gaussian()),
}


def _draw(name: str, eta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mu = np.exp(eta)
    if name == "binomial":
        return rng.binomial(1, 1 / (1 + np.exp(-eta))).astype(float)
    if name == "poisson":
        return rng.poisson(mu).astype(float)
    if name == "gamma":
        return rng.gamma(2.0, mu / 2.0)
    if name == "tweedie":  # exact zeros plus a skewed positive part, as episode costs
        return np.where(rng.random(eta.size) < 0.3, 0.0, rng.gamma(1.5, mu / 1.5))
    return eta + rng.normal(size=eta.size)


def make_sites(name: str, seed: int = 0) -> list[Site]:
    """Sites that differ in case mix and in a site effect, so cluster-robust errors differ from model-based."""
    rng = np.random.default_rng(seed)
    sites = []
    for k, rows in enumerate(SITE_ROWS):
        x = rng.normal(loc=0.3 * (k % 3 - 1), size=(rows, FEATURES))
        eta = TRUE_BETA[0] + x @ TRUE_BETA[1:] + 0.25 * (k % 2 - 0.5)
        sites.append((x, _draw(name, eta, rng)))
    return sites


def included(sites: list[Site]) -> list[Site]:
    return [site for k, site in enumerate(sites) if k != DROPPED]


def pooled_rows(sites: list[Site]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, target and site id of every row of ``sites``."""
    x = np.vstack([s[0] for s in sites])
    y = np.concatenate([s[1] for s in sites])
    groups = np.concatenate([np.full(len(s[1]), k) for k, s in enumerate(sites)])
    return x, y, groups


def plain_total(sites: list[Site], family: glm.Family) -> Callable[[np.ndarray], np.ndarray]:
    return lambda beta: sum(glm.site_sums(x, y, beta, family=family) for x, y in sites)


def federated(sites: list[Site], family: glm.Family, **settings) -> glm.FittedGlm:
    return glm.fit(plain_total(sites, family), parameters=FEATURES + 1, family=family, **settings)


def statsmodels_fit(name: str, x: np.ndarray, y: np.ndarray, **fit_kwargs):
    result = sm.GLM(y, sm.add_constant(x), family=FAMILIES[name][1]()).fit(tol=1e-13, maxiter=200, **fit_kwargs)
    assert result.converged
    return result


def secure_total(vectors: list[np.ndarray], precision: glm.SumsPrecision, label: str) -> np.ndarray:
    """Each node's vector through Quantizer.encode, added mod 2**bits (the masks of SecAgg+ cancel), decoded."""
    quantizer = precision.quantizer()
    total = np.zeros(quantizer.length([v.shape for v in vectors[:1]]), dtype=word(quantizer.bits))
    for k, vector in enumerate(vectors):
        seed = hashlib.sha256(f"{label}:{k}".encode()).digest()  # fixed seeds: a reproducible test
        total += quantizer.encode([vector], seed=seed)
    total &= total.dtype.type((1 << quantizer.bits) - 1)
    sums, weight = quantizer.decode(total, [vectors[0].shape])
    assert weight == len(vectors)
    return sums[0]


def quantised_total(
    sites: list[Site], family: glm.Family, precision: glm.SumsPrecision
) -> Callable[[np.ndarray], np.ndarray]:
    rounds = itertools.count()

    def total_at(beta: np.ndarray) -> np.ndarray:
        vectors = [glm.site_sums(x, y, beta, family=family, limit=precision.clip) for x, y in sites]
        return secure_total(vectors, precision, f"sums:{next(rounds)}")

    return total_at


# --- the federated fit is the pooled fit ------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_federated_fit_over_surviving_sites_equals_statsmodels_on_their_rows(name):
    family = FAMILIES[name][0]
    sites = make_sites(name)
    assert min(len(y) for _, y in sites) < FEATURES + 1 and sum(len(y) < 30 for _, y in sites) >= 3
    model = federated(included(sites), family)
    x, y, _ = pooled_rows(included(sites))
    reference = statsmodels_fit(name, x, y)
    assert model.converged and model.rows == len(y)
    np.testing.assert_allclose(model.coefficients, reference.params, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.standard_errors(), reference.bse, rtol=1e-4)
    np.testing.assert_allclose(model.dispersion, reference.scale, rtol=1e-6)
    np.testing.assert_allclose(model.deviance, reference.deviance, rtol=1e-8)
    np.testing.assert_allclose(model.pearson, reference.pearson_chi2, rtol=1e-8)
    # the same iteration on the pooled rows, and a fit that did see the dropped site differs
    np.testing.assert_allclose(glm.fit_pooled(x, y, family=family).coefficients, model.coefficients, atol=1e-12)
    assert np.abs(federated(sites, family).coefficients - model.coefficients).max() > 1e-3


@pytest.mark.parametrize("name", ["binomial", "gamma"])
def test_coefficient_table_matches_statsmodels(name):
    family = FAMILIES[name][0]
    sites = included(make_sites(name))
    model = federated(sites, family)
    x, y, _ = pooled_rows(sites)
    reference = statsmodels_fit(name, x, y)
    table = model.summary()
    assert [row.name for row in table] == ["intercept", "x1", "x2", "x3", "x4", "x5"]
    np.testing.assert_allclose([r.statistic for r in table], reference.tvalues, rtol=1e-4)
    np.testing.assert_allclose([r.p_value for r in table], reference.pvalues, rtol=1e-3, atol=1e-12)
    bounds = reference.conf_int(alpha=0.05)
    np.testing.assert_allclose([(r.lower, r.upper) for r in table], bounds, atol=1e-6)
    np.testing.assert_allclose(
        [(r.ratio_lower, r.ratio, r.ratio_upper) for r in table],
        np.exp(np.column_stack([bounds[:, 0], reference.params, bounds[:, 1]])),
        rtol=1e-5,
    )
    assert family.ratio == {"binomial": "odds ratio", "gamma": "mean ratio"}[name]


def test_t_reference_matches_statsmodels_use_t_where_dispersion_is_estimated():
    sites = included(make_sites("gamma"))
    model = federated(sites, glm.GAMMA)
    x, y, _ = pooled_rows(sites)
    reference = statsmodels_fit("gamma", x, y, use_t=True)
    table = model.summary(use_t=True)
    np.testing.assert_allclose([r.p_value for r in table], reference.pvalues, rtol=1e-3)
    np.testing.assert_allclose([(r.lower, r.upper) for r in table], reference.conf_int(), atol=1e-6)


def test_gaussian_has_no_ratio_and_poisson_offset_matches_statsmodels():
    assert all(row.ratio is None for row in federated(included(make_sites("gaussian")), glm.GAUSSIAN).summary())
    x, y, _ = pooled_rows(included(make_sites("poisson")))
    exposure = np.log(np.linspace(0.5, 3.0, len(y)))
    model = glm.fit_pooled(x, y, family=glm.POISSON, offset=exposure)
    reference = sm.GLM(y, sm.add_constant(x), family=sm.families.Poisson(), offset=exposure).fit(tol=1e-13)
    np.testing.assert_allclose(model.coefficients, reference.params, atol=1e-6)
    np.testing.assert_allclose(model.predict(x, offset=exposure), reference.fittedvalues, rtol=1e-6)


# --- cluster-robust errors ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "correction"), list(itertools.product(FAMILIES, ["crv1", "none"])))
def test_cluster_robust_errors_equal_statsmodels_cluster(name, correction):
    family = FAMILIES[name][0]
    sites = included(make_sites(name))
    model = federated(sites, family)
    meat = sum(glm.site_meat(x, y, model.coefficients, family=family) for x, y in sites)
    robust = model.with_clusters(meat, correction=correction)
    x, y, groups = pooled_rows(sites)
    kwds = {"groups": groups, "use_correction": correction == "crv1"}
    reference = statsmodels_fit(name, x, y, cov_type="cluster", cov_kwds=kwds)
    np.testing.assert_allclose(robust.standard_errors(robust=True), reference.bse, rtol=1e-4)
    assert round(robust.clusters.sites) == len(sites)
    assert np.abs(robust.standard_errors(robust=True) / robust.standard_errors() - 1).max() > 0.05


def test_groups_correction_is_g_over_g_minus_1():
    sites = included(make_sites("binomial"))
    model = federated(sites, glm.BINOMIAL)
    meat = sum(glm.site_meat(x, y, model.coefficients, family=glm.BINOMIAL) for x, y in sites)
    none, groups = (model.with_clusters(meat, correction=c).cluster_covariance() for c in ("none", "groups"))
    np.testing.assert_allclose(groups, none * 10 / 9, rtol=1e-12)


def test_cluster_errors_need_two_sites_and_the_fits_rows():
    x, y = make_sites("binomial")[0]
    model = glm.fit_pooled(x, y, family=glm.BINOMIAL)
    with pytest.raises(ModelFitError, match="at least 2 sites"):
        model.with_clusters(glm.site_meat(x, y, model.coefficients, family=glm.BINOMIAL))
    halves = glm.site_meat(x[:100], y[:100], model.coefficients, family=glm.BINOMIAL) * 2
    with pytest.raises(ModelFitError, match="cover 200 rows, the fit 400"):
        model.with_clusters(halves)
    with pytest.raises(ModelFitError, match="exceeds the fixed-point clip 1"):
        glm.site_meat(x, y, model.coefficients, family=glm.BINOMIAL, limit=1.0)


# --- ridge ------------------------------------------------------------------------------------

_LOGLIK = {  # per-row log-likelihood in η at unit dispersion, up to terms free of η
    "binomial": (lambda y, eta: y * eta - np.logaddexp(0, eta), lambda y, eta: y - 1 / (1 + np.exp(-eta))),
    "poisson": (lambda y, eta: y * eta - np.exp(eta), lambda y, eta: y - np.exp(eta)),
    "gamma": (lambda y, eta: -y * np.exp(-eta) - eta, lambda y, eta: y * np.exp(-eta) - 1),
}


@pytest.mark.parametrize("name", list(_LOGLIK))
@pytest.mark.parametrize("penalty", [0.5, 20.0])
def test_ridge_fit_equals_a_direct_optimiser_of_the_penalised_loglikelihood(name, penalty):
    family = FAMILIES[name][0]
    sites = included(make_sites(name))
    model = federated(sites, family, penalty=penalty)
    x, y, _ = pooled_rows(sites)
    design = np.column_stack([np.ones(len(y)), x])
    loglik, score = _LOGLIK[name]
    mask = np.r_[0.0, np.ones(FEATURES)]

    def negative(beta: np.ndarray) -> tuple[float, np.ndarray]:
        eta = design @ beta
        value = -loglik(y, eta).sum() + penalty / 2 * np.sum(mask * beta**2)
        return value / len(y), (-(design.T @ score(y, eta)) + penalty * mask * beta) / len(y)

    direct = optimize.minimize(negative, np.zeros(FEATURES + 1), jac=True, method="BFGS", options={"gtol": 1e-12})
    np.testing.assert_allclose(model.coefficients, direct.x, atol=1e-6)
    assert np.abs(model.coefficients - federated(sites, family).coefficients).max() > 1e-5  # the penalty matters


# --- precision under secure aggregation ----------------------------------------------------


def test_proposed_settings_are_pinned_and_fit_the_quantiser():
    large = glm.sums_quantizer_settings(rows=10**6, nodes=100)
    assert (large.clip, large.levels, large.bits, large.word_bits) == (2.0**28, 2**50, 58, 64)
    assert large.step == 2.0**-22 and large.error == pytest.approx(4.77e-5, rel=1e-3)
    assert glm.sums_quantizer_settings(rows=10**6, nodes=2047).levels == 2**50
    assert glm.sums_quantizer_settings(rows=10**6, nodes=2048).levels == 2**49
    crowded = glm.sums_quantizer_settings(rows=10**6, nodes=5000)
    assert crowded.levels == 2**48 and crowded.bits <= MAX_BITS
    assert glm.sums_quantizer_settings(rows=2000, nodes=10).clip == 2.0**19


@pytest.mark.parametrize("name", ["binomial", "gamma", "tweedie"])
@pytest.mark.parametrize("rows", ["own", 10**6])
def test_fit_on_quantised_sums_meets_1e6_on_coefficients_and_1e4_on_errors(name, rows):
    family = FAMILIES[name][0]
    sites = included(make_sites(name))
    x, y, _ = pooled_rows(sites)
    precision = glm.sums_quantizer_settings(rows=len(y) if rows == "own" else rows, nodes=len(sites))
    model = glm.fit(
        quantised_total(sites, family, precision), parameters=FEATURES + 1, family=family, resolution=precision.error
    )
    exact = federated(sites, family)
    assert model.converged
    np.testing.assert_allclose(model.coefficients, exact.coefficients, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.standard_errors(), exact.standard_errors(), rtol=1e-4)
    assert precision.coefficient_error(model.information) < 1e-6
    meat_precision = glm.meat_quantizer_settings(model, nodes=len(sites))
    meat = [glm.site_meat(xs, ys, model.coefficients, family=family, limit=meat_precision.clip) for xs, ys in sites]
    robust = model.with_clusters(secure_total(meat, meat_precision, "meat"))
    exact_meat = sum(glm.site_meat(xs, ys, exact.coefficients, family=family) for xs, ys in sites)
    want = exact.with_clusters(exact_meat).standard_errors(robust=True)
    np.testing.assert_allclose(robust.standard_errors(robust=True), want, rtol=1e-4)


def test_decoded_sums_are_within_the_stated_error():
    sites = included(make_sites("poisson"))
    precision = glm.sums_quantizer_settings(rows=10**6, nodes=len(sites))
    vectors = [glm.site_sums(x, y, TRUE_BETA, family=glm.POISSON, limit=precision.clip) for x, y in sites]
    error = np.abs(secure_total(vectors, precision, "check") - sum(vectors))
    assert error.max() <= precision.error
    assert error.max() > precision.step / 4  # the rounding is really there


def test_todays_statistics_precision_cannot_meet_1e6():
    sites = included(make_sites("binomial"))
    today = glm.SumsPrecision(clip=2.0**30, levels=2**40, nodes=len(sites))  # SUMS_CLIP, SUMS_LEVELS
    exact = federated(sites, glm.BINOMIAL)
    assert today.coefficient_error(exact.information) > 1e-6
    model = glm.fit(quantised_total(sites, glm.BINOMIAL, today), parameters=FEATURES + 1, family=glm.BINOMIAL,
                    resolution=today.error)  # fmt: skip
    gap = np.abs(model.coefficients - exact.coefficients).max()
    assert 1e-6 < gap <= today.coefficient_error(exact.information)
    # steps inside the fixed point's noise count as converged, where a 1e-8 tolerance alone would never be met
    assert model.converged and model.iterations <= 8


def test_a_site_whose_sums_exceed_the_clip_flags_overflow_and_the_step_is_halved():
    x, y = make_sites("poisson")[0]
    limit = max(400.0, y.sum()) + 1  # above the row count and the target total
    assert np.abs(glm.site_sums(x, y, TRUE_BETA, family=glm.POISSON)).max() > limit
    vector = glm.site_sums(x, y, TRUE_BETA, family=glm.POISSON, limit=limit)
    sums = glm.SumsLayout(FEATURES + 1).unpack(vector)
    assert (sums.rows, sums.y_sum, sums.overflowed) == (400, y.sum(), 1.0)
    assert not sums.score.any() and not sums.information.any() and sums.deviance == 0
    huge = np.r_[800.0, np.zeros(FEATURES)]  # exp(800) overflows float64
    assert glm.SumsLayout(FEATURES + 1).unpack(glm.site_sums(x, y, huge, family=glm.POISSON)).overflowed == 1
    _, info = glm.newton_step(glm.site_sums(x, y, np.zeros(6), family=glm.POISSON), np.zeros(6), family=glm.POISSON)
    proposed, after = glm.newton_step(vector, TRUE_BETA, family=glm.POISSON, previous=info)
    assert not after.accepted and after.halvings == 1
    np.testing.assert_allclose(proposed, TRUE_BETA / 2)
    with pytest.raises(ModelFitError, match="overflow at the starting coefficients"):
        glm.newton_step(vector, TRUE_BETA, family=glm.POISSON)


# --- convergence and step halving -----------------------------------------------------------


def test_well_posed_logistic_fit_converges_in_five_iterations():
    sites = included(make_sites("binomial"))
    assert federated(sites, glm.BINOMIAL).iterations == 5
    x, y, _ = pooled_rows(sites)
    start = glm.start_coefficients(FEATURES + 1, family=glm.BINOMIAL, mean=float(y.mean()))
    assert start[0] == pytest.approx(math.log(y.mean() / (1 - y.mean()))) and not start[1:].any()
    assert federated(sites, glm.BINOMIAL, start=start).iterations == 5
    assert federated(included(make_sites("gaussian")), glm.GAUSSIAN).iterations == 2  # quadratic: one step


@pytest.mark.parametrize(("name", "most"), [("tweedie", 4), ("gamma", 6), ("binomial", 5)])
def test_the_step_uses_the_observed_information_the_errors_the_expected(name, most):
    """Newton on the observed information: 4 and 6 rounds for tweedie and gamma, where Fisher
    scoring took 8 and 9-10; the expected information, which the standard errors use, differs."""
    family = FAMILIES[name][0]
    assert federated(included(make_sites(name)), family).iterations <= most
    x, y = make_sites(name)[0]
    layout, h = glm.SumsLayout(FEATURES + 1), 1e-6
    sums = layout.unpack(glm.site_sums(x, y, TRUE_BETA, family=family))
    for j in range(FEATURES + 1):
        shift = h * np.eye(FEATURES + 1)[j]
        up, down = (layout.unpack(glm.site_sums(x, y, TRUE_BETA + d, family=family)).score for d in (shift, -shift))
        np.testing.assert_allclose(-(up - down) / (2 * h), sums.observed[:, j], rtol=1e-5, atol=1e-5)
    assert np.allclose(sums.information, sums.observed) == (name == "binomial")


def test_step_halving_brings_back_an_overshooting_first_step():
    rng = np.random.default_rng(3)
    sites = [(rng.normal(size=(n, FEATURES)), None) for n in (200, 150, 120)]
    sites = [(x, rng.poisson(np.exp(3.0 + 0.3 * x[:, 0])).astype(float)) for x, _ in sites]
    beta, info, trail = np.zeros(FEATURES + 1), None, []
    while info is None or not info.done:
        beta, info = glm.newton_step(plain_total(sites, glm.POISSON)(beta), beta, family=glm.POISSON, previous=info)
        trail.append((info.accepted, info.halvings))
    assert trail[:5] == [(True, 0), (False, 1), (False, 2), (False, 3), (True, 0)]
    assert info.converged and info.iteration == 10
    x, y, _ = pooled_rows(sites)
    np.testing.assert_allclose(info.estimate, statsmodels_fit("poisson", x, y).params, atol=1e-6)


def test_penalty_cannot_change_during_a_fit():
    x, y = make_sites("binomial")[0]
    beta, info = glm.newton_step(glm.site_sums(x, y, np.zeros(6), family=glm.BINOMIAL), np.zeros(6),
                                 family=glm.BINOMIAL, penalty=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="penalty changed"):
        glm.newton_step(glm.site_sums(x, y, beta, family=glm.BINOMIAL), beta, family=glm.BINOMIAL, previous=info)


# --- bad input --------------------------------------------------------------------------------


def _with_column(column: Callable[[np.ndarray], np.ndarray]) -> list[Site]:
    return [(np.column_stack([x, column(x)]), y) for x, y in included(make_sites("binomial"))]


NAMES = ["age", "los", "prior", "acuity", "ed_visits", "extra"]

SINGULAR_CASES = {
    "constant feature": (lambda x: np.full(len(x), 2.0), "feature 'extra' takes one value at every row"),
    "feature zero everywhere": (lambda x: np.zeros(len(x)), "feature 'extra' is 0 at every row of every site"),
    "collinear features": (lambda x: 2 * x[:, 1] - x[:, 2], "features 'los', 'prior', 'extra' are collinear"),
    "collinear with the intercept": (lambda x: 1 - x[:, 0], "features 'age', 'extra' and the intercept are collinear"),
}


@pytest.mark.parametrize("case", list(SINGULAR_CASES))
def test_singular_information_names_the_features_and_a_penalty_fixes_it(case):
    column, message = SINGULAR_CASES[case]
    sites = _with_column(column)
    total = plain_total(sites, glm.BINOMIAL)
    with pytest.raises(ModelFitError, match=message + ".*set \\[model\\] penalty > 0"):
        glm.fit(total, parameters=FEATURES + 2, family=glm.BINOMIAL, feature_names=NAMES)
    model = glm.fit(total, parameters=FEATURES + 2, family=glm.BINOMIAL, feature_names=NAMES, penalty=1.0)
    assert model.converged and np.isfinite(model.coefficients).all() and np.isfinite(model.standard_errors()).all()


@pytest.mark.parametrize("value", [0.0, 1.0])
@pytest.mark.parametrize("penalty", [0.0, 5.0])
def test_one_class_at_every_site_is_refused_with_or_without_penalty(value, penalty):
    sites = [(x, np.full(len(y), value)) for x, y in included(make_sites("binomial"))]
    with pytest.raises(ModelFitError, match=f"target is {value:.0f} at every row of every site"):
        federated(sites, glm.BINOMIAL, penalty=penalty)


def test_all_zero_counts_are_refused():
    sites = [(x, np.zeros(len(y))) for x, y in included(make_sites("poisson"))]
    with pytest.raises(ModelFitError, match="target is 0 at every row"):
        federated(sites, glm.POISSON)


def test_perfect_separation_does_not_converge_without_penalty_and_is_finite_with_one():
    sites = [(x, (x[:, 0] > 0.1).astype(float)) for x, _ in included(make_sites("binomial"))]
    diverging = federated(sites, glm.BINOMIAL)
    assert not diverging.converged and diverging.iterations == glm.MAX_ITERATIONS
    assert "separate the classes" in diverging.message and "penalty > 0" in diverging.message
    assert np.isfinite(diverging.coefficients).all() and diverging.coefficients[1] > 50
    assert all(math.isfinite(row.estimate) and row.std_error >= 0 for row in diverging.summary())
    ridge = federated(sites, glm.BINOMIAL, penalty=1.0)
    assert ridge.converged and np.isfinite(ridge.standard_errors()).all() and 1 < ridge.coefficients[1] < 50


BAD_TARGETS = {
    "gamma negative": (glm.GAMMA, -1.0, "gamma model needs a target that is > 0 .* 1 of 400 rows are outside it"),
    "gamma zero": (glm.GAMMA, 0.0, "gamma model needs a target that is > 0"),
    "gamma nan": (glm.GAMMA, math.nan, "1 of 400 rows are not finite"),
    "gamma infinite": (glm.GAMMA, math.inf, "1 of 400 rows are not finite"),
    "binomial two": (glm.BINOMIAL, 2.0, "binomial model needs a target that is 0 or 1"),
    "binomial half": (glm.BINOMIAL, 0.5, "binomial model needs a target that is 0 or 1"),
    "poisson negative": (glm.POISSON, -3.0, "poisson model needs a target that is >= 0"),
    "tweedie negative": (glm.tweedie(1.5), -0.1, "tweedie model needs a target that is >= 0"),
    "gaussian nan": (glm.GAUSSIAN, math.nan, "not finite"),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_a_target_outside_the_family_is_refused_at_the_node(case):
    family, value, message = BAD_TARGETS[case]
    x, y = make_sites("gamma")[0]
    y = np.where(y > 1, 1.0, 0.0) if family.name == "binomial" else y.copy()
    y[7] = value
    with pytest.raises(ModelFitError, match=message):
        glm.site_sums(x, y, np.zeros(FEATURES + 1), family=family)


def test_bad_features_and_shapes_are_refused():
    x, y = make_sites("gaussian")[0]
    broken = x.copy()
    broken[3, 2] = math.nan
    with pytest.raises(ModelFitError, match="features hold NaN"):
        glm.site_sums(broken, y, np.zeros(6), family=glm.GAUSSIAN)
    with pytest.raises(ValueError, match="5 coefficients for 5 features: expected 1 \\+ 5"):
        glm.site_sums(x, y, np.zeros(5), family=glm.GAUSSIAN)
    with pytest.raises(ValueError, match="shape \\(30,\\), the layout expects \\(53,\\)"):
        glm.newton_step(np.zeros(30), np.zeros(6), family=glm.GAUSSIAN)
    total = glm.site_sums(x, y, np.zeros(6), family=glm.GAUSSIAN)
    total[9] = math.nan
    with pytest.raises(ModelFitError, match="NaN or infinite"):
        glm.newton_step(total, np.zeros(6), family=glm.GAUSSIAN)
    with pytest.raises(ValueError, match="variance power"):
        glm.tweedie(2.0)


def test_a_site_without_rows_adds_nothing():
    family = glm.GAMMA
    empty = glm.site_sums(np.empty((0, FEATURES)), np.empty(0), TRUE_BETA, family=family)
    assert empty.shape == (glm.SumsLayout(FEATURES + 1).size,) and not empty.any()
    assert not glm.site_meat(np.empty((0, FEATURES)), np.empty(0), TRUE_BETA, family=family).any()


def test_too_few_rows_for_an_estimated_dispersion_is_refused():
    x, y = make_sites("gamma")[3]  # 4 rows, 6 coefficients
    with pytest.raises(ModelFitError, match="4 rows for 6 coefficients"):
        glm.fit_pooled(x, y, family=glm.GAMMA, penalty=1.0)


# --- layouts and persistence ------------------------------------------------------------------


def test_sums_layout_names_packs_and_unpacks_every_slot():
    layout = glm.SumsLayout(3)
    assert layout.size == 5 + 3 + 6 + 6 and glm.SumsLayout.for_size(20) == layout
    assert layout.slots(["age", "los"]) == [
        "rows", "y_sum", "overflowed", "deviance", "pearson", "score[intercept]", "score[age]", "score[los]",
        "information[intercept,intercept]", "information[intercept,age]", "information[intercept,los]",
        "information[age,age]", "information[age,los]", "information[los,los]",
        "observed[intercept,intercept]", "observed[intercept,age]", "observed[intercept,los]",
        "observed[age,age]", "observed[age,los]", "observed[los,los]",
    ]  # fmt: skip
    vector = np.arange(20.0)
    sums = layout.unpack(vector)
    assert sums.information[0, 2] == sums.information[2, 0] == 10 and sums.observed[1, 2] == 18
    assert np.array_equal(layout.pack(sums), vector)
    assert glm.MeatLayout.for_size(glm.MeatLayout(6).size) == glm.MeatLayout(6)
    with pytest.raises(ValueError, match="no GLM layout"):
        glm.SumsLayout.for_size(15)


def test_model_round_trips_through_json_and_predicts_as_statsmodels():
    sites = included(make_sites("tweedie"))
    family = glm.tweedie(1.5)
    model = federated(sites, family)
    model = model.with_clusters(sum(glm.site_meat(x, y, model.coefficients, family=family) for x, y in sites))
    loaded = glm.FittedGlm.from_dict(json.loads(json.dumps(model.to_dict())))
    assert loaded.to_dict() == model.to_dict()
    np.testing.assert_array_equal(loaded.standard_errors(robust=True), model.standard_errors(robust=True))
    x, y, _ = pooled_rows(sites)
    np.testing.assert_allclose(loaded.predict(x), statsmodels_fit("tweedie", x, y).fittedvalues, rtol=1e-6)


def _spoiled(change: Callable[[dict], None]) -> dict:
    data = federated(included(make_sites("binomial")), glm.BINOMIAL).to_dict()
    change(data)
    return data


SPOILED = {
    "unknown field": (lambda d: d.update(extra=1), "unknown fields \\['extra'\\]"),
    "missing field": (lambda d: d.pop("pearson"), "missing fields \\['pearson'\\]"),
    "other format": (lambda d: d.update(format="fedcost.glm/0"), "format"),
    "short information": (lambda d: d["information"].pop(), "information must be a list of 21 numbers"),
    "nan coefficient": (lambda d: d["coefficients"].__setitem__(2, math.nan), "coefficients must be a finite"),
    "boolean rows": (lambda d: d.update(rows=True), "rows must be a non-negative integer"),
    "string converged": (lambda d: d.update(converged="yes"), "converged must be true or false"),
    "tweedie without power": (lambda d: d.update(family={"name": "tweedie", "power": None}), "variance power"),
    "names do not match": (lambda d: d["feature_names"].pop(), "coefficients must be a list of 5 numbers"),
}


@pytest.mark.parametrize("case", list(SPOILED))
def test_from_dict_is_strict(case):
    change, message = SPOILED[case]
    with pytest.raises(ValueError, match=message):
        glm.FittedGlm.from_dict(_spoiled(change))


def test_crafted_coefficients_that_weigh_one_patient_describe_one_row_and_honest_ones_all():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(500, 3))
    costs = rng.gamma(2.0, 1.0, size=500)
    readmitted = (rng.random(500) < 0.2).astype(float)
    family = glm.task_family("cost", cost_family="tweedie", tweedie_power=1.5)
    honest = glm.start_coefficients(4, family=family, mean=float(costs.mean()))
    assert glm.effective_rows(x, costs, honest, family=family) == pytest.approx(500)
    steep = np.array([0.0, 40.0, 0.0, 0.0])  # a log mean that explodes for the one patient highest on feature 0
    assert glm.effective_rows(x, costs, steep, family=family) < 2
    one_age = np.array([-400.0 * x[7, 0], 400.0, 0.0, 0.0])  # a logit steep at one patient's value
    assert glm.effective_rows(x, readmitted, one_age, family=glm.BINOMIAL) < 11
