"""The run's PNG plots: metrics per round, per-site comparison, calibration, funnel, and
cost against payment per disease group."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from fedcost.analytics.benchmarking import Z_95, Z_998, Benchmark, funnel_limits  # noqa: E402
from fedcost.analytics.random_effects import overdispersed_limits  # noqa: E402
from fedcost.report.units import cost_unit  # noqa: E402

MODEL_COLOURS = {"federated": "#1f77b4", "pooled": "#2ca02c", "local_only": "#d62728"}
ROUND_PANELS = (
    ("readmission_auroc", "readmission", "auroc", "Readmission AUROC"),
    ("readmission_brier", "readmission", "brier", "Readmission Brier score"),
    ("cost_mae", "cost", "mae", "Cost MAE ({unit})"),
    ("cost_r2", "cost", "r2", "Cost R²"),
)
# A site's funnel position (``SiteBenchmark.funnel``): its dot's colour and legend entry.
FUNNEL_COLOURS = {
    "above 99.8% limit": ("#d62728", "above 99.8% limit: worse"),
    "above 95% limit": ("#ff7f0e", "above 95% limit"),
    "within limits": ("#1f77b4", "within limits"),
    "below 95% limit": ("#74c476", "below 95% limit"),
    "below 99.8% limit": ("#006d2c", "below 99.8% limit: better"),
}


def plot_rounds(rounds: list[dict], summary: dict, path: Path) -> None:
    """Federated metrics after each round, with the pooled model as a dashed reference; a
    round whose figures were withheld (too few sites could send them) is a gap, and a run
    with none has no plot."""
    panels = [p for p in ROUND_PANELS if any(p[0] in r for r in rounds)]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    x = [r["round"] for r in rounds]
    for ax, (key, task, metric, title) in zip(axes[0], panels):
        y = [r.get(key, math.nan) for r in rounds]
        ax.plot(x, y, marker="o", color=MODEL_COLOURS["federated"], label="federated")
        if "pooled" in summary.get(task, {}):  # a federation has no pooled model
            ax.axhline(summary[task]["pooled"][metric], ls="--", color=MODEL_COLOURS["pooled"], label="pooled (final)")
        ax.set(title=title.format(unit=cost_unit(summary)), xlabel="round")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _save(figure, path)


def plot_sites(summary: dict, path: Path) -> None:
    """Per-site readmission AUROC and cost MAE for the models the summary scored per site
    (a federation's: the federated model, as far as each site reported it)."""
    sites = list(summary["per_site"])
    panels = [
        (t, m, label)
        for t, m, label in (("readmission", "auroc", "AUROC"), ("cost", "mae", f"cost MAE ({cost_unit(summary)})"))
        if any(m in scores for s in sites for scores in summary["per_site"][s].get(t, {}).values())
    ]
    if not panels:
        return
    figure, axes = plt.subplots(
        len(panels), 1, figsize=(max(6, 0.9 * len(sites) + 2), 3.2 * len(panels)), squeeze=False
    )
    positions = np.arange(len(sites))
    for ax, (task, metric, label) in zip(axes[:, 0], panels):
        models = [m for m in MODEL_COLOURS if any(m in summary["per_site"][s].get(task, {}) for s in sites)]
        for offset, model in zip((-0.27, 0, 0.27) if len(models) > 1 else (0,), models):
            values = [summary["per_site"][s].get(task, {}).get(model, {}).get(metric, np.nan) for s in sites]
            ax.bar(positions + offset, values, width=0.27, color=MODEL_COLOURS[model], label=model)
        ax.set_xticks(positions, sites, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel=label, title=f"{label} per site (held-out rows)")
        if metric == "auroc":
            ax.set_ylim(0.5, 1.0)  # 0.5 is a coin toss: the interesting range starts there
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, ncols=3, loc="upper left")
    _save(figure, path)


