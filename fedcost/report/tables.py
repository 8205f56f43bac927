"""The run folder's analytics files: what a coordinator's recorder writes as results arrive."""

from __future__ import annotations

from pathlib import Path

from fedcost.analytics import Benchmark, GroupedStatistics
from fedcost.analytics.group_costing import GroupCosting
from fedcost.report.plots import plot_excess_readmission, plot_funnel
from fedcost.run_folder import RunFolder


def save_group_costing(folder: Path, result: GroupCosting, sites: list[str]) -> dict:
    """Write ``group_costing.csv`` (the federation's groups, then every site's); return the
    summary's ``analytics.group_costing``."""
    result.frame().to_csv(RunFolder(folder).group_costing, index=False)
    return {**result.to_dict(), "included": sites}


def save_statistics(folder: Path, statistics: GroupedStatistics, sites: list[str]) -> dict:
    """Write ``statistics.csv``; return the summary's ``analytics.statistics``."""
    statistics.to_frame().to_csv(RunFolder(folder).statistics, index=False)
    return {**statistics.to_dict(), "included": sites}


def save_benchmark(folder: Path, result: Benchmark, sites: list[str]) -> dict:
    """Write ``benchmark.csv``, ``plots/funnel.png`` and ``plots/err.png``; return the summary's
    ``analytics.benchmark``."""
    run = RunFolder(folder)
    result.to_frame().to_csv(run.benchmark, index=False)
    plot_funnel(result, run.plot("funnel"))
    plot_excess_readmission(result, run.plot("err"))
    return {**result.to_dict(), "included": sites}
