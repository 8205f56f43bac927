"""``fedcost audit``: verify a run's logs, and report what each site sent."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fedcost.audit.folder import verify_folder
from fedcost.audit.report import audit_report, render_report
from fedcost.errors import ConfigError

audit_app = typer.Typer(help="Verify audit logs and report what each site sent.", no_args_is_help=True)

RunFolder = Annotated[
    Path, typer.Argument(help="A run folder (audit/ and identities/), or one folder of *.jsonl and *.pub.json.")
]


class ReportFormat(str, Enum):
    table = "table"
    json = "json"
    html = "html"


@audit_app.command()
def verify(path: RunFolder) -> None:
    """Check every log's chain, signatures and completeness, then reconcile them. Exit 1 on any problem."""
    try:
        result = verify_folder(path)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    for status in result.parties.values():
        line = f"{status.status.upper():16} {status.party} ({status.role or 'unknown role'})"
        typer.echo(line + (f": {status.detail}" if status.status == "ok" else ""))
    for problem in result.problems:
        typer.echo(f"PROBLEM  {problem}")
    if not result.ok:
        typer.echo(f"FAILED: {len(result.problems)} problem(s)")
        raise typer.Exit(1)
    typer.echo("all logs verified and reconciled")


@audit_app.command()
def report(
    path: RunFolder,
    fmt: Annotated[ReportFormat, typer.Option("--format", "-f", help="Output format.")] = ReportFormat.table,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of stdout.")] = None,
) -> None:
    """Per site: rounds joined, messages and bytes sent, output kinds, protections and refusals."""
    try:
        text = render_report(audit_report(path), fmt.value)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {out}")
