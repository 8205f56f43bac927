"""``fedcost federation | coordinator | node | run``: a real federation from the command line.

The operator provisions (``federation init``, ``add-node``, ``revoke``), starts the
coordinator, submits jobs and collects the sites' logs and reports afterwards
(``federation collect``); each site starts its node from its startup kit. The folder a
command creates (``init``) or a site's kit is its argument; the federation a command works
in is ``--federation``/``-f`` (default: the current folder), in every command. Provisioning
imports neither torch nor Flower's runtime: those load only for the commands that run.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fedcost.errors import ConfigError, FedcostError
from fedcost.federation import site_ledger
from fedcost.federation.provision import NODE_ROLES, Federation, FederationConfig, fleet_address
from fedcost.identity.federation_ca import utc_now
from fedcost.run_folder import RunFolder, new_run_id
from fedcost.terminal import console, fail, say

federation_app = typer.Typer(help="Provision a federation: CA, coordinator, node startup kits.", no_args_is_help=True)
coordinator_app = typer.Typer(help="Run the federation's coordinator (Flower SuperLink).", no_args_is_help=True)
node_app = typer.Typer(help="Run a site's node from its startup kit.", no_args_is_help=True)

FederationDir = Annotated[
    Path,
    typer.Option(
        "--federation", "-f", help="The federation folder (made by `fedcost federation init`); default: this folder."
    ),
]
KitDir = Annotated[Path, typer.Argument(help="The site's startup kit folder.")]
_COORDINATOR_LINE = re.compile(r'^coordinator\s*=\s*"[^"\n]*"', re.MULTILINE)


@federation_app.command("init")
def init(
    name: Annotated[Path, typer.Argument(help="The federation folder to create; its name names the federation.")],
    address: Annotated[
        str, typer.Option(help="HOST:PORT where the coordinator is reached (nodes: PORT + 1).")
    ] = "127.0.0.1:9093",
    bind_host: Annotated[str, typer.Option(help="Interface the coordinator listens on (0.0.0.0: all).")] = "127.0.0.1",
    cert_days: Annotated[float, typer.Option(help="Lifetime of issued certificates, in days.")] = 365.0,
) -> None:
    """Create a federation folder: root CA, coordinator TLS certificate and identity, federation.toml."""
    try:
        config = FederationConfig(name.name, address, bind_host, cert_days)
    except ValueError as error:
        raise fail(ConfigError(str(error), field="address")) from None
    try:
        federation = Federation.init(name, config, at=utc_now())
    except FedcostError as error:
        raise fail(error) from None
    coordinator = federation.coordinator_identity().public()
    console.print(
        f"federation [bold]{config.name}[/bold] in {name}; coordinator at {address} "
        f"(nodes connect to {fleet_address(address)})"
    )
    console.print(f"coordinator key id (sites put it in their policy): {coordinator.key_id}")


@federation_app.command("add-node")
def add_node(
    name: Annotated[str, typer.Argument(help="The site's name, as in its data mapping.")],
    role: Annotated[str, typer.Option(help=f"One of {', '.join(NODE_ROLES)}.")],
    federation_dir: FederationDir = Path("."),
    days: Annotated[float | None, typer.Option(help="Certificate lifetime in days (default: federation.toml).")] = None,
) -> None:
    """Enrol a node and write its startup kit (kits/NAME): hand the kit to the site, then delete it here."""
    try:
        kit = Federation.load(federation_dir).add_node(name, role, at=utc_now(), days=days)
    except FedcostError as error:
        raise fail(error) from None
    console.print(f"enrolled {name} ({role}); startup kit: [bold]{kit}[/bold]")


@federation_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="The enrolled node to revoke.")],
    federation_dir: FederationDir = Path("."),
) -> None:
    """Revoke a node's certificate; a running coordinator drops it within seconds."""
    try:
        Federation.load(federation_dir).revoke(name, at=utc_now())
    except FedcostError as error:
        raise fail(error) from None
    console.print(f"revoked {name}; a running coordinator drops it within seconds")


# The forms from before -f (`coordinator start DIR`, `run DIR [JOB]`) still work: the folder
# arrives as an extra argument, left out of the usage line.
OLD_FORMS = {"allow_extra_args": True}


def _old_form(ctx: typer.Context, most: int) -> list[Path]:
    if len(ctx.args) > most:
        raise ConfigError(f"unexpected argument(s): {' '.join(ctx.args[most:])}; see --help", field="arguments")
    return [Path(arg) for arg in ctx.args]


@coordinator_app.command("start", context_settings=OLD_FORMS)
def coordinator_start(ctx: typer.Context, federation_dir: FederationDir = Path(".")) -> None:
    """Start the coordinator: TLS, SuperNode authentication, only enrolled, unrevoked nodes."""
    from fedcost.federation import processes

    try:
        federation = Federation.load(next(iter(_old_form(ctx, 1)), federation_dir))
        code = processes.run_coordinator(
            federation,
            echo=sys.stdout,
            on_ready=lambda: console.print(f"coordinator ready; log: {federation.log_file}"),
        )
    except FedcostError as error:
        raise fail(error) from None
    raise typer.Exit(code=code)


