"""Verifying a whole run: every party's log against its identity, then against each other."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedcost.audit.log import LogVerification, verify_log
from fedcost.audit.reconcile import Problem, reconcile
from fedcost.errors import AuditLogTamperedError, ConfigError
from fedcost.identity import PublicIdentity

LOG_SUFFIX = ".jsonl"
IDENTITY_SUFFIX = ".pub.json"


@dataclass(frozen=True)
class PartyStatus:
    """How one party's log fared: "ok", "cut", "tampered", or a missing or bad file."""

    party: str
    role: str | None
    status: str
    detail: str
    verification: LogVerification | None = None


@dataclass(frozen=True)
class FolderVerification:
    """Per-party statuses and every problem found; ``ok`` only when there is none."""

    path: Path
    parties: dict[str, PartyStatus]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


def _files(folder: Path, suffix: str) -> dict[str, Path]:
    return {p.name.removesuffix(suffix): p for p in sorted(folder.glob(f"*{suffix}"))}


def _check_party(party: str, log: Path | None, identity_file: Path | None) -> PartyStatus:
    if identity_file is None:
        return PartyStatus(party, None, "missing identity", f"no {party}{IDENTITY_SUFFIX}: "
                           "the log cannot be attributed to anyone")
    try:
        identity = PublicIdentity.load(identity_file)
    except ConfigError as e:
        return PartyStatus(party, None, "bad identity", str(e))
    if identity.name != party:
        return PartyStatus(party, identity.role, "bad identity",
                           f"{identity_file} holds the identity of {identity.name!r}")
    if log is None:
        return PartyStatus(party, identity.role, "missing log", f"no {party}{LOG_SUFFIX}")
    try:
        result = verify_log(log, identity)
    except AuditLogTamperedError as e:
        return PartyStatus(party, identity.role, "tampered", str(e))
    return PartyStatus(party, identity.role, "ok" if result.ok else "cut", result.describe(), result)


def verify_folder(path: str | os.PathLike[str]) -> FolderVerification:
    """Verify every party's log (chain, signatures, completeness), then reconcile them.

    Accepts a run folder (``audit/<party>.jsonl`` and ``identities/<party>.pub.json``) or
    one folder holding both. Every identity needs its log and every log its identity:
    a deleted log is as suspect as an edited one. Logs that verify, or verify up to an
    interrupted write, are reconciled with each other.
    """
    root = Path(path)
    logs_dir = root / "audit" if (root / "audit").is_dir() else root
    ids_dir = root / "identities" if (root / "identities").is_dir() else logs_dir
    logs, ids = _files(logs_dir, LOG_SUFFIX), _files(ids_dir, IDENTITY_SUFFIX)
    if not logs and not ids:
        raise ConfigError(f"no audit logs (*{LOG_SUFFIX}) or identities (*{IDENTITY_SUFFIX}) found",
                          path=str(root))
    parties = {party: _check_party(party, logs.get(party), ids.get(party)) for party in sorted(logs | ids)}
    problems = [Problem(s.party, None, f"{s.status.upper()}: {s.detail}")
                for s in parties.values() if s.status != "ok"]
    problems += reconcile({s.party: s.verification.entries for s in parties.values() if s.verification})
    return FolderVerification(root, parties, problems)
