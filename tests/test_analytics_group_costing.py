"""Disease-group costing equals the pooled computation over the cells released, exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedcost import schema
from fedcost.analytics import group_costing
from fedcost.analytics.statistics import SITE, GroupedStatistics, GroupedStatisticsLayout, plan_release
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.errors import ConfigError

MIN_COHORT = 11
# A small hospital, so that some of its groups fall under the small-cell rule.
SIZES = {"hospital": [3000, 1500, 90], "insurer": [2500], "pharma": [800]}
GROUP = schema.DISEASE_GROUP


@pytest.fixture(scope="module")
def federation():
    """Every node's rows (payment missing where its role has none), the summed table and
    each node's released rows of it."""
    nodes = generate_ecosystem(EcosystemSpec.from_sizes(SIZES), seed=5).nodes
    sites = tuple(node.name for node in nodes)
    layout = group_costing.layout(sites)
    totals = np.zeros(layout.size)
    released = []
    for node in nodes:
        rows = node.frame.copy()
        if schema.PAYMENT not in rows:
            rows[schema.PAYMENT] = np.nan
        release = plan_release([layout], rows, role=node.role, site=node.name, min_cohort=MIN_COHORT)[0]
        totals += layout.local_vector(rows, role=node.role, site=node.name, min_cohort=MIN_COHORT, release=release)
        shown = np.array(release.rows) & np.array(release.measures[schema.COST])
        kept = rows[shown[layout.cell_codes(rows, node.role, node.name)]].assign(**{SITE: node.name})
        released.append((node.name, rows, kept))
    statistics = GroupedStatistics.from_totals(layout, totals, MIN_COHORT)
    return sites, statistics, released


def _pooled(released: list) -> tuple[dict, dict, dict]:
    """The same figures from the released rows, pooled, in whole cents with pandas."""
    rows = pd.concat([kept for _, _, kept in released], ignore_index=True)
    rows = rows[rows[GROUP].notna()]
    rows = rows.assign(
        cost=np.rint(rows[schema.COST] * 100).astype("int64"),
        paid=np.rint(rows[schema.PAYMENT].fillna(0) * 100).astype("int64"),
        has_payment=rows[schema.PAYMENT].notna(),
    )
    cells = rows.groupby([SITE, GROUP]).agg(
        n=("cost", "size"), cost=("cost", "sum"), payment=("paid", "sum"), paid_n=("has_payment", "sum")
    )
    cells["fully_paid"] = cells["paid_n"] == cells["n"]
    mean_cost = int(cells["cost"].sum()) * 0.01 / int(cells["n"].sum())
    groups = {}
    for group, part in cells.groupby(level=GROUP):
        paid = part[part["fully_paid"]]
        cases, paid_cases = int(part["n"].sum()), int(paid["n"].sum())
        margin = int(paid["payment"].sum() - paid["cost"].sum())
        groups[group] = {
            "cases": cases,
            "mean_cost": int(part["cost"].sum()) * 0.01 / cases,
            "margin": margin * 0.01 / paid_cases if paid_cases else None,
        }
        groups[group]["cost_weight"] = groups[group]["mean_cost"] / mean_cost
    per_site, case_mix = {}, {}
    levels = schema.COLUMNS[GROUP].levels
    for site, part in cells.groupby(level=SITE):
        part = part.droplevel(SITE)
        part = part.reindex([g for g in levels if g in part.index])
        n = int(part["n"].sum())
        case_mix[site] = sum(int(part.loc[g, "n"]) * groups[g]["cost_weight"] for g in part.index) / n
        for g in part.index:
            cell = part.loc[g]
            margin = (int(cell["payment"]) - int(cell["cost"])) * 0.01 / int(cell["n"]) if cell["fully_paid"] else None
            oe = int(cell["cost"]) * 0.01 / (int(cell["n"]) * groups[g]["mean_cost"])
            per_site[(site, g)] = {"cases": int(cell["n"]), "margin": margin, "cost_oe": oe}
    return groups, per_site, case_mix


def test_margins_weights_and_case_mix_equal_the_pooled_computation_exactly(federation) -> None:
    _, statistics, released = federation
    result = group_costing.group_costing(statistics).to_dict()
    groups, per_site, case_mix = _pooled(released)
    assert {
        g["group"]: {k: g[k] for k in ("cases", "mean_cost", "margin", "cost_weight")} for g in result["groups"]
    } == groups
    assert {
        (s["site"], s["group"]): {k: s[k] for k in ("cases", "margin", "cost_oe")} for s in result["sites"]
    } == per_site
    assert {c["site"]: c["case_mix_index"] for c in result["case_mix"]} == case_mix
    margins = [g["margin"] for g in result["groups"]]
    assert min(margins) < 0 < max(margins), "the synthetic payer underpays some groups and overpays others"


def test_payment_and_margin_only_where_every_case_carries_a_payment(federation) -> None:
    _, statistics, _ = federation
    result = group_costing.group_costing(statistics)
    pharma = [row for row in result.sites if row.site.startswith("pharma")]
    assert pharma and all(row.paid_cases == 0 and np.isnan(row.margin) for row in pharma)
    assert all(row.paid_cases == row.cases for row in result.sites if row.site.startswith("hospital"))


def test_small_site_group_cells_are_withheld(federation) -> None:
    """A site's group of 1 to min_cohort - 1 cases never shows; every cell shown has at least
    min_cohort cases; the small hospital loses some groups to the rule."""
    _, statistics, released = federation
    result = group_costing.group_costing(statistics)
    shown = {(row.site, row.group) for row in result.sites}
    assert all(row.cases >= MIN_COHORT for row in result.sites)
    small = [
        (name, group)
        for name, rows, _ in released
        for group, n in rows[GROUP].value_counts().items()
        if 0 < n < MIN_COHORT
    ]
    assert small and not shown & set(small)
    cells = {(record[SITE], record[GROUP]): record["n"] for record in statistics.records}
    assert all(cells[cell] == 0 for cell in small), "the node zeroed them: the sum shows no trace of them"


def test_a_table_by_site_names_distinct_sites_and_a_node_places_only_its_own_rows() -> None:
    with pytest.raises(ConfigError):
        GroupedStatisticsLayout((SITE, GROUP), group_costing.MEASURES)
    with pytest.raises(ConfigError):
        group_costing.layout(("a", "a"))
    layout = group_costing.layout(("a", "b"))
    assert GroupedStatisticsLayout.from_json(layout.to_json()) == layout
    rows = pd.DataFrame({GROUP: ["copd"], schema.COST: [1.0], schema.PAYMENT: [2.0]})
    with pytest.raises(ValueError, match="site"):
        layout.local_vector(rows, role="hospital", site="c", min_cohort=1)