@node_app.command("start")
def node_start(
    kit: KitDir,
    data: Annotated[
        Path, typer.Option(help="The site's data file (CSV or Parquet), or its OMOP CDM extract's folder.")
    ],
    mapping: Annotated[Path, typer.Option(help="The mapping file with a \\[nodes.<name>] table for this site.")],
    policy: Annotated[Path | None, typer.Option(help="The site policy (TOML); default: the permissive one.")] = None,
    state: Annotated[
        Path | None, typer.Option(help="Folder for the node's audit log and state (default: KIT/state).")
    ] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the site's own train/held-out split.")] = 7,
    test_fraction: Annotated[float, typer.Option(help="Share of the site's rows held out for evaluation.")] = 0.2,
) -> None:
    """Check the kit, policy and data, then serve the site's node in this process until stopped."""
    from fedcost.federation.provision import Kit

    state = state or kit / "state"
    try:
        Kit.load(kit)  # a wrong kit folder is named before anything is written
        state.mkdir(parents=True, exist_ok=True)
        with site_ledger.holding(state):
            code = _serve_node(kit, data, mapping, policy, state, split_seed, test_fraction)
    except FedcostError as error:
        raise fail(error) from None
    raise typer.Exit(code=code)


def _serve_node(
    kit: Path, data: Path, mapping: Path, policy: Path | None, state: Path, split_seed: int, test_fraction: float
) -> int:
    """``node start`` once the state folder is held: check, then serve until stopped."""
    from fedcost.federation import processes

    checked = processes.prepare_node(
        kit,
        data=data,
        mapping=mapping,
        policy=policy,
        state=state,
        split_seed=split_seed,
        test_fraction=test_fraction,
        at=utc_now(),
    )
    console.print(
        f"kit, policy and data of {checked.name} checked; connecting to {fleet_address(checked.address)} "
        f"(log: {state / 'node.log'})",
        soft_wrap=True,
        highlight=False,
    )
    return processes.run_node(
        checked, state=state, policy=policy, split_seed=split_seed, test_fraction=test_fraction, say=say
    )


StateDir = Annotated[Path | None, typer.Option(help="The node's state folder (default: KIT/state).")]
Reason = Annotated[str, typer.Option(help="Why, in words: signed into the site's ledger.")]


@node_app.command("close-run")
def node_close_run(
    kit: KitDir,
    run: Annotated[str, typer.Argument(help="The run id to close at this site.")],
    reason: Reason,
    state: StateDir = None,
) -> None:
    """Close a run that will not come back (node stopped): frees the DP budget it held."""
    from fedcost.federation.provision import Kit

    try:
        closed = site_ledger.close_run(Kit.load(kit), state or kit / "state", run, reason=reason)
    except FedcostError as error:
        raise fail(error) from None
    say(f"run {run} {'closed at this site' if closed else 'was already closed at this site'}")


@node_app.command("ledger-reset")
def node_ledger_reset(
    kit: KitDir,
    reason: Reason,
    state: StateDir = None,
) -> None:
    """Start the release ledger anew after it was lost or failed its check (node stopped)."""
    from fedcost.federation.provision import Kit

    try:
        kept = site_ledger.start_ledger_anew(Kit.load(kit), state or kit / "state", reason=reason)
    except FedcostError as error:
        raise fail(error) from None
    say(f"started a new release ledger{f'; the old one is kept as {kept}' if kept else ''}")


@node_app.command("policy")
def node_policy(
    kit: KitDir,
    template: Annotated[Path, typer.Argument(help="A policy to start from, e.g. configs/policies/hospital.toml.")],
    out: Annotated[Path, typer.Argument(help="The site's policy file to write.")],
) -> None:
    """Write the site's policy: the template, trusting the coordinator its kit names."""
    from fedcost.federation.provision import Kit
    from fedcost.privacy import SitePolicy

    try:
        checked = Kit.load(kit)
        text = template.read_text(encoding="utf-8") if template.is_file() else None
        if text is None or not _COORDINATOR_LINE.search(text):
            raise ConfigError('not a policy file with a `coordinator = "..."` line', path=str(template))
        if out.exists():
            raise ConfigError("exists; choose another file or remove it", path=str(out))
        out.write_text(
            _COORDINATOR_LINE.sub(f'coordinator = "{checked.coordinator.key_id}"', text, count=1), encoding="utf-8"
        )
        SitePolicy.load(out)
    except FedcostError as error:
        raise fail(error) from None
    console.print(
        f"wrote {out}: {template.name} trusting coordinator {checked.coordinator.key_id[:16]}… of "
        f"federation {checked.federation}; review the rest before starting the node",
        soft_wrap=True,
    )


