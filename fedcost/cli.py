"""The `fedcost` command line."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fedcost import __version__
from fedcost.audit.commands import audit_app
from fedcost.errors import ConfigError, FedcostError
from fedcost.federation.commands import OLD_FORMS, coordinator_app, federation_app, node_app
from fedcost.federation.commands import run as run_job
from fedcost.report.units import cost_unit
from fedcost.run_folder import RunFolder
from fedcost.terminal import PoliteTyper, RoundProgress, console, fail

if TYPE_CHECKING:  # torch, Flower and pandas load only inside the commands that need them
    from fedcost.config import SimulationConfig
    from fedcost.lab import RunResult

# A traceback that prints locals would print patient rows and keys: never show them.
app = PoliteTyper(
    help="Privacy-preserving multi-party cost analysis for health-care ecosystems.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(audit_app, name="audit", help="Verify a run's signed audit logs and report what each site sent.")
app.add_typer(federation_app, name="federation", help="Provision a federation: CA, coordinator, node startup kits.")
app.add_typer(coordinator_app, name="coordinator", help="Run the federation's coordinator (Flower SuperLink).")
app.add_typer(node_app, name="node", help="Run a site's node from its startup kit.")
app.command(name="run", context_settings=OLD_FORMS)(run_job)
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"
OutFolder = Annotated[
    Path | None, typer.Option("--out", help="Run folder to create, new or empty (default: runs/<run-id>)")
]
DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Your own data: a folder with mapping.toml and one file per node")
]


def _version(shown: bool) -> None:
    if shown:
        console.print(f"fedcost {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print fedcost's version and exit.")
    ] = False,
) -> None:
    """fedcost: federated readmission and cost models for hospitals, insurers and pharma."""


@app.command()
def simulate(
    config: Annotated[
        Path | None, typer.Argument(help="Simulation config (TOML); default: configs/default.toml")
    ] = None,
    out: OutFolder = None,
    data_dir: DataDir = None,
) -> None:
    """Run a federation on Flower's Simulation Engine and compare it with pooled and local-only training."""
    result = _run(config, out, data_dir, "train")
    if "benchmark" in result.summary["analytics"]:
        console.print(_benchmark_table(result.summary["analytics"]["benchmark"], result.summary))
    if "group_costing" in result.summary["analytics"]:
        console.print(_group_costing_table(result.summary["analytics"]["group_costing"], result.summary))
    if "episodes" in result.summary["analytics"]:
        _print_episodes(result.summary)
    console.print(f"run folder: [bold]{result.run_dir}[/bold] (report: {RunFolder(result.run_dir).report})")
    _warn_unconverged(result.summary.get("inference", {}))
    console.print(_comparison_table(result.summary))  # the headline: the terminal ends with it


def _warn_unconverged(inference: dict) -> None:
    """Say so where an exact GLM ran out of rounds: its coefficients are not the fit's optimum."""
    for task, table in inference.items():
        if not table["converged"]:
            text = f"the {task} GLM is not the maximum-likelihood fit: it {table['message']}"
            console.print("[yellow]warning:[/yellow] " + escape(text), soft_wrap=True, highlight=False)


