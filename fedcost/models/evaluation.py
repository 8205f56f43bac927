"""Federated evaluation from sums: each node reports additive totals over its held-out
rows, the coordinator adds them (under secure aggregation, only the sum is seen) and
derives the metrics. No per-record value leaves a node.

AUROC comes from per-class histograms of the predicted probability over ``SCORE_BINS``
equal bins; pairs in the same bin count as ties. Fine bins would list the held-out rows:
the coordinator chooses the model, and weights that make the score a function of age
turn the two histograms into every row's (age, readmitted). So a node coarsens them
(``fedcost.privacy.smallcells.coarsen_histogram``) into groups of at least ``min_cohort``
of its rows, both classes sharing the groups; a group's readmissions are a rate over
those rows. Inside a group the classes are spread evenly, so pairs within one group
count as ties. The price, measured against the exact AUROC on the synthetic ecosystem
(every site scored by its true case-mix risk, min_cohort 11, seeds 0-4): at most 0.0005
at the held-out sizes of ``fedcost simulate``'s default sites (13,120 rows at 8 sites;
the 1,000 fine bins alone cost at most 0.00004), and at most 0.0045 for an ecosystem of
780 held-out rows at 5 sites, where each group is a larger share of a site.
``tests/test_small_cell_attacks.py`` pins 0.001 and 0.01 on another seed.
"""

from __future__ import annotations

import math

import numpy as np

from fedcost.privacy.policy import MIN_COHORT
from fedcost.privacy.smallcells import coarsen_histogram

SCORE_BINS = 1000
# A noisy release's histograms: every bin carries the full noise, so fewer, wider bins
# (each 20 fine ones) keep the AUROC's error from summing the noise of a thousand.
NOISY_SCORE_BINS = 50
READMISSION_SUMS = ("rows", "positives", "brier_sum", "log_loss_sum")
COST_SUMS = ("rows", "cost_sum", "cost_sq_sum", "abs_error_sum", "sq_error_sum")


# Predicted risks are clipped to [EPSILON, 1 - EPSILON]: one row's log loss is then at most
# -log(EPSILON), the bound a noisy release needs.
EPSILON = 1e-7
LOG_LOSS_BOUND = -math.log(EPSILON)
# The most slots one held-out row changes: each task's totals and one histogram bin.
NOISY_TOUCHED = {"readmission": 5, "cost": len(COST_SUMS)}


def readmission_sums(
    readmitted: np.ndarray, probability: np.ndarray, *, min_cohort: int = MIN_COHORT, noisy: bool = False
) -> np.ndarray:
    """Additive totals and the per-class score histograms, as one float64 vector.

    The histograms are coarsened to groups of at least ``min_cohort`` rows, or, for a
    noisy release (``noisy``), sent whole: the noise protects their bins, and a rule that
    groups by count is not differentially private. Held-out rows fewer than ``min_cohort``
    send zeros: their totals would describe a handful of patients.
    """
    y = readmitted.astype("float64")
    if y.size < min_cohort:
        return np.zeros(readmission_sums_size())
    p = np.clip(probability.astype("float64"), EPSILON, 1 - EPSILON)
    bins = np.minimum((p * SCORE_BINS).astype(int), SCORE_BINS - 1)
    histograms = np.stack([np.bincount(bins[y == label], minlength=SCORE_BINS) for label in (1, 0)])
    totals = [
        float(y.size),
        float(y.sum()),
        float(np.square(p - y).sum()),
        float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).sum()),
    ]
    if noisy:
        released = histograms.reshape(2, NOISY_SCORE_BINS, -1).sum(axis=2).astype("float64")
    else:
        released = coarsen_histogram(histograms, min_cohort)
    return np.concatenate([totals, released.ravel()])


def readmission_bounds() -> np.ndarray:
    """The most one held-out row adds to each slot of a noisy ``readmission_sums``."""
    return np.concatenate([[1.0, 1.0, 1.0, LOG_LOSS_BOUND], np.ones(2 * NOISY_SCORE_BINS)])


def readmission_sums_size(*, noisy: bool = False) -> int:
    """Length of a ``readmission_sums`` vector: the totals and two histograms."""
    return len(READMISSION_SUMS) + 2 * (NOISY_SCORE_BINS if noisy else SCORE_BINS)


def sums_shapes(tasks: tuple[str, ...], *, noisy: bool = False) -> list[tuple[int]]:
    """The shape of each task's evaluation sums vector, in task order."""
    sizes = {"readmission": readmission_sums_size(noisy=noisy), "cost": len(COST_SUMS)}
    return [(sizes[task],) for task in tasks]


def readmission_from_sums(sums: np.ndarray) -> dict[str, float]:
    """Federated AUROC, Brier score and log loss from summed ``readmission_sums``."""
    k = len(READMISSION_SUMS)
    totals = dict(zip(READMISSION_SUMS, sums[:k]))
    # A noisy release's bins may read below zero; no bin holds fewer than no rows.
    bins = (len(sums) - k) // 2
    positive_hist = np.clip(sums[k : k + bins], 0, None)
    negative_hist = np.clip(sums[k + bins :], 0, None)
    return {
        "auroc": histogram_auroc(positive_hist, negative_hist),
        "brier": totals["brier_sum"] / totals["rows"],
        "log_loss": totals["log_loss_sum"] / totals["rows"],
        "readmission_rate": totals["positives"] / totals["rows"],
    }


def histogram_auroc(positive_hist: np.ndarray, negative_hist: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties within a bin counted half."""
    positives, negatives = positive_hist.sum(), negative_hist.sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    negatives_below = np.cumsum(negative_hist) - negative_hist
    wins = (positive_hist * (negatives_below + 0.5 * negative_hist)).sum()
    return float(wins / (positives * negatives))


def cost_sums(cost: np.ndarray, predicted: np.ndarray, *, clip: float | None = None) -> np.ndarray:
    """Additive cost totals; for a noisy release, costs and predictions clipped to ``clip``
    (the same units) so one row's share of each total is bounded (``cost_bounds``)."""
    y, predicted = cost.astype("float64"), predicted.astype("float64")
    if clip is not None:
        y, predicted = np.minimum(y, clip), np.minimum(predicted, clip)
    error = predicted - y
    return np.array([y.size, y.sum(), np.square(y).sum(), np.abs(error).sum(), np.square(error).sum()], dtype="float64")


def cost_bounds(clip: float) -> np.ndarray:
    """The most one held-out row adds to each slot of ``cost_sums`` clipped at ``clip``."""
    return np.array([1.0, clip, clip**2, clip, clip**2])


def cost_from_sums(sums: np.ndarray, cost_scale: float = 1.0) -> dict[str, float]:
    """Federated MAE, RMSE and R² (raw scale) from summed ``cost_sums``.

    Nodes send the sums in cost-scale units (costs divided by the federation's mean
    cost) so every entry stays small enough for fixed-point secure aggregation;
    ``cost_scale`` turns MAE and RMSE back into currency units.
    """
    totals = dict(zip(COST_SUMS, sums))
    n = totals["rows"]
    total_ss = totals["cost_sq_sum"] - totals["cost_sum"] ** 2 / n
    return {
        "mae": totals["abs_error_sum"] / n * cost_scale,
        "rmse": float(np.sqrt(totals["sq_error_sum"] / n)) * cost_scale,
        "r2": 1 - totals["sq_error_sum"] / total_ss if total_ss > 0 else float("nan"),
    }
