"""``fedcost federation | coordinator | node | run``: a real federation from the command line.

The operator provisions (``federation init``, ``add-node``, ``revoke``), starts the
coordinator and submits jobs; each site starts its node from its startup kit. Every
command takes the federation folder (or the kit folder) as its first argument.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from fedcost.errors import ConfigError, FedcostError, FederationError
from fedcost.federation import processes
from fedcost.federation.control import Control
from fedcost.federation.job import FederationJob
from fedcost.federation.provision import NODE_ROLES, Federation, FederationConfig
from fedcost.identity.federation_ca import utc_now
from fedcost.report.progress import METRICS_FILE
from fedcost.server import deploy
from fedcost.server.app import new_run_id

federation_app = typer.Typer(help="Provision a federation: CA, coordinator, node startup kits.", no_args_is_help=True)
coordinator_app = typer.Typer(help="Run the federation's coordinator (Flower SuperLink).", no_args_is_help=True)
node_app = typer.Typer(help="Run a site's node (Flower SuperNode) from its startup kit.", no_args_is_help=True)
console = Console(emoji=False)

FederationDir = Annotated[Path, typer.Argument(help="The federation folder (made by `fedcost federation init`).")]
RUN_POLL_SECONDS = 1.0


def _fail(error: FedcostError) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True, highlight=False)
    return typer.Exit(code=2)


@federation_app.command("init")
def init(
    name: Annotated[Path, typer.Argument(help="The federation folder to create; its name names the federation.")],
    address: Annotated[str, typer.Option(help="HOST:PORT where nodes reach the coordinator.")] = "127.0.0.1:9093",
    bind_host: Annotated[str, typer.Option(help="Interface the coordinator listens on (0.0.0.0: all).")] = "127.0.0.1",
    cert_days: Annotated[float, typer.Option(help="Lifetime of issued certificates, in days.")] = 365.0,
) -> None:
    """Create a federation folder: root CA, coordinator TLS certificate and identity, federation.toml."""
    try:
        config = FederationConfig(name.name, address, bind_host, cert_days)
    except ValueError as error:
        raise _fail(ConfigError(str(error), field="address")) from None
    try:
        federation = Federation.init(name, config, at=utc_now())
    except FedcostError as error:
        raise _fail(error) from None
    coordinator = federation.coordinator_identity().public()
    console.print(f"federation [bold]{config.name}[/bold] in {name}; coordinator at {address}")
    console.print(f"coordinator key id (sites put it in their policy): {coordinator.key_id}")


@federation_app.command("add-node")
def add_node(
    name: Annotated[str, typer.Argument(help="The site's name, as in its data mapping.")],
    role: Annotated[str, typer.Option(help=f"One of {', '.join(NODE_ROLES)}.")],
    federation_dir: Annotated[Path, typer.Option("--federation", "-f", help="The federation folder.")] = Path("."),
    days: Annotated[Optional[float], typer.Option(help="Certificate lifetime in days (default: federation.toml).")] = None,
) -> None:
    """Enrol a node and write its startup kit (kits/NAME): hand the kit to the site, then delete it here."""
    try:
        kit = Federation.load(federation_dir).add_node(name, role, at=utc_now(), days=days)
    except FedcostError as error:
        raise _fail(error) from None
    console.print(f"enrolled {name} ({role}); startup kit: [bold]{kit}[/bold]")


@federation_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="The enrolled node to revoke.")],
    federation_dir: Annotated[Path, typer.Option("--federation", "-f", help="The federation folder.")] = Path("."),
) -> None:
    """Revoke a node's certificate; a running coordinator drops it within seconds."""
    try:
        Federation.load(federation_dir).revoke(name, at=utc_now())
    except FedcostError as error:
        raise _fail(error) from None
    console.print(f"revoked {name}")


@coordinator_app.command("start")
def coordinator_start(federation_dir: FederationDir) -> None:
    """Start the coordinator: TLS, SuperNode authentication, only enrolled, unrevoked nodes."""
    try:
        federation = Federation.load(federation_dir)
        code = processes.run_coordinator(
            federation, echo=sys.stdout,
            on_ready=lambda: console.print(f"coordinator ready; log: {federation.log_file}"),
        )
    except FedcostError as error:
        raise _fail(error) from None
    raise typer.Exit(code=code)


