"""Site calibration of the cost model: each site's own cost level, fitted and kept at the site.

One global model cannot know a site's cost level when nothing the federation can learn pins
it down. In the synthetic ecosystem the regional price level is carried by ``region``, but a
region held by one small site only is, to example-weighted FedAvg, a feature of that site
alone: its coefficient moves by that site's share of the examples per round and stays near
zero. The federated model then misses such a site's level by 10 % to a factor of 2, while
a site's own model (local-only) gets it from its intercept.

The remedy is the one health economics uses to carry a national cost model to a local
setting (a national DRG weight times a local price index; recalibration-in-the-large of a
prediction model): each site multiplies the model's expected costs by its own
observed-over-expected ratio (O/E) on its training rows, so its expected costs add up to its
observed costs. The ratio fixes the *mean*, which is what cost totals, budgets and
shared-savings contracts need; a factor fitted for MAE would aim at the median of a skewed
cost and understate every total. Nor is the ratio shrunk towards 1 for small sites:
the errors it corrects can be a factor of 2, many standard errors of even a 300-row site's
O/E, and shrinkage would leave much of them in place.

The factor is fitted on the site's own rows and never leaves it; a site keeps it only where
its own validation rows show it helps (``models.site_steps``). Risk-adjusted benchmarking
(``fedcost.analytics``) compares a site against the *global* model: there the O/E is the
result, not a correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostCalibration:
    """A site's cost level against a model: its observed-over-expected ratio (O/E)."""

    observed_over_expected: float

    @classmethod
    def fit(cls, observed: np.ndarray, expected: np.ndarray) -> CostCalibration:
        """O/E over a site's training rows: observed costs and the model's expected costs.

        Any cost unit will do as long as both arrays share it.
        """
        y = np.asarray(observed, dtype=np.float64).ravel()
        mu = np.asarray(expected, dtype=np.float64).ravel()
        if y.size == 0 or y.size != mu.size:
            raise ValueError(f"observed has {y.size} costs and expected {mu.size}: expected the same, non-zero number")
        if not (np.isfinite(y).all() and np.isfinite(mu).all()):
            raise ValueError("observed and expected costs must be finite")
        if (y < 0).any() or (mu <= 0).any():
            raise ValueError("observed costs must be >= 0 and expected costs > 0")
        return cls(float(y.sum() / mu.sum()))

    def apply(self, expected: np.ndarray) -> np.ndarray:
        """``expected`` costs at this site's level."""
        return np.asarray(expected, dtype=np.float64) * self.observed_over_expected
