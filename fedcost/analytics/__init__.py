"""Federated cost analytics: grouped statistics with small-cell suppression, and
risk-adjusted benchmarking (O/E, funnel limits, value). Pure: arrays in, arrays and
dataclasses out; no Flower, no network, no plots (the funnel plot is the report's)."""

from fedcost.analytics.benchmarking import SITE_SLOTS, Benchmark, SiteBenchmark, benchmark, site_totals
from fedcost.analytics.statistics import GroupedStatistics, GroupedStatisticsLayout, TableRelease, plan_release

__all__ = [
    "SITE_SLOTS",
    "Benchmark",
    "GroupedStatistics",
    "GroupedStatisticsLayout",
    "SiteBenchmark",
    "TableRelease",
    "benchmark",
    "plan_release",
    "site_totals",
]
