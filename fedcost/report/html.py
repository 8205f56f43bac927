"""`report.html`: the comparison table and the plots in one file that opens anywhere.

Plots are embedded as base64 PNGs, so the report needs neither a server nor the rest
of the run folder.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from fedcost.report.units import cost_unit
from fedcost.run_folder import RunFolder

METRICS = {"readmission": ("auroc", "auprc", "brier"), "cost": ("mae", "rmse", "r2")}
# The models every run compares, in table order: the shared model, pooled and local-only
# fitted by the same estimator and scored as fitted, then the shared model as each site
# would use it (``models.site_steps``).
MODELS = ("federated", "pooled", "local_only", "federated_at_sites")
PLOTS = ("rounds", "sites", "calibration", "funnel", "err", "group_costing")
# Metrics in currency units; the others are ratios or probabilities.
MONEY_METRICS = {("cost", "mae"), ("cost", "rmse")}


def scoring_note(summary: dict) -> str:
    """How the models were scored: the first three as fitted; the last with each site's steps."""
    steps = summary.get("site_steps", {})
    calibrated = sum(step["calibration"] is not None for step in steps.values())
    tuned = sum(bool(step["adapted"]) for step in steps.values())
    return (
        f"federated, pooled and local-only scored as fitted; federated_at_sites: the shared model with the "
        f"steps each site's validation rows kept ({calibrated} of {len(steps)} sites their cost level, "
        f"{tuned} fine-tuning)"
    )