@app.command()
def analyze(
    config: Annotated[
        Path | None, typer.Argument(help="Config (TOML) whose \\[analytics] group_by sets the cells")
    ] = None,
    out: OutFolder = None,
    data_dir: DataDir = None,
) -> None:
    """Federated cost statistics by group (counts, exact sums, means, variances, quantiles), small cells suppressed."""
    result = _run(config, out, data_dir, "analyze")
    statistics = result.summary["analytics"].get("statistics")
    if statistics is None:
        console.print(
            "[yellow]warning:[/yellow] " + escape("[analytics] group_by is empty: no statistics were computed")
        )
    else:
        console.print(_statistics_table(statistics))
        console.print(escape(statistics["note"]), soft_wrap=True)
    if "group_costing" in result.summary["analytics"]:
        console.print(_group_costing_table(result.summary["analytics"]["group_costing"], result.summary))
    if "episodes" in result.summary["analytics"]:
        _print_episodes(result.summary)
    console.print(
        f"run folder: [bold]{result.run_dir}[/bold] (statistics.csv, report: {RunFolder(result.run_dir).report})"
    )


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="A finished run's folder (it holds model.json and model.pt)")],
    data: Annotated[
        Path, typer.Argument(help="The site's rows to score: a CSV or Parquet file, or an OMOP CDM extract's folder")
    ],
    mapping: Annotated[Path, typer.Option("--mapping", help="The site's mapping file, as for `fedcost node start`")],
    node: Annotated[str, typer.Option("--node", help="The site's \\[nodes.NAME] table in the mapping")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the predictions (CSV)")] = Path("predictions.csv"),
    site: Annotated[
        str | None, typer.Option("--site", help="Apply this site's saved steps (cost level, fine-tuning)")
    ] = None,
) -> None:
    """Score a site's rows with a run's model; predictions stay at the site.

    Each prediction names its row: the file's row number, or an OMOP extract's
    visit_occurrence_id (every index stay is scored, recent ones too)."""
    from fedcost.atomic import replace_atomically
    from fedcost.data.loader import load_omop_rows, load_rows
    from fedcost.data.mapping import DataMapping, OmopReading
    from fedcost.models.saved import SavedModel

    try:
        model = SavedModel.load(run)
        checked = DataMapping.load(mapping)
        source = checked.node(node)
        if data.is_dir():
            reading = dataclasses.replace(source.omop or OmopReading(data), folder=data)
            rows, stays = load_omop_rows(checked, source, reading, targets=False)
            names: tuple[str, Sequence[int]] = ("visit_occurrence_id", stays)
        else:
            rows = load_rows(checked, source, data, targets=False)
            names = ("row", range(1, len(rows) + 1))
        scored = model.predict(rows, site=site)
    except FedcostError as error:
        raise fail(error) from None
    scored.insert(0, *names)
    replace_atomically(out, scored.to_csv(index=False).encode())
    console.print(f"wrote {len(scored):,} predictions to [bold]{escape(str(out))}[/bold]")


def _run(config: Path | None, out: Path | None, data_dir: Path | None, task: str) -> RunResult:
    """Check the config and the run folder, run the simulation with progress shown, and turn
    a user's mistakes into exit code 2. Torch and Flower load only once the config passed."""
    from fedcost.config import SimulationConfig
    from fedcost.data.files import MAPPING_FILE
    from fedcost.data.mapping import DataMapping

    try:
        settings = SimulationConfig.load(config) if config else _default_config()
        if out is not None:
            _check_new_folder(out)
        if data_dir is not None:  # checked again by the run: a mistake in it shows before torch loads
            DataMapping.load(data_dir / MAPPING_FILE)
        from fedcost.lab import simulate as run

        if not settings.secure_aggregation.enabled:
            console.print(
                "[yellow]warning:[/yellow] "
                + escape("secure aggregation is OFF ([secure_aggregation] enabled = false): ")
                + "the coordinator sees every node's contribution in the clear",
                soft_wrap=True,
            )
        if task == "analyze":
            with console.status("federated statistics under way…"):
                return run(settings, out=out, data_dir=data_dir, task="analyze")
        with RoundProgress(settings.run.rounds) as progress:
            return run(
                settings,
                out=out,
                data_dir=data_dir,
                on_start=progress.start,
                on_round=progress.advance,
                on_stage=progress.stage,
            )
    except FedcostError as error:
        raise fail(error) from None


def _check_new_folder(out: Path) -> None:
    """``--out`` must be a folder to create (or an empty one), checked before any work."""
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise ConfigError("is a file: give --out the path of a new folder", path=str(folder), field="--out")
        if folder.exists():
            break
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError("exists and is not empty: give --out a new or empty folder", path=str(out), field="--out")


