"""`fedcost analyze` as a user runs it: grouped cost statistics over secure aggregation
equal the pooled computation over the rows the nodes release exactly, with every small
cell withheld and shown so."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcost import schema
from fedcost.analytics import group_costing
from fedcost.analytics.statistics import MISSING, QUANTILES, GroupedStatisticsLayout, measure_unit, plan_release
from fedcost.audit import verify_folder
from fedcost.data.loader import load_node
from fedcost.data.mapping import DataMapping
from simulations import fedcost, simulate

# hospital-3 is small enough that many of its cells hold 1..10 rows.
CONFIG = """
[run]
seed = 5
min_cohort = 11

[ecosystem.sizes]
hospital = [1500, 900, 150]
insurer = [1200]
pharma = [500]

[analytics]
group_by = ["diagnosis_group", "payer"]
measures = ["total_cost", "readmitted_30d", "length_of_stay"]
"""
MIN_COHORT = 11
LAYOUT = GroupedStatisticsLayout(("diagnosis_group", "payer"), ("total_cost", "readmitted_30d", "length_of_stay"))
# The bounds ``fedcost.analytics.statistics`` states from its measurements, by the cell's rows.
QUANTILE_BOUNDS = {"median": ((300, 0.15), (1000, 0.06), (3000, 0.015)), "p90": ((1000, 0.75), (3000, 0.08))}


@pytest.fixture(scope="module")
def analysis(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    return simulate(tmp_path_factory.mktemp("analyze"), CONFIG, "run", command="analyze")


def _node_rows(run: Path) -> dict[str, pd.DataFrame]:
    """Every node's rows as its node reads them (training and held-out together)."""
    mapping = DataMapping.load(run / "data" / "mapping.toml")
    rows = {}
    for node in mapping.nodes:
        data = load_node(mapping, node.name, split_seed=5, test_fraction=0.2)
        rows[node.name] = pd.concat([data.train, data.test], ignore_index=True).assign(role=node.role)
    return rows


def _cell(rows: pd.DataFrame) -> pd.Series:
    return rows["diagnosis_group"].astype(object).fillna(MISSING) + "|" + rows["payer"].astype(object).fillna(MISSING)


def _rows_that_may_leave(run: Path) -> tuple[pd.DataFrame, int]:
    """The pooled rows the federation may describe, each with a flag per measure saying
    whether its node released that measure in the row's cell, and how many node-cells the
    nodes withheld (cells of 1..10 rows and their complements stay home)."""
    shared, withheld = [], 0
    nodes = _node_rows(run)
    plan = [LAYOUT, group_costing.layout(tuple(nodes))]  # the job's plan: both tables decide what leaves
    for name, rows in nodes.items():
        release = plan_release(plan, rows, role=str(rows["role"].iloc[0]), site=name, min_cohort=MIN_COHORT)[0]
        codes = LAYOUT.cell_codes(rows, None)
        sizes = np.bincount(codes, minlength=LAYOUT.n_cells)
        withheld += int(((sizes > 0) & ~np.array(release.rows)).sum())
        flags = {f"{m}_released": np.array(release.measures[m])[codes] for m in LAYOUT.measures}
        shared.append(rows.assign(**flags)[np.array(release.rows)[codes]])
    return pd.concat(shared, ignore_index=True), withheld


