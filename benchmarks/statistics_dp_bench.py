"""Utility of distributed DP for a statistics table: ε against the error of counts, sums and quantiles.

A `fedcost analyze` job on the default synthetic ecosystem (8 nodes, seed 7): one table by
diagnosis group and payer, with cost, readmission and stay length. Every node's noisy-table
vector (fedcost's own ``GroupedStatisticsLayout.noisy_vector``, costs clipped at 100,000)
carries the job's noise (``calibrate_noise`` for the job's one noisy sum at δ = 1e-6, shared
among the 6 sites a sum keeps when a third drop out); the vectors and the noise add up as
secure aggregation adds them, and the coordinator decodes them as it does
(``GroupedStatistics.from_noisy_totals``). Errors are against the exact pooled figures of the
same rows, over the cells of at least 100 rows, median and 90th percentile over cells and 5
noise draws; ``inf`` is the table without noise (small cells withheld, histograms grouped).

    .venv/bin/python benchmarks/statistics_dp_bench.py
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fedcost import schema
from fedcost.analytics.statistics import GroupedStatistics, GroupedStatisticsLayout
from fedcost.config import SimulationConfig
from fedcost.data.synthetic import generate_ecosystem
from fedcost.privacy.distributed import NOISE_GRID, calibrate_noise, skellam_noise

EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
DELTA, COST_CLIP, SITES, DRAWS, MIN_COHORT, BIG_CELL = 1e-6, 100_000.0, 6, 5, 11, 100
LAYOUT = GroupedStatisticsLayout(("diagnosis_group", "payer"), (schema.COST, schema.READMISSION, "length_of_stay"))


def exact_table(frames: list[pd.DataFrame]) -> pd.DataFrame:
    rows = pd.concat(frames, ignore_index=True)
    grouped = rows.groupby(["diagnosis_group", "payer"], observed=True)[schema.COST]
    return pd.DataFrame(
        {
            "n": grouped.size(),
            "cost_sum": grouped.sum(),
            "cost_mean": grouped.mean(),
            "cost_median": grouped.median(),
            "cost_p90": grouped.quantile(0.9, interpolation="higher"),
        }
    )


def released(frames: list[tuple[pd.DataFrame, str]], epsilon: float, rng: np.random.Generator) -> pd.DataFrame:
    if math.isinf(epsilon):
        total = sum(LAYOUT.local_vector(frame, role=role, min_cohort=MIN_COHORT) for frame, role in frames)
        table = GroupedStatistics.from_totals(LAYOUT, total, MIN_COHORT)
    else:
        noise = calibrate_noise(
            epsilon=epsilon, delta=DELTA, touched=[LAYOUT.noisy_touched()], sites=SITES, cost_clip=COST_CLIP
        )
        bounds = LAYOUT.noisy_bounds(COST_CLIP)
        normalised = sum(LAYOUT.noisy_vector(frame, role=role, cost_clip=COST_CLIP) for frame, role in frames) / bounds
        noisy = normalised + skellam_noise(normalised.size, noise.variance, rng=rng) / NOISE_GRID
        table = GroupedStatistics.from_noisy_totals(LAYOUT, noisy * bounds, MIN_COHORT, noise.sd)
    frame = table.to_frame().set_index(["diagnosis_group", "payer"])
    return frame.rename(columns={"total_cost_sum": "cost_sum", "total_cost_mean": "cost_mean"})


def main() -> None:
    ecosystem = generate_ecosystem(SimulationConfig().ecosystem.spec(), 7)
    columns = list(schema.COLUMNS)  # a node's loader gives every schema column, empty where its role lacks it
    frames = [(node.frame.reindex(columns=columns), node.role) for node in ecosystem.nodes]
    truth = exact_table([frame for frame, _ in frames])
    truth = truth[truth["n"] >= BIG_CELL]
    rng = np.random.default_rng(7)
    print(f"{len(truth)} cells of at least {BIG_CELL} rows (median {int(truth['n'].median())} rows)")
    print("| ε | noise sd (rows) | count | cost sum | mean cost | median cost | p90 cost | cells withheld |")
    print("|---|---|---|---|---|---|---|---|")
    for epsilon in EPSILONS:
        errors: dict[str, list[float]] = {key: [] for key in ("n", "cost_sum", "cost_mean", "cost_median", "cost_p90")}
        withheld = []
        for _ in range(DRAWS if math.isfinite(epsilon) else 1):
            table = released(frames, epsilon, rng).reindex(truth.index)
            withheld.append(int(table["n"].isna().sum()))
            for key in errors:
                errors[key] += list((np.abs(table[key].astype(float) - truth[key]) / truth[key]).dropna())
        sd = (
            "—"
            if math.isinf(epsilon)
            else f"{calibrate_noise(epsilon=epsilon, delta=DELTA, touched=[LAYOUT.noisy_touched()], sites=SITES, cost_clip=COST_CLIP).sd:.3g}"
        )  # noqa: E501
        cells = " | ".join(f"{np.median(v):.2%} ({np.quantile(v, 0.9):.1%})" for v in errors.values())
        print(f"| {epsilon:g} | {sd} | {cells} | {np.mean(withheld):.1f} |")


if __name__ == "__main__":
    main()
