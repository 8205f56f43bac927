"""Grouped federated statistics: summed node vectors give the pooled figures, small cells
never leave a node or the coordinator, and cost quantiles keep their stated bound."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcost import schema
from fedcost.analytics.statistics import (
    AGE_BANDS,
    MISSING,
    GroupedStatistics,
    GroupedStatisticsLayout,
    histogram_quantile,
    measure_unit,
)
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.errors import ConfigError

COLUMNS = [c.name for c in schema.FEATURES] + [schema.READMISSION, schema.COST]
LAYOUT = GroupedStatisticsLayout(("diagnosis_group", "payer"), measures=(schema.COST, schema.READMISSION, "length_of_stay"))


@pytest.fixture(scope="module")
def ecosystem() -> list[tuple[str, pd.DataFrame]]:
    """(role, rows) per node; rows carry every schema column, NaN/None where the role lacks it."""
    nodes = generate_ecosystem(EcosystemSpec.from_sizes({"hospital": [1500, 900, 400], "insurer": [800], "pharma": [300]}), seed=11).nodes
    return [(node.role, node.frame.reindex(columns=COLUMNS)) for node in nodes]


@pytest.fixture(scope="module")
def pooled(ecosystem: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    return pd.concat([rows for _, rows in ecosystem], ignore_index=True)


def _split(layout: GroupedStatisticsLayout, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cells = vector[: layout.n_cells * layout.width].reshape(layout.n_cells, layout.width)
    return cells, vector[layout.n_cells * layout.width :]


def test_summed_node_vectors_give_the_pooled_counts_and_sums_exactly(ecosystem, pooled) -> None:
    summed = np.sum([LAYOUT.local_vector(rows, min_cohort=1) for _, rows in ecosystem], axis=0)
    assert summed.shape == (LAYOUT.size,) and len(LAYOUT.slots()) == LAYOUT.size
    assert (summed == np.rint(summed)).all() and summed.max() < 2**53, "every summed entry is a whole number"
    records = GroupedStatistics.from_totals(LAYOUT, summed, min_cohort=1).records
    keys = pooled[["diagnosis_group", "payer"]].fillna(MISSING)
    groups = dict(list(pooled.groupby([keys["diagnosis_group"], keys["payer"]])))
    for record in records:
        rows = groups.get((record["diagnosis_group"], record["payer"]), pooled.iloc[:0])
        assert record["n"] == len(rows)
        for measure in LAYOUT.measures:
            unit = measure_unit(measure)
            values = [int(v) for v in np.rint(rows[measure].dropna().to_numpy() / unit)]
            assert record[f"{measure}_n"] == len(values)
            if values:
                assert round(record[f"{measure}_sum"] / unit) == sum(values), (record, measure)
                squares = sum(v * v for v in values)
                if len(values) > 1:
                    exact_var = (len(values) * squares - sum(values) ** 2) * unit * unit / (len(values) * (len(values) - 1))
                    assert record[f"{measure}_var"] == pytest.approx(exact_var, rel=1e-12)


def test_cell_figures_match_a_pandas_groupby_of_the_pooled_rows(ecosystem, pooled) -> None:
    totals = np.sum([LAYOUT.local_vector(rows, min_cohort=1) for _, rows in ecosystem], axis=0)
    frame = GroupedStatistics.from_totals(LAYOUT, totals, min_cohort=1).to_frame().set_index(["diagnosis_group", "payer"])
    keys = pooled[["diagnosis_group", "payer"]].fillna(MISSING)
    rounded = pooled.assign(cents=np.rint(pooled[schema.COST] * 100) / 100)
    grouped = rounded.groupby([keys["diagnosis_group"], keys["payer"]])
    expected = grouped.agg(
        n=(schema.COST, "size"),
        cost_mean=("cents", "mean"),
        cost_var=("cents", "var"),
        rate=(schema.READMISSION, "mean"),
        los_n=("length_of_stay", "count"),
        los_mean=("length_of_stay", "mean"),
    )
    got = frame.loc[expected.index]
    np.testing.assert_array_equal(got["n"].to_numpy(), expected["n"].to_numpy())
    np.testing.assert_allclose(got[f"{schema.COST}_mean"], expected["cost_mean"], rtol=1e-10)
    np.testing.assert_allclose(got[f"{schema.COST}_var"], expected["cost_var"], rtol=1e-9)
    np.testing.assert_allclose(got["readmission_rate"], expected["rate"], rtol=1e-12)
    np.testing.assert_array_equal(got["length_of_stay_n"].to_numpy(), expected["los_n"].to_numpy())
    has_los = expected["los_n"] > 0
    np.testing.assert_allclose(got["length_of_stay_mean"][has_los], expected["los_mean"][has_los], rtol=1e-12)
    assert frame["n"].sum() == len(pooled), "every row lands in exactly one cell (missing levels included)"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=120, max_size=120), st.integers(1, 15))
def test_any_split_of_rows_into_nodes_sums_to_the_pooled_counts(owners: list[int], min_cohort: int) -> None:
    rows = SMALL_ROWS
    layout = GroupedStatisticsLayout(("admission_type", "age_band"))
    owner = np.array(owners)
    vectors = [layout.local_vector(rows[owner == k], min_cohort=min_cohort) for k in range(5)]
    summed_cells, summed_flags = _split(layout, np.sum(vectors, axis=0))
    pooled_cells, _ = _split(layout, layout.local_vector(rows, min_cohort=1))
    # the suppressed node-cells are exactly what the sum misses
    missed = np.zeros(layout.n_cells)
    flagged = np.zeros(layout.n_cells)
    for k, vector in enumerate(vectors):
        local_cells, flags = _split(layout, vector)
        raw_cells, _ = _split(layout, layout.local_vector(rows[owner == k], min_cohort=1))
        small = (raw_cells[:, 0] > 0) & (raw_cells[:, 0] < min_cohort)
        np.testing.assert_array_equal(flags, small)
        assert not ((local_cells[:, 0] > 0) & (local_cells[:, 0] < min_cohort)).any()
        assert (local_cells[small] == 0).all()
        missed += raw_cells[:, 0] * small
        flagged += small
    np.testing.assert_array_equal(summed_cells[:, 0] + missed, pooled_cells[:, 0])
    np.testing.assert_array_equal(summed_flags, flagged)


def _small_rows(n: int = 120) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    return pd.DataFrame(
        {
            "admission_type": rng.choice(["emergency", "urgent", "elective", None], n, p=[0.5, 0.2, 0.2, 0.1]),
            "age": np.where(rng.random(n) < 0.05, np.nan, rng.integers(20, 99, n)),
            schema.READMISSION: rng.integers(0, 2, n).astype(float),
            schema.COST: np.round(rng.lognormal(8, 1, n), 2),
        }
    )


SMALL_ROWS = _small_rows()


def test_small_cells_are_suppressed_at_nodes_and_at_the_coordinator(ecosystem) -> None:
    layout = GroupedStatisticsLayout(("diagnosis_group", "payer", "age_band"))
    vectors = [layout.local_vector(rows, min_cohort=11) for _, rows in ecosystem]
    for vector in vectors:
        cells, _ = _split(layout, vector)
        assert not ((cells[:, 0] > 0) & (cells[:, 0] < 11)).any(), "no cell of 1..10 rows leaves a node"
    result = GroupedStatistics.from_totals(layout, np.sum(vectors, axis=0), min_cohort=25)
    frame = result.to_frame()
    cells, flags = _split(layout, np.sum(vectors, axis=0))
    small = (cells[:, 0] > 0) & (cells[:, 0] < 25)
    assert small.any() and flags.sum() > 0, "the fixture must exercise both suppressions"
    np.testing.assert_array_equal(frame["suppressed"].to_numpy(), small)
    withheld = frame[frame["suppressed"]]
    assert withheld["n"].isna().all() and withheld[f"{schema.COST}_mean"].isna().all() and withheld["cost_median"].isna().all()
    np.testing.assert_array_equal(frame["nodes_suppressed"].to_numpy(), flags)
    assert f"{int(small.sum())} of {layout.n_cells} cells suppressed at the coordinator" in result.note
    assert f"{int((flags > 0).sum())} cells suppressed at node level ({int(flags.sum())} node-cells" in result.note
    json.dumps(result.to_dict(), allow_nan=False)


def test_a_measure_few_rows_hold_is_withheld_like_a_small_cell() -> None:
    layout = GroupedStatisticsLayout((), measures=(schema.COST, "length_of_stay"))
    rows = SMALL_ROWS.assign(length_of_stay=np.where(np.arange(len(SMALL_ROWS)) < 6, 3.0, np.nan))
    cells, _ = _split(layout, layout.local_vector(rows, min_cohort=11))
    stay = cells[0, layout.measure_slots(1)]
    assert cells[0, 0] == len(rows) and stay.size > 3 and (stay == 0).all(), "6 stay lengths do not leave the node"
    totals = layout.local_vector(rows, min_cohort=5) + layout.local_vector(rows, min_cohort=5)
    record = GroupedStatistics.from_totals(layout, totals, min_cohort=20).records[0]
    assert record["n"] == 2 * len(rows) and record[f"{schema.COST}_n"] == 2 * len(rows)
    assert record["length_of_stay_n"] is None and math.isnan(record["length_of_stay_mean"]), "12 < 20: withheld"


def test_role_and_age_band_group_rows(ecosystem) -> None:
    layout = GroupedStatisticsLayout(("role", "age_band"))
    totals = np.sum([layout.local_vector(rows, role=role, min_cohort=1) for role, rows in ecosystem], axis=0)
    frame = GroupedStatistics.from_totals(layout, totals, min_cohort=1).to_frame().set_index(["role", "age_band"])
    for role in schema.ROLES:
        rows = pd.concat([r for k, r in ecosystem if k == role])
        bands = pd.cut(rows["age"], [-np.inf, 45, 65, 75, 85, np.inf], right=False, labels=AGE_BANDS)
        assert frame.loc[role, "n"].loc[list(AGE_BANDS)].tolist() == bands.value_counts().loc[list(AGE_BANDS)].tolist()
    with pytest.raises(ValueError, match="role"):
        layout.local_vector(ecosystem[0][1])


def test_federated_quantiles_lie_within_the_stated_bound_of_the_exact_pooled_quantile(ecosystem, pooled) -> None:
    layout = GroupedStatisticsLayout(("diagnosis_group",))
    totals = np.sum([layout.local_vector(rows) for _, rows in ecosystem], axis=0)
    frame = GroupedStatistics.from_totals(layout, totals).to_frame().set_index("diagnosis_group")
    assert layout.quantile_relative_error == pytest.approx(0.01, abs=1e-12)
    checked = 0
    for group, costs in pooled.groupby(pooled["diagnosis_group"].fillna(MISSING))[schema.COST]:
        for name, p in (("median", 0.5), ("p90", 0.9)):
            exact = float(np.quantile(costs, p, method="inverted_cdf"))
            estimate = frame.loc[group, f"cost_{name}"]
            assert frame.loc[group, f"cost_{name}_low"] <= exact <= frame.loc[group, f"cost_{name}_high"]
            assert abs(estimate - exact) <= layout.quantile_relative_error * exact, (group, name, estimate, exact)
            checked += 1
    assert checked >= 18


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.one_of(st.just(0.0), st.floats(1.0, 9e6), st.floats(0.01, 0.99)), min_size=1, max_size=300),
    st.sampled_from([0.1, 0.5, 0.9, 0.99]),
)
def test_histogram_quantile_bound_holds_for_any_costs(costs: list[float], p: float) -> None:
    layout = GroupedStatisticsLayout(())
    values = np.array(costs)
    histogram = np.bincount(layout.cost_bins(values), minlength=layout.n_bins)
    estimate, lo, hi = histogram_quantile(histogram, *layout.bin_bounds, p)
    exact = float(np.quantile(values, p, method="inverted_cdf"))
    assert lo <= exact <= hi and lo <= estimate <= hi
    bound = layout.quantile_relative_error * exact if exact >= 1 else 1.0
    assert abs(estimate - exact) <= bound


def test_layout_refuses_unknown_fields_and_measures() -> None:
    with pytest.raises(ConfigError, match="cannot group by 'hospital'"):
        GroupedStatisticsLayout(("hospital",))
    with pytest.raises(ConfigError, match="'sex' is not a numeric"):
        GroupedStatisticsLayout(("payer",), measures=("sex",))
    with pytest.raises(ValueError, match="expected a vector"):
        GroupedStatistics.from_totals(LAYOUT, np.zeros(3))
    assert math.isclose(GroupedStatisticsLayout((), bin_ratio=1.02).quantile_relative_error, 0.02)