def plot_calibration(summary: dict, path: Path) -> None:
    """Observed readmission rate against the predicted risk, per model, in quantile bins."""
    figure, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect")
    top = 0.0
    for model in MODEL_COLOURS:
        bins = summary["calibration"][model]
        ax.plot(bins["mean_predicted"], bins["observed_rate"], marker="o", color=MODEL_COLOURS[model], label=model)
        top = max(top, *bins["mean_predicted"], *bins["observed_rate"])
    ax.set(
        xlim=(0, min(1, top * 1.1)),
        ylim=(0, min(1, top * 1.1)),
        xlabel="predicted risk",
        ylabel="observed rate",
        title="Readmission calibration",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_funnel(result: Benchmark, path: Path) -> None:
    """Funnel plot PNG: O/E against expected readmissions, with 95% and 99.8% limits widened
    for between-site variation (the method in the title), the Poisson 99.8% limits faintly
    for reference, dots coloured by position with a legend, and which side is worse."""
    expected = np.array([s.expected for s in result.sites])
    volume = np.geomspace(max(expected.min() / 2, 1.0), expected.max() * 1.2, 200)
    figure, ax = plt.subplots(figsize=(8, 5))
    for z, style, label in ((Z_95, "--", "95% limits"), (Z_998, "-", "99.8% limits")):
        low, high = overdispersed_limits(volume, z, result.funnel_tau2)
        ax.plot(volume, high, style, color="grey", label=label)
        ax.plot(volume, low, style, color="grey")
    low, high = funnel_limits(volume, Z_998)
    ax.plot(volume, high, ":", color="silver", label="99.8% Poisson limits (no overdispersion)")
    ax.plot(volume, low, ":", color="silver")
    ax.axhline(1.0, color="black", lw=0.8)
    for position, (colour, label) in FUNNEL_COLOURS.items():
        members = [s for s in result.sites if s.funnel == position]
        ax.scatter(
            [s.expected for s in members],
            [s.oe for s in members],
            color=colour,
            zorder=3,
            label=f"{label} ({len(members)})",
        )
    for site in result.sites:
        ax.annotate(site.site, (site.expected, site.oe), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.text(
        1.01,
        0.97,
        "worse ↑\n(more readmissions\nthan expected)",
        transform=ax.transAxes,
        va="top",
        fontsize=8,
        color=FUNNEL_COLOURS["above 99.8% limit"][0],
    )
    ax.text(
        1.01,
        0.03,
        "better ↓\n(fewer readmissions\nthan expected)",
        transform=ax.transAxes,
        va="bottom",
        fontsize=8,
        color=FUNNEL_COLOURS["below 99.8% limit"][0],
    )
    ax.set(xlabel="expected readmissions (E)", ylabel="observed / expected readmissions (O/E)")
    ax.set_title(
        "Risk-adjusted 30-day readmission\n"
        f"limits: additive between-site variance τ² = {result.funnel_tau2:.3g} (DerSimonian–Laird on log O/E)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.8), frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(figure, path)


def plot_excess_readmission(result: Benchmark, path: Path) -> None:
    """Each site's raw O/E and its shrunken excess readmission ratio, with 95% intervals,
    sites ordered by size: the smaller the site, the further its ERR is pulled toward 1."""
    sites = sorted(result.sites, key=lambda s: s.expected)
    figure, ax = plt.subplots(figsize=(8, max(3.0, 0.35 * len(sites) + 1.5)))
    rows = np.arange(len(sites))
    for offset, (key, colour, label) in zip(
        (0.15, -0.15), (("oe", "#7f7f7f", "O/E (raw)"), ("err", "#1f77b4", "excess readmission ratio (ERR)"))
    ):
        centre = np.array([getattr(s, key) for s in sites])
        low, high = (np.array([getattr(s, f"{key}_{b}") for s in sites]) for b in ("low", "high"))
        ax.errorbar(
            centre,
            rows + offset,
            xerr=[centre - low, high - centre],
            fmt="o",
            color=colour,
            capsize=2,
            label=f"{label}, 95% interval",
        )
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(rows, [f"{s.site} (E {s.expected:,.0f})" for s in sites], fontsize=8)
    ax.set(
        xlabel="ratio (above 1: more readmissions than expected, worse)",
        title=f"Shrunken against raw readmission ratios (between-site SD τ = {result.between_site_sd:.3f})",
    )
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncols=2, frameon=False)
    _save(figure, path)


def plot_group_costing(summary: dict, path: Path) -> None:
    """Cost against payment per disease group (the federation's mean per case), and each
    group's margin per case at the federation and at every site that released the group."""
    result = summary["analytics"]["group_costing"]
    groups = [g for g in result["groups"] if g["mean_payment"] is not None]
    if not groups:
        return
    unit = cost_unit(summary)
    names = [g["group"].replace("_", " ") for g in groups]
    positions = np.arange(len(groups))
    figure, (costs, margins) = plt.subplots(2, 1, figsize=(max(7, 0.8 * len(groups) + 2), 7), sharex=True)
    costs.bar(positions - 0.2, [g["mean_cost"] for g in groups], width=0.4, color="#d62728", label="mean cost")
    costs.bar(positions + 0.2, [g["mean_payment"] for g in groups], width=0.4, color="#2ca02c", label="mean payment")
    costs.set(ylabel=f"per case ({unit})", title="Cost against payment per disease group (federation)")
    costs.legend(fontsize=8)
    margins.bar(positions, [g["margin"] for g in groups], width=0.5, color="#1f77b4", alpha=0.6, label="federation")
    index = {g["group"]: i for i, g in enumerate(groups)}
    sites = [s for s in result["sites"] if s["margin"] is not None and s["group"] in index]
    margins.scatter(
        [index[s["group"]] for s in sites],
        [s["margin"] for s in sites],
        color="black",
        s=10,
        zorder=3,
        label="one site",
    )
    margins.axhline(0.0, color="black", lw=0.8)
    margins.set(
        ylabel=f"margin per case ({unit})",
        title="Margin (payment - cost): below 0 the payer pays less than the care costs",
    )
    margins.set_xticks(positions, names, rotation=30, ha="right", fontsize=8)
    margins.legend(fontsize=8)
    for ax in (costs, margins):
        ax.grid(axis="y", alpha=0.3)
    _save(figure, path)
