"""The run folder's analytics files: what a coordinator's recorder writes as results arrive."""

from __future__ import annotations

from pathlib import Path

from fedcost.analytics import Benchmark, GroupedStatistics
from fedcost.report.plots import plot_excess_readmission, plot_funnel


def save_statistics(folder: Path, statistics: GroupedStatistics, sites: list[str]) -> dict:
    """Write ``statistics.csv``; return the summary's ``analytics.statistics``."""
    statistics.to_frame().to_csv(folder / "statistics.csv", index=False)
    return {**statistics.to_dict(), "included": sites}


def save_benchmark(folder: Path, result: Benchmark, sites: list[str]) -> dict:
    """Write ``benchmark.csv``, ``plots/funnel.png`` and ``plots/err.png``; return the summary's
    ``analytics.benchmark``."""
    result.to_frame().to_csv(folder / "benchmark.csv", index=False)
    plot_funnel(result, folder / "plots" / "funnel.png")
    plot_excess_readmission(result, folder / "plots" / "err.png")
    return {**result.to_dict(), "included": sites}