@node_app.command("start")
def node_start(
    kit: Annotated[Path, typer.Argument(help="The site's startup kit folder.")],
    data: Annotated[Path, typer.Option(help="The site's data file (CSV or Parquet).")],
    mapping: Annotated[Path, typer.Option(help="The mapping file with a [nodes.<name>] table for this site.")],
    policy: Annotated[Optional[Path], typer.Option(help="The site policy (TOML); default: the permissive one.")] = None,
    state: Annotated[Optional[Path], typer.Option(help="Folder for the node's audit log and state (default: KIT/state).")] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the site's own train/held-out split.")] = 7,
    test_fraction: Annotated[float, typer.Option(help="Share of the site's rows held out for evaluation.")] = 0.2,
) -> None:
    """Check the kit, policy and data, then start the site's node and keep it connected."""
    state = state or kit / "state"
    try:
        checked = processes.prepare_node(kit, data=data, mapping=mapping, policy=policy, state=state,
                                         split_seed=split_seed, test_fraction=test_fraction, at=utc_now())
        console.print(f"kit, policy and data of {checked.name} checked; connecting to {checked.address} "
                      f"(log: {state / 'node.log'})")
        code = processes.run_node(checked, state=state, policy=policy, split_seed=split_seed,
                                  test_fraction=test_fraction)
    except FedcostError as error:
        raise _fail(error) from None
    raise typer.Exit(code=code)


def run(
    federation_dir: FederationDir,
    job: Annotated[Optional[Path], typer.Argument(help="The job (TOML): [run], [model], [training], [strategy], "
                                                       "[secure_aggregation], [data].")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Resume this run id from its checkpoint.")] = None,
) -> None:
    """Submit a training job to the running coordinator and follow it; outputs in runs/<run-id>/."""
    from fedcost.cli import RoundProgress

    try:
        federation = Federation.load(federation_dir)
        folder = _run_folder(federation, job, resume)
        rounds = FederationJob.load(folder / "job.toml").config.run.rounds
        with Control(federation.config.address, federation.ca_cert_file) as control:
            flower_run = control.start_run({deploy.FEDERATION_DIR: str(federation.root.resolve()), deploy.RUN_ID: folder.name})
            console.print(f"run [bold]{folder.name}[/bold] submitted (Flower run {flower_run}); folder: {folder}")
            with RoundProgress(rounds) as progress:
                progress.start()
                _follow(control, flower_run, folder, progress)
    except FedcostError as error:
        raise _fail(error) from None
    summary = json.loads((folder / deploy.SUMMARY_FILE).read_text())
    console.print(f"finished: {escape(json.dumps(summary['federated_evaluation']))}", soft_wrap=True, highlight=False)


def _run_folder(federation: Federation, job: Path | None, resume: str | None) -> Path:
    """A new run folder holding the validated job, or the existing one to resume."""
    if (job is None) == (resume is None):
        raise ConfigError("give either a job file or --resume RUN_ID")
    if resume is not None:
        folder = federation.runs_dir / resume
        if not (folder / "job.toml").is_file():
            raise ConfigError("no such run (no job.toml) to resume", path=str(folder))
        (folder / deploy.ERROR_FILE).unlink(missing_ok=True)
        return folder
    assert job is not None
    checked = FederationJob.load(job)
    folder = federation.runs_dir / new_run_id()
    folder.mkdir(parents=True)
    (folder / "job.toml").write_bytes(checked.to_toml())
    return folder


def _follow(control: Control, flower_run: int, folder: Path, progress) -> None:  # type: ignore[no-untyped-def]
    """Advance the progress bar per finished round until Flower reports the run finished."""
    shown = 0
    while True:
        status, sub_status = control.run_status(flower_run)
        metrics = folder / METRICS_FILE
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        for record in records[shown:]:
            progress.advance(record)
        shown = max(shown, len(records))
        if status == "finished":
            break
        time.sleep(RUN_POLL_SECONDS)
    if sub_status != "completed" or not (folder / deploy.SUMMARY_FILE).exists():
        error = folder / deploy.ERROR_FILE
        reason = error.read_text().strip() if error.exists() else f"Flower reports the run {sub_status}"
        raise FederationError(f"the run stopped: {reason}; the coordinator's audit log is in {folder / 'audit'}")