def _default_config() -> SimulationConfig:
    from fedcost.config import SimulationConfig

    return SimulationConfig.load(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else SimulationConfig()


def _comparison_table(summary: dict) -> Table:
    from fedcost.report.html import MODELS, comparison_rows, format_value, left_out_note, scoring_note

    caption = "; ".join(filter(None, (scoring_note(summary), left_out_note(summary))))
    table = Table(title=f"Held-out rows: {summary['test_rows']:,} (same rows for every model)", caption=caption)
    table.add_column("outcome")
    table.add_column("metric")
    for model in MODELS:
        table.add_column(model, justify="right")
    for task, metric, values in comparison_rows(summary):
        table.add_row(task, metric, *(format_value(values[m]) for m in MODELS))
    return table


def _benchmark_table(result: dict, summary: dict) -> Table:
    from fedcost.report.html import funnel_position, outcome_label

    binary, cost = outcome_label(summary, "readmission"), outcome_label(summary, "cost")
    table = Table(title="Risk-adjusted benchmarking (each site shared only its totals; 1 = the federation)")
    heads = ("site", "rows", f"O/E {binary} (95% CI)", "ERR (95% CI)", "funnel", f"O/E {cost} (95% CI)", "value index")
    for head in heads:
        table.add_column(head, justify="left" if head in ("site", "funnel") else "right")
    for s in result["sites"]:
        table.add_row(
            s["site"],
            f"{s['n']:,}",
            _ratio(s, "oe"),
            _ratio(s, "err"),
            funnel_position(s),
            _ratio(s, "cost_ratio"),
            _ratio(s, "value_index"),
        )
    return table


def _ratio(site: dict, name: str) -> str:
    """A site's ratio with its interval, where the benchmark gives one."""
    if site.get(name) is None or math.isnan(site[name]):
        return "n/a"
    low, high = site.get(f"{name}_low"), site.get(f"{name}_high")
    interval = "" if low is None or high is None else f" ({low:.2f}–{high:.2f})"
    return f"{site[name]:.2f}{interval}"


def _group_costing_table(result: dict, summary: dict) -> Table:
    """Cost against payment per disease group, over the federation's released cells."""
    unit = cost_unit(summary)
    table = Table(title=f"Cost against payment per disease group ({unit}; cost weight 1 = the mean case)")
    for head in ("disease group", "cases", "mean cost", "mean payment", "margin per case", "cost weight"):
        table.add_column(head, justify="left" if head == "disease group" else "right")
    for group in result["groups"]:
        money = [("n/a" if group[k] is None else f"{group[k]:,.0f}") for k in ("mean_cost", "mean_payment", "margin")]
        table.add_row(group["group"], f"{group['cases']:,}", *money, f"{group['cost_weight']:.3f}")
    return table


def _print_episodes(summary: dict) -> None:
    """Episode cost and value per hospital (``episodes.csv``), and what the figures are."""
    result = summary["analytics"]["episodes"]
    unit = cost_unit(summary)
    table = Table(title=f"Episode cost per hospital ({unit}; value index 1 = the federation)")
    for head in ("hospital", "stays", "episode cost", "mean per stay", "paid by others", "value index", "withheld"):
        table.add_column(head, justify="left" if head in ("hospital", "withheld") else "right")
    for name, h in result["hospitals"].items():
        if h["episode_cost"] is None:
            table.add_row(name, "", "", "", "", "", h["withheld"])
            continue
        others = sum(v for v in h["payers"].values() if v is not None) / h["episode_cost"]
        index = "n/a" if h["value_index"] is None else f"{h['value_index']:.3f}"
        table.add_row(
            name,
            f"{h['stays']:,}",
            f"{h['episode_cost']:,.0f}",
            f"{h['mean_per_stay']:,.0f}",
            f"{others:.1%}",
            index,
            h["withheld"],
        )
    console.print(table)
    console.print(escape(result["note"]), soft_wrap=True)


def _statistics_table(result: dict) -> Table:
    groups = result["group_by"]
    table = Table(title=f"Federated statistics by {', '.join(groups) or 'everything'}")
    for head in (*groups, "rows", "mean cost", "median cost", "p90 cost", "readmission rate"):
        table.add_column(head, justify="left" if head in groups else "right")
    for cell in result["cells"]:
        if cell["suppressed"]:
            table.add_row(*(str(cell[g]) for g in groups), "suppressed", "", "", "", "")
        elif cell["n"]:
            figures = (cell.get("total_cost_mean"), cell.get("cost_median"), cell.get("cost_p90"))
            rate = cell.get("readmission_rate")
            table.add_row(
                *(str(cell[g]) for g in groups),
                f"{cell['n']:,}",
                *("n/a" if f is None else f"{f:,.0f}" for f in figures),
                "n/a" if rate is None else f"{rate:.3f}",
            )
    return table