def left_out_note(summary: dict) -> str:
    """The job's declared features the model lacks, and why; empty when it lacks none."""
    left_out = summary.get("features_left_out", [])
    if not left_out:
        return ""
    return (
        f"not in the model: {', '.join(left_out)} (no site released them over {summary['min_cohort']} training "
        "rows, nor did enough sites hold 4 each: absent, or rare everywhere)"
    )


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
    from fedcost.report.plots import plot_calibration, plot_group_costing, plot_rounds, plot_sites

    run = RunFolder(folder)
    run.plots.mkdir(exist_ok=True)
    if summary["task"] == "train":
        plot_rounds(rounds, summary, run.plot("rounds"))
        plot_sites(summary, run.plot("sites"))
    if summary.get("calibration"):
        plot_calibration(summary, run.plot("calibration"))
    if summary.get("analytics", {}).get("group_costing"):
        plot_group_costing(summary, run.plot("group_costing"))
    images = [run.plot(name) for name in PLOTS if run.plot(name).exists()]
    run.report.write_text(_page(summary, images), encoding="utf-8")
    return run.report


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
<html lang="en"><head><meta charset="utf-8"><title>fedcost run {html.escape(summary["run_id"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
.withheld {{ color: #a33; font-style: italic; }}
details > summary {{ cursor: pointer; font-size: 1.2rem; font-weight: bold; margin: 1rem 0; }}
</style></head><body>
<h1>fedcost run {html.escape(summary["run_id"])}</h1>
<p>Costs in {html.escape(cost_unit(summary))}{"" if summary.get("currency") else " (the config names no currency: [analytics] currency)"}.</p>
{body}
{_privacy_section(summary)}
{_benchmark_section(summary.get("analytics", {}).get("benchmark"), summary)}
{_group_costing_section(summary.get("analytics", {}).get("group_costing"), summary)}
{_episodes_section(summary.get("analytics", {}).get("episodes"), summary)}
{_statistics_section(summary.get("analytics", {}).get("statistics"), summary)}
<h2>Plots</h2>
{figures}
</body></html>
"""


def _sites_line(summary: dict) -> str:
    names = ", ".join(f"{html.escape(n['name'])} ({n['role']})" for n in summary["nodes"])
    return f"<p>Federated analytics over {len(summary['nodes'])} sites: {names}.</p>"


def _training_sections(summary: dict) -> str:
    table = "".join(
        f"<tr><td>{task}</td><td>{_metric_label(task, metric, summary)}</td>"
        + "".join(f"<td>{format_value(v[m])}</td>" for m in MODELS)
        + "</tr>"
        for task, metric, v in comparison_rows(summary)
    )
    sites = "".join(
        f"<tr><td>{html.escape(n['name'])}</td><td>{n['role']}</td><td>{n['train_rows']:,}</td><td>{n['test_rows']:,}</td>"
        + "".join(_site_cells(summary["per_site"][n["name"]], task) for task in METRICS if task in summary)
        + "</tr>"
        for n in summary["nodes"]
    )
    site_heads = "".join(
        f"<th>{task} {_metric_label(task, METRICS[task][0], summary)} ({m})</th>"
        for task in METRICS
        if task in summary
        for m in MODELS
    )
    return f"""<p>{len(summary["nodes"])} nodes, {summary["rounds"]} rounds of {summary["strategy"]}, model {summary["model"]};
all models scored on the same {summary["test_rows"]:,} held-out rows; {scoring_note(summary)}.</p>
{_left_out_paragraph(summary)}<h2>Federated against pooled and local-only</h2>
<table><tr><th>outcome</th><th>metric</th>{"".join(f"<th>{m}</th>" for m in MODELS)}</tr>{table}</table>
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


def _left_out_paragraph(summary: dict) -> str:
    note = left_out_note(summary)
    return f'<p class="withheld">{html.escape(note[0].upper() + note[1:])}.</p>\n' if note else ""


def _federation_sections(summary: dict) -> str:
    """A federation run: the federated model's metrics, then each site as it reported itself."""
    table = "".join(
        f"<tr><td>{task}</td><td>{_metric_label(task, metric, summary)}</td><td>{format_value(v)}</td></tr>"
        for task, metric, v in federation_rows(summary)
    )
    reported = summary.get("sites_reported", [])
    sites = "".join(_reported_site(n, summary) for n in summary["nodes"])
    note = (
        f"{len(reported)} of {len(summary['nodes'])} sites sent their own report"
        if reported
        else "No site report collected yet (`fedcost federation collect`)"
    )
    return f"""<p>A federation of {len(summary["nodes"])} sites, {summary["rounds"]} rounds of {summary["strategy"]},
model {summary["model"]}. Metrics of the federated model from the summed evaluation sums of every site's
held-out rows; no party holds the rows a pooled or local-only model would need.</p>
{_left_out_paragraph(summary)}<h2>Federated model</h2>
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
        f"{task} {_metric_label(task, metric, summary)} {format_value(value)}"
        for task, models in summary.get("per_site", {}).get(node["name"], {}).items()
        if isinstance(models, dict)
        for metric, value in models.get("federated", {}).items()
    )
    rows = [f"{node[k]:,}" if k in node else "" for k in ("train_rows", "test_rows")]
    return (
        f"<tr><td>{html.escape(node['name'])}</td><td>{node['role']}</td><td>{rows[0]}</td><td>{rows[1]}</td>"
        f"<td>{spent}</td><td>{html.escape(figures)}</td></tr>"
    )


def funnel_position(site: dict) -> str:
    """A site's position in the funnel, against limits widened for between-site variation, and
    against the Poisson 99.8% limits where it lies outside them."""
    poisson = "above" if site["above_998"] else "below" if site["below_998"] else ""
    return f"{site['funnel']} ({poisson} Poisson 99.8%)" if poisson else site["funnel"]


def _metric_label(task: str, metric: str, summary: dict) -> str:
    return f"{metric} ({html.escape(cost_unit(summary))})" if (task, metric) in MONEY_METRICS else metric


def _interval(centre: float, low: float, high: float) -> str:
    return f"{centre:.2f} ({low:.2f}–{high:.2f})"


def _benchmark_section(result: dict | None, summary: dict) -> str:
    """Risk-adjusted O/E next to the shrunken excess readmission ratio, cost ratio and value
    per site, each with its interval, and how they were computed."""
    if not result:
        return ""
    unit = html.escape(cost_unit(summary))
    peers = any(s["peer_group"] for s in result["sites"])
    rows = "".join(
        f"<tr><td>{html.escape(s['site'])}</td><td>{s['n']:,}</td><td>{s['observed']:,.0f}</td><td>{s['expected']:,.1f}</td>"
        f"<td>{_interval(s['oe'], s['oe_low'], s['oe_high'])}</td><td>{_interval(s['err'], s['err_low'], s['err_high'])}</td>"
        + (f"<td>{html.escape(s['peer_group']) or 'none'}</td><td>{s['err_threshold']:.3f}</td>" if peers else "")
        + f"<td>{funnel_position(s)}</td><td>{_interval(s['cost_ratio'], s['cost_ratio_low'], s['cost_ratio_high'])}</td>"
        f"<td>{_interval(s['value_index'], s['value_index_low'], s['value_index_high'])}</td></tr>"
        for s in result["sites"]
    )
    peer_heads = "<th>peer group</th><th>peer median ERR</th>" if peers else ""
    return f"""<h2>Risk-adjusted benchmarking</h2>
<p>Each site scored its own rows with the federated model and shared only its totals: rows, observed and
expected readmissions and costs. Federation readmission rate {result["federation_rate"]:.3f}, mean cost
{result["federation_mean_cost"]:,.0f} {unit} per stay. All intervals are 95%.</p>
<ul>
<li><strong>O/E</strong>: observed over expected readmissions, exact-Poisson (Byar) interval.</li>
<li><strong>ERR</strong> (excess readmission ratio, as CMS's readmissions programme computes it): predicted
readmissions with the site's own random intercept over expected with the average site's. Method:
{html.escape(result["err_method"])}; between-site SD τ = {result["between_site_sd"]:.3f}. A small site's ERR is pulled toward 1: its own
readmissions say little. ERR compares a site with the average site, O/E with the federation's pooled
rate (which large sites dominate), so a large site's ERR and O/E can differ. Computed at the coordinator
from the rows, O and E the sites already shared.
{"ERR is compared with the median ERR of the site's peer group (CMS's threshold)." if peers else "Above 1: more readmissions than the average site with the same patients."}</li>
<li><strong>Funnel</strong>: the site's O/E against control limits around 1 widened for real between-site
variation ({html.escape(result["funnel_method"])}; τ² = {result["funnel_tau2"]:.3g}). Above the limits is worse:
unusual even allowing for how much sites differ. In brackets, a site outside the Poisson 99.8% limits, which
allow for chance alone.</li>
<li><strong>Cost O/E</strong>: observed over expected cost, interval from the squared residuals.</li>
<li><strong>Value index</strong>: readmission-free stays per {unit} against the federation's; above 1 better
value; delta-method interval.</li>
</ul>
{_noise_note(summary)}
<p>{_normalisation(result)}</p>
<table><tr><th>site</th><th>rows</th><th>observed</th><th>expected</th><th>O/E (95% CI)</th><th>ERR (95% CI)</th>
{peer_heads}<th>funnel</th><th>cost O/E (95% CI)</th><th>value index (95% CI)</th></tr>{rows}</table>"""


def _money(value: float | None, places: int = 0) -> str:
    return "–" if value is None else f"{value:,.{places}f}"


def _group_costing_section(result: dict | None, summary: dict) -> str:
    """Cost against payment per disease group: the federation's groups, each site's case mix,
    and (folded away) every site's groups."""
    if not result:
        return ""
    unit = html.escape(cost_unit(summary))
    groups = "".join(
        f"<tr><td>{html.escape(g['group'])}</td><td>{g['cases']:,}</td><td>{_money(g['mean_cost'])}</td>"
        f"<td>{_money(g['mean_payment'])}</td><td>{_money(g['margin'])}</td><td>{_money(g['total_margin'])}</td>"
        f"<td>{g['cost_weight']:.3f}</td></tr>"
        for g in result["groups"]
    )
    mixes = "".join(
        f"<tr><td>{html.escape(c['site'])}</td><td>{c['cases']:,}</td><td>{c['case_mix_index']:.3f}</td>"
        f"<td>{c['cost_oe']:.3f}</td><td>{_money(c['mean_cost'])}</td><td>{_money(c['mean_payment'])}</td>"
        f"<td>{_money(c['margin'])}</td></tr>"
        for c in result["case_mix"]
    )
    cells = "".join(
        f"<tr><td>{html.escape(s['site'])}</td><td>{html.escape(s['group'])}</td><td>{s['cases']:,}</td>"
        f"<td>{_money(s['mean_cost'])}</td><td>{_money(s['mean_payment'])}</td><td>{_money(s['margin'])}</td>"
        f"<td>{s['cost_oe']:.3f}</td></tr>"
        for s in result["sites"]
    )
    return f"""<h2>Cost against payment per disease group</h2>
<p>{html.escape(result["note"])} Mean cost of every case: {_money(result["mean_cost"])} {unit}.</p>
<table><tr><th>disease group</th><th>cases</th><th>mean cost ({unit})</th><th>mean payment ({unit})</th>
<th>margin per case ({unit})</th><th>total margin ({unit})</th><th>cost weight</th></tr>{groups}</table>
<table><tr><th>site</th><th>cases</th><th>case-mix index</th><th>cost O/E</th><th>mean cost ({unit})</th>
<th>mean payment ({unit})</th><th>margin per case ({unit})</th></tr>{mixes}</table>
<details><summary>Per site and disease group: {len(result["sites"])} cells released</summary>
<table><tr><th>site</th><th>disease group</th><th>cases</th><th>mean cost ({unit})</th><th>mean payment ({unit})</th>
<th>margin per case ({unit})</th><th>cost O/E within group</th></tr>{cells}</table></details>"""


def _episodes_section(result: dict | None, summary: dict) -> str:
    """Episode cost and value per hospital, each payer's part beside its stays, withheld rows flagged."""
    if not result:
        return ""
    unit = html.escape(cost_unit(summary))
    payers = sorted({payer for h in result["hospitals"].values() for payer in h["payers"]})
    heads = "".join(f"<th>paid by {html.escape(p)} ({unit})</th>" for p in payers)
    rows = []
    for name, h in result["hospitals"].items():
        if h["episode_cost"] is None:
            span = 6 + len(payers)
            rows.append(
                f'<tr><td>{html.escape(name)}</td><td class="withheld" colspan="{span}">withheld: '
                f"{html.escape(h['withheld'])}</td></tr>"
            )
            continue
        paid = "".join(
            '<td class="withheld">withheld</td>' if h["payers"].get(p) is None else f"<td>{_money(h['payers'][p])}</td>"
            for p in payers
        )
        index = "–" if h["value_index"] is None else f"{h['value_index']:.3f}"
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{h['stays']:,}</td><td>{_money(h['stay_cost'])}</td>{paid}"
            f"<td>{_money(h['episode_cost'])}</td><td>{_money(h['mean_per_stay'])}</td>"
            f"<td>{h['readmission_rate']:.3f}</td><td>{index}</td></tr>"
        )
    return f"""<h2>Episode cost per hospital</h2>
<p>{html.escape(result["note"])}</p>
<table><tr><th>hospital</th><th>stays</th><th>stay cost ({unit})</th>{heads}<th>episode cost ({unit})</th>
<th>mean per stay ({unit})</th><th>readmission rate</th><th>value index</th></tr>{"".join(rows)}</table>"""


def _noise_note(summary: dict) -> str:
    noisy = summary.get("statistics_privacy")
    if not noisy:
        return ""
    return (
        f"<p>The totals carried differential-privacy noise (SD {noisy['noise_sd']:.3g} readmissions or rows per "
        "total, costs clipped): the intervals on O/E, ERR, cost O/E and the value index include it; the funnel "
        "limits leave it out.</p>"
    )


def _normalisation(result: dict) -> str:
    """Why the federation is 1 on every ratio, and how far the model's own level was off."""
    factors = result.get("calibration") or {}
    if not factors:
        return "Expected readmissions are standardised to the federation (its O/E is 1); expected costs are the model's own."
    return (
        "Expected readmissions and costs are standardised so that the federation as a whole has O/E, cost O/E "
        "and value index 1, in every run. Before that, the federated model's totals were off by a factor of "
        f"{factors['readmission']:.3f} (readmissions, observed/expected) and {factors['cost']:.3f} (costs): the "
        "model's calibration in the large, which differential privacy and few rounds can move."
    )


def _privacy_section(summary: dict) -> str:
    """What protected the sites' data and what was held back: secure aggregation, differential
    privacy per site, the smallest cohort any figure describes, and what was withheld."""
    privacy = summary.get("privacy", {})
    rows = "".join(
        f"<tr><td>{html.escape(n['name'])}</td><td>{_dp_spent(privacy.get(n['name']))}</td></tr>"
        for n in summary["nodes"]
    )
    noisy = summary.get("statistics_privacy")
    statistics = (
        f"<p>Shared statistics (benchmark totals, grouped statistics, evaluation sums) carried distributed "
        f"noise for (ε = {noisy['epsilon']:g}, δ = {noisy['delta']:g}) per site, noise SD "
        f"{noisy['noise_sd']:.3g}, costs clipped at {noisy['cost_clip']:,.0f} {html.escape(cost_unit(summary))}.</p>"
        if noisy
        else "<p>Shared statistics were exact (no statistics noise).</p>"
    )
    glm = summary.get("glm_privacy")
    newton = (
        f"<p>The exact GLM's Newton sums carried distributed noise for (ε = {glm['epsilon']:g}, δ = "
        f"{glm['delta']:g}) per site over its {glm['rounds_planned']} planned rounds, noise SD {glm['noise_sd']:.3g} "
        "of a record's bound per sum; its standard errors include the noise on the score, not on the "
        "information: read them as a lower bound.</p>"
        if glm
        else ""
    )
    return f"""<h2>Privacy</h2>
<p>{_protections(summary)}</p>
<p>Smallest cohort any shared figure describes (min cohort): {summary.get("min_cohort", "not recorded")} rows.</p>
{statistics}{newton}
<table><tr><th>site</th><th>differential privacy in training: ε spent / budget (δ)</th></tr>{rows}</table>
<p>Withheld: {_withheld(summary)}</p>"""


def _dp_spent(privacy: dict | None) -> str:
    if privacy is None:
        return "not reported"
    if not privacy.get("dp"):
        return "no DP"
    noise = privacy.get("noise_multiplier")
    trained = f"; this run trained at noise multiplier {noise:.3g}" if noise is not None else ""
    return f"{privacy['epsilon_spent']:.2f} / {privacy['epsilon_budget']:g} ({privacy['delta']:g}){trained}"


def _withheld(summary: dict) -> str:
    analytics = summary.get("analytics", {})
    parts = []
    statistics = analytics.get("statistics")
    if statistics:
        cells = _listed_cells(statistics)
        suppressed = sum(c["suppressed"] for c in cells)
        partial = sum(_partly_withheld(c) for c in cells)
        parts.append(f"{suppressed} of {len(cells)} statistics cells suppressed, {partial} partly withheld")
    bench = analytics.get("benchmark")
    if bench:
        missing = sorted(
            {n["name"] for n in summary["nodes"]} - set(bench.get("included", [s["site"] for s in bench["sites"]]))
        )
        parts.append(
            "every site shared its benchmark totals"
            if not missing
            else f"no benchmark totals from {', '.join(map(html.escape, missing))}"
        )
    dropouts = summary.get("dropouts") or {}
    if dropouts:
        parts.append(f"nodes dropped out in round(s) {', '.join(map(str, dropouts))}")
    return "; ".join(parts) + "." if parts else "nothing."


def _statistics_section(result: dict | None, summary: dict) -> str:
    """Grouped statistics, folded away: every cell that holds rows, suppressed and partly
    withheld cells flagged."""
    if not result:
        return ""
    groups = result["group_by"]
    cells = _listed_cells(result)
    heads = "".join(f"<th>{html.escape(g)}</th>" for g in groups)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c[g]))}</td>" for g in groups) + _cell_figures(c) + "</tr>"
        for c in cells
    )
    suppressed, partial = sum(c["suppressed"] for c in cells), sum(_partly_withheld(c) for c in cells)
    unit = html.escape(cost_unit(summary))
    return f"""<details><summary>Federated statistics: {len(cells)} cells ({suppressed} suppressed, {partial} partly withheld)</summary>
<p>{html.escape(result["note"])}</p>
<table><tr>{heads}<th>rows</th><th>mean cost ({unit})</th><th>median cost ({unit})</th><th>p90 cost ({unit})</th>
<th>readmission rate</th></tr>
{rows}</table></details>"""


# The figures of a statistics cell the report shows, in column order.
CELL_FIGURES = ("total_cost_mean", "cost_median", "cost_p90", "readmission_rate")


def _listed_cells(result: dict) -> list[dict]:
    """The cells the report lists: those that hold rows, suppressed ones included."""
    return [c for c in result["cells"] if c["suppressed"] or c["n"]]


def _partly_withheld(cell: dict) -> bool:
    """A released cell with some figure held back (a measure under min cohort at the nodes)."""
    return not cell["suppressed"] and any(k in cell and cell[k] is None for k in CELL_FIGURES)


def _cell_figures(cell: dict) -> str:
    if cell["suppressed"]:
        return '<td colspan="5" class="withheld">suppressed: too few rows</td>'
    figures = [f"<td>{cell['n']:,}</td>"]
    for key in CELL_FIGURES:
        value = cell.get(key)
        if key in cell and value is None:
            figures.append('<td class="withheld" title="withheld: too few rows for this figure">withheld</td>')
        else:
            figures.append(
                "<td>n/a</td>"
                if value is None
                else f"<td>{value:.3f}</td>"
                if key == "readmission_rate"
                else f"<td>{value:,.0f}</td>"
            )
    return "".join(figures)


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
