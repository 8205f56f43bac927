"""``fedcost audit``: verify a run's logs, and report what each site sent."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fedcost.audit.authority import TrustedCA
from fedcost.audit.folder import verify_folder
from fedcost.audit.report import audit_report, render_report
from fedcost.errors import ConfigError
from fedcost.identity.federation_ca import utc_now

audit_app = typer.Typer(
    help="Verify audit logs and report what each site sent.", no_args_is_help=True, pretty_exceptions_show_locals=False
)

RunFolder = Annotated[
    Path, typer.Argument(help="A run folder (audit/ and identities/), or one folder of *.jsonl and *.pub.json.")
]
CaFile = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        metavar="CA_CERT_PEM",
        help="The federation's CA certificate (its ca/ca.cert.pem): every party's key must match a certificate "
        "it issued, identities/<party>.cert.pem. Without it, keys are pinned only by the other parties' logs.",
    ),
]
FederationDir = Annotated[
    Path | None,
    typer.Option(
        "--federation",
        "-f",
        metavar="DIR",
        help="A federation folder: as --ca with DIR/ca/ca.cert.pem, certificates also from DIR/nodes/*/node.cert.pem "
        "and DIR/coordinator/coordinator.cert.pem, and revocations from DIR/ca/revoked.crl.pem.",
    ),
]


class ReportFormat(str, Enum):
    table = "table"
    json = "json"
    html = "html"


def _trust(ca: Path | None, federation: Path | None) -> TrustedCA | None:
    """The CA that pins the parties' keys, from --ca or --federation; a bad option is a ``ConfigError``."""
    if ca is not None and federation is not None:
        raise ConfigError("give --ca or --federation, not both (a federation folder brings its own CA)")
    if federation is not None:
        from fedcost.federation.provision import Federation  # deployment, above the audit core

        return Federation.load(Path(federation)).trusted_ca(at=utc_now())
    return None if ca is None else TrustedCA.from_file(ca)


@audit_app.command()
def verify(path: RunFolder, ca: CaFile = None, federation: FederationDir = None) -> None:
    """Check every log's chain, signatures and completeness, pin every party's key, then reconcile the logs.

    Exit 1 on any problem, 2 on a bad --ca or --federation.
    """
    try:
        trust = _trust(ca, federation)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    try:
        result = verify_folder(path, trust=trust)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    for status in result.parties.values():
        line = f"{status.status.upper():16} {status.party} ({status.role or 'unknown role'})"
        typer.echo(line + (f": {status.detail}" if status.status == "ok" else ""))
    for problem in result.problems:
        typer.echo(f"PROBLEM  {problem}")
    for note in result.notes:
        typer.echo(f"NOTE     {note}")
    if not result.ok:
        typer.echo(f"FAILED: {len(result.problems)} problem(s)")
        raise typer.Exit(1)
    typer.echo("all logs verified and reconciled")


@audit_app.command()
def report(
    path: RunFolder,
    fmt: Annotated[ReportFormat, typer.Option("--format", help="Output format.")] = ReportFormat.table,
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
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        typer.echo(f"error: {out}, field '--out': cannot write it ({e.strerror}); give a file path", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {out}")
