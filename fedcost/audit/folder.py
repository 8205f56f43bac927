"""Verifying a whole run: each party's log against its identity, each identity against the
other parties' logs (and the federation's CA), then the logs against each other."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedcost.audit.authority import CERTIFICATE_SUFFIX, TrustedCA, short
from fedcost.audit.log import LogVerification, verify_chain, verify_log
from fedcost.audit.pins import Pins
from fedcost.audit.reconcile import Problem, reconcile, withdrawals
from fedcost.errors import AuditLogTamperedError, CertificateError, ConfigError
from fedcost.identity import PublicIdentity
from fedcost.run_folder import RunFolder

LOG_SUFFIX = ".jsonl"
IDENTITY_SUFFIX = ".pub.json"
# The statuses of a log that verified, as far as it was written: an "unclosed" one ends
# whole but without run_closed, which only a withdrawal explains (``reconcile.withdrawals``).
VERIFIED = ("ok", "cut", "unclosed")


_UNCLOSED = (
    " (a site's log may end so only where the federation's CA revoked it (verify with --federation) and "
    "the coordinator logged it dropped after their last shared message)"
)


@dataclass(frozen=True)
class PartyStatus:
    """How one party fared: "ok", "cut", "unclosed", "tampered", a missing or bad file, or a key
    not pinned; ``revoked``: the federation's CA revoked its certificate after its log ended, or
    while an unclosed log ran (``TrustedCA.in_force``)."""

    party: str
    role: str | None
    status: str
    detail: str
    verification: LogVerification | None = None
    identity: PublicIdentity | None = None
    revoked: bool = False


@dataclass(frozen=True)
class FolderVerification:
    """Per-party statuses, every problem found, and notes that fail nothing; ``ok`` only without problems."""

    path: Path
    parties: dict[str, PartyStatus]
    problems: list[Problem]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _Layout:
    """Where a run folder keeps each party's files, and their names as the auditor sees them."""

    root: Path
    logs: Path
    identities: Path

    @classmethod
    def of(cls, root: Path) -> _Layout:
        """A run folder (``audit/`` and ``identities/``) or one folder holding both."""
        run = RunFolder(root)
        logs = run.audit if run.audit.is_dir() else root
        return cls(root, logs, run.identities if run.identities.is_dir() else logs)

    def parties(self) -> set[str]:
        """Every party with a log or an identity file here."""
        return {p.name.removesuffix(LOG_SUFFIX) for p in self.logs.glob(f"*{LOG_SUFFIX}")} | {
            p.name.removesuffix(IDENTITY_SUFFIX) for p in self.identities.glob(f"*{IDENTITY_SUFFIX}")
        }

    def log(self, party: str) -> Path:
        return self.logs / f"{party}{LOG_SUFFIX}"

    def identity(self, party: str) -> Path:
        return self.identities / f"{party}{IDENTITY_SUFFIX}"

    def certificate(self, party: str) -> Path:
        return self.identities / f"{party}{CERTIFICATE_SUFFIX}"

    def shown(self, path: Path) -> str:
        """``identities/hospital-1.pub.json`` rather than the whole path; a file elsewhere in full."""
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)


def _check_party(party: str, layout: _Layout, trust: TrustedCA | None) -> tuple[PartyStatus, str | None]:
    """Checks (1)-(5) of ``verify_folder`` for one party, up to the first that fails; and a note, if any."""
    identity_file, log = layout.identity(party), layout.log(party)
    # (1) an identity file that loads and names the party.
    if not identity_file.exists():
        return PartyStatus(
            party, None, "missing identity", f"no {party}{IDENTITY_SUFFIX}: the log cannot be attributed to anyone"
        ), None
    try:
        identity = PublicIdentity.load(identity_file)
    except ConfigError as e:
        return PartyStatus(party, None, "bad identity", str(e)), None
    if identity.name != party:
        return PartyStatus(
            party, identity.role, "bad identity", f"{identity_file} holds the identity of {identity.name!r}"
        ), None
    # (2) with a CA: a certificate it issued binds the party's name, role and key.
    certified = None
    if trust is not None:
        try:
            certified = trust.certify(
                identity, identity_file=identity_file, run_copy=layout.certificate(party), shown=layout.shown
            )
        except CertificateError as e:
            return PartyStatus(party, identity.role, "uncertified", str(e), identity=identity), None
    # (3) a log.
    if not log.exists():
        return PartyStatus(party, identity.role, "missing log", f"no {party}{LOG_SUFFIX}", identity=identity), None
    # (4) the log is the identity's own, unedited and complete (verify_log's checklist); one
    # that is all of that but not closed is "unclosed", for reconciliation to explain or not.
    try:
        result = verify_log(log, identity)
        status, detail = "ok" if result.ok else "cut", result.describe()
    except AuditLogTamperedError as e:
        try:
            result, status, detail = verify_chain(log, identity), "unclosed", str(e)
        except AuditLogTamperedError:
            return PartyStatus(party, identity.role, "tampered", str(e), identity=identity), None
    except OSError as e:
        return PartyStatus(
            party,
            identity.role,
            "unreadable log",
            f"{layout.shown(log)} cannot be read ({e.strerror})",
            identity=identity,
        ), None
    # (5) with a CA: the certificate was in force while the log was written; for an unclosed
    # log, up to its last signature (what follows it, no key vouches for).
    note = None
    if trust is not None and certified is not None and result.entries:
        certificate, shown = certified
        last = result.entries[-1]
        if status == "unclosed":
            last = next((e for e in result.entries if e.seq == result.signed_through), result.entries[0])
        try:
            withdrawn = status == "unclosed"
            note = trust.in_force(certificate, shown, party, result.entries[0].time, last.time, withdrawn=withdrawn)
        except CertificateError as e:
            return PartyStatus(party, identity.role, "uncertified", str(e), identity=identity), None
    # in_force notes a revocation (after the log's last entry, or during an unclosed one), and nothing else.
    return PartyStatus(party, identity.role, status, detail, result, identity, revoked=note is not None), note


