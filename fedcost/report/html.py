"""`report.html`: the comparison table and the plots in one file that opens anywhere.

Plots are embedded as base64 PNGs, so the report needs neither a server nor the rest
of the run folder.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from fedcost.report.plots import plot_calibration, plot_rounds, plot_sites

METRICS = {"readmission": ("auroc", "auprc", "brier"), "cost": ("mae", "rmse", "r2")}
# The three models every run compares, in table order.
MODELS = ("federated", "pooled", "local_only")
PLOTS = ("rounds.png", "sites.png", "calibration.png")


def comparison_rows(summary: dict) -> list[tuple[str, str, dict[str, float]]]:
    """(task, metric, value per model) rows: the table the terminal and the report show."""
    return [
        (task, metric, {model: summary[task][model][metric] for model in MODELS})
        for task, metrics in METRICS.items()
        if task in summary
        for metric in metrics
    ]


def format_value(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4f}"


def write_report(folder: Path, summary: dict, rounds: list[dict]) -> Path:
    """Write the PNG plots into ``folder/plots`` and the report next to them."""
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    plot_rounds(rounds, summary, plots / "rounds.png")
    plot_sites(summary, plots / "sites.png")
    if summary.get("calibration"):
        plot_calibration(summary, plots / "calibration.png")
    path = folder / "report.html"
    path.write_text(_page(summary, [plots / name for name in PLOTS if (plots / name).exists()]), encoding="utf-8")
    return path


def _page(summary: dict, images: list[Path]) -> str:
    table = "".join(
        f"<tr><td>{task}</td><td>{metric}</td>" + "".join(f"<td>{format_value(v[m])}</td>" for m in MODELS) + "</tr>"
        for task, metric, v in comparison_rows(summary)
    )
    sites = "".join(
        f"<tr><td>{html.escape(n['name'])}</td><td>{n['role']}</td><td>{n['train_rows']:,}</td><td>{n['test_rows']:,}</td>"
        + "".join(_site_cells(summary["per_site"][n["name"]], task) for task in METRICS if task in summary)
        + "</tr>"
        for n in summary["nodes"]
    )
    site_heads = "".join(
        f"<th>{task} {METRICS[task][0]} ({m})</th>"
        for task in METRICS
        if task in summary
        for m in MODELS
    )
    figures = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"></figure>'
        for p in images
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedcost run {html.escape(summary['run_id'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>fedcost run {html.escape(summary['run_id'])}</h1>
<p>{len(summary['nodes'])} nodes, {summary['rounds']} rounds of {summary['strategy']}, model {summary['model']};
all models scored on the same {summary['test_rows']:,} held-out rows.</p>
<p>{_protections(summary)}</p>
<h2>Federated against pooled and local-only</h2>
<table><tr><th>task</th><th>metric</th>{''.join(f'<th>{m}</th>' for m in MODELS)}</tr>{table}</table>
<h2>Per site</h2>
<table><tr><th>site</th><th>role</th><th>train rows</th><th>test rows</th>{site_heads}</tr>{sites}</table>
<h2>Plots</h2>
{figures}
</body></html>
"""


def _protections(summary: dict) -> str:
    secure = (
        "Secure aggregation (SecAgg+) was on: the coordinator saw only sums."
        if summary.get("secure_aggregation")
        else "<strong>Secure aggregation was OFF</strong>: the coordinator saw each node's contribution."
    )
    audit = summary.get("audit", {})
    logs = (
        f"The signed audit logs of all {len(audit['parties'])} parties verified and reconciled."
        if audit.get("verified")
        else ""
    )
    dropouts = summary.get("dropouts") or {}
    lost = f" Dropouts recovered in round(s) {', '.join(map(str, dropouts))}." if dropouts else ""
    return f"{secure} {logs}{lost}"


def _site_cells(site: dict, task: str) -> str:
    metric = METRICS[task][0]
    return "".join(f"<td>{format_value(site[task][m][metric])}</td>" for m in MODELS)
