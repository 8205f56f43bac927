"""The `fedcost` command line."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedcost.audit.cli import audit_app
from fedcost.config import SimulationConfig
from fedcost.errors import FedcostError
from fedcost.report.html import MODELS, comparison_rows, format_value

app = typer.Typer(help="Privacy-preserving multi-party cost analysis for health-care ecosystems.", no_args_is_help=True)
app.add_typer(audit_app, name="audit", help="Verify a run's signed audit logs and report what each site sent.")
console = Console(emoji=False)
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"


@app.callback()
def main() -> None:
    """fedcost: federated readmission and cost models for hospitals, insurers and pharma."""


@app.command()
def simulate(
    config: Annotated[Optional[Path], typer.Argument(help="Simulation config (TOML); default: configs/default.toml")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder to create (default: runs/<run-id>)")] = None,
    data_dir: Annotated[
        Optional[Path], typer.Option(help="Your own data: a folder with mapping.toml and one file per node")
    ] = None,
) -> None:
    """Run a federation on Flower's Simulation Engine and compare it with pooled and local-only training."""
    from fedcost.simulation import simulate as run

    try:
        settings = SimulationConfig.load(config) if config else _default_config()
        if not settings.secure_aggregation.enabled:
            console.print(
                "[yellow]warning:[/yellow] "
                + escape("secure aggregation is OFF ([secure_aggregation] enabled = false): ")
                + "the coordinator sees every node's contribution in the clear",
                soft_wrap=True,
            )
        with RoundProgress(settings.run.rounds) as progress:
            result = run(settings, out=out, data_dir=data_dir, on_start=progress.start, on_round=progress.advance)
    except FedcostError as error:
        # Messages name TOML tables such as [nodes.st-mary]: print them as text, not markup.
        console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True, highlight=False)
        for note in getattr(error, "__notes__", ()):
            console.print(escape(note), soft_wrap=True, highlight=False)
        raise typer.Exit(code=2) from None
    console.print(_comparison_table(result.summary))
    console.print(f"run folder: [bold]{result.run_dir}[/bold] (report: {result.run_dir / 'report.html'})")


class RoundProgress:
    """A progress bar over federated rounds, shown once the data has passed its checks."""

    def __init__(self, rounds: int):
        self.progress = Progress(
            TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), console=console,
        )
        self.task = self.progress.add_task("starting nodes…", total=rounds)

    def __enter__(self) -> "RoundProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def start(self) -> None:
        self.progress.start()

    def advance(self, record: dict) -> None:
        self.progress.update(self.task, advance=1, description=_round_text(record))


def _default_config() -> SimulationConfig:
    return SimulationConfig.load(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else SimulationConfig()


def _round_text(record: dict) -> str:
    parts = []
    if "readmission_auroc" in record:
        parts.append(f"AUROC {record['readmission_auroc']:.3f}")
    if "cost_r2" in record and not math.isnan(record["cost_r2"]):
        parts.append(f"cost R² {record['cost_r2']:.3f}")
    return "  ".join(parts)


def _comparison_table(summary: dict) -> Table:
    table = Table(title=f"Held-out rows: {summary['test_rows']:,} (same rows for every model)")
    table.add_column("task")
    table.add_column("metric")
    for model in MODELS:
        table.add_column(model, justify="right")
    for task, metric, values in comparison_rows(summary):
        table.add_row(task, metric, *(format_value(values[m]) for m in MODELS))
    return table
