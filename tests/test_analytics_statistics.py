"""Grouped federated statistics: summed node vectors give the pooled figures over the rows
released, small cells never leave a node or the coordinator, and cost quantiles keep what
the module states of them."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedcost import schema
from fedcost.analytics.statistics import (
    AGE_BANDS,
    MISSING,
    QUANTILES,
    GroupedStatistics,
    GroupedStatisticsLayout,
    histogram_quantile,
    measure_unit,
    plan_release,
)
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.errors import ConfigError
from fedcost.privacy.smallcells import coarsen_histogram, histogram_groups

COLUMNS = [c.name for c in schema.FEATURES] + [schema.READMISSION, schema.COST]
LAYOUT = GroupedStatisticsLayout(
    ("diagnosis_group", "payer"), measures=(schema.COST, schema.READMISSION, "length_of_stay")
)


@pytest.fixture(scope="module")
def ecosystem() -> list[tuple[str, pd.DataFrame]]:
    """(role, rows) per node; rows carry every schema column, NaN/None where the role lacks it."""
    nodes = generate_ecosystem(
        EcosystemSpec.from_sizes({"hospital": [1500, 900, 400], "insurer": [800], "pharma": [300]}), seed=11
    ).nodes
    return [(node.role, node.frame.reindex(columns=COLUMNS)) for node in nodes]


@pytest.fixture(scope="module")
def pooled(ecosystem: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    return pd.concat([rows for _, rows in ecosystem], ignore_index=True)


def _cells(layout: GroupedStatisticsLayout, vector: np.ndarray) -> np.ndarray:
    assert vector.shape == (layout.n_cells * layout.width,), "a cell's slots and nothing else"
    return vector.reshape(layout.n_cells, layout.width)


def test_summed_node_vectors_give_the_pooled_counts_and_sums_exactly(ecosystem, pooled) -> None:
    summed = np.sum([LAYOUT.local_vector(rows, min_cohort=1) for _, rows in ecosystem], axis=0)
    assert summed.shape == (LAYOUT.size,) and len(LAYOUT.slots()) == LAYOUT.size
    counts_and_limbs = _cells(LAYOUT, summed)[:, : -LAYOUT.n_bins]
    assert (counts_and_limbs == np.rint(counts_and_limbs)).all() and summed.max() < 2**53, "counts and limbs are whole"
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
                    exact_var = (
                        (len(values) * squares - sum(values) ** 2) * unit * unit / (len(values) * (len(values) - 1))
                    )
                    assert record[f"{measure}_var"] == pytest.approx(exact_var, rel=1e-12)


def test_cell_figures_match_a_pandas_groupby_of_the_pooled_rows(ecosystem, pooled) -> None:
    totals = np.sum([LAYOUT.local_vector(rows, min_cohort=1) for _, rows in ecosystem], axis=0)
    frame = (
        GroupedStatistics.from_totals(LAYOUT, totals, min_cohort=1).to_frame().set_index(["diagnosis_group", "payer"])
    )
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
@example(owners=[0] * 119 + [1], min_cohort=2)
def test_any_split_of_rows_into_nodes_sums_to_the_pooled_counts(owners: list[int], min_cohort: int) -> None:
    rows = SMALL_ROWS
    layout = GroupedStatisticsLayout(("admission_type", "age_band"))
    owner = np.array(owners)
    summed = np.zeros(layout.size)
    missed = np.zeros(layout.n_cells)
    for k in range(5):
        local = rows[owner == k]
        release = plan_release([layout], local, role=None, min_cohort=min_cohort)[0]
        cells = _cells(layout, layout.local_vector(local, min_cohort=min_cohort, release=release))
        raw = np.bincount(layout.cell_codes(local, None), minlength=layout.n_cells)
        assert not ((cells[:, 0] > 0) & (cells[:, 0] < min_cohort)).any(), "no cell of 1..min_cohort-1 rows leaves"
        withheld = np.flatnonzero(~np.array(release.rows))
        assert (cells[withheld] == 0).all()
        union = raw[withheld].sum()
        # A node of fewer than min_cohort rows withholds them all (the guardian sends it no table at all).
        assert union in (0, len(local)) or union >= min_cohort, "the withheld union is no small cell"
        missed += raw * ~np.array(release.rows)
        summed += cells.ravel()
    pooled = np.bincount(layout.cell_codes(rows, None), minlength=layout.n_cells)
    np.testing.assert_array_equal(_cells(layout, summed)[:, 0] + missed, pooled)


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
    withheld_somewhere = False
    for _, rows in ecosystem:
        cells = _cells(layout, layout.local_vector(rows, min_cohort=11))
        assert not ((cells[:, 0] > 0) & (cells[:, 0] < 11)).any(), "no cell of 1..10 rows leaves a node"
        raw = np.bincount(layout.cell_codes(rows, None), minlength=layout.n_cells)
        withheld_somewhere |= bool((raw > cells[:, 0]).any())
    result = GroupedStatistics.from_totals(layout, np.sum(vectors, axis=0), min_cohort=25)
    frame = result.to_frame()
    cells = _cells(layout, np.sum(vectors, axis=0))
    small = (cells[:, 0] > 0) & (cells[:, 0] < 25)
    assert small.any() and withheld_somewhere, "the fixture must exercise both suppressions"
    np.testing.assert_array_equal(frame["suppressed"].to_numpy(), small)
    withheld = frame[frame["suppressed"]]
    assert (
        withheld["n"].isna().all()
        and withheld[f"{schema.COST}_mean"].isna().all()
        and withheld["cost_median"].isna().all()
    )
    assert "nodes_suppressed" not in frame, "which nodes withheld a cell is not said"
    assert f"{int(small.sum())} of {layout.n_cells} cells suppressed at the coordinator" in result.note
    assert "complementary cells" in result.note and "does not say which" in result.note
    json.dumps(result.to_dict(), allow_nan=False)


def test_a_measure_few_rows_hold_is_withheld_like_a_small_cell() -> None:
    layout = GroupedStatisticsLayout((), measures=(schema.COST, "length_of_stay"))
    rows = SMALL_ROWS.assign(length_of_stay=np.where(np.arange(len(SMALL_ROWS)) < 6, 3.0, np.nan))
    cells = _cells(layout, layout.local_vector(rows, min_cohort=11))
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
    for role in sorted({role for role, _ in ecosystem}):
        rows = pd.concat([r for k, r in ecosystem if k == role])
        bands = pd.cut(rows["age"], [-np.inf, 45, 65, 75, 85, np.inf], right=False, labels=AGE_BANDS)
        assert frame.loc[role, "n"].loc[list(AGE_BANDS)].tolist() == bands.value_counts().loc[list(AGE_BANDS)].tolist()
    with pytest.raises(ValueError, match="role"):
        layout.local_vector(ecosystem[0][1])


# Measured bounds (module docstring): relative error of the federated quantile against the
# exact one over the rows released, by the cell's size; min_cohort 11.
QUANTILE_BOUNDS = {"median": ((300, 0.15), (1000, 0.06), (3000, 0.015)), "p90": ((1000, 0.75), (3000, 0.08))}


@pytest.mark.parametrize("group_by", [("diagnosis_group",), ("diagnosis_group", "payer")])
def test_federated_quantiles_stay_within_the_measured_bounds_of_the_exact_pooled_quantile(group_by) -> None:
    """At the sizes ``fedcost simulate`` runs by default, on a seed the bounds were not measured on."""
    sizes = {"hospital": [24000, 9000, 2500, 400], "insurer": [18000, 5000], "pharma": [6000, 700]}
    ecosystem = generate_ecosystem(EcosystemSpec.from_sizes(sizes), seed=3)
    layout = GroupedStatisticsLayout(group_by)
    totals = np.zeros(layout.size)
    released = []
    for node in ecosystem.nodes:
        rows = node.frame.reindex(columns=COLUMNS)
        release = plan_release([layout], rows, role=None, min_cohort=11)[0]
        totals += layout.local_vector(rows, min_cohort=11, release=release)
        cells = layout.cell_codes(rows, None)
        released.append(rows.assign(cell=cells)[np.array(release.measures[schema.COST])[cells]])
    records = GroupedStatistics.from_totals(layout, totals, min_cohort=11).records
    checked = 0
    for cell, costs in pd.concat(released).groupby("cell")[schema.COST]:
        for name, p in QUANTILES.items():
            exact = float(np.quantile(costs, p, method="inverted_cdf"))
            bound = min((b for n, b in QUANTILE_BOUNDS[name] if len(costs) >= n), default=None)
            if bound is not None:
                error = abs(records[cell][f"cost_{name}"] - exact) / exact
                assert error <= bound, (records[cell], name, len(costs), error)
                checked += 1
    assert checked >= 15


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.one_of(st.just(0.0), st.floats(1.0, 9e6), st.floats(0.01, 0.99)), min_size=1, max_size=300),
    st.sampled_from([0.1, 0.5, 0.9, 0.99]),
    st.integers(1, 25),
)
def test_a_coarsened_quantile_is_the_quantile_of_rows_moved_within_their_groups(
    costs: list[float], p: float, min_cohort: int
) -> None:
    """What the module states: the estimate lies between the rank-th smallest lower and upper
    group edge of the rows, so it is exact wherever the groups near that rank are one bin."""
    layout = GroupedStatisticsLayout(())
    values = np.array(costs)
    bins = layout.cost_bins(values)
    counts = np.bincount(bins, minlength=layout.n_bins)
    coarse = coarsen_histogram(counts, min_cohort)
    if len(values) < min_cohort:
        assert not coarse.any()
        return
    lower, upper = layout.bin_bounds
    estimate, _, _ = histogram_quantile(coarse, lower, upper, p)
    spread_of_bin = np.empty((layout.n_bins, 2), dtype=int)
    for held, spread in histogram_groups(counts, min_cohort):
        spread_of_bin[held] = (spread.start, spread.stop - 1)
    rank = max(math.ceil(p * len(values)), 1)
    low = np.sort(lower[spread_of_bin[bins, 0]])[rank - 1]
    high = np.sort(upper[spread_of_bin[bins, 1]])[rank - 1]
    assert low <= estimate <= high


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
