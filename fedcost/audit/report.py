"""What each site sent, when and under which protection, from verified logs only."""

from __future__ import annotations

import html
import io
import json
import os
from typing import Any

from rich.console import Console
from rich.table import Table

from fedcost.audit.entry import Entry
from fedcost.audit.folder import PartyStatus, verify_folder
from fedcost.wire.events import Event

FORMATS = ("table", "json", "html")
_COLUMNS = (
    "site",
    "role",
    "status",
    "rounds joined",
    "messages sent",
    "bytes sent",
    "output kinds",
    "protections",
    "refusals",
)


def _bytes(entries: list[Entry]) -> int:
    return sum(size for e in entries if type(size := e.details.get("bytes")) is int)


# Details of the job entries that are not protections: the pinned keys, the plan's digest.
_NOT_PROTECTIONS = frozenset({"key_ids", "plan"})


def _site(status: PartyStatus) -> dict[str, Any]:
    site: dict[str, Any] = {"role": status.role, "status": status.status, "detail": status.detail}
    if status.verification is None:  # nothing here can be trusted, so nothing is summarised
        return site
    entries = status.verification.entries
    sent = [e for e in entries if e.event == Event.MESSAGE_SENT]
    received = [e for e in entries if e.event == Event.MESSAGE_RECEIVED]
    protections: dict[str, Any] = {}
    for e in entries:
        if e.event in (Event.RUN_STARTED, Event.JOB_RECEIVED):
            protections.update({k: v for k, v in e.details.items() if k not in _NOT_PROTECTIONS})
        elif "dp_epsilon_spent" in e.details:  # the budget is spent round by round: keep the latest
            protections["dp_epsilon_spent"] = e.details["dp_epsilon_spent"]
    site.update(
        first_entry=entries[0].time if entries else None,
        last_entry=entries[-1].time if entries else None,
        rounds_joined=sorted({e.round for e in sent if e.round is not None}),
        messages_sent=len(sent),
        bytes_sent=_bytes(sent),
        messages_received=len(received),
        bytes_received=_bytes(received),
        output_kinds=sorted({_family(str(e.details.get("kind"))) for e in sent}),
        message_kinds=sorted({str(e.details.get("kind")) for e in sent}),
        protections=protections,
        refusals=[
            {"seq": e.seq, "time": e.time, "round": e.round, **e.details} for e in entries if e.event == Event.REFUSAL
        ],
    )
    return site


def _family(kind: str) -> str:
    """A message kind without its protocol stage: ``secagg:train:unmask>reply`` → ``secagg:train``.

    What an auditor asks is which kinds of output left (training updates under secure
    aggregation, evaluation sums, ...), not every stage of the protocol that carried them.
    """
    return ":".join(kind.split(">", 1)[0].split(":")[:2])


def audit_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Verify a run folder and summarise, per site, what its verified log shows."""
    folder = verify_folder(path)
    return {
        "path": str(folder.path),
        "ok": folder.ok,
        "problems": [str(p) for p in folder.problems],
        "sites": {party: _site(status) for party, status in folder.parties.items()},
    }


def _cells(party: str, site: dict[str, Any]) -> tuple[str, ...]:
    def refusal(r: dict[str, Any]) -> str:
        return f"round {r['round']}: {r.get('reason', 'no reason given')}"

    return (
        party,
        site["role"] or "?",
        site["status"],
        ", ".join(map(str, site.get("rounds_joined", []))),
        str(site.get("messages_sent", "")),
        str(site.get("bytes_sent", "")),
        ", ".join(site.get("output_kinds", [])),
        ", ".join(f"{k}={v}" for k, v in site.get("protections", {}).items()),
        "; ".join(refusal(r) for r in site.get("refusals", [])),
    )


def _table(report: dict[str, Any]) -> str:
    table = Table(title=f"fedcost audit: {report['path']}")
    for column in _COLUMNS:
        table.add_column(column)
    for party, site in report["sites"].items():
        table.add_row(*_cells(party, site))
    out = io.StringIO()
    console = Console(file=out, width=160, color_system=None, emoji=False)
    console.print(table)
    console.print("verified and reconciled" if report["ok"] else "PROBLEMS:")
    for problem in report["problems"]:
        console.print(f"  {problem}", markup=False, highlight=False)
    return out.getvalue()


def _html(report: dict[str, Any]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in _COLUMNS)
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in _cells(party, site)) + "</tr>"
        for party, site in report["sites"].items()
    )
    problems = "".join(f"<li>{esc(p)}</li>" for p in report["problems"])
    verdict = "Verified and reconciled" if report["ok"] else f"{len(report['problems'])} problem(s)"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>fedcost audit report</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{border:1px solid #999;padding:.3em .6em;text-align:left}th{background:#eee}"
        ".bad{color:#a00}.good{color:#070}</style></head><body>"
        f"<h1>fedcost audit report</h1><p>{esc(report['path'])}</p>"
        f'<p class="{"good" if report["ok"] else "bad"}">{esc(verdict)}</p>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
        + (f'<h2>Problems</h2><ul class="bad">{problems}</ul>' if problems else "")
        + "</body></html>\n"
    )


def render_report(report: dict[str, Any], fmt: str = "table") -> str:
    """Render ``audit_report``'s result as a text table, JSON or a self-contained HTML page."""
    if fmt == "json":
        return json.dumps(report, indent=2, sort_keys=True) + "\n"
    if fmt == "table":
        return _table(report)
    if fmt == "html":
        return _html(report)
    raise ValueError(f"unknown report format {fmt!r}; expected one of {', '.join(FORMATS)}")
