"""Utility of distributed DP for released statistics: Skellam noise on counts, cost sums and mean costs.

For each ε at δ = 1e-6, one job's whole budget, priced in RDP by ``fedcost.privacy.distributed``:

- a count: one record changes it by at most 1, so l1 = l2 = 1;
- a cost sum in cents, each record's cost clipped at 100,000 currency units: one record changes
  the (one-coordinate) sum by at most 10,000,000 cents, so l1 = l2 = 1e7;
- a mean cost, the noisy sum over the noisy count: both releases must fit the one budget. The
  count takes k times the variance it would need alone, the sum the smallest variance that fits
  after it (``skellam_variance_for`` with ``prior_rdp``), and k is the one of ``SPLITS`` that
  gives the smallest error (both error terms fall as 1/N, so the best k does not depend on N).

Relative errors are one noise standard deviation over the true value: σ_N / N for a count of N
rows, and for the mean (first order, delta method) sqrt((σ_S / S)² + (σ_N / N)²) with S = N ·
10,000 currency units, i.e. a mean cost of 10,000. The noise is Sk(variance) in total, whatever
the number of nodes that share it (``share_of_variance``).

    .venv/bin/python benchmarks/statistics_dp_bench.py
"""

from __future__ import annotations

import math

from fedcost.privacy.distributed import MAX_POISSON_MEAN, skellam_rdp, skellam_variance_for

EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)
DELTA = 1e-6
CENTS = 100  # per currency unit
CLIP = 100_000 * CENTS  # a record's cost, clipped, in cents: the sum's l1 and l2 sensitivity
MEAN_COST = 10_000  # currency units
ROWS = (100, 1_000, 10_000)
SPLITS = (1.25, 1.5, 2, 3, 5, 10, 20, 50)  # the count's variance over what it needs alone


def mean_cost_noise(epsilon: float) -> tuple[float, float]:
    """(sd of the count, sd of the cost sum in currency units) that give the best mean within ``epsilon``."""
    alone = skellam_variance_for(epsilon=epsilon, delta=DELTA, l1=1, l2=1)
    candidates = []
    for k in SPLITS:
        prior = skellam_rdp(variance=k * alone, l1=1, l2=1)
        sum_variance = skellam_variance_for(epsilon=epsilon, delta=DELTA, l1=CLIP, l2=CLIP, prior_rdp=prior)
        candidates.append((math.sqrt(k * alone), math.sqrt(sum_variance) / CENTS))
    return min(candidates, key=lambda sds: math.hypot(sds[1] / MEAN_COST, sds[0]))


def percent(value: float) -> str:
    return f"{100 * value:.3g}%"


def main() -> None:
    print(f"Skellam noise at delta={DELTA:g}; count l1 = l2 = 1; cost sum in cents, l1 = l2 = {CLIP:.0e}")
    print()
    print("Each released alone with the whole budget (noise standard deviation; count error = sd / N)")
    header = ["epsilon", "sd count", "sd sum (units)"] + [f"count N={n}" for n in ROWS]
    print("  ".join(f"{h:>14}" for h in header))
    for epsilon in EPSILONS:
        count_sd = math.sqrt(skellam_variance_for(epsilon=epsilon, delta=DELTA, l1=1, l2=1))
        sum_sd = math.sqrt(skellam_variance_for(epsilon=epsilon, delta=DELTA, l1=CLIP, l2=CLIP)) / CENTS
        cells = [f"{epsilon:g}", f"{count_sd:.3g}", f"{sum_sd:,.0f}"] + [percent(count_sd / n) for n in ROWS]
        print("  ".join(f"{c:>14}" for c in cells))
    print()
    print(f"Mean cost (true mean {MEAN_COST:,}): count and sum released together within the one budget")
    header = ["epsilon", "sd count", "sd sum (units)"] + [f"mean N={n}" for n in ROWS]
    print("  ".join(f"{h:>14}" for h in header))
    for epsilon in EPSILONS:
        count_sd, sum_sd = mean_cost_noise(epsilon)
        errors = [math.hypot(sum_sd / (n * MEAN_COST), count_sd / n) for n in ROWS]
        cells = [f"{epsilon:g}", f"{count_sd:.3g}", f"{sum_sd:,.0f}"] + [percent(e) for e in errors]
        print("  ".join(f"{c:>14}" for c in cells))
    print()
    largest = skellam_variance_for(epsilon=min(EPSILONS), delta=DELTA, l1=CLIP, l2=CLIP)
    unit = 10 ** math.ceil(math.log10(math.sqrt(largest / (2 * MAX_POISSON_MEAN))))  # in cents
    print(
        f"numpy draws Skellam noise of variance up to {2 * MAX_POISSON_MEAN:g}; the cost sum in cents needs up to "
        f"{largest:.3g}, so a node releases it in units of {unit // CENTS:g} currency units "
        f"(l1 = l2 = {CLIP // unit:g}, variance / {unit**2:g}; rounding moves a record by at most "
        f"{unit / 2 / CENTS:g}, far below the noise)."
    )


if __name__ == "__main__":
    main()