def run(
    ctx: typer.Context,
    job: Annotated[
        Path | None,
        typer.Argument(
            help="The job (TOML): \\[run], \\[model], \\[training], "
            "\\[strategy], \\[secure_aggregation], \\[analytics], "
            "\\[data]; configs/job.toml is one."
        ),
    ] = None,
    federation_dir: FederationDir = Path("."),
    resume: Annotated[str | None, typer.Option(help="Resume this run id from its checkpoint.")] = None,
) -> None:
    """Submit a job to the running coordinator and follow it; outputs in FEDERATION/runs/<run-id>/."""
    from fedcost.federation.follow import Follower, submit_and_follow
    from fedcost.federation.job import FederationJob
    from fedcost.terminal import RoundProgress

    try:
        old_job = _old_form(ctx, 1)
        if old_job or (job is not None and job.is_dir()):  # `fedcost run DIR [JOB]`
            federation_dir, job = job, next(iter(old_job), None)
        federation = Federation.load(federation_dir)
        run = _run_folder(federation, job, resume)
        rounds = FederationJob.load(run.job).config.run.rounds
        with RoundProgress(rounds) as progress:
            progress.start()
            submit_and_follow(federation, run.path, Follower(progress.advance, progress.stage, progress.say))
    except FedcostError as error:
        raise fail(error) from None
    summary = json.loads(run.summary.read_text())
    console.print(f"run folder: [bold]{run.path}[/bold] (report: {run.report})", soft_wrap=True)
    console.print(
        f"sites' logs and reports: fedcost federation collect {run.run_id} SITE_STATE... -f {federation_dir}",
        soft_wrap=True,
        highlight=False,
        markup=False,
    )
    console.print(federation_table(summary))


def federation_table(summary: dict) -> Table:
    """The federated model's metrics on every site's held-out rows: how a federation run ends."""
    from fedcost.report.html import federation_rows, format_value, left_out_note

    last = summary.get("federated_evaluation", {})
    caption = "; ".join(filter(None, (_covers(summary), left_out_note(summary))))
    table = Table(title=f"Federated model after round {last.get('round', '?')}", min_width=60, caption=caption)
    for head in ("task", "metric", "federated"):
        table.add_column(head, justify="right" if head == "federated" else "left")
    for task, metric, value in federation_rows(summary):
        table.add_row(task, metric, format_value(value))
    return table


def _covers(summary: dict) -> str:
    """What the federated figures are over: the held-out rows and sites in the last round's
    evaluation sum, and the sites that withheld theirs, or why there are none."""
    last = summary.get("federated_evaluation", {})
    if "evaluation_withheld" in last:
        return f"no federated figures: {last['evaluation_withheld']}"
    sites, withheld = last.get("evaluated_sites", []), sorted(last.get("withheld", {}))
    shown = "the held-out rows"
    if "evaluated_rows" in last:
        shown = f"{last['evaluated_rows']:,} held-out rows at {len(sites)} of {len(summary['nodes'])} sites"
    return (
        f"from the summed evaluation sums of {shown}"
        + (f" ({', '.join(withheld)} withheld theirs)" if withheld else "")
        + "; no party holds the rows a pooled or local-only model needs"
    )


@federation_app.command("collect")
def collect(
    run_id: Annotated[str, typer.Argument(help="The run id (its folder under runs/).")],
    sources: Annotated[
        list[Path],
        typer.Argument(
            help="Each site's node state folder, or a copy of its audit/<run-id>/ and reports/<run-id>.json."
        ),
    ],
    federation_dir: FederationDir = Path("."),
) -> None:
    """Put the sites' audit logs and own reports into a run folder and verify every log."""
    from fedcost.federation.collect import collect as collect_run

    try:
        federation = Federation.load(federation_dir)
        collected = collect_run(federation, run_id, sources)
    except FedcostError as error:
        raise fail(error) from None
    folder = federation.runs_dir / run_id
    console.print(
        f"collected {len(collected.logs)} site log(s) and {len(collected.reports)} site report(s) into {folder}",
        soft_wrap=True,
    )
    if collected.verified:
        console.print(
            f"every log verified and reconciled against the federation's CA; an auditor runs: "
            f"fedcost audit verify {folder} --federation {federation_dir}",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
        return
    for problem in collected.problems[:10]:
        console.print(f"[red]problem:[/red] {escape(problem)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=1)


def _run_folder(federation: Federation, job: Path | None, resume: str | None) -> RunFolder:
    """A new run folder holding the validated job, or the existing one to resume."""
    from fedcost.federation.job import FederationJob

    if (job is None) == (resume is None):
        raise ConfigError("give either a job file or --resume RUN_ID")
    if resume is not None:
        run = RunFolder(federation.runs_dir / resume)
        if not run.job.is_file():
            raise ConfigError("no such run (no job.toml) to resume", path=str(run.path))
        return run
    assert job is not None
    checked = FederationJob.load(job)
    run = RunFolder(federation.runs_dir / new_run_id())
    run.path.mkdir(parents=True)
    run.job.write_bytes(checked.to_toml())
    return run
