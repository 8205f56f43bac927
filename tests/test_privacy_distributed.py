"""Distributed DP for integer sums: the Skellam bound pinned and checked against the exact
divergence, its inverse, the sampler, and the shares that make up the noise."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import get_privacy_spent
from scipy.special import ive, logsumexp
from scipy.stats import skellam

from fedcost.errors import PrivacyBudgetExhausted
from fedcost.privacy.distributed import (
    MAX_POISSON_MEAN,
    ORDERS,
    VARIANCE_TOLERANCE,
    epsilon_from_rdp,
    secure_generator,
    share_of_variance,
    skellam_noise,
    skellam_rdp,
    skellam_variance_for,
)

DELTA = 1e-6
# (variance, l1, l2) -> (RDP at orders 2, 12 and 63; epsilon at DELTA), computed by skellam_rdp. Cross-checked
# once against the authors' reference implementation (google-research/federated, distributed_dp/
# accounting_utils.py, `_skellam_rdp` at scale 1, run outside the project): equal to 4e-16 at every integer
# order; and against the exact divergence in test_the_bound_dominates_the_exact_divergence. The last row
# is a cost sum in cents clipped at 100,000 per record.
PINNED = {
    (10.0, 1.0, 1.0): (0.1225, 0.6725, 3.3, 1.561897154003196),
    (2500.0, 4.0, 2.0): (0.00160144, 0.00960464, 0.05042096, 0.19042668045311922),
    (7.5e15, 1e7, 1e7): (0.013333333333333336, 0.08000000000000002, 0.42000000000000004, 0.5010060664734112),
}


def skellam_pmf(k: np.ndarray, variance: float) -> np.ndarray:
    """P[Pois(v/2) − Pois(v/2) = k] = e^{−v} I_|k|(v)."""
    return ive(np.abs(k), variance)


def exact_rdp(variance: float, shift: int) -> np.ndarray:
    """D_α(shift + Sk(v) ‖ Sk(v)) at every order, summed over the integers (log-space).

    The sum is cut where the pmfs underflow; the assertion checks that what is cut is negligible.
    """
    alpha = np.asarray(ORDERS)[:, None]
    reach = int(abs(shift) * max(ORDERS) + 60 * math.sqrt(variance) + 200)
    k = np.arange(-reach, reach + 1)
    with np.errstate(divide="ignore"):
        log_q, log_p = np.log(skellam_pmf(k, variance)), np.log(skellam_pmf(k - shift, variance))
    kept = np.isfinite(log_q) & np.isfinite(log_p)
    terms = alpha * log_p[kept] + (1 - alpha) * log_q[kept]
    assert (terms[:, [0, -1]] < terms.max(axis=1, keepdims=True) - 30).all(), "the tails are not negligible"
    return logsumexp(terms, axis=1) / (alpha[:, 0] - 1)


@pytest.mark.parametrize("params, expected", PINNED.items(), ids=[str(k) for k in PINNED])
def test_skellam_rdp_and_epsilon_are_the_pinned_values(params, expected):
    variance, l1, l2 = params
    rdp = skellam_rdp(variance=variance, l1=l1, l2=l2)
    at = [rdp[ORDERS.index(order)] for order in (2, 12, 63)]
    assert at == pytest.approx(expected[:3], rel=1e-9)
    assert epsilon_from_rdp(rdp=rdp, delta=DELTA) == pytest.approx(expected[3], rel=1e-9)


@pytest.mark.parametrize("params", PINNED, ids=[str(k) for k in PINNED])
def test_the_conversion_equals_opacus(params):
    variance, l1, l2 = params
    rdp = skellam_rdp(variance=variance, l1=l1, l2=l2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=DELTA)
    assert epsilon_from_rdp(rdp=rdp, delta=DELTA) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("variance", [0.5, 1.0, 3.0, 10.0, 100.0, 1000.0])
@pytest.mark.parametrize("shift", [(1,), (2,), (3,), (1, 1), (2, 1), (1, 1, 1)], ids=str)
def test_the_bound_dominates_the_exact_divergence(variance, shift):
    """Noise i.i.d. per coordinate: the divergence of a shift vector is the sum over its coordinates."""
    exact = sum(exact_rdp(variance, s) for s in shift)
    bound = skellam_rdp(variance=variance, l1=sum(shift), l2=math.sqrt(sum(s * s for s in shift)))
    assert (bound >= exact).all()


def test_the_bound_is_tight_for_large_variance_so_mu_is_the_variance():
    """Read with μ the Poisson mean (variance 2μ), the bound would be twice the divergence here."""
    integer = [i for i, order in enumerate(ORDERS) if float(order).is_integer() and order <= 20]
    exact = exact_rdp(1000.0, 1)[integer]
    bound = skellam_rdp(variance=1000.0, l1=1, l2=1)[integer]
    assert (bound / exact < 1.01).all()


def test_more_noise_spends_less_and_more_sensitivity_more():
    variances = np.geomspace(0.5, 1e6, 30)
    rdps = [skellam_rdp(variance=v, l1=2, l2=2) for v in variances]
    assert all((a > b).all() for a, b in zip(rdps, rdps[1:]))
    epsilons = [epsilon_from_rdp(rdp=rdp, delta=DELTA) for rdp in rdps]
    assert epsilons == sorted(epsilons, reverse=True) and len(set(epsilons)) == len(epsilons)
    assert (skellam_rdp(variance=50.0, l1=3, l2=2) > skellam_rdp(variance=50.0, l1=2, l2=2)).all()
    assert (skellam_rdp(variance=50.0, l1=3, l2=3) > skellam_rdp(variance=50.0, l1=3, l2=2)).all()


def test_no_noise_is_no_privacy():
    assert np.isinf(skellam_rdp(variance=0.0, l1=1, l2=1)).all()
    assert epsilon_from_rdp(rdp=skellam_rdp(variance=0.0, l1=1, l2=1), delta=DELTA) == math.inf
    assert epsilon_from_rdp(rdp=np.zeros(len(ORDERS)), delta=DELTA) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(variance=-1.0, l1=1, l2=1),
        dict(variance=math.nan, l1=1, l2=1),
        dict(variance=math.inf, l1=1, l2=1),
        dict(variance="10", l1=1, l2=1),
        dict(variance=10.0, l1=0, l2=1),
        dict(variance=10.0, l1=1, l2=-2),
        dict(variance=10.0, l1=True, l2=1),
        dict(variance=10.0, l1=1, l2=1, orders=(1.0, 2.0)),
    ],
    ids=["negative", "nan", "inf", "string", "l1 zero", "l2 negative", "bool", "order 1"],
)
def test_out_of_range_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        skellam_rdp(**kwargs)


@pytest.mark.parametrize("params, expected", PINNED.items(), ids=[str(k) for k in PINNED])
def test_skellam_variance_for_inverts_epsilon(params, expected):
    variance, l1, l2 = params
    found = skellam_variance_for(epsilon=expected[3], delta=DELTA, l1=l1, l2=l2)
    assert found == pytest.approx(variance, rel=2 * VARIANCE_TOLERANCE)
    assert epsilon_from_rdp(rdp=skellam_rdp(variance=found, l1=l1, l2=l2), delta=DELTA) <= expected[3]


def test_skellam_variance_for_composes_after_what_was_spent():
    prior = skellam_rdp(variance=40.0, l1=1, l2=1)
    alone = skellam_variance_for(epsilon=3.0, delta=DELTA, l1=1, l2=1)
    found = skellam_variance_for(epsilon=3.0, delta=DELTA, l1=1, l2=1, prior_rdp=prior)
    assert found > alone

    def total(variance: float) -> float:
        return epsilon_from_rdp(rdp=prior + skellam_rdp(variance=variance, l1=1, l2=1), delta=DELTA)

    assert total(found) <= 3.0 < total(found * (1 - 2 * VARIANCE_TOLERANCE))


def test_no_variance_fits_a_spent_budget():
    prior = skellam_rdp(variance=1.0, l1=1, l2=1)
    spent = epsilon_from_rdp(rdp=prior, delta=DELTA)
    assert spent > 1.0
    with pytest.raises(PrivacyBudgetExhausted) as caught:
        skellam_variance_for(epsilon=1.0, delta=DELTA, l1=1, l2=1, prior_rdp=prior)
    message = str(caught.value)
    assert "variance up to 1e+08" in message and "within 1 at delta=1e-06" in message
    assert f"{spent:.4g} is already spent" in message
    with pytest.raises(PrivacyBudgetExhausted, match="0 is already spent"):
        skellam_variance_for(epsilon=0.05, delta=DELTA, l1=1, l2=1)  # below what RDP can certify at DELTA


@pytest.mark.parametrize("variance", [0.77, 7.3, 2.5e3, 2 * MAX_POISSON_MEAN])
def test_the_sampler_has_mean_zero_and_the_variance_asked(variance):
    n = 200_000
    noise = skellam_noise(n, variance, rng=np.random.default_rng(20240607))
    assert noise.dtype == np.int64 and noise.shape == (n,)
    assert abs(noise.mean()) < 5 * math.sqrt(variance / n)
    assert noise.var() == pytest.approx(variance, rel=0.02)  # 6 standard errors at this n


def test_the_sampler_draws_the_skellam_law():
    variance, n = 3.0, 200_000
    noise = skellam_noise((400, 500), variance, rng=np.random.default_rng(7))
    assert noise.shape == (400, 500)
    k = np.arange(-4, 5)
    expected = skellam_pmf(k, variance)
    assert expected == pytest.approx(skellam.pmf(k, variance / 2, variance / 2), rel=1e-9)
    observed = np.array([(noise == i).mean() for i in k])
    assert (np.abs(observed - expected) < 5 * np.sqrt(expected * (1 - expected) / n)).all()


def test_no_noise_draws_zeros_and_the_generator_must_be_numpy():
    assert not skellam_noise(5, 0.0, rng=np.random.default_rng(1)).any()
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        skellam_noise(5, 1.0, rng=np.random.RandomState(1))
    with pytest.raises(ValueError):
        skellam_noise(5, -1.0, rng=np.random.default_rng(1))


def test_noise_beyond_what_numpy_draws_accurately_is_refused():
    """At a Poisson mean of 3.75e15 numpy draws a variance 1.5 times too large (its rounding, not chance)."""
    with pytest.raises(ValueError, match="coarser integer units"):
        skellam_noise(5, 2.5 * MAX_POISSON_MEAN, rng=np.random.default_rng(1))


def test_the_secure_generator_is_seeded_afresh_each_time():
    first, second = secure_generator(), secure_generator()
    assert isinstance(first.bit_generator, np.random.PCG64)
    assert first.integers(2**63) != second.integers(2**63)


def test_shares_sum_to_the_target_variance_exactly_in_law():
    """Pois(a) + Pois(b) = Pois(a + b), so n shares of Sk(v/n) sum to Sk(v): convolve their pmfs."""
    variance, nodes = 12.0, 5
    share = share_of_variance(variance, nodes)
    assert share * nodes == pytest.approx(variance, rel=1e-15)
    k = np.arange(-80, 81)
    total = skellam_pmf(k, share)
    for _ in range(nodes - 1):
        total = np.convolve(total, skellam_pmf(k, share))
    support = np.arange(-80 * nodes, 80 * nodes + 1)
    np.testing.assert_allclose(total, skellam_pmf(support, variance), rtol=0, atol=1e-15)


def test_shares_drawn_by_each_node_sum_to_the_target_variance():
    variance, nodes = 500.0, 7
    share = share_of_variance(variance, nodes)
    total = sum(skellam_noise(100_000, share, rng=np.random.default_rng(node)) for node in range(nodes))
    assert total.var() == pytest.approx(variance, rel=0.03)


@pytest.mark.parametrize("nodes", [0, -1, 2.0, True])
def test_shares_need_a_positive_number_of_nodes(nodes):
    with pytest.raises(ValueError, match="nodes"):
        share_of_variance(10.0, nodes)


def test_the_module_needs_neither_torch_nor_opacus():
    """A node that only releases statistics must not pay for (or depend on) the DP-SGD stack."""
    probe = (
        "import sys, fedcost.privacy.distributed; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'opacus', 'flwr'}))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
