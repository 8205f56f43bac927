"""`report.html`: the comparison table and the plots in one file that opens anywhere.

Plots are embedded as base64 PNGs, so the report needs neither a server nor the rest
of the run folder.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path


METRICS = {"readmission": ("auroc", "auprc", "brier"), "cost": ("mae", "rmse", "r2")}
# The models every run compares, in table order: the shared model, pooled and local-only
# fitted by the same estimator and scored as fitted, then the shared model as each site
# would use it (``models.site_steps``).
MODELS = ("federated", "pooled", "local_only", "federated_at_sites")
PLOTS = ("rounds.png", "sites.png", "calibration.png", "funnel.png")


def scoring_note(summary: dict) -> str:
    """How the models were scored: the first three as fitted; the last with each site's steps."""
    steps = summary.get("site_steps", {})
    calibrated = sum(step["calibration"] is not None for step in steps.values())
    tuned = sum(bool(step["adapted"]) for step in steps.values())
    return (f"federated, pooled and local-only scored as fitted; federated_at_sites: the shared model with the "
            f"steps each site's validation rows kept ({calibrated} of {len(steps)} sites their cost level, "
            f"{tuned} fine-tuning)")


def outcome_label(summary: dict, task: str) -> str:
    """A task as the data set names its outcome (``died``), else the task's own name."""
    return summary.get("outcomes", {}).get(task, {}).get("column", task)


def comparison_rows(summary: dict) -> list[tuple[str, str, dict[str, float]]]:
    """(outcome, metric, value per model) rows: the table the terminal and the report show."""
    return [
        (outcome_label(summary, task), metric, {model: summary[task][model][metric] for model in MODELS})
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
    # matplotlib loads only here: the command line's tables need this module, not the plots.
    from fedcost.report.plots import plot_calibration, plot_rounds, plot_sites

    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    if summary["task"] == "train":
        plot_rounds(rounds, summary, plots / "rounds.png")
        plot_sites(summary, plots / "sites.png")
    if summary.get("calibration"):
        plot_calibration(summary, plots / "calibration.png")
    path = folder / "report.html"
    path.write_text(_page(summary, [plots / name for name in PLOTS if (plots / name).exists()]), encoding="utf-8")
    return path


def _page(summary: dict, images: list[Path]) -> str:
    figures = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"></figure>'
        for p in images
    )
    if summary.get("federation"):
        body = _federation_sections(summary)
    else:
        body = _training_sections(summary) if summary["task"] == "train" else _sites_line(summary)
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
{body}
<p>{_protections(summary)}</p>
{_benchmark_section(summary.get("analytics", {}).get("benchmark"))}
{_statistics_section(summary.get("analytics", {}).get("statistics"))}
<h2>Plots</h2>
{figures}
</body></html>
"""


def _sites_line(summary: dict) -> str:
    names = ", ".join(f"{html.escape(n['name'])} ({n['role']})" for n in summary["nodes"])
    return f"<p>Federated analytics over {len(summary['nodes'])} sites: {names}.</p>"


def _training_sections(summary: dict) -> str:
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
    return f"""<p>{len(summary['nodes'])} nodes, {summary['rounds']} rounds of {summary['strategy']}, model {summary['model']};
all models scored on the same {summary['test_rows']:,} held-out rows; {scoring_note(summary)}.</p>
<h2>Federated against pooled and local-only</h2>
<table><tr><th>outcome</th><th>metric</th>{''.join(f'<th>{m}</th>' for m in MODELS)}</tr>{table}</table>
<h2>Per site</h2>
<table><tr><th>site</th><th>role</th><th>train rows</th><th>test rows</th>{site_heads}</tr>{sites}</table>"""


def federation_rows(summary: dict) -> list[tuple[str, str, float]]:
    """(task, metric, value) of the federated model: the table a federation run ends with."""
    return [
        (outcome_label(summary, task), metric, value)
        for task in METRICS
        if task in summary
        for metric, value in summary[task]["federated"].items()
    ]


def _federation_sections(summary: dict) -> str:
    """A federation run: the federated model's metrics, then each site as it reported itself."""
    table = "".join(f"<tr><td>{task}</td><td>{metric}</td><td>{format_value(v)}</td></tr>"
                    for task, metric, v in federation_rows(summary))
    reported = summary.get("sites_reported", [])
    sites = "".join(_reported_site(n, summary) for n in summary["nodes"])
    note = (f"{len(reported)} of {len(summary['nodes'])} sites sent their own report"
            if reported else "No site report collected yet (`fedcost federation collect`)")
    return f"""<p>A federation of {len(summary['nodes'])} sites, {summary['rounds']} rounds of {summary['strategy']},
model {summary['model']}. Metrics of the federated model from the summed evaluation sums of every site's
held-out rows; no party holds the rows a pooled or local-only model would need.</p>
<h2>Federated model</h2>
<table><tr><th>outcome</th><th>metric</th><th>federated</th></tr>{table}</table>
<h2>Per site</h2>
<p>{note}: rows, privacy spent, and the final model on the site's own held-out rows (the metrics its
policy shares).</p>
<table><tr><th>site</th><th>role</th><th>train rows</th><th>test rows</th><th>ε spent / budget</th>
<th>held-out figures</th></tr>{sites}</table>"""