def _pin(parties: dict[str, PartyStatus], pins: Pins, layout: _Layout, *, certified: bool) -> dict[str, PartyStatus]:
    """Checks (6)-(8) of ``verify_folder``: each party's key against what the others recorded for it."""
    checked = dict(parties)
    for party, status in parties.items():
        if status.status not in VERIFIED or status.identity is None:
            continue
        key_id, shown = status.identity.key_id, layout.shown(layout.identity(party))
        # (6) every key id the others recorded is the identity's.
        if pins.disputes(party, key_id):
            recorded = pins.describe(party, besides=key_id)
            detail = (
                f"{shown} has key id {short(key_id)}, certified by the federation's CA; {recorded}: they ran "
                f"with a key the CA did not certify for {party} (a substituted key), or their logs are wrong"
                if certified
                else f"{shown} has key id {short(key_id)}; {recorded}: the identity file (or the log it verifies) "
                "was replaced, or they ran with a substituted key; verify with --ca to tell which"
            )
            checked[party] = replace(status, status="key disputed", detail=detail)
        # (7) without a CA, once the run records key ids, someone else pinned this one.
        elif pins.recorders and not certified and party not in pins.recorded:
            checked[party] = replace(
                status,
                status="key unpinned",
                detail=(
                    f"{party}'s key is pinned by no other party's log; its identity is trusted only from this folder "
                    f"({shown}): verify with --ca, or collect the logs of the parties that ran with it"
                ),
            )
    # (8) every pinned party is here.
    for party in pins.recorded.keys() - parties.keys():
        checked[party] = PartyStatus(
            party,
            None,
            "missing party",
            (
                f"{pins.describe(party)}, but this folder has neither {layout.shown(layout.log(party))} nor "
                f"{layout.shown(layout.identity(party))}: collect both from {party}"
            ),
        )
    return dict(sorted(checked.items()))


def verify_folder(path: str | os.PathLike[str], *, trust: TrustedCA | None = None) -> FolderVerification:
    """Verify every party's log and identity, pin each identity, then reconcile the logs.

    Accepts a run folder (``audit/<party>.jsonl`` and ``identities/<party>.pub.json``) or one
    folder holding both. Each party in the folder passes, in order, up to the first that fails:
    (1) its identity file loads and names it (a log without one is attributed to no one);
    (2) with ``trust`` (``--ca`` or ``--federation``): a certificate that CA issued binds the
        party's name, role and key (``identities/<party>.cert.pem``, else the federation's);
    (3) it has a log (a deleted log is as suspect as an edited one);
    (4) the log verifies against the identity (``verify_log``); one cut by an interrupted
        write verifies up to its last whole entry; one whole but not closed is "unclosed",
        which fails the folder unless the site was withdrawn (``reconcile.withdrawals``);
    (5) with ``trust``: the certificate was in force from the log's first entry to its last.
    Then, from the logs that verified (``Pins``), the identity files must agree with what
    the other parties held at the start of the run:
    (6) every key id another party's log recorded for a party is its identity's;
    (7) without ``trust``, every party is pinned by another party's log. Logs from before
        the bindings recorded key ids (no log of the run records any) are not held to it,
        and a note says their keys are trusted from the folder only;
    (8) every party a log pinned has its log and identity in the folder.
    (9) Finally the verified logs are reconciled with each other (``reconcile``).

    Limit: without ``trust``, a forger who rewrites every log and identity of a run with
    fresh keys, key ids included, passes (6)-(8); only a CA the folder cannot rewrite (2)
    stops that.
    """
    root = Path(path)
    layout = _Layout.of(root)
    names = layout.parties()
    if not names:
        raise ConfigError(f"no audit logs (*{LOG_SUFFIX}) or identities (*{IDENTITY_SUFFIX}) found", path=str(root))
    checked = {party: _check_party(party, layout, trust) for party in sorted(names)}
    statuses = {party: status for party, (status, _) in checked.items()}
    coordinators = {party for party, s in statuses.items() if s.role == "coordinator" and s.status == "ok"}
    revoked = {party for party, s in statuses.items() if s.revoked}
    withdrawn = withdrawals(
        {party: s.verification.entries for party, s in statuses.items() if s.verification},
        coordinators=coordinators,
        revoked=revoked,
    )
    # An unclosed log no withdrawal explains is as suspect as a truncated one: it pins and reconciles nothing.
    statuses = {
        party: replace(s, status="tampered", detail=s.detail + _UNCLOSED, verification=None)
        if s.status == "unclosed" and party not in withdrawn
        else s
        for party, s in statuses.items()
    }
    verified = {party: s.verification.entries for party, s in statuses.items() if s.verification}
    pins = Pins.from_logs(verified)
    parties = _pin(statuses, pins, layout, certified=trust is not None)
    problems = [
        Problem(s.party, None, f"{s.status.upper()}: {s.detail}")
        for s in parties.values()
        if s.status not in ("ok", "unclosed")
    ]
    problems += pins.problems
    problems += reconcile(verified, coordinators=coordinators, revoked=revoked)
    notes = [note for _, note in checked.values() if note] + [str(w) for w in withdrawn.values()]
    if trust is not None and trust.note:
        notes.append(trust.note)
    if trust is None and verified and not pins.recorders:
        notes.append(
            "no log records the key ids its party held for the others (logs from before fedcost recorded "
            "them), so every key is trusted from this folder only; verify with --ca or --federation to "
            "pin the keys to the federation's CA"
        )
    return FolderVerification(root, parties, problems, notes)
