"""Plots and the self-contained HTML report of a run folder."""

from fedcost.report.html import write_report

__all__ = ["write_report"]
