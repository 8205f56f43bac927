"""Disease-group (DRG / DIP) costing: cost against payment per diagnosis group and site,
the federation's relative cost weights, and a case-mix index per site.

The figures come from one grouped-statistics table by site and diagnosis group
(``layout``): each site's rows fall in its own block of the secure sum, so the coordinator
learns every site's cases and its exact sums of cost and payment per group, with the
node's small cells and their complements withheld (``fedcost.analytics.statistics``), and
nothing finer. All that follows is arithmetic on those released sums, in whole cents, so
it equals the same arithmetic on the pooled rows of the cells released, exactly.

Per site and group g: cases n, mean cost, mean payment, margin per case (mean payment -
mean cost) and cost O/E within the group, C / (n x federation mean cost of g). Per group,
over the sites: the same, and the relative cost weight w_g = mean cost of g / mean cost of
every case. Per site: its case-mix index sum_g n_g w_g / sum_g n_g (1 = the federation's
case mix) and its cost O/E across groups, sum_g C_g / sum_g n_g x mean cost of g.

Payment is taken where a cell's every case carries one (hospitals and insurers hold it,
pharma nodes do not): a cell with cases but not a payment for each has no payment or
margin and adds nothing to its group's. Rows without a diagnosis group are left out:
no payer pays for them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pandas as pd

from fedcost import schema
from fedcost.analytics.statistics import MISSING, SITE, GroupedStatistics, GroupedStatisticsLayout, measure_unit

MEASURES = (schema.COST, schema.PAYMENT)


def layout(sites: tuple[str, ...]) -> GroupedStatisticsLayout:
    """The table group costing reads: by site and disease group, cost and payment."""
    return GroupedStatisticsLayout((SITE, schema.DISEASE_GROUP), MEASURES, sites=tuple(sites))


def is_group_costing(table: GroupedStatisticsLayout) -> bool:
    return table.group_by == (SITE, schema.DISEASE_GROUP) and table.measures == MEASURES


@dataclass(frozen=True)
class GroupCost:
    """One disease group at one site (or, with ``site`` "", over the federation): money in
    the data's currency; ``paid_cases`` the cases payment and margin are over."""

    site: str
    group: str
    cases: int
    paid_cases: int
    mean_cost: float
    mean_payment: float
    margin: float
    total_margin: float
    cost_oe: float
    cost_weight: float


@dataclass(frozen=True)
class SiteCaseMix:
    """A site over all its released groups: its case-mix index and its cost O/E."""

    site: str
    cases: int
    case_mix_index: float
    cost_oe: float
    mean_cost: float
    mean_payment: float
    margin: float


@dataclass(frozen=True)
class GroupCosting:
    groups: tuple[GroupCost, ...]
    sites: tuple[GroupCost, ...]
    case_mix: tuple[SiteCaseMix, ...]
    mean_cost: float
    note: str

    def to_dict(self) -> dict:
        def clean(row: dict) -> dict:
            return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}

        return {
            "mean_cost": self.mean_cost,
            "note": self.note,
            "groups": [clean(asdict(g)) for g in self.groups],
            "sites": [clean(asdict(s)) for s in self.sites],
            "case_mix": [clean(asdict(c)) for c in self.case_mix],
        }

    def frame(self) -> pd.DataFrame:
        """Federation rows (site "") then every site's, one per group."""
        return pd.DataFrame([asdict(row) for row in (*self.groups, *self.sites)])


