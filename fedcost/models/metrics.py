"""Evaluation metrics: discrimination and calibration for readmission, error and R² for cost.

Numpy in, plain floats out, so results can go straight into reports and JSON. Scores that are
undefined on the given data (AUROC with one class, R² with a constant target) are NaN rather than
an exception: a small site's evaluation set may well hold no readmission at all.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)


def _pair(y_true: np.ndarray, y_pred: np.ndarray, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as finite, non-empty float64 vectors of one length."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if y.size == 0 or y.size != p.size:
        raise ValueError(f"{names[0]} has {y.size} values and {names[1]} {p.size}: expected the same, non-zero number")
    for name, values in zip(names, (y, p)):
        if not np.isfinite(values).all():
            raise ValueError(f"{name} holds NaN or infinite values")
    return y, p


def _probabilities(y_true: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, p = _pair(y_true, p, ("y_true", "p"))
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold only 0 and 1")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("p must be probabilities in [0, 1]")
    return y, p


def readmission_metrics(y_true: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """AUROC, AUPRC (average precision) and Brier score; AUROC and AUPRC are NaN with one class."""
    y, p = _probabilities(y_true, p)
    one_class = np.unique(y).size < 2
    return {
        "auroc": float("nan") if one_class else float(roc_auc_score(y, p)),
        "auprc": float("nan") if one_class else float(average_precision_score(y, p)),
        "brier": float(brier_score_loss(y, p)),
    }


def cost_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R² on the raw scale, and R² on the log1p scale (less dominated by the tail).

    Pass costs in currency units: log1p is only meaningful there. Negative predictions (a linear
    baseline can make them) count as 0 on the log scale; a cost cannot be below 0. R² is NaN when
    the true costs are constant.
    """
    y, p = _pair(y_true, y_pred, ("y_true", "y_pred"))
    if (y < 0).any():
        raise ValueError("y_true holds negative costs")
    constant = np.ptp(y) == 0
    log_y, log_p = np.log1p(y), np.log1p(np.maximum(p, 0.0))
    return {
        "mae": float(mean_absolute_error(y, p)),
        "rmse": float(np.sqrt(mean_squared_error(y, p))),
        "r2": float("nan") if constant else float(r2_score(y, p)),
        "r2_log": float("nan") if constant else float(r2_score(log_y, log_p)),
    }


def calibration_bins(y_true: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, list[float]]:
    """Reliability-diagram data over quantile bins of ``p``: per non-empty bin the mean predicted
    probability, the observed rate and the count.

    Bins match sklearn's ``calibration_curve(strategy="quantile")``, which gives no counts; the
    counts say how much each point of the diagram can be trusted (and whether it is a small cell).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins={n_bins!r}: expected a positive integer")
    y, p = _probabilities(y_true, p)
    edges = np.percentile(p, np.linspace(0.0, 1.0, n_bins + 1) * 100)
    bin_of = np.searchsorted(edges[1:-1], p)
    count = np.bincount(bin_of, minlength=n_bins)
    filled = count > 0
    return {
        "mean_predicted": (np.bincount(bin_of, weights=p, minlength=n_bins)[filled] / count[filled]).tolist(),
        "observed_rate": (np.bincount(bin_of, weights=y, minlength=n_bins)[filled] / count[filled]).tolist(),
        "count": count[filled].astype(float).tolist(),
    }
