"""The sensitivity a noisy sum's noise is calibrated on is what one row can actually do.

Distributed DP (``fedcost.privacy.distributed.StatisticsNoise``) divides each slot of a noisy
sum by the most one row adds to it (its bound) and prices the noise for a row that moves at
most ``touched`` slots by at most one bound each. If a row could move a slot further, or
more slots, the stated ε would be false. Each test adds one row to a site's rows and checks
the change of every noisy vector against its bounds and its ``touched``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcost import schema
from fedcost.analytics import benchmarking
from fedcost.analytics.statistics import GroupedStatisticsLayout
from fedcost.data.features import StatisticsLayout
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.models import evaluation

CLIP = 50_000.0


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    ecosystem = generate_ecosystem(EcosystemSpec.from_sizes({"hospital": [400], "pharma": [200]}), seed=11)
    frames = [node.frame.reindex(columns=list(schema.COLUMNS)) for node in ecosystem.nodes]
    return pd.concat(frames, ignore_index=True)


def _check(before: np.ndarray, after: np.ndarray, bounds: np.ndarray, touched: int) -> None:
    change = np.abs(after - before) / bounds
    assert change.max() <= 1 + 1e-9, f"a row moved a slot by {change.max():.3g} bounds"
    assert np.count_nonzero(change > 1e-12) <= touched, "a row moved more slots than the noise was priced for"


def _split(rows: pd.DataFrame, index: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows without row ``index``, and with it."""
    return rows.drop(index=rows.index[index]).reset_index(drop=True), rows


@settings(max_examples=40, deadline=None)
@given(index=st.integers(0, 599))
def test_one_row_moves_the_feature_statistics_within_their_bounds(rows: pd.DataFrame, index: int) -> None:
    layout = StatisticsLayout(schema.FEATURES, (schema.READMISSION, schema.COST))
    without, with_row = _split(rows, index)
    before, after = (layout.local_statistics(r, cost_clip=CLIP) for r in (without, with_row))
    _check(before, after, layout.noisy_bounds(CLIP), layout.touched())


@settings(max_examples=40, deadline=None)
@given(index=st.integers(0, 599), group_by=st.sampled_from([(), ("diagnosis_group",), ("payer", "sex")]))
def test_one_row_moves_a_noisy_table_within_its_bounds(rows: pd.DataFrame, index: int, group_by: tuple) -> None:
    layout = GroupedStatisticsLayout(group_by, (schema.COST, schema.READMISSION, "length_of_stay"))
    without, with_row = _split(rows, index)
    before, after = (layout.noisy_vector(r, role="hospital", cost_clip=CLIP) for r in (without, with_row))
    _check(before, after, layout.noisy_bounds(CLIP), layout.noisy_touched())


@settings(max_examples=40, deadline=None)
@given(index=st.integers(0, 599), crafted=st.booleans())
def test_one_row_moves_the_evaluation_sums_within_their_bounds(rows: pd.DataFrame, index: int, crafted: bool) -> None:
    rng = np.random.default_rng(index)
    rows = rows.dropna(subset=[schema.READMISSION, schema.COST])
    index = index % len(rows)
    risk = rng.random(len(rows)) if not crafted else np.where(rng.random(len(rows)) < 0.5, 0.0, 1.0)
    predicted = rng.lognormal(9, 2, len(rows)) / 1e4  # predictions of any size: a crafted model's too
    cost = rows[schema.COST].to_numpy() / 1e4
    keep = np.arange(len(rows)) != index
    readmitted = rows[schema.READMISSION].to_numpy()
    for part, bounds, touched in (
        (
            lambda m: evaluation.readmission_sums(readmitted[m], risk[m], min_cohort=1, noisy=True),
            evaluation.readmission_bounds(),
            evaluation.NOISY_TOUCHED["readmission"],
        ),
        (
            lambda m: evaluation.cost_sums(cost[m], predicted[m], clip=CLIP / 1e4),
            evaluation.cost_bounds(CLIP / 1e4),
            evaluation.NOISY_TOUCHED["cost"],
        ),
    ):
        _check(part(keep), part(np.ones(len(rows), dtype=bool)), bounds, touched)


@settings(max_examples=40, deadline=None)
@given(index=st.integers(0, 599))
def test_one_row_moves_a_sites_benchmark_totals_within_their_bounds(rows: pd.DataFrame, index: int) -> None:
    rng = np.random.default_rng(index)
    rows = rows.dropna(subset=[schema.READMISSION, schema.COST])
    index = index % len(rows)
    risk, expected = rng.random(len(rows)), rng.lognormal(9, 2, len(rows))
    observed = rows[schema.COST].to_numpy()

    def vector(mask: np.ndarray) -> np.ndarray:
        totals = benchmarking.site_totals(
            rows[schema.READMISSION].to_numpy()[mask],
            risk[mask],
            np.minimum(observed[mask], CLIP),
            np.minimum(expected[mask], CLIP),
            min_cohort=1,
        )
        return benchmarking.shared_vector(totals, 1, 3, noisy=True)

    keep = np.arange(len(rows)) != index
    _check(
        vector(keep),
        vector(np.ones(len(rows), dtype=bool)),
        benchmarking.noisy_bounds(3, CLIP),
        benchmarking.NOISY_TOUCHED,
    )