def _reported_site(node: dict, summary: dict) -> str:
    privacy = summary.get("privacy", {}).get(node["name"])
    if privacy is None:
        spent = ""
    elif privacy.get("dp"):
        spent = f"{privacy['epsilon_spent']:.2f} / {privacy['epsilon_budget']:g}"
    else:
        spent = "no DP"
    figures = "; ".join(
        f"{task} {metric} {format_value(value)}"
        for task, models in summary.get("per_site", {}).get(node["name"], {}).items() if isinstance(models, dict)
        for metric, value in models.get("federated", {}).items()
    )
    rows = [f"{node[k]:,}" if k in node else "" for k in ("train_rows", "test_rows")]
    return (f"<tr><td>{html.escape(node['name'])}</td><td>{node['role']}</td><td>{rows[0]}</td><td>{rows[1]}</td>"
            f"<td>{spent}</td><td>{html.escape(figures)}</td></tr>")


def funnel_position(site: dict) -> str:
    for flag, words in (("above_998", "above 99.8% limit"), ("above_95", "above 95% limit"),
                        ("below_998", "below 99.8% limit"), ("below_95", "below 95% limit")):
        if site[flag]:
            return words
    return "within limits"


def _benchmark_section(result: dict | None) -> str:
    """Risk-adjusted O/E, cost ratio and value per site, as the sites shared them."""
    if not result:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(s['site'])}</td><td>{s['n']:,}</td><td>{s['observed']:,.0f}</td><td>{s['expected']:,.1f}</td>"
        f"<td>{s['oe']:.2f} ({s['oe_low']:.2f}–{s['oe_high']:.2f})</td><td>{funnel_position(s)}</td>"
        f"<td>{s['cost_ratio']:.2f} ({s['cost_ratio_low']:.2f}–{s['cost_ratio_high']:.2f})</td><td>{s['value_index']:.2f}</td></tr>"
        for s in result["sites"]
    )
    return f"""<h2>Risk-adjusted benchmarking</h2>
<p>Each site scored its own rows with the federated model and shared only its totals: observed and
expected readmissions and costs. Federation readmission rate {result['federation_rate']:.3f}, mean cost
{result['federation_mean_cost']:,.0f}. O/E and cost ratio with 95% intervals; the funnel's control limits are
Poisson limits around 1 at each site's expected count; value index 1 is the federation's
readmission-free episodes per cost, above 1 better value.</p>
<table><tr><th>site</th><th>rows</th><th>observed</th><th>expected</th><th>O/E (95% CI)</th><th>funnel</th>
<th>cost O/E (95% CI)</th><th>value index</th></tr>{rows}</table>"""


def _statistics_section(result: dict | None) -> str:
    """Grouped statistics: every cell that holds rows, suppressed cells shown as such."""
    if not result:
        return ""
    groups = result["group_by"]
    cells = [c for c in result["cells"] if c["suppressed"] or c["n"]]
    heads = "".join(f"<th>{html.escape(g)}</th>" for g in groups)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c[g]))}</td>" for g in groups) + _cell_figures(c) + "</tr>" for c in cells
    )
    return f"""<h2>Federated statistics</h2>
<p>{html.escape(result['note'])}</p>
<table><tr>{heads}<th>rows</th><th>mean cost</th><th>median cost</th><th>p90 cost</th><th>readmission rate</th></tr>
{rows}</table>"""


def _cell_figures(cell: dict) -> str:
    if cell["suppressed"]:
        return '<td colspan="5">suppressed: too few rows</td>'
    figures = [
        f"{cell['n']:,}",
        _money(cell.get("total_cost_mean")),
        _money(cell.get("cost_median")),
        _money(cell.get("cost_p90")),
        "n/a" if cell.get("readmission_rate") is None else f"{cell['readmission_rate']:.3f}",
    ]
    return "".join(f"<td>{f}</td>" for f in figures)


def _money(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


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
