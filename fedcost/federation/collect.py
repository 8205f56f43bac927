"""``fedcost federation collect``: the sites' audit logs and own reports into a run folder.

After a run each site sends the operator two things from its node's state folder, in
that folder's layout: ``audit/<run-id>/<site>.jsonl`` (its signed log of the run) and
``reports/<run-id>.json`` (its own report: rows, ε spent, the final model on its
held-out rows as far as its policy shares them). ``collect`` copies each log next to the
coordinator's (``runs/<run-id>/audit/``), adds each report to ``summary.json`` and
``report.html``, and verifies every log against the federation's CA, so that
``fedcost audit verify runs/<run-id> --federation DIR`` is all an auditor runs next.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fedcost.atomic import replace_atomically
from fedcost.audit import verify_folder
from fedcost.errors import ConfigError
from fedcost.federation.provision import Federation
from fedcost.federation.site_report import FOLDER as REPORTS
from fedcost.federation.site_report import read_report
from fedcost.identity.federation_ca import utc_now
from fedcost.report import write_report
from fedcost.run_folder import RunFolder
from fedcost.wire import COORDINATOR


@dataclass
class Collected:
    """What ``collect`` found: the logs and reports it added, and the audit verdict."""

    logs: list[str] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)
    verified: bool = False
    problems: list[str] = field(default_factory=list)


def collect(federation: Federation, run_id: str, sources: list[Path]) -> Collected:
    """Copy each source's log and report of ``run_id`` into the run folder; verify every log."""
    run = RunFolder(federation.runs_dir / run_id)
    if not run.summary.is_file() and not run.audit.is_dir():
        raise ConfigError("no such run in this federation (no audit/ or summary.json)", path=str(run.path))
    members = {p.name.removesuffix(".pub.json") for p in run.identities.glob("*.pub.json")} - {COORDINATOR}
    collected = Collected()
    reports = []
    for source in sources:
        logs = sorted((source / "audit" / run_id).glob("*.jsonl"))
        report = source / REPORTS / f"{run_id}.json"
        if not logs and not report.exists():
            raise ConfigError(
                f"holds neither audit/{run_id}/<site>.jsonl nor {REPORTS}/{run_id}.json: give the "
                "site's node state folder (or a copy with that layout)",
                path=str(source),
            )
        for log in logs:
            site = log.stem
            if site not in members:
                raise ConfigError(
                    f"is the log of {site!r}, not a node of run {run_id} ({', '.join(sorted(members))})", path=str(log)
                )
            shutil.copyfile(log, run.audit / log.name)
            collected.logs.append(site)
        if report.exists():
            content = read_report(report)
            if content["run_id"] != run_id or content["site"] not in members:
                raise ConfigError(
                    f"is {content['site']!r}'s report of run {content['run_id']!r}, not one of this run's sites",
                    path=str(report),
                )
            if content["site"] not in {log.stem for log in logs}:  # a report is unsigned: its log vouches for it
                raise ConfigError(
                    f"is {content['site']!r}'s report, but the folder holds no audit/{run_id}/{content['site']}.jsonl "
                    "beside it: a site's report is taken only with that site's own signed log, from its state folder",
                    path=str(report),
                )
            reports.append(content)
            collected.reports.append(content["site"])
    trust = federation.trusted_ca(at=utc_now())
    verification = verify_folder(run.path, trust=trust)
    collected.verified = verification.ok
    collected.problems = [str(p) for p in verification.problems]
    if run.summary.is_file():
        summary = json.loads(run.summary.read_text())
        add_reports(summary, reports)
        summary["audit"] = {
            "verified": verification.ok,
            "parties": sorted(verification.parties),
            "checked_against": "the federation's CA",
        }
        replace_atomically(run.summary, json.dumps(summary, indent=2).encode())
        rounds = [json.loads(line) for line in run.metrics.read_text().splitlines() if line.strip()]
        write_report(run.path, summary, rounds)
    return collected


def add_reports(summary: dict, reports: list[dict]) -> None:
    """Each site's own figures into a federation summary: rows, privacy and per-site metrics."""
    nodes = {node["name"]: node for node in summary["nodes"]}
    for report in reports:
        site = report["site"]
        nodes[site].update(train_rows=report["train_rows"], test_rows=report["test_rows"])
        summary["privacy"][site] = report["privacy"]
        summary["per_site"][site] = {
            "role": report["role"],
            **{task: {"federated": figures} for task, figures in report["held_out"].items()},
        }
    summary["sites_reported"] = sorted(set(summary.get("sites_reported", [])) | {r["site"] for r in reports})
    if all("test_rows" in node for node in nodes.values()):
        summary["test_rows"] = sum(node["test_rows"] for node in nodes.values())
