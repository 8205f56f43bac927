"""`fedcost analyze` as a user runs it: grouped cost statistics over secure aggregation
equal the pooled computation exactly, with every small cell withheld and shown so."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from simulations import fedcost, simulate

from fedcost import schema
from fedcost.analytics.statistics import MISSING, GroupedStatisticsLayout, measure_unit
from fedcost.audit import verify_folder
from fedcost.data.loader import load_node
from fedcost.data.mapping import DataMapping

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


def _rows_that_may_leave(run: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """The pooled rows the federation may describe (each node's cells of 1..10 rows stay
    home), and at how many nodes each cell was withheld."""
    shared, withheld = [], {}
    for rows in _node_rows(run).values():
        cells = _cell(rows)
        sizes = cells.value_counts()
        small = sizes[sizes < MIN_COHORT].index
        for cell in small:
            withheld[cell] = withheld.get(cell, 0) + 1
        shared.append(rows[~cells.isin(small)])
    return pd.concat(shared, ignore_index=True), withheld


def test_analyze_writes_statistics_and_a_verified_run_folder(analysis: tuple[subprocess.CompletedProcess, Path]) -> None:
    result, run = analysis
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("statistics.csv", "summary.json", "report.html", "config.toml"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "analyze" and summary["secure_aggregation"] is True
    assert verify_folder(run).ok and summary["audit"]["verified"]
    assert "Federated statistics by diagnosis_group, payer" in result.stdout
    assert "cells suppressed at node level" in result.stdout
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
        assert record["nodes_suppressed"] == withheld.get(key, 0), key
        if 0 < len(rows) < MIN_COHORT:
            assert record["suppressed"] and record["n"] is None and record["total_cost_mean"] is None
            continue
        assert record["n"] == len(rows), key
        for measure in ("total_cost", "readmitted_30d"):
            unit = measure_unit(measure)
            values = [int(v) for v in np.rint(rows[measure].dropna().to_numpy() / unit)]
            if len(values) >= MIN_COHORT:
                assert round(record[f"{measure}_sum"] / unit) == sum(values), (key, measure)
                checked += 1
    assert checked >= 30 and sum(withheld.values()) > 0, "the fixture must exercise sums and node suppression"


def test_federated_cost_quantiles_lie_within_the_stated_bound(analysis: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, run = analysis
    statistics = json.loads((run / "summary.json").read_text())["analytics"]["statistics"]
    bound = statistics["quantile_relative_error"]
    pooled, _ = _rows_that_may_leave(run)
    costs = dict(list(pooled.groupby(_cell(pooled))[schema.COST]))
    checked = 0
    for record in statistics["cells"]:
        key = f"{record['diagnosis_group']}|{record['payer']}"
        if not record["n"]:
            continue
        for name, p in (("median", 0.5), ("p90", 0.9)):
            exact = float(np.quantile(costs[key], p, method="inverted_cdf"))
            assert math.isclose(record[f"cost_{name}"], exact, rel_tol=bound), (key, name)
            checked += 1
    assert checked >= 10


def test_a_group_by_field_the_schema_lacks_is_refused_before_anything_runs(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[analytics]\ngroup_by = ["hospital_name"]\n')
    result = fedcost("analyze", "bad.toml", "--out", "run", cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.toml" in result.stdout and "cannot group by 'hospital_name'" in result.stdout
    assert not (tmp_path / "run").exists()
    assert GroupedStatisticsLayout.from_json(GroupedStatisticsLayout(("payer",)).to_json()).group_by == ("payer",)