def test_analyze_writes_statistics_and_a_verified_run_folder(
    analysis: tuple[subprocess.CompletedProcess, Path],
) -> None:
    result, run = analysis
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("statistics.csv", "summary.json", "report.html", "config.toml"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "analyze" and summary["secure_aggregation"] is True
    assert verify_folder(run).ok and summary["audit"]["verified"]
    assert "Federated statistics by diagnosis_group, payer" in result.stdout
    assert "complementary cells" in result.stdout
    assert "Federated statistics" in (run / "report.html").read_text()
    assert not (run / "model.pt").exists(), "an analysis trains no model"


def test_federated_counts_and_sums_equal_the_pooled_computation_exactly(
    analysis: tuple[subprocess.CompletedProcess, Path],
) -> None:
    _, run = analysis
    statistics = json.loads((run / "summary.json").read_text())["analytics"]["statistics"]
    pooled, withheld = _rows_that_may_leave(run)
    groups = dict(list(pooled.groupby(_cell(pooled))))
    checked = 0
    for record in statistics["cells"]:
        key = f"{record['diagnosis_group']}|{record['payer']}"
        rows = groups.get(key, pooled.iloc[:0])
        assert "nodes_suppressed" not in record, "which nodes withheld a cell is not said"
        if 0 < len(rows) < MIN_COHORT:
            assert record["suppressed"] and record["n"] is None and record["total_cost_mean"] is None
            continue
        assert record["n"] == len(rows), key
        for measure in ("total_cost", "readmitted_30d"):
            unit = measure_unit(measure)
            released = rows[rows[f"{measure}_released"]]
            values = [int(v) for v in np.rint(released[measure].dropna().to_numpy() / unit)]
            if len(values) >= MIN_COHORT:
                assert round(record[f"{measure}_sum"] / unit) == sum(values), (key, measure)
                checked += 1
    assert checked >= 30 and withheld > 0, "the fixture must exercise sums and node suppression"


def test_federated_cost_quantiles_lie_within_the_stated_bounds(
    analysis: tuple[subprocess.CompletedProcess, Path],
) -> None:
    _, run = analysis
    statistics = json.loads((run / "summary.json").read_text())["analytics"]["statistics"]
    pooled, _ = _rows_that_may_leave(run)
    pooled = pooled[pooled["total_cost_released"]]
    costs = dict(list(pooled.groupby(_cell(pooled))[schema.COST]))
    checked = 0
    for record in statistics["cells"]:
        key = f"{record['diagnosis_group']}|{record['payer']}"
        if not record["n"]:
            continue
        for name, p in QUANTILES.items():
            bound = min((b for n, b in QUANTILE_BOUNDS[name] if len(costs[key]) >= n), default=None)
            if bound is not None:
                exact = float(np.quantile(costs[key], p, method="inverted_cdf"))
                assert math.isclose(record[f"cost_{name}"], exact, rel_tol=bound), (key, name)
                checked += 1
    assert checked >= 3, "the small fixture has few cells of 300 rows or more"


def test_a_group_by_field_the_schema_lacks_is_refused_before_anything_runs(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[analytics]\ngroup_by = ["hospital_name"]\n')
    result = fedcost("analyze", "bad.toml", "--out", "run", cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.toml" in result.stdout and "cannot group by 'hospital_name'" in result.stdout
    assert not (tmp_path / "run").exists()
    assert GroupedStatisticsLayout.from_json(GroupedStatisticsLayout(("payer",)).to_json()).group_by == ("payer",)


def test_group_costing_equals_the_pooled_computation_over_the_released_cells_exactly(
    analysis: tuple[subprocess.CompletedProcess, Path],
) -> None:
    """Cost against payment per disease group, end to end: cases, mean cost, margin and cost
    weight per group as the pooled released rows give them in whole cents; the table and
    plot in the report, in the data's currency units."""
    completed, run = analysis
    assert "Cost against payment per disease group" in completed.stdout
    result = json.loads((run / "summary.json").read_text())["analytics"]["group_costing"]
    nodes = _node_rows(run)
    plan = [LAYOUT, group_costing.layout(tuple(nodes))]
    kept = []
    for name, rows in nodes.items():
        release = plan_release(plan, rows, role=str(rows["role"].iloc[0]), site=name, min_cohort=MIN_COHORT)[1]
        shown = np.array(release.rows)[plan[1].cell_codes(rows, None, name)]
        kept.append(rows[shown & rows["diagnosis_group"].notna().to_numpy()].assign(site=name))
    pooled = pd.concat(kept, ignore_index=True)
    cents = np.rint(pooled["total_cost"] * 100).astype("int64")
    paid = pooled.groupby(["site", "diagnosis_group"])["payment"].transform(lambda p: p.notna().all())
    mean_cost = int(cents.sum()) * 0.01 / len(pooled)
    expected = {}
    for group, part in pooled.groupby("diagnosis_group"):
        part_cents, part_paid = cents[part.index], paid[part.index]
        margin = int(np.rint(part["payment"][part_paid] * 100).sum()) - int(part_cents[part_paid].sum())
        group_mean = int(part_cents.sum()) * 0.01 / len(part)
        expected[group] = (len(part), group_mean, margin * 0.01 / int(part_paid.sum()), group_mean / mean_cost)
    figures = {g["group"]: (g["cases"], g["mean_cost"], g["margin"], g["cost_weight"]) for g in result["groups"]}
    assert figures == expected
    assert all(s["cases"] >= MIN_COHORT for s in result["sites"])
    assert {c["site"] for c in result["case_mix"]} == set(nodes)
    assert (run / "group_costing.csv").is_file()
    report = (run / "report.html").read_text()
    assert "Cost against payment per disease group" in report and 'alt="group_costing"' in report