@dataclass
class _Sums:
    """Whole cents (payment over the paid cells only) and cases, added exactly."""

    cases: int = 0
    cost: int = 0
    paid_cases: int = 0
    paid_cost: int = 0
    payment: int = 0

    def add(self, other: _Sums) -> None:
        for name in ("cases", "cost", "paid_cases", "paid_cost", "payment"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _cents(record: dict, measure: str) -> int:
    return round(record[f"{measure}_sum"] / measure_unit(measure))


def _cell(record: dict) -> _Sums | None:
    """A released cell's sums, or None for a withheld or empty one."""
    cases = record[f"{schema.COST}_n"]
    if record["suppressed"] or not cases:
        return None
    sums = _Sums(cases=cases, cost=_cents(record, schema.COST))
    if record[f"{schema.PAYMENT}_n"] == cases:
        sums.paid_cases, sums.paid_cost, sums.payment = cases, sums.cost, _cents(record, schema.PAYMENT)
    return sums


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _row(site: str, group: str, sums: _Sums, group_mean: float, weight: float) -> GroupCost:
    unit = measure_unit(schema.COST)
    return GroupCost(
        site=site,
        group=group,
        cases=sums.cases,
        paid_cases=sums.paid_cases,
        mean_cost=sums.cost * unit / sums.cases,
        mean_payment=_ratio(sums.payment * unit, sums.paid_cases),
        margin=_ratio((sums.payment - sums.paid_cost) * unit, sums.paid_cases),
        total_margin=(sums.payment - sums.paid_cost) * unit if sums.paid_cases else math.nan,
        cost_oe=_ratio(sums.cost * unit, sums.cases * group_mean),
        cost_weight=weight,
    )


def group_costing(statistics: GroupedStatistics) -> GroupCosting:
    """Group costing from the summed table by site and disease group (``layout``)."""
    if not is_group_costing(statistics.layout):
        raise ValueError("group costing reads a table by site and diagnosis_group of total_cost and payment")
    cells: dict[tuple[str, str], _Sums] = {}
    for record in statistics.records:
        sums = _cell(record)
        if sums is not None and record[schema.DISEASE_GROUP] != MISSING:
            cells[(record[SITE], record[schema.DISEASE_GROUP])] = sums
    groups: dict[str, _Sums] = {}
    for (_, group), sums in cells.items():
        groups.setdefault(group, _Sums()).add(sums)
    everyone = _Sums()
    for sums in groups.values():
        everyone.add(sums)
    unit = measure_unit(schema.COST)
    mean_cost = _ratio(everyone.cost * unit, everyone.cases)
    group_means = {group: sums.cost * unit / sums.cases for group, sums in groups.items()}
    weights = {group: _ratio(mean, mean_cost) for group, mean in group_means.items()}
    order = [g for g in schema.COLUMNS[schema.DISEASE_GROUP].levels if g in groups]
    federation = tuple(_row("", g, groups[g], group_means[g], weights[g]) for g in order)
    per_site = tuple(
        _row(site, group, sums, group_means[group], weights[group])
        for site in statistics.layout.sites
        for group in order
        if (sums := cells.get((site, group))) is not None
    )
    case_mix = _case_mix(cells, statistics.layout.sites, group_means, weights)
    return GroupCosting(federation, per_site, case_mix, mean_cost, _note(statistics))


def _case_mix(
    cells: dict[tuple[str, str], _Sums],
    sites: tuple[str, ...],
    group_means: dict[str, float],
    weights: dict[str, float],
) -> tuple[SiteCaseMix, ...]:
    """Per site: sum_g n_g w_g / sum_g n_g, and observed over group-expected cost."""
    unit = measure_unit(schema.COST)
    mixes = []
    for site in sites:
        mine = {group: sums for (owner, group), sums in cells.items() if owner == site}
        if not mine:
            continue
        total = _Sums()
        for sums in mine.values():
            total.add(sums)
        expected = sum(sums.cases * group_means[group] for group, sums in mine.items())
        mixes.append(
            SiteCaseMix(
                site=site,
                cases=total.cases,
                case_mix_index=sum(sums.cases * weights[group] for group, sums in mine.items()) / total.cases,
                cost_oe=total.cost * unit / expected,
                mean_cost=total.cost * unit / total.cases,
                mean_payment=_ratio(total.payment * unit, total.paid_cases),
                margin=_ratio((total.payment - total.paid_cost) * unit, total.paid_cases),
            )
        )
    return tuple(mixes)


def _note(statistics: GroupedStatistics) -> str:
    withheld = sum(bool(r["suppressed"]) for r in statistics.records)
    return (
        f"Each site's cases, cost and payment per disease group, summed under secure aggregation in its own block; "
        f"{withheld} site-group cells of 1 to {statistics.min_cohort - 1} cases withheld at the coordinator, and "
        "before anything left a node, each node withheld its small cells and complementary ones, so a group's "
        "figures cover the cells released. Payment and margin cover the cells in which every case carries a "
        "payment. Cost weight: a group's mean cost over the mean cost of every case; case-mix index: a site's "
        "cases weighted by their groups' cost weights (1 = the federation's case mix); cost O/E: observed cost "
        "over its cases at their groups' federation mean costs."
    )
