"""Exact federated GLMs: distributed Newton–Raphson / IRLS on shared sums.

How a fit runs (DataSHIELD's ``ds.glm``: Jones et al. 2012, Norsk Epidemiologi 21(2);
Gaye et al. 2014, Int J Epidemiol 43(6)): the coordinator holds the coefficients β and,
each iteration, every node computes ``site_sums(X, y, β)`` over its own training rows —
its row count, its target total, the score (gradient of the log-likelihood), the upper
triangles of the Fisher (expected) information X'WX and of the observed information, the
deviance and the Pearson χ² — as one flat float64 vector (``SumsLayout``). The nodes'
vectors are added (under secure aggregation, outside this module) and ``newton_step``
turns the total into the next β. Every entry is a sum over rows, so the total over the
sites is the same quantity over the pooled rows and the iteration is the pooled one: the
federated fit is the pooled penalised maximum-likelihood fit, to the precision the sums
travel in (``sums_quantizer_settings``).

Design matrix: a node passes its features as ``FeatureSpec.encode`` gives them, without
an intercept. ``site_sums`` adds the intercept as column 0, so β[0] is the intercept
everywhere here (the ridge penalty skips it) and no caller can misplace it.

The loop a binding runs (``fit`` is this loop over a callable)::

    beta, info = start_coefficients(p, family=f, mean=y_mean), None
    while info is None or not info.done:
        total = <sum over the nodes of site_sums(X_k, y_k, beta, family=f)>
        beta, info = newton_step(total, beta, family=f, penalty=lam, previous=info)
    model = FittedGlm.from_step(info, family=f, feature_names=names)
    # optionally one more sum, at model.coefficients, for cluster-robust errors:
    model = model.with_clusters(<sum over the nodes of site_meat(X_k, y_k, model.coefficients, family=f)>)

Families and information (McCullagh & Nelder 1989, Generalized Linear Models, 2nd ed.,
§2.5): binomial (logit), poisson (log), gaussian (identity) have canonical links, where
the observed and the expected (Fisher) information coincide and IRLS is Newton–Raphson.
For gamma (log) and tweedie (log, 1 < p < 2) they differ: the step uses the observed
information -d²ℓ/dβ² (Newton–Raphson, quadratic convergence: 4 to 6 rounds where Fisher
scoring, R's ``glm`` and statsmodels' IRLS, took 8 to 10 on the same data), while the
model-based standard errors use the expected information X'WX with W = 1/(V(μ) g'(μ)²)
(= 1 for gamma, μ^(2-p) for tweedie), as R and statsmodels report them. Both are positive
definite wherever X has full rank and y >= 0: the log-likelihood is concave in η for all
five families here (e.g. -y e^-η - η for gamma, whose observed weight is y/μ), so every
Newton step is an ascent direction, and with step halving the iteration is a monotone
ascent to the unique maximiser, whose fixed points are exactly the zeros of the score.
Each node sends both triangles (for the canonical families they are equal), so the
standard errors need no extra round.

Objective: maximise ℓ(β) - λ/2·|β_{-0}|², with ℓ = -D(β)/2 the log-likelihood at unit
dispersion (the exact log-likelihood up to a constant for binomial and poisson; for the
others ℓ/φ is, so the penalty is in units of the unit-dispersion log-likelihood and does
not move with an estimated φ, as in glmnet).

One round behind, and step halving. The sums at β carry D(β), so the coordinator knows
the objective at the point it just asked about, not at the one it proposes next. So
``newton_step`` judges the *previous* step with the sums it is given: if the objective at
β is worse than at the last accepted point (or a node's sums overflowed), β is rejected,
its gradient and information are not used, and the next point is halfway back to the
last accepted one (step halving, as in Marschner 2011, R Journal 3(2), "glm2"). A
rejection costs one round; from a start at the target's mean (``start_coefficients``)
well-posed data rarely need one. "Worse" allows a slack of the sums' resolution plus
1e-9 of |objective|, so rounding and fixed-point noise near the optimum, where the true
change is below both, never trigger a halving.

Convergence: the largest change of a coefficient below ``tolerance`` times max(1,
largest |β|), i.e. relative for large coefficients and absolute (log-odds, log-ratios on
standardised features) for small ones. Why β and not the deviance (R, statsmodels): the
promise is about β; a deviance tolerance means something different at 100 and at 10⁶
rows; and the deviance travels in fixed point with an absolute error (nodes x step) that
can exceed 1e-8, while the step comes from the score and information, which need the
precision anyway. A step below what the sums' resolution can move it (``resolution``)
also counts as converged. The estimate is then β plus that last step (statsmodels and R
also report the last solve), with the Fisher information and Pearson χ² taken at β.

Bad input, and what each case does (tests/test_glm.py on arrays, tests/test_glm_bad_input.py
end to end): a target with one class (or all zeros) at every site is refused, penalty or
not, since the intercept is never penalised; a feature constant everywhere and collinear
features make H singular: refused naming them without a penalty, while with the ridge
penalty λ > 0 (fedcost's default is 0.1) H + λP is positive definite, the constant gets
coefficient 0 and a collinear pair shares its effect equally; classes that features
separate have no finite MLE: without a penalty the coefficients grow until the rounds run
out (reported as not converged) or the sites refuse sums that weigh so few rows
(``effective_rows``), which stops the run saying so; with one, the fit is finite. A site
with fewer rows than coefficients only adds to the sums; one with fewer rows than the
job's min_cohort can send no sum at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any, ClassVar, NamedTuple

import numpy as np

from fedcost.errors import ModelFitError
from fedcost.secagg.prg import word
from fedcost.secagg.quantize import MAX_BITS, Quantizer

FAMILY_NAMES = ("binomial", "poisson", "gamma", "tweedie", "gaussian")
MAX_ITERATIONS = 25  # R's glm.control(maxit = 25); every round of sums counts, halvings too
TOLERANCE = 1e-8  # R's glm.control(epsilon) and statsmodels' tol, here on β
MAX_HALVINGS = 30  # a step of 2**-30 of a Newton step that still fails is not rounding
SLACK = 1e-9  # relative objective decrease tolerated before a step is rejected
# The smallest eigenvalue of the unit-diagonal information matrix below which it counts
# as singular: a coefficient whose feature the others explain to 1e-10 of its variance
# (variance inflation above 1e10) would be set by rounding, not by the data.
SINGULAR = 1e-10
ROW_BOUND = 2**8  # per-row mean of a sum's terms a site may reach; sets the fixed-point clip
FLOAT_LEVELS = 2**50  # Quantizer.encode rounds in float64: 2 * levels must stay below 2**52
CORRECTIONS = ("crv1", "groups", "none")
FORMAT = "fedcost.glm/1"

_INTERCEPT = "intercept"


# --- families ---------------------------------------------------------------------------


class _Terms(NamedTuple):
    """Per-row quantities at η: mean, score factor dℓ/dη, Fisher weight, deviance, Pearson."""

    mu: np.ndarray
    score: np.ndarray
    weight: np.ndarray
    deviance: np.ndarray
    pearson: np.ndarray


def _binomial_terms(y: np.ndarray, eta: np.ndarray, power: float) -> _Terms:
    log_mu, log_one_minus = -np.logaddexp(0.0, -eta), -np.logaddexp(0.0, eta)
    mu = np.exp(log_mu)
    weight = np.exp(log_mu + log_one_minus)  # μ(1-μ) without cancellation in the tails
    pearson = np.exp((1.0 - 2.0 * y) * eta)  # (y - μ)² / μ(1-μ) for y in {0, 1}, without 0/0
    return _Terms(mu, y - mu, weight, 2.0 * (np.logaddexp(0.0, eta) - y * eta), pearson)


def _poisson_terms(y: np.ndarray, eta: np.ndarray, power: float) -> _Terms:
    mu = np.exp(eta)
    y_log_y = y * np.log(np.where(y > 0, y, 1.0))
    residual = y - mu
    return _Terms(mu, residual, mu, 2.0 * (y_log_y - y * eta - residual), residual**2 * np.exp(-eta))


def _gamma_terms(y: np.ndarray, eta: np.ndarray, power: float) -> _Terms:
    mu = np.exp(eta)
    ratio = y * np.exp(-eta)
    return _Terms(mu, ratio - 1.0, np.ones_like(y), 2.0 * (ratio - np.log(ratio) - 1.0), (ratio - 1.0) ** 2)


def _tweedie_terms(y: np.ndarray, eta: np.ndarray, power: float) -> _Terms:
    p = power
    mu = np.exp(eta)
    mu_1, mu_2 = np.exp((1.0 - p) * eta), np.exp((2.0 - p) * eta)
    deviance = 2.0 * (y ** (2.0 - p) / ((1.0 - p) * (2.0 - p)) - y * mu_1 / (1.0 - p) + mu_2 / (2.0 - p))
    residual = y - mu
    return _Terms(mu, residual * mu_1, mu_2, deviance, residual**2 * np.exp(-p * eta))


def _gaussian_terms(y: np.ndarray, eta: np.ndarray, power: float) -> _Terms:
    residual = y - eta
    return _Terms(eta, residual, np.ones_like(y), residual**2, residual**2)


def _binomial_observed(y: np.ndarray, mu: np.ndarray, power: float) -> np.ndarray:
    return mu * (1.0 - mu)


def _poisson_observed(y: np.ndarray, mu: np.ndarray, power: float) -> np.ndarray:
    return mu


def _gamma_observed(y: np.ndarray, mu: np.ndarray, power: float) -> np.ndarray:
    return y / mu  # -d²ℓ/dη² of -y e^-η - η


def _tweedie_observed(y: np.ndarray, mu: np.ndarray, power: float) -> np.ndarray:
    return (2.0 - power) * mu ** (2.0 - power) + (power - 1.0) * y * mu ** (1.0 - power)


def _gaussian_observed(y: np.ndarray, mu: np.ndarray, power: float) -> np.ndarray:
    return np.ones_like(y)


def _binary(y: np.ndarray) -> int:
    return int(np.count_nonzero((y != 0.0) & (y != 1.0)))


def _negative(y: np.ndarray) -> int:
    return int(np.count_nonzero(y < 0.0))


def _not_positive(y: np.ndarray) -> int:
    return int(np.count_nonzero(y <= 0.0))


def _anything(y: np.ndarray) -> int:
    return 0


class _Kernel(NamedTuple):
    link: str
    canonical: bool  # the family's canonical link: observed and expected information are equal
    fixed_dispersion: bool
    ratio: str | None  # what exp(coefficient) is called; None where it is not a ratio
    bad_rows: Callable[[np.ndarray], int]
    requirement: str
    terms: Callable[[np.ndarray, np.ndarray, float], _Terms]
    observed: Callable[[np.ndarray, np.ndarray, float], np.ndarray]


_KERNELS: dict[str, _Kernel] = {
    "binomial": _Kernel("logit", True, True, "odds ratio", _binary, "0 or 1", _binomial_terms, _binomial_observed),
    "poisson": _Kernel("log", True, True, "rate ratio", _negative, ">= 0", _poisson_terms, _poisson_observed),
    "gamma": _Kernel("log", False, False, "mean ratio", _not_positive, "> 0", _gamma_terms, _gamma_observed),
    "tweedie": _Kernel("log", False, False, "mean ratio", _negative, ">= 0", _tweedie_terms, _tweedie_observed),
    "gaussian": _Kernel("identity", True, False, None, _anything, "finite", _gaussian_terms, _gaussian_observed),
}


@dataclass(frozen=True)
class Family:
    """A GLM family and its link: binomial (logit), poisson, gamma, tweedie (log), gaussian (identity).

    ``power`` is tweedie's variance power p, 1 < p < 2 (variance μ^p: a point mass at 0
    plus a continuous positive part, costs with exact zeros); the others take none.
    """

    name: str
    power: float | None = None

    def __post_init__(self) -> None:
        if self.name not in _KERNELS:
            raise ValueError(f"family {self.name!r}: expected one of {FAMILY_NAMES}")
        if self.name == "tweedie":
            if not (isinstance(self.power, (int, float)) and not isinstance(self.power, bool) and 1 < self.power < 2):
                raise ValueError(f"tweedie needs a variance power 1 < p < 2, got {self.power!r}")
            object.__setattr__(self, "power", float(self.power))
        elif self.power is not None:
            raise ValueError(f"family {self.name!r} takes no power, got {self.power!r}")

    @property
    def link(self) -> str:
        return _KERNELS[self.name].link

    @property
    def fixed_dispersion(self) -> bool:
        """Binomial and poisson have φ = 1; the others estimate φ by Pearson χ² / (n - p)."""
        return _KERNELS[self.name].fixed_dispersion

    @property
    def ratio(self) -> str | None:
        """What exp(coefficient) is called: an odds, rate or mean ratio; None for identity."""
        return _KERNELS[self.name].ratio

    def mean(self, eta: np.ndarray) -> np.ndarray:
        """μ = g⁻¹(η)."""
        eta = np.asarray(eta, dtype=np.float64)
        if self.link == "identity":
            return eta.copy()
        if self.link == "log":
            return np.exp(eta)
        return np.exp(-np.logaddexp(0.0, -eta))

    def link_of(self, mu: float) -> float:
        """η = g(μ) of one mean, e.g. the intercept that fits a mean of ``mu``."""
        if self.link == "identity":
            return float(mu)
        if self.link == "log":
            return math.log(mu)
        return math.log(mu / (1.0 - mu))

    def check_target(self, y: np.ndarray) -> None:
        """ModelFitError unless every y is finite and in the family's support."""
        kernel = _KERNELS[self.name]
        non_finite = int(np.count_nonzero(~np.isfinite(y)))
        bad = non_finite or kernel.bad_rows(y)
        if bad:
            raise ModelFitError(
                f"a {self.name} model needs a target that is {kernel.requirement} at every row; "
                f"{bad} of {y.size} rows are {'not finite' if non_finite else 'outside it'}: "
                f"{'impute or drop them' if non_finite else 'check the target column, or choose another family'}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "power": self.power}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Family:
        _exact_keys(data, {"name", "power"}, "family")
        return cls(data["name"], data["power"])


BINOMIAL, POISSON, GAMMA, GAUSSIAN = Family("binomial"), Family("poisson"), Family("gamma"), Family("gaussian")


def tweedie(power: float) -> Family:
    """The tweedie family with variance power ``power`` (1 < p < 2), log link."""
    return Family("tweedie", power)


def start_coefficients(parameters: int, *, family: Family, mean: float | None = None) -> np.ndarray:
    """Where the iteration starts: zeros, with the intercept at g(mean) when the mean is known.

    The mean of the training target is public after the statistics stage
    (``FeatureSpec.readmission_rate``; costs in ``cost_scale`` units have mean 1, so 0).
    Without it, zeros: step halving brings back a first step that overshoots.
    """
    if isinstance(parameters, bool) or not isinstance(parameters, int) or parameters < 1:
        raise ValueError(f"parameters must be a positive integer, got {parameters!r}")
    beta = np.zeros(parameters)
    if mean is not None:
        try:
            beta[0] = family.link_of(mean)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"mean {mean!r} is outside the {family.name} family's range") from None
    return beta


# --- layouts of the shared vectors ----------------------------------------------------------


def _triangle(parameters: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(parameters)


def _symmetric(upper: np.ndarray, parameters: int) -> np.ndarray:
    rows, cols = _triangle(parameters)
    matrix = np.zeros((parameters, parameters))
    matrix[rows, cols] = upper
    matrix[cols, rows] = upper
    return matrix


def _parameters_for(size: int, fixed: int, triangles: int, vectors: int) -> int:
    """The p for which fixed + vectors*p + triangles*p(p+1)/2 == size."""
    a, b = triangles / 2.0, triangles / 2.0 + vectors
    p = int(round((-b + math.sqrt(b * b + 4.0 * a * (size - fixed))) / (2.0 * a)))
    if p < 1 or fixed + vectors * p + triangles * p * (p + 1) // 2 != size:
        raise ValueError(f"a vector of {size} entries is no GLM layout")
    return p


@dataclass(frozen=True, eq=False)
class GlmSums:
    """Unpacked ``site_sums`` (of one node, or summed): the coordinator's view of a round."""

    rows: float
    y_sum: float
    overflowed: float
    deviance: float
    pearson: float
    score: np.ndarray
    information: np.ndarray  # expected (Fisher): the standard errors'
    observed: np.ndarray  # observed: the Newton step's; equal to ``information`` for canonical links


@dataclass(frozen=True)
class SumsLayout:
    """Where each sum sits in a ``site_sums`` vector of a model with ``parameters`` coefficients.

    Scalars first (``SCALARS``), then the score (p entries), then the upper triangles of
    the Fisher information and of the observed information, row by row (p(p+1)/2 entries
    each).
    """

    parameters: int
    SCALARS: ClassVar[tuple[str, ...]] = ("rows", "y_sum", "overflowed", "deviance", "pearson")

    def __post_init__(self) -> None:
        if isinstance(self.parameters, bool) or not isinstance(self.parameters, int) or self.parameters < 1:
            raise ValueError(f"parameters must be a positive integer, got {self.parameters!r}")

    @property
    def size(self) -> int:
        p = self.parameters
        return len(self.SCALARS) + p + p * (p + 1)

    @classmethod
    def for_size(cls, size: int) -> SumsLayout:
        """The layout whose vectors have ``size`` entries; ValueError if there is none."""
        return cls(_parameters_for(size, len(cls.SCALARS), 2, 1))

    def slots(self, names: Sequence[str] | None = None) -> list[str]:
        """A name for every entry, e.g. ``score[age]`` and ``information[intercept,age]``."""
        pairs = _pair_names(self.parameters, names)
        return [
            *self.SCALARS,
            *(f"score[{name}]" for name in _names(self.parameters, names)),
            *(f"information[{pair}]" for pair in pairs),
            *(f"observed[{pair}]" for pair in pairs),
        ]

    def pack(self, sums: GlmSums) -> np.ndarray:
        scalars = [sums.rows, sums.y_sum, sums.overflowed, sums.deviance, sums.pearson]
        upper = _triangle(self.parameters)
        return np.concatenate(
            [np.asarray(scalars, dtype=np.float64), sums.score, sums.information[upper], sums.observed[upper]]
        )

    def unpack(self, vector: np.ndarray) -> GlmSums:
        vector = _checked_vector(vector, self.size, "sums")
        k, p = len(self.SCALARS), self.parameters
        rows, y_sum, overflowed, deviance, pearson = (float(v) for v in vector[:k])
        half = p * (p + 1) // 2
        information, observed = vector[k + p : k + p + half], vector[k + p + half :]
        return GlmSums(
            rows,
            y_sum,
            overflowed,
            deviance,
            pearson,
            vector[k : k + p].copy(),
            _symmetric(information, p),
            _symmetric(observed, p),
        )


@dataclass(frozen=True, eq=False)
class ClusterSums:
    """Unpacked ``site_meat`` at β̂: sites, rows, Σ_k s_k s_kᵀ and the observed information."""

    sites: float
    rows: float
    meat: np.ndarray
    observed: np.ndarray


@dataclass(frozen=True)
class MeatLayout:
    """Where each sum sits in a ``site_meat`` vector: sites, rows, then two upper triangles."""

    parameters: int
    SCALARS: ClassVar[tuple[str, ...]] = ("sites", "rows")

    def __post_init__(self) -> None:
        if isinstance(self.parameters, bool) or not isinstance(self.parameters, int) or self.parameters < 1:
            raise ValueError(f"parameters must be a positive integer, got {self.parameters!r}")

    @property
    def size(self) -> int:
        p = self.parameters
        return len(self.SCALARS) + p * (p + 1)

    @classmethod
    def for_size(cls, size: int) -> MeatLayout:
        return cls(_parameters_for(size, len(cls.SCALARS), 2, 0))

    def slots(self, names: Sequence[str] | None = None) -> list[str]:
        pairs = _pair_names(self.parameters, names)
        return [*self.SCALARS, *(f"meat[{pair}]" for pair in pairs), *(f"observed[{pair}]" for pair in pairs)]

    def pack(self, sums: ClusterSums) -> np.ndarray:
        upper = _triangle(self.parameters)
        return np.concatenate([[sums.sites, sums.rows], sums.meat[upper], sums.observed[upper]]).astype(np.float64)

    def unpack(self, vector: np.ndarray) -> ClusterSums:
        vector = _checked_vector(vector, self.size, "meat")
        p, half = self.parameters, self.parameters * (self.parameters + 1) // 2
        return ClusterSums(
            float(vector[0]), float(vector[1]), _symmetric(vector[2 : 2 + half], p), _symmetric(vector[2 + half :], p)
        )


def _checked_vector(vector: np.ndarray, size: int, what: str) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    if vector.shape != (size,):
        raise ValueError(f"{what} vector has shape {vector.shape}, the layout expects ({size},)")
    if not np.isfinite(vector).all():
        raise ModelFitError(f"the summed {what} vector holds NaN or infinite entries: a node sent a broken vector")
    return vector


def _names(parameters: int, feature_names: Sequence[str] | None) -> tuple[str, ...]:
    """Names of the coefficients: the intercept, then the features (x1, x2, ... by default)."""
    if feature_names is None:
        return (_INTERCEPT, *(f"x{j}" for j in range(1, parameters)))
    names = (_INTERCEPT, *feature_names)
    if len(names) != parameters:
        raise ValueError(f"{len(names) - 1} feature names for {parameters - 1} features")
    return names


def _pair_names(parameters: int, feature_names: Sequence[str] | None) -> list[str]:
    """``a,b`` for every entry of a symmetric matrix's upper triangle (``_triangle``'s order)."""
    names = _names(parameters, feature_names)
    return [f"{names[i]},{names[j]}" for i, j in zip(*_triangle(parameters))]


# --- node side ------------------------------------------------------------------------------


def _prepared(
    X: np.ndarray, y: np.ndarray, beta: np.ndarray, family: Family, offset: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, target and linear predictor, checked; the intercept is column 0 of β."""
    x = np.asarray(X, dtype=np.float64)
    target = np.asarray(y, dtype=np.float64)
    coefficients = np.asarray(beta, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features have shape {x.shape}: expected (rows, features) without an intercept")
    if coefficients.shape != (x.shape[1] + 1,):
        raise ValueError(f"{coefficients.size} coefficients for {x.shape[1]} features: expected 1 + {x.shape[1]}")
    if target.shape != (x.shape[0],):
        raise ValueError(f"target has shape {target.shape}, expected ({x.shape[0]},) to match the features")
    if not np.isfinite(coefficients).all():
        raise ValueError("coefficients hold NaN or infinite values")
    if not np.isfinite(x).all():
        raise ModelFitError("features hold NaN or infinite values: impute them first (FeatureSpec.encode does)")
    family.check_target(target)
    eta = coefficients[0] + x @ coefficients[1:]
    if offset is not None:
        shift = np.asarray(offset, dtype=np.float64)
        if shift.shape != target.shape or not np.isfinite(shift).all():
            raise ValueError(f"offset must be {target.shape[0]} finite values")
        eta = eta + shift
    return x, target, eta


def _gram(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """[1 x]ᵀ diag(weight) [1 x] without building [1 x]; weight >= 0 (every family's is).

    As (√w x)ᵀ(√w x), which numpy hands to BLAS syrk: half the products of xᵀ(w x).
    """
    p = x.shape[1] + 1
    root = np.sqrt(weight)
    scaled = x * root[:, None]
    gram = np.empty((p, p))
    gram[0, 0] = weight.sum()
    gram[0, 1:] = gram[1:, 0] = root @ scaled
    gram[1:, 1:] = scaled.T @ scaled
    return gram


def _score(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    return np.concatenate([[factor.sum()], factor @ x])


def site_sums(
    X: np.ndarray,
    y: np.ndarray,
    beta: np.ndarray,
    *,
    family: Family,
    offset: np.ndarray | None = None,
    limit: float = math.inf,
) -> np.ndarray:
    """One node's sums at ``beta`` over its rows, as one float64 vector (``SumsLayout``).

    ``X``: the node's features without an intercept (column 0 of β is the intercept).
    ``offset``: added to η (e.g. log exposure). The score is Xᵀ(dℓ/dη), the
    information Xᵀ W X with the Fisher weights and the observed information with
    -d²ℓ/dη², all at unit dispersion. ``limit``: the
    most any entry may be in magnitude (the quantiser's clip). Where β makes some sum
    overflow float64 or exceed ``limit``, the node sends only its row count, its target
    total and ``overflowed = 1``: nothing is silently clipped, and the coordinator halves
    the step. A node with no rows sends zeros; one with fewer rows than coefficients
    only adds to the sums.
    """
    x, target, eta = _prepared(X, y, beta, family, offset)
    layout = SumsLayout(x.shape[1] + 1)
    p = layout.parameters
    rows, y_sum = float(target.size), float(target.sum())
    if abs(y_sum) > limit:
        raise ModelFitError(
            f"the target's total ({rows:.0f} rows) exceeds the fixed-point clip {limit:g}: fit costs in "
            "cost-scale units (FeatureSpec.cost_scale), or raise the clip's row bound"
        )
    kernel = _KERNELS[family.name]
    with np.errstate(all="ignore"):
        terms = kernel.terms(target, eta, family.power or 0.0)
        information = _gram(x, terms.weight)
        observed = information if kernel.canonical else _gram(x, kernel.observed(target, terms.mu, family.power or 0.0))
        sums = GlmSums(
            rows,
            y_sum,
            0.0,
            float(terms.deviance.sum()),
            float(terms.pearson.sum()),
            _score(x, terms.score),
            information,
            observed,
        )
        vector = layout.pack(sums)
    if not np.isfinite(vector).all() or np.abs(vector).max(initial=0.0) > limit:
        return layout.pack(GlmSums(rows, y_sum, 1.0, 0.0, 0.0, np.zeros(p), np.zeros((p, p)), np.zeros((p, p))))
    return vector


# How a node says it refused a Newton round under ``effective_rows``; the coordinator looks for it.
CONCENTRATED = "coefficients put the sums' weight on fewer than"


def effective_rows(X: np.ndarray, y: np.ndarray, beta: np.ndarray, *, family: Family) -> float:
    """How many rows the sums at ``beta`` effectively describe: (Σw)² / Σw² of the Fisher weights.

    The coordinator chooses β. A β crafted to put (nearly) all the weight on one row, a
    logit that is steep at one age or a log mean that explodes for one patient, would turn
    the information sum into that row's features and the score into its outcome: a node
    answers only where its sums describe at least a cohort's worth of rows (Kish's
    effective sample size, 1965, §11.7, of the weights the sums apply).
    """
    x, target, eta = _prepared(X, y, beta, family, None)
    with np.errstate(all="ignore"):
        weight = _KERNELS[family.name].terms(target, eta, family.power or 0.0).weight
    total, squares = float(weight.sum()), float(np.square(weight).sum())
    if not (math.isfinite(total) and math.isfinite(squares)) or squares == 0:
        return 0.0
    return total * total / squares


def task_family(task: str, *, cost_family: str, tweedie_power: float) -> Family:
    """The family of an exact GLM for one of fedcost's tasks: logistic readmission, log-link cost."""
    if task == "readmission":
        return BINOMIAL
    return tweedie(tweedie_power) if cost_family == "tweedie" else Family(cost_family)


def site_meat(
    X: np.ndarray,
    y: np.ndarray,
    beta: np.ndarray,
    *,
    family: Family,
    offset: np.ndarray | None = None,
    limit: float = math.inf,
) -> np.ndarray:
    """One node's cluster-robust sums at the fitted ``beta`` (``MeatLayout``).

    The outer product s_k s_kᵀ of the node's own score (so that the meat Σ_k s_k s_kᵀ
    travels as a sum and no node's score is ever seen) and its observed information (the
    sandwich's bread, as statsmodels uses; it differs from the Fisher information for
    log-link gamma and tweedie), plus 1 site and its rows. A node without rows sends zeros.
    ``limit``: the quantiser's clip (``meat_quantizer_settings``); an entry beyond it is an
    error here rather than a silently clipped, wrong standard error.
    """
    x, target, eta = _prepared(X, y, beta, family, offset)
    layout = MeatLayout(x.shape[1] + 1)
    p = layout.parameters
    if target.size == 0:
        return layout.pack(ClusterSums(0.0, 0.0, np.zeros((p, p)), np.zeros((p, p))))
    kernel = _KERNELS[family.name]
    with np.errstate(all="ignore"):
        terms = kernel.terms(target, eta, family.power or 0.0)
        score = _score(x, terms.score)
        observed = _gram(x, kernel.observed(target, terms.mu, family.power or 0.0))
        vector = layout.pack(ClusterSums(1.0, float(target.size), np.outer(score, score), observed))
    if not np.isfinite(vector).all():
        raise ModelFitError("the cluster-robust sums overflow at these coefficients: use the converged fit's")
    if np.abs(vector).max() > limit:
        raise ModelFitError(
            f"a cluster-robust sum exceeds the fixed-point clip {limit:g}: take the clip from "
            "meat_quantizer_settings of this fit, at its coefficients"
        )
    return vector


# --- noisy Newton sums (distributed DP) -----------------------------------------------------


def noisy_blocks(family: Family) -> int:
    """The blocks of a noisy Newton sum: score and information, and a Pearson sum where the
    family's dispersion is estimated."""
    return 2 if family.fixed_dispersion else 3


@dataclass(frozen=True)
class NoisyBounds:
    """The most one record adds, in L2, to each block of a noisy Newton sum of one task.

    A row's features (standardised) are scaled down to an L2 norm of at most ``feature_norm``
    C, so its design row z = [1, x] has ‖z‖ <= B = √(1 + C²). Its score term s·z, with the
    score factor s = dℓ/dη clipped to |s| <= ``score``, then has L2 <= S·B; its Fisher
    information term w·zzᵀ, with the Fisher weight clipped to 0 <= w <= ``weight``, has an
    upper triangle of L2 <= ‖zzᵀ‖_F·W = W·B²; its Pearson term, clipped at S², at most S².
    The Fisher weight, unlike the observed one (y/μ for gamma), does not grow with y, so
    noisy sums take Fisher scoring (IRLS) steps. For the logit link S = 1 and W = 1/4 hold
    for every row and coefficient (|y - μ| <= 1, μ(1-μ) <= 1/4): nothing but the features is
    clipped. For log links S is ``response_clip`` and W the Fisher weight at a mean of
    ``response_clip`` (1 for gamma, R^(2-p) for tweedie, R for poisson); the score clip changes
    the estimator where a row exceeds it (its pull on the fit is capped, as in Huber's
    M-estimators), and the features' clip does so for every family: the fit is that of the
    clipped features.
    """

    feature_norm: float
    score: float
    weight: float
    dispersion: bool  # whether the family's dispersion is estimated: a Pearson block is sent

    @classmethod
    def of(cls, family: Family, features: int, *, feature_clip: float, response_clip: float) -> NoisyBounds:
        """The bounds of ``family`` over ``features`` features: features clipped at
        ``feature_clip`` x √features (about the norm of a typical standardised row), score
        factors and weights of log links at ``response_clip``."""
        norm = feature_clip * math.sqrt(max(features, 1))
        if family.name == "binomial":
            return cls(norm, 1.0, 0.25, False)
        mean = np.array([response_clip])
        weight = float(_KERNELS[family.name].terms(mean, np.log(mean), family.power or 0.0).weight[0])
        return cls(norm, response_clip, weight, noisy_blocks(family) == 3)

    @property
    def row_norm(self) -> float:
        """B: the largest L2 norm of a row of the design with its intercept."""
        return math.sqrt(1.0 + self.feature_norm**2)

    def size(self, parameters: int) -> int:
        return parameters + parameters * (parameters + 1) // 2 + self.dispersion

    def scale(self, parameters: int) -> np.ndarray:
        """Per slot, the bound the node divides by and the coordinator multiplies the sum by."""
        half = parameters * (parameters + 1) // 2
        bound = self.row_norm
        parts = [np.full(parameters, self.score * bound), np.full(half, self.weight * bound**2)]
        return np.concatenate(parts + ([np.array([self.score**2])] if self.dispersion else []))


def noisy_site_sums(
    X: np.ndarray, y: np.ndarray, beta: np.ndarray, *, family: Family, bounds: NoisyBounds
) -> np.ndarray:
    """One node's Newton sums at ``beta`` for a noisy release, normalised: its score, the upper
    triangle of its Fisher information (and its Pearson sum where the dispersion is
    estimated), with every row's terms clipped to ``bounds`` and each block divided by its
    bound, so that one row moves each block by at most 1 in L2. The node adds its share of
    the noise to this vector (``privacy.distributed.NewtonNoise``)."""
    x = np.asarray(X, dtype=np.float64)
    if x.ndim == 2 and x.size:
        norms = np.linalg.norm(x, axis=1)
        x = x * np.minimum(1.0, bounds.feature_norm / np.maximum(norms, 1e-300))[:, None]
    x, target, eta = _prepared(x, y, beta, family, None)
    kernel = _KERNELS[family.name]
    with np.errstate(all="ignore"):
        terms = kernel.terms(target, eta, family.power or 0.0)
        # A coefficient far out can make a log link's terms inf - inf: such a row adds nothing.
        score = np.nan_to_num(np.clip(terms.score, -bounds.score, bounds.score), nan=0.0)
        weight = np.nan_to_num(np.clip(terms.weight, 0.0, bounds.weight), nan=0.0)
        pearson = np.nan_to_num(np.minimum(terms.pearson, bounds.score**2), nan=0.0)
    p = x.shape[1] + 1
    parts = [_score(x, score), _gram(x, weight)[_triangle(p)]]
    vector = np.concatenate(parts + ([np.array([pearson.sum()])] if bounds.dispersion else []))
    return vector / bounds.scale(p)


# --- coordinator side ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StepInfo:
    """What ``newton_step`` decided, and what the next call needs (pass it as ``previous``).

    ``iteration``: rounds of sums used so far, rejected ones included. ``accepted``: the
    point these sums were taken at improved the objective (or was the start).
    ``objective``: the penalised log-likelihood there (-inf when a node overflowed).
    ``reference``/``reference_objective``/``sums``: the last accepted point, its objective
    and its sums. ``halvings``: consecutive halvings so far. ``change``: the proposed
    step's largest coefficient change over max(1, largest |β|); ``noise``: the most the
    sums' fixed point can make it (``resolution``). ``estimate``: the coefficients to
    report once ``done``.
    """

    iteration: int
    accepted: bool
    objective: float
    reference: np.ndarray
    reference_objective: float
    sums: GlmSums
    halvings: int
    change: float
    converged: bool
    done: bool
    estimate: np.ndarray
    penalty: float
    noise: float = 0.0
    message: str = ""
    score_noise: float = 0.0  # the DP noise's standard deviation on each score entry (noisy sums)


def _objective(deviance: float, beta: np.ndarray, penalty: float) -> float:
    """ℓ(β) - λ/2·|β_{-0}|² with ℓ = -D/2 (unit dispersion)."""
    return -0.5 * deviance - 0.5 * penalty * float(beta[1:] @ beta[1:])


def _penalised(information: np.ndarray, penalty: float) -> np.ndarray:
    matrix = information.copy()
    matrix[np.arange(1, len(matrix)), np.arange(1, len(matrix))] += penalty
    return matrix


@dataclass(frozen=True, eq=False)
class _Factor:
    """H + λP = D^½ L Lᵀ D^½: a Cholesky of the unit-diagonal matrix, which scales well."""

    scale: np.ndarray  # D^-½
    lower: np.ndarray
    smallest: float  # smallest eigenvalue of the unit-diagonal matrix

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """(H + λP)⁻¹ rhs, for a vector or a matrix of right-hand sides."""
        scale = self.scale.reshape(-1, *(1,) * (rhs.ndim - 1))
        return scale * np.linalg.solve(self.lower.T, np.linalg.solve(self.lower, rhs * scale))

    def inverse(self) -> np.ndarray:
        return self.solve(np.eye(len(self.scale)))

    def norm_of_inverse(self) -> float:
        """An upper bound on |(H + λP)⁻¹|₂: 1 / (smallest eigenvalue x smallest diagonal)."""
        return float(np.max(self.scale) ** 2 / self.smallest)


def _factor(
    matrix: np.ndarray, names: Sequence[str], *, resolution: float = 0.0, family: Family | None = None
) -> _Factor:
    """Factor H + λP, or ModelFitError naming the features that make it singular.

    Singular means the smallest eigenvalue of the unit-diagonal matrix is at most
    ``SINGULAR`` plus what the sums' fixed point can move it by (p·resolution / min
    diagonal; below that, a coefficient's error bound √p·resolution/λ_min(H) reaches
    1/√p: it would be set by rounding): a constant feature, collinear features, or
    weights that vanished.
    """
    p = len(matrix)
    diagonal = np.diag(matrix)
    hint = "drop it, or set [model] penalty > 0"
    separation = ""
    if family is not None and family.name == "binomial":
        separation = "; in a logistic model this also happens when features separate the classes perfectly"
    if not diagonal[0] > 0:
        raise ModelFitError(
            "the information matrix is singular: every row has zero weight (the fitted means all sit at "
            f"the boundary of the family's range){separation}; set [model] penalty > 0"
        )
    zero = [names[j] for j in range(1, p) if not diagonal[j] > p * resolution]  # 0 up to the fixed point
    if zero:
        raise ModelFitError(
            f"the information matrix is singular: feature{'' if len(zero) == 1 else 's'} {_quoted(zero)} "
            f"{'is' if len(zero) == 1 else 'are'} 0 at every row of every site (a numeric feature with one value "
            f"everywhere is 0 once standardised); {hint}"
        )
    scale = 1.0 / np.sqrt(diagonal)
    unit = matrix * scale[:, None] * scale[None, :]
    values, vectors = np.linalg.eigh(unit)
    floor = SINGULAR + p * resolution / float(diagonal.min())
    if values[0] <= floor:
        raise ModelFitError(_singular_message(vectors[:, 0], names) + separation)
    try:
        lower = np.linalg.cholesky(unit)
    except np.linalg.LinAlgError:
        raise ModelFitError(_singular_message(vectors[:, 0], names) + separation) from None
    return _Factor(scale, lower, float(values[0]))


def _singular_message(null: np.ndarray, names: Sequence[str]) -> str:
    """Which features span the null direction, in words a user can act on."""
    involved = [j for j in range(len(null)) if abs(null[j]) > 0.1 * np.abs(null).max()]
    features = [names[j] for j in involved if j != 0]
    start = "the information matrix is singular: "
    if len(features) == 1 and 0 not in involved:
        return f"{start}feature {_quoted(features)} is 0 at nearly every row; drop it, or set [model] penalty > 0"
    if len(features) == 1 and 0 in involved:
        return (
            f"{start}feature {_quoted(features)} takes one value at every row of every site; drop it, or set "
            "[model] penalty > 0"
        )
    if 0 in involved:
        return (
            f"{start}features {_quoted(features)} and the intercept are collinear (e.g. every level of a category "
            "is a feature: drop one level as the reference); drop one of them, or set [model] penalty > 0"
        )
    return (
        f"{start}features {_quoted(features)} are collinear (one is a linear combination of the others); "
        "drop one of them, or set [model] penalty > 0"
    )


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


_TARGET_HINT = "check the target column and how the mapping reads it (its positive values), or leave the target out"


def _check_target_sums(sums: GlmSums, family: Family, resolution: float) -> None:
    """ModelFitError for a target whose MLE lies at infinity whatever the features: one class, all zeros."""
    rows = round(sums.rows)
    if rows < 1:
        raise ModelFitError("the sites reported no training rows: there is nothing to fit")
    floor = max(resolution, 0.5 if family.name == "binomial" else 0.0)
    if family.name in ("binomial", "poisson", "tweedie") and sums.y_sum <= floor:
        raise ModelFitError(
            f"the target is 0 at every row of every site, so the intercept of a {family.name} model runs to "
            f"-infinity (the ridge penalty leaves the intercept free): there is nothing to fit; {_TARGET_HINT}"
        )
    if family.name == "binomial" and sums.y_sum >= rows - 0.5:
        raise ModelFitError(
            "the target is 1 at every row of every site, so the intercept of a logistic model runs to "
            f"+infinity (the ridge penalty leaves the intercept free): there is nothing to fit; {_TARGET_HINT}"
        )


def newton_step(
    total: np.ndarray,
    beta: np.ndarray,
    *,
    family: Family,
    penalty: float = 0.0,
    previous: StepInfo | None = None,
    feature_names: Sequence[str] | None = None,
    max_iterations: int = MAX_ITERATIONS,
    tolerance: float = TOLERANCE,
    resolution: float = 0.0,
) -> tuple[np.ndarray, StepInfo]:
    """The coordinator's update: from the summed ``site_sums`` at ``beta``, the next β to ask about.

    Maximises ℓ(β) - λ/2·|β_{-0}|² (``penalty`` = λ >= 0, the intercept unpenalised):
    β_next = β + (H + λP)⁻¹(score - λPβ) by a Cholesky of H + λP, where H is the Fisher
    information. Judges the previous step one round behind and halves it when the
    objective fell (module docstring). ``previous``: the StepInfo of the last call, None
    on the first; keep ``penalty`` and the other settings the same throughout.
    ``resolution``: the most one entry of ``total`` can be off (``SumsPrecision.error``;
    0 for float sums); it widens the singularity, slack and convergence thresholds to
    what the fixed point can resolve. Stop when the returned ``StepInfo.done``.

    Raises ModelFitError for a singular H + λP (naming the features), a target with one
    class (or all zeros) everywhere, sums that overflow at the start, or a step that
    still lowers the objective after ``MAX_HALVINGS`` halvings.
    """
    beta = np.asarray(beta, dtype=np.float64)
    if beta.ndim != 1 or not np.isfinite(beta).all():
        raise ValueError("beta must be a finite vector")
    if not (math.isfinite(penalty) and penalty >= 0):
        raise ValueError(f"penalty must be a finite number >= 0, got {penalty!r}")
    if not (math.isfinite(resolution) and resolution >= 0):
        raise ValueError(f"resolution must be a finite number >= 0, got {resolution!r}")
    if previous is not None and previous.penalty != penalty:
        raise ValueError(f"penalty changed from {previous.penalty} to {penalty} in the middle of a fit")
    names = _names(len(beta), feature_names)
    sums = SumsLayout(len(beta)).unpack(total)
    _check_target_sums(sums, family, resolution)
    iteration = 1 if previous is None else previous.iteration + 1
    overflowed = sums.overflowed > 0.5
    objective = -math.inf if overflowed else _objective(sums.deviance, beta, penalty)
    if previous is None and overflowed:
        raise ModelFitError(
            "the sums overflow at the starting coefficients: start from zeros (start_coefficients), with features "
            "standardised and costs in cost-scale units"
        )
    slack = 0.0 if previous is None else resolution + SLACK * (1.0 + abs(previous.reference_objective))
    if previous is not None and (overflowed or objective < previous.reference_objective - slack):
        return _halve(previous, beta, objective, iteration, max_iterations, tolerance, family)
    # At the start every weight is positive, so a singular matrix there is the features' doing.
    late = family if previous is not None else None
    factor = _factor(_penalised(sums.observed, penalty), names, resolution=resolution, family=late)
    gradient = sums.score.copy()
    gradient[1:] -= penalty * beta[1:]
    step = factor.solve(gradient)
    proposed = beta + step
    size = max(1.0, float(np.abs(proposed).max()))
    change = float(np.abs(step).max()) / size
    noise = math.sqrt(len(beta)) * resolution * factor.norm_of_inverse() / size
    converged = change <= max(tolerance, noise)
    done = converged or iteration >= max_iterations
    info = StepInfo(
        iteration=iteration,
        accepted=True,
        objective=objective,
        reference=beta,
        reference_objective=objective,
        sums=sums,
        halvings=0,
        change=change,
        converged=converged,
        done=done,
        estimate=proposed if converged else beta,
        penalty=penalty,
        noise=noise,
        message=_message(converged, done, iteration, change, family),
    )
    return proposed, info


def _halve(
    previous: StepInfo,
    beta: np.ndarray,
    objective: float,
    iteration: int,
    max_iterations: int,
    tolerance: float,
    family: Family,
) -> tuple[np.ndarray, StepInfo]:
    """The step to ``beta`` lowered the objective: propose half of it from the last accepted point."""
    halvings = previous.halvings + 1
    if halvings > MAX_HALVINGS:
        raise ModelFitError(
            f"the objective still fell after {MAX_HALVINGS} step halvings at iteration {iteration}: the sums "
            "are inconsistent between rounds (did a node's rows change during the fit?)"
        )
    reference = previous.reference
    proposed = reference + 0.5 * (beta - reference)
    change = float(np.abs(proposed - reference).max()) / max(1.0, float(np.abs(reference).max()))
    converged = change <= max(tolerance, previous.noise)  # the last accepted point is as good as the sums tell
    done = converged or iteration >= max_iterations
    info = replace(
        previous,
        iteration=iteration,
        accepted=False,
        objective=objective,
        halvings=halvings,
        change=change,
        converged=converged,
        done=done,
        estimate=reference,
        message=_message(converged, done, iteration, change, family),
    )
    return proposed, info


def noisy_newton_step(
    total: np.ndarray,
    beta: np.ndarray,
    *,
    family: Family,
    bounds: NoisyBounds,
    noise_sd: float,
    rows: int,
    penalty: float = 0.0,
    previous: StepInfo | None = None,
    feature_names: Sequence[str] | None = None,
    max_iterations: int = MAX_ITERATIONS,
    tolerance: float = TOLERANCE,
) -> tuple[np.ndarray, StepInfo]:
    """``newton_step`` for summed ``noisy_site_sums`` that carry noise of ``noise_sd``
    normalised units per slot over ``rows`` training rows (the statistics stage's count).

    The noisy (Fisher) information is made usable: symmetric by construction (one triangle
    travels), its eigenvalues raised to at least 2√p·σ_H (σ_H the noise's standard deviation
    per entry, 2√p·σ_H the spectral norm of such a noise matrix: Wigner's semicircle), which
    keeps it positive definite and damps the step along directions the noise could have
    flattened, and the ridge λP added. No deviance travels, so there is no step halving:
    every step is taken. Stop rule: the fixed number of rounds the noise was planned for
    (``max_iterations``); more rounds cannot average the noise away (each step carries a
    fresh draw), fewer leave the deterministic part of a log link's iteration unfinished.
    ``converged`` then says whether the last step was within 3 standard deviations of what
    the noise on the score moves each coefficient (σ_g·√diag((H + λP)⁻²)). The estimate is
    the last step's point; its standard errors include the noise on the score
    (``FittedGlm.score_noise``), not that on the information.
    """
    beta = np.asarray(beta, dtype=np.float64)
    if beta.ndim != 1 or not np.isfinite(beta).all():
        raise ValueError("beta must be a finite vector")
    if previous is not None and previous.penalty != penalty:
        raise ValueError(f"penalty changed from {previous.penalty} to {penalty} in the middle of a fit")
    p = len(beta)
    names = _names(p, feature_names)
    scale = bounds.scale(p)
    summed = _checked_vector(total, bounds.size(p), "noisy sums") * scale
    half = p * (p + 1) // 2
    score_sd, information_sd = float(noise_sd * scale[0]), float(noise_sd * scale[p])
    values, vectors = np.linalg.eigh(_symmetric(summed[p : p + half], p))
    floor = 2.0 * math.sqrt(p) * information_sd
    information = (vectors * np.maximum(values, floor)) @ vectors.T
    pearson = max(float(summed[-1]), 0.0) if bounds.dispersion else math.nan
    sums = GlmSums(float(rows), math.nan, 0.0, math.nan, pearson, summed[:p].copy(), information, information)
    iteration = 1 if previous is None else previous.iteration + 1
    factor = _factor(_penalised(information, penalty), names)
    gradient = sums.score.copy()
    gradient[1:] -= penalty * beta[1:]
    step = factor.solve(gradient)
    proposed = beta + step
    size = max(1.0, float(np.abs(proposed).max()))
    change = float(np.abs(step).max()) / size
    inverse = factor.inverse()
    moved = 3.0 * score_sd * np.sqrt(np.diag(inverse @ inverse))
    noise = float(moved.max()) / size
    converged = bool((np.abs(step) <= np.maximum(moved, tolerance * size)).all())
    done = iteration >= max_iterations
    message = ""
    if done and converged:
        message = f"ran the {iteration} planned rounds; the last step was within what the DP noise moves it"
    elif done:
        message = (
            f"ran the {iteration} planned rounds, and the last step was larger than the DP noise explains (last "
            f"relative step {change:.2g}): plan more rounds, or a larger [glm_privacy] epsilon"
        )
    info = StepInfo(
        iteration=iteration,
        accepted=True,
        objective=math.nan,
        reference=beta,
        reference_objective=math.nan,
        sums=sums,
        halvings=0,
        change=change,
        converged=converged,
        done=done,
        estimate=proposed,
        penalty=penalty,
        noise=noise,
        message=message,
        score_noise=score_sd,
    )
    return proposed, info


_SEPARATED_ZEROS = "coefficients that keep growing mean that features separate the zero targets"
_NOT_CONVERGED = {  # what a fit that ran out of iterations most likely means, by family
    "binomial": "coefficients that keep growing mean that features separate the classes (perfectly or nearly): "
    "set [model] penalty > 0",
    "poisson": f"{_SEPARATED_ZEROS}: set [model] penalty > 0",
    "tweedie": f"{_SEPARATED_ZEROS}: set [model] penalty > 0",
}


def _message(converged: bool, done: bool, iteration: int, change: float, family: Family) -> str:
    if converged:
        return f"converged after {iteration} iterations"
    if not done:
        return ""
    hint = _NOT_CONVERGED.get(family.name, "raise max_iterations")
    return f"did not converge in {iteration} iterations (last relative step {change:.2g}); {hint}"


# --- the fitted model -----------------------------------------------------------------------


@dataclass(frozen=True)
class Coefficient:
    """One row of the coefficient table, as ``ds.glm`` and statsmodels report it."""

    name: str
    estimate: float
    std_error: float
    statistic: float
    p_value: float
    lower: float
    upper: float
    ratio: float | None
    ratio_lower: float | None
    ratio_upper: float | None


@dataclass(frozen=True, eq=False)
class FittedGlm:
    """A fitted GLM: coefficients, the Fisher information and what inference needs.

    ``information``: H = Xᵀ W X at unit dispersion (unpenalised), at the last accepted
    point; ``rows``, ``deviance``, ``pearson`` there too. ``clusters``: the summed
    ``site_meat`` when cluster-robust errors were asked for. A fit on noisy sums
    (``noisy_newton_step``) has no deviance (nan; none travels), nor a Pearson sum for a
    family of fixed dispersion, and ``score_noise``: the DP noise's standard deviation on
    each score entry, which its standard errors include.
    """

    family: Family
    feature_names: tuple[str, ...]
    coefficients: np.ndarray
    information: np.ndarray
    penalty: float
    rows: int
    deviance: float
    pearson: float
    iterations: int
    converged: bool
    message: str = ""
    clusters: ClusterSums | None = None
    correction: str = "crv1"
    score_noise: float = 0.0

    def __post_init__(self) -> None:
        p = len(self.coefficients)
        if len(self.feature_names) != p - 1:
            raise ValueError(f"{len(self.feature_names)} feature names for {p - 1} features")
        if self.information.shape != (p, p) or not np.isfinite(self.information).all():
            raise ValueError(f"information must be a finite {p}x{p} matrix")
        if not np.isfinite(self.coefficients).all():
            raise ValueError("coefficients hold NaN or infinite values")
        if not (math.isfinite(self.penalty) and self.penalty >= 0):
            raise ValueError(f"penalty must be a finite number >= 0, got {self.penalty!r}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction {self.correction!r}: expected one of {CORRECTIONS}")
        if not self.family.fixed_dispersion and self.rows <= p:
            raise ModelFitError(
                f"{self.rows} rows for {p} coefficients leave no residual degrees of freedom to estimate the "
                f"{self.family.name} dispersion: use fewer features or more rows"
            )

    @classmethod
    def from_step(cls, info: StepInfo, *, family: Family, feature_names: Sequence[str] | None = None) -> FittedGlm:
        """The model at the end of ``newton_step``'s iteration (``info.done``)."""
        if not info.done:
            raise ValueError("the iteration is not done: keep calling newton_step until StepInfo.done")
        p = len(info.estimate)
        return cls(
            family=family,
            feature_names=_names(p, feature_names)[1:],
            coefficients=info.estimate.copy(),
            information=info.sums.information.copy(),
            penalty=info.penalty,
            rows=round(info.sums.rows),
            deviance=info.sums.deviance,
            pearson=info.sums.pearson,
            iterations=info.iteration,
            converged=info.converged,
            message=info.message,
            score_noise=info.score_noise,
        )

    @property
    def names(self) -> tuple[str, ...]:
        return (_INTERCEPT, *self.feature_names)

    @property
    def dispersion(self) -> float:
        """φ: 1 for binomial and poisson, else Pearson χ² / (n - p) (McCullagh & Nelder 1989, §4.5.2)."""
        if self.family.fixed_dispersion:
            return 1.0
        return self.pearson / (self.rows - len(self.coefficients))

    @property
    def residual_df(self) -> int:
        return self.rows - len(self.coefficients)

    def covariance(self) -> np.ndarray:
        """φ·(H + λP)⁻¹: the inverse information without a penalty; with one, the Bayesian
        covariance of a penalised GLM (Wood 2017, Generalized Additive Models, 2nd ed., §6.10;
        mgcv's Vp), which stays positive definite where a feature carries no information,
        unlike the ridge sandwich (H + λP)⁻¹H(H + λP)⁻¹. Penalised intervals are centred on
        shrunken estimates: read them as such. A fit on noisy sums adds what the noise on the
        last step's score does to the estimate, σ²·(H + λP)⁻²: its errors include the DP noise."""
        inverse = _factor(_penalised(self.information, self.penalty), self.names).inverse()
        return self.dispersion * inverse + self.score_noise**2 * (inverse @ inverse)

    def cluster_covariance(self) -> np.ndarray:
        """c·B⁻¹ M B⁻¹: B the observed information (+ λP), M = Σ_k s_k s_kᵀ over sites.

        Liang & Zeger 1986 (Biometrika 73(1)); c is the small-sample correction
        (Cameron & Miller 2015, J Hum Resour 50(2), §III.B): "crv1" G/(G-1)·(n-1)/(n-p),
        Stata's and statsmodels' default (``use_correction=True``); "groups" G/(G-1);
        "none" 1 (statsmodels' ``use_correction=False``).
        """
        if self.clusters is None:
            raise ValueError("no cluster sums: call with_clusters with the summed site_meat first")
        inverse = _factor(_penalised(self.clusters.observed, self.penalty), self.names).inverse()
        return _correction(self) * (inverse @ self.clusters.meat @ inverse)

    def with_clusters(self, total: np.ndarray, *, correction: str = "crv1") -> FittedGlm:
        """A copy with the summed ``site_meat`` (at these coefficients) for cluster-robust errors."""
        clusters = MeatLayout(len(self.coefficients)).unpack(total)
        sites = round(clusters.sites)
        if sites < 2:
            raise ModelFitError(f"cluster-robust errors need at least 2 sites with rows, got {sites}")
        if round(clusters.rows) != self.rows:
            raise ModelFitError(
                f"the cluster sums cover {round(clusters.rows)} rows, the fit {self.rows}: sum site_meat over the "
                "sites that were in the fit"
            )
        return replace(self, clusters=clusters, correction=correction)

    def standard_errors(self, *, robust: bool = False) -> np.ndarray:
        covariance = self.cluster_covariance() if robust else self.covariance()
        return np.sqrt(np.maximum(np.diag(covariance), 0.0))  # rounding can leave -1e-20 where 0 is meant

    def summary(self, *, robust: bool = False, use_t: bool = False, level: float = 0.95) -> list[Coefficient]:
        """Estimates, standard errors, z (or t) statistics, two-sided p-values, intervals and ratios.

        Normal reference by default, as statsmodels' GLM and ``ds.glm``. ``use_t``: t with
        n - p degrees of freedom where φ is estimated (R's ``summary.glm``), G - 1 for
        cluster-robust errors (Cameron & Miller 2015, §VI). exp(estimate) and its interval
        are the odds, rate or mean ratios (None for the identity link).
        """
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        errors = self.standard_errors(robust=robust)
        statistics = self.coefficients / errors
        df = None
        if use_t and robust:
            df = round(self.clusters.sites) - 1 if self.clusters is not None else None
        elif use_t and not self.family.fixed_dispersion:
            df = self.residual_df
        p_values, quantile = _reference(statistics, df, level)
        rows = []
        for j, name in enumerate(self.names):
            estimate, lower, upper = (
                float(self.coefficients[j]),
                float(self.coefficients[j] - quantile * errors[j]),
                float(self.coefficients[j] + quantile * errors[j]),
            )
            ratios = tuple(_exp(v) for v in (estimate, lower, upper)) if self.family.ratio else (None,) * 3
            row = (name, estimate, float(errors[j]), float(statistics[j]), float(p_values[j]), lower, upper, *ratios)
            rows.append(Coefficient(*row))
        return rows

    def linear_predictor(self, X: np.ndarray, *, offset: np.ndarray | None = None) -> np.ndarray:
        x = np.asarray(X, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ValueError(f"features have shape {x.shape}, the model expects (rows, {len(self.feature_names)})")
        if not np.isfinite(x).all():
            raise ModelFitError("features hold NaN or infinite values: impute them before predicting")
        eta = self.coefficients[0] + x @ self.coefficients[1:]
        return eta if offset is None else eta + np.asarray(offset, dtype=np.float64)

    def predict(self, X: np.ndarray, *, offset: np.ndarray | None = None) -> np.ndarray:
        """The mean μ = g⁻¹(Xβ + offset): a probability, a rate or an expected cost."""
        return self.family.mean(self.linear_predictor(X, offset=offset))

    def to_dict(self) -> dict[str, Any]:
        upper = _triangle(len(self.coefficients))
        clusters = None
        if self.clusters is not None:
            clusters = {
                "sites": self.clusters.sites,
                "rows": self.clusters.rows,
                "meat": self.clusters.meat[upper].tolist(),
                "observed": self.clusters.observed[upper].tolist(),
                "correction": self.correction,
            }
        return {
            "format": FORMAT,
            "family": self.family.to_dict(),
            "feature_names": list(self.feature_names),
            "coefficients": self.coefficients.tolist(),
            "information": self.information[upper].tolist(),
            "penalty": self.penalty,
            "rows": self.rows,
            "deviance": _finite_or_none(self.deviance),
            "pearson": _finite_or_none(self.pearson),
            "iterations": self.iterations,
            "converged": self.converged,
            "message": self.message,
            "clusters": clusters,
            "score_noise": self.score_noise,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FittedGlm:
        """Strict inverse of ``to_dict``: ValueError on a missing, extra or mistyped field (a
        model saved before fits could be noisy has no ``score_noise``: 0)."""
        keys = {
            "format", "family", "feature_names", "coefficients", "information", "penalty", "rows",
            "deviance", "pearson", "iterations", "converged", "message", "clusters",
        }  # fmt: skip
        _exact_keys(data, keys | ({"score_noise"} & set(data)), "model")
        if data["format"] != FORMAT:
            raise ValueError(f"model format {data['format']!r}: expected {FORMAT!r}")
        names = _strings(data["feature_names"], "feature_names")
        coefficients = _floats(data["coefficients"], len(names) + 1, "coefficients")
        p = len(coefficients)
        half = p * (p + 1) // 2
        clusters, correction = None, "crv1"
        if data["clusters"] is not None:
            _exact_keys(data["clusters"], {"sites", "rows", "meat", "observed", "correction"}, "clusters")
            part = data["clusters"]
            clusters = ClusterSums(
                _number(part["sites"], "clusters.sites"),
                _number(part["rows"], "clusters.rows"),
                _symmetric(_floats(part["meat"], half, "clusters.meat"), p),
                _symmetric(_floats(part["observed"], half, "clusters.observed"), p),
            )
            correction = part["correction"]
        return cls(
            family=Family.from_dict(data["family"]),
            feature_names=names,
            coefficients=coefficients,
            information=_symmetric(_floats(data["information"], half, "information"), p),
            penalty=_number(data["penalty"], "penalty"),
            rows=_integer(data["rows"], "rows"),
            deviance=_number_or_nan(data["deviance"], "deviance"),
            pearson=_number_or_nan(data["pearson"], "pearson"),
            iterations=_integer(data["iterations"], "iterations"),
            converged=_boolean(data["converged"], "converged"),
            message=_string(data["message"], "message"),
            clusters=clusters,
            correction=correction,
            score_noise=_number(data.get("score_noise", 0.0), "score_noise"),
        )


def _finite_or_none(value: float) -> float | None:
    """A sum a noisy fit never received (nan) as JSON's null."""
    return value if math.isfinite(value) else None


def _number_or_nan(value: Any, what: str) -> float:
    return math.nan if value is None else _number(value, what)


def _exp(value: float) -> float:
    """exp, inf beyond float64 (a diverged fit's coefficient) instead of OverflowError."""
    return math.exp(value) if value < 709.0 else math.inf


def _correction(model: FittedGlm) -> float:
    assert model.clusters is not None
    groups, n, p = round(model.clusters.sites), model.rows, len(model.coefficients)
    if model.correction == "none":
        return 1.0
    factor = groups / (groups - 1)
    return factor * (n - 1) / (n - p) if model.correction == "crv1" else factor


def _reference(statistics: np.ndarray, df: int | None, level: float) -> tuple[np.ndarray, float]:
    """Two-sided p-values and the interval's quantile: normal, or t with ``df`` degrees of freedom."""
    if df is None:
        p_values = np.array([math.erfc(abs(float(z)) / math.sqrt(2.0)) for z in statistics])
        return p_values, NormalDist().inv_cdf(0.5 + level / 2)
    from scipy import stats  # only a t reference needs scipy

    return 2.0 * stats.t.sf(np.abs(statistics), df), float(stats.t.ppf(0.5 + level / 2, df))


def _exact_keys(data: Any, keys: set[str], what: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be a mapping, got {type(data).__name__}")
    missing, extra = keys - set(data), set(data) - keys
    if missing or extra:
        raise ValueError(f"{what}: missing fields {sorted(missing)}, unknown fields {sorted(extra)}")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _boolean(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r}")
    return value


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return tuple(value)


def _floats(value: Any, size: int, what: str) -> np.ndarray:
    if not isinstance(value, list) or len(value) != size:
        raise ValueError(f"{what} must be a list of {size} numbers")
    return np.array([_number(v, what) for v in value], dtype=np.float64)


# --- the loop, and the pooled reference -----------------------------------------------------


def fit(
    total_at: Callable[[np.ndarray], np.ndarray],
    *,
    parameters: int,
    family: Family,
    penalty: float = 0.0,
    start: np.ndarray | None = None,
    feature_names: Sequence[str] | None = None,
    max_iterations: int = MAX_ITERATIONS,
    tolerance: float = TOLERANCE,
    resolution: float = 0.0,
) -> FittedGlm:
    """The coordinator's loop: ``total_at(β)`` is the summed ``site_sums`` at β (one round each)."""
    beta = np.zeros(parameters) if start is None else np.asarray(start, dtype=np.float64).copy()
    info: StepInfo | None = None
    while info is None or not info.done:
        beta, info = newton_step(
            total_at(beta),
            beta,
            family=family,
            penalty=penalty,
            previous=info,
            feature_names=feature_names,
            max_iterations=max_iterations,
            tolerance=tolerance,
            resolution=resolution,
        )
    return FittedGlm.from_step(info, family=family, feature_names=feature_names)


def fit_pooled(
    X: np.ndarray,
    y: np.ndarray,
    *,
    family: Family,
    penalty: float = 0.0,
    offset: np.ndarray | None = None,
    feature_names: Sequence[str] | None = None,
    start: np.ndarray | None = None,
    max_iterations: int = MAX_ITERATIONS,
    tolerance: float = TOLERANCE,
) -> FittedGlm:
    """The same iteration on all rows in one place: the run's ``pooled`` baseline and the tests' reference."""
    x = np.asarray(X, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features have shape {x.shape}: expected (rows, features)")
    return fit(
        lambda beta: site_sums(x, y, beta, family=family, offset=offset),
        parameters=x.shape[1] + 1,
        family=family,
        penalty=penalty,
        start=start,
        feature_names=feature_names,
        max_iterations=max_iterations,
        tolerance=tolerance,
    )


# --- precision under secure aggregation ---------------------------------------------------


@dataclass(frozen=True)
class SumsPrecision:
    """Fixed-point settings for GLM sums, and what they cost in precision.

    ``error``: the most a decoded summed entry can be off, 2·nodes·step (one grid unit
    per node from stochastic rounding, doubled for the float64 rounding inside
    ``Quantizer.encode`` at these levels); pass it to ``newton_step`` as ``resolution``.
    """

    clip: float
    levels: int
    nodes: int

    def quantizer(self) -> Quantizer:
        return Quantizer(self.clip, self.levels, self.nodes)

    @property
    def bits(self) -> int:
        return self.quantizer().bits

    @property
    def word_bits(self) -> int:
        return word(self.bits).itemsize * 8

    @property
    def step(self) -> float:
        return self.clip / self.levels

    @property
    def error(self) -> float:
        return 2.0 * self.nodes * self.step

    def coefficient_error(self, information: np.ndarray, *, penalty: float = 0.0) -> float:
        """A bound on the largest coefficient error the sums' fixed point can cause:
        √p·error·|(H + λP)⁻¹|₂ (the score's error e moves the root by (H + λP)⁻¹e)."""
        matrix = _penalised(np.asarray(information, dtype=np.float64), penalty)
        return math.sqrt(len(matrix)) * self.error / float(np.linalg.eigvalsh(matrix)[0])


def _levels_for(clip: float, nodes: int) -> int:
    """The most levels (a power of 2, at most FLOAT_LEVELS) whose sums over ``nodes`` fit MAX_BITS."""
    levels = FLOAT_LEVELS
    while levels > 1 and (2 * levels * nodes + nodes).bit_length() > MAX_BITS:
        levels //= 2
    if (2 * levels * nodes + nodes).bit_length() > MAX_BITS:
        raise ValueError(f"{nodes} nodes do not fit a {MAX_BITS}-bit sum")
    return levels


def sums_quantizer_settings(*, rows: int, nodes: int, row_bound: float = ROW_BOUND) -> SumsPrecision:
    """Clip and levels for ``site_sums`` under secure aggregation.

    Clip: the power of 2 at or above ``rows``·``row_bound`` (rows: the most training rows
    one node can hold; the federation's rows from the statistics stage will do), so a
    node's entry stays within it while the per-row mean of its terms (w·x_j·x_k, the
    score, deviance and Pearson terms) is within ``row_bound`` — 256 is ample for
    standardised features and costs in cost-scale units; ``site_sums(limit=clip)`` refuses
    the rest. Levels: as many as float64 encoding and MAX_BITS allow (2**50 up to 2,047
    nodes), so 64-bit words; the vector is small (p = 51: 1,382 entries).

    Precision (why this and not today's 2**30 clip with 2**40 levels, a step of 2**-10):
    the fit is the root of score + e = 0, so the coefficient error is at most
    √p·error/λ_min(H + λP), error = 2·nodes·step; H's error only slows the iteration,
    and its share of a standard error is p·error/λ_min, below the coefficients' share.
    With clip = rows·row_bound the per-row condition is the same at any size: for 10⁶
    rows, 100 nodes, p = 51: clip 2**28, step 2**-22, error 4.8e-5, and β is within 1e-6
    of the pooled fit while λ_min(H) >= 343, i.e. the mean Fisher weight times the
    smallest eigenvalue of the features' correlation matrix is at least 3.4e-4 (a 5 %
    event rate with λ_min >= 0.007). Today's step of 2**-10 (error 0.2) would need
    λ_min(H) >= 1.4e6, more than 10⁶ binomial rows can give. Standard errors to 1e-4
    relative follow with room to spare. ``SumsPrecision.coefficient_error`` gives the
    bound for a fitted H.
    """
    for name, value in (("rows", rows), ("nodes", nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (math.isfinite(row_bound) and row_bound > 0):
        raise ValueError(f"row_bound must be a positive number, got {row_bound!r}")
    clip = float(2 ** math.ceil(math.log2(rows * row_bound)))
    return SumsPrecision(clip, _levels_for(clip, nodes), nodes)


def meat_quantizer_settings(model: FittedGlm, *, nodes: int, row_bound: float = ROW_BOUND) -> SumsPrecision:
    """Clip and levels for ``site_meat``, from the fit's own released sums.

    A node's score entry obeys |s_kj| <= √(χ²_k·H_k,jj) <= √(χ²·H_jj) (Cauchy–Schwarz,
    since (dℓ/dη)²/w is the row's Pearson term), so |s_kj s_kl| <= χ²·max_j H_jj: the
    clip is the power of 2 above twice that (the fit's sums are at a nearby β and in fixed
    point), and at least the sums' clip, which covers the observed information.
    """
    bound = 2.0 * model.pearson * float(np.diag(model.information).max())
    floor = sums_quantizer_settings(rows=max(model.rows, 1), nodes=nodes, row_bound=row_bound).clip
    clip = max(floor, float(2 ** math.ceil(math.log2(max(bound, 1.0)))))
    return SumsPrecision(clip, _levels_for(clip, nodes), nodes)
