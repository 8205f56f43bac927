"""A site's release ledger: everything the site let leave, kept across jobs, failing closed.

The node consults it before every reply and writes to it before the reply leaves:

- the plan of every job it accepted, by digest: a restarted run must restate the same plan;
- every reply (run, purpose, round, secure-sum label, stage): a request it has already
  answered is refused, so a replayed exchange gets nothing;
- for every input it let be unmasked, the sites of that sum. An input is one release key:
  the same fixed data (feature statistics, a statistics table) in any job, one round's
  training update or evaluation in a job. The site lets one input be summed again only
  over sets of sites such that no combination of those sums isolates fewer than
  ``minimum`` sites (``isolated_sites``): the same set again is harmless, a set that
  differs by one site is not (it would hand the coordinator that site's input);
- every grouped-statistics table it released with the cells it withheld, so that a later
  plan is suppressed against them;
- its privacy spending: the budget has no other record. A spend that repeats every round
  (a DP-SGD round, a noisy Newton sum) states how many more rounds of it its run has
  planned; until the run closes here, those rounds are held for it, so a run that started
  later prices its own rounds on what is left after them (``held``), not on budget that an
  open run will spend.

The ledger is a log in the audit format, owned by the site's identity: hash-chained, with
a signed, fsynced checkpoint after every entry that matters, so an edit, a reordering or
a forged entry fails its check. A ledger cut short or deleted is caught by the anchors
in the site's own audit logs: each ``dp_round`` entry names the ledger position its spend
was recorded at. Any of these fails closed (``LedgerError``): nothing leaves the site
until it restores the ledger from a backup or starts a new one with ``reset``, an
explicit, signed site action. A site that deletes its ledger *and* every audit log that
anchors it has lost the record; that is the limit.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedcost.audit import AuditLog, Entry, LogPosition, read_log, verify_chain
from fedcost.audit.log import ends_at
from fedcost.errors import AuditLogTamperedError, LedgerError, PolicyViolationError
from fedcost.identity import Identity, PublicIdentity
from fedcost.wire.events import Event, LedgerEvent

_refusal = PolicyViolationError.request_refused

SUFFIX = ".ledger"
# Where an audit log's dp_round entry anchors its spend in the ledger.
ANCHOR_SEQ, ANCHOR_HEAD = "ledger_seq", "ledger_head"
_WHAT_TO_DO = (
    "Nothing leaves this site until this is resolved: restore the ledger from a backup, or, if you accept "
    "that what it recorded is lost, start a new one with `fedcost node ledger-reset` (a signed entry that "
    "records your reason)."
)


def isolated_sites(sets: Sequence[frozenset[str]], minimum: int) -> frozenset[str] | None:
    """The smallest group of sites that sums over ``sets`` could isolate, if it has fewer
    than ``minimum`` members; None when every group is large enough.

    Sites that lie in exactly the same sets cannot be told apart by adding and subtracting
    those sums, and any two sites that lie in different sets can: the groups of sites
    with equal membership are the finest sums the sets reveal.
    """
    groups: dict[tuple[bool, ...], set[str]] = defaultdict(set)
    for site in frozenset().union(*sets):
        groups[tuple(site in s for s in sets)].add(site)
    small = [frozenset(group) for group in groups.values() if len(group) < minimum]
    return min(small, key=lambda group: (len(group), sorted(group))) if small else None


@dataclass
class _Record:
    """What the ledger holds, indexed for the node's checks."""

    plans: dict[str, str] = field(default_factory=dict)
    answered: set[str] = field(default_factory=set)
    signed: dict[str, list[frozenset[str]]] = field(default_factory=lambda: defaultdict(list))
    spending: list[dict[str, Any]] = field(default_factory=list)  # each spend: run_id, round, release
    tables: list[dict[str, Any]] = field(default_factory=list)
    episode_windows: dict[str, list[int]] = field(default_factory=dict)  # extract digest -> [before, after]
    ended: set[str] = field(default_factory=set)
    owed: dict[str, tuple[dict[str, Any], int]] = field(default_factory=dict)  # run -> (release, rounds still to pay)
    reset_at: str | None = None  # time of the last explicit reset: spending before it no longer counts

    def add(self, entry: Entry) -> None:
        details = entry.details
        if entry.event == LedgerEvent.STARTED and details.get("reason"):
            self.spending, self.reset_at = [], entry.time
        elif entry.event == LedgerEvent.BUDGET_RESET:
            self.spending, self.reset_at = [], entry.time
        elif entry.event == LedgerEvent.PLAN_ACCEPTED:
            self.plans[details["run_id"]] = details["plan"]
        elif entry.event == LedgerEvent.ANSWERED:
            self.answered.add(details["exchange"])
        elif entry.event == LedgerEvent.SET_SIGNED:
            for key in details["keys"]:
                self.signed[key].append(frozenset(details["sites"]))
        elif entry.event == LedgerEvent.DP_SPENT:
            self.spending.append(dict(details))
            if details.get("owed") is not None:
                self.owed[details["run_id"]] = (dict(details["release"]), int(details["owed"]))
        elif entry.event == LedgerEvent.TABLE_RELEASED:
            self.tables.append(dict(details))
        elif entry.event == LedgerEvent.EPISODE_WINDOW:
            self.episode_windows.setdefault(details["data"], list(details["window"]))
        elif entry.event == LedgerEvent.RUN_ENDED:
            self.ended.add(details["run_id"])
            self.owed.pop(details["run_id"], None)


@dataclass(frozen=True)
class _Anchor:
    """A spend the site's audit log says was recorded in the ledger."""

    where: str
    time: str
    seq: int | None
    head: str | None


# Per process: where each ledger ended when this process last wrote or read it, what it
# holds, and the file's identity then (inode, size, modification time), so a node that
# reopens its ledger for every message does not re-read it each time, and a file changed
# by anyone else is read and checked in full.
_CACHE: dict[Path, tuple[LogPosition, _Record, tuple[int, int, int]]] = {}


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class ReleaseLedger:
    """One site's ledger, open for the duration of one message (``with`` closes it)."""

    def __init__(self, path: Path, log: AuditLog, record: _Record):
        self.path = path
        self._log = log
        self._record = record

    @classmethod
    def open(cls, path: Path, identity: Identity, *, audit_logs: Iterable[Path] = ()) -> ReleaseLedger:
        """The site's ledger, checked: chain, signatures and the anchors in ``audit_logs``.

        A site without a ledger and without any anchor starts one. ``LedgerError`` when the
        ledger is missing, cut short, edited or not the site's own.
        """
        path = Path(path)
        cached = _CACHE.get(path.resolve())
        if cached is not None and path.exists() and _stamp(path) == cached[2] and ends_at(path, cached[0]):
            position, record, _ = cached
        else:
            position, record = _load(path, identity, list(audit_logs))
        ledger = cls(path, AuditLog(path, identity, resume=position), record)
        if position.seq == 0:
            ledger._write(LedgerEvent.STARTED, {}, durable=True)
        return ledger

    def __enter__(self) -> ReleaseLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self._log.detach()

    # --- what the site has released -------------------------------------------------------

    @property
    def spending(self) -> tuple[Mapping[str, Any], ...]:
        """Every privacy-budget spend (its release) since the last explicit reset, in order."""
        return tuple(spend["release"] for spend in self._record.spending)

    def held(self, *, besides: str) -> dict[str, tuple[Mapping[str, Any], int]]:
        """The rounds other open runs have planned and not yet paid, by run: each one's
        per-round release and how many more rounds of it (runs other than ``besides``)."""
        return {run: (release, n) for run, (release, n) in self._record.owed.items() if run != besides and n > 0}

    def tables(self, data: str) -> list[Mapping[str, Any]]:
        """The statistics tables released over the rows of digest ``data``, oldest first."""
        return [table for table in self._record.tables if table["data"] == data]

    def runs(self) -> dict[str, bool]:
        """Every run this site accepted, and whether it is closed here."""
        return {run: run in self._record.ended for run in self._record.plans}

    def check_run_open(self, run_id: str) -> None:
        """Refuse anything of a run this site has closed."""
        if run_id in self._record.ended:
            raise _refusal(f"run {run_id!r} is closed at this site; it answers nothing more of it")

    def check_unanswered(self, exchange: str) -> None:
        """Refuse a request this site has already answered: a replay gets nothing."""
        if exchange in self._record.answered:
            raise _refusal(
                f"it repeats a request this site has already answered ({exchange}); a site answers each once"
            )

    # --- what the site records before a reply leaves ----------------------------------------

    def accept_plan(self, run_id: str, plan: str) -> None:
        """Record a job's plan; a run that restarts must state the plan it was accepted with."""
        self.check_run_open(run_id)
        accepted = self._record.plans.get(run_id)
        if accepted is not None and accepted != plan:
            raise _refusal(
                f"run {run_id!r} was accepted here with another plan; a restarted run must state the same job"
            )
        if accepted is None:
            self._write(LedgerEvent.PLAN_ACCEPTED, {"run_id": run_id, "plan": plan}, durable=True)

    def answered(self, exchange: str, digest: str, *, durable: bool) -> None:
        """Record that a reply is about to leave; ``durable`` for replies that release something."""
        self.check_unanswered(exchange)
        self._write(LedgerEvent.ANSWERED, {"exchange": exchange, "digest": digest}, durable=durable)

    def sign_set(self, keys: Sequence[tuple[str, str]], sites: frozenset[str], *, minimum: int, exchange: str) -> None:
        """Let one input be unmasked within a sum over ``sites``; ``keys`` are its release keys,
        each with the input in words.

        Refused when that sum, with the sums the input already joined under any of its keys,
        could isolate fewer than ``minimum`` sites.
        """
        for key, what in keys:
            earlier = self._record.signed.get(key, [])
            group = isolated_sites([*earlier, sites], minimum)
            if group is not None:
                before = f"; it was already summed over {', '.join(sorted(earlier[-1]))}" if earlier else ""
                raise _refusal(
                    f"a secure sum of {what} over {', '.join(sorted(sites))}{before}: the coordinator could isolate "
                    f"{', '.join(sorted(group))} ({len(group)} site(s), fewer than this site's minimum of {minimum})"
                )
        details = {"keys": [key for key, _ in keys], "sites": sorted(sites), "exchange": exchange}
        self._write(LedgerEvent.SET_SIGNED, details, durable=True)

    def spend(
        self, release: Mapping[str, Any], *, run_id: str, round: int | None, owed: int | None = None
    ) -> tuple[int, str]:
        """Record a privacy-budget spend; returns the anchor (seq, hash) the audit log keeps.

        ``owed``: for a spend its run repeats every round, how many more rounds of it the run
        has planned (held for it until it closes); None for a one-off spend.
        """
        details: dict[str, Any] = {"run_id": run_id, "round": round, "release": dict(release)}
        if owed is not None:
            details["owed"] = owed
        entry = self._write(LedgerEvent.DP_SPENT, details, durable=True)
        return entry.seq, entry.hash

    def record_table(self, *, data: str, layout: str, release: Mapping[str, Any], run_id: str) -> None:
        """Record a released statistics table and the cells it withheld."""
        details = {"data": data, "layout": layout, "release": dict(release), "run_id": run_id}
        self._write(LedgerEvent.TABLE_RELEASED, details, durable=True)

    def fix_episode_window(self, *, data: str, window: tuple[int, int], run_id: str) -> None:
        """Hold the episode sums over one extract (digest ``data``) to one window (days before
        admission, after discharge): two windows' sums differ by what was paid on the days
        between them, which may describe a handful of patients. The first job fixes it."""
        fixed = self._record.episode_windows.get(data)
        if fixed is None:
            details = {"data": data, "window": list(window), "run_id": run_id}
            self._write(LedgerEvent.EPISODE_WINDOW, details, durable=True)
        elif tuple(fixed) != tuple(window):
            raise _refusal(
                f"it asks for episodes from {window[0]} days before admission to {window[1]} after discharge; this "
                f"site released them over the same extract from {fixed[0]} to {fixed[1]}, and the difference of "
                "two windows' sums describes the days between them: a site keeps one window per extract"
            )

    def end_run(self, run_id: str, *, reason: str | None = None) -> None:
        """Close a run here: the site answers nothing more of it, and what it held is freed.
        ``reason``: for a run the site operator closes (one that will not come back)."""
        details = {"run_id": run_id} if reason is None else {"run_id": run_id, "reason": reason}
        self._write(LedgerEvent.RUN_ENDED, details, durable=True)

    def reset_budget(self, reason: str) -> None:
        """An explicit site action: spending recorded before it no longer counts."""
        if not reason.strip():
            raise ValueError("a budget reset needs a reason")
        self._write(LedgerEvent.BUDGET_RESET, {"reason": reason}, durable=True)

    def _write(self, event: LedgerEvent, details: Mapping[str, Any], *, durable: bool) -> Entry:
        entry = self._log.append(event, details=details)
        self._record.add(entry)
        if durable:
            entry = self._log.checkpoint()
        _CACHE[self.path.resolve()] = (self._log.position, self._record, _stamp(self.path))
        return entry


def recorded_spending(path: Path, identity: PublicIdentity) -> tuple[Mapping[str, Any], ...]:
    """The spends a site's ledger records since its last reset (each its ``run_id``, ``round``
    and ``release``), checked against the site's key (for a report; the node itself opens its
    ledger with ``ReleaseLedger.open``). A site that never answered has none."""
    if not path.exists():
        return ()
    try:
        state = verify_chain(path, identity)
    except AuditLogTamperedError as error:
        raise LedgerError(f"the release ledger failed its check: {error}") from None
    record = _Record()
    for entry in state.entries:
        record.add(entry)
    return tuple(record.spending)


def start_anew(path: Path, identity: Identity, *, reason: str, at: datetime | None = None) -> Path | None:
    """Start a new ledger after the old one was lost or failed its check: an explicit site
    action. The old file (if any) is kept beside it; returns where. Spending the old ledger
    recorded, and the audit logs' anchors into it, no longer count."""
    if not reason.strip():
        raise ValueError("starting a ledger anew needs a reason")
    path = Path(path)
    kept = None
    if path.exists():
        stamp = (at or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        kept = path.with_name(f"{path.name}.replaced-{stamp}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        path.rename(kept)
    else:
        digest = None
    _CACHE.pop(path.resolve(), None)
    with AuditLog(path, identity) as log:
        log.append(LedgerEvent.STARTED, details={"reason": reason, "replaced_digest": digest}, at=at)
        log.checkpoint(at=at)
    return kept


def _load(path: Path, identity: Identity, audit_logs: list[Path]) -> tuple[LogPosition, _Record]:
    """Read and check the whole ledger against the site's audit logs."""
    anchors = _anchors(identity.name, audit_logs)
    if not path.exists():
        if anchors:
            raise LedgerError(
                f"the release ledger {path} is missing, but {anchors[0].where} records privacy spending paid in it "
                f"({len(anchors)} spend(s) in all). {_WHAT_TO_DO}"
            )
        return LogPosition(0, "", 0), _Record()
    try:
        state = verify_chain(path, identity.public())
    except AuditLogTamperedError as error:
        raise LedgerError(f"the release ledger failed its check: {error}. {_WHAT_TO_DO}") from None
    record = _Record()
    for entry in state.entries:
        record.add(entry)
    for anchor in anchors:
        if record.reset_at is not None and anchor.time < record.reset_at:
            continue
        if anchor.seq is None or anchor.seq >= len(state.entries):
            raise LedgerError(
                f"the release ledger {path} is cut short: {anchor.where} records a spend paid at its entry "
                f"{anchor.seq}, but it holds {len(state.entries)} entries. {_WHAT_TO_DO}"
            )
        if state.entries[anchor.seq].hash != anchor.head:
            raise LedgerError(
                f"the release ledger {path} is not the one {anchor.where} paid its spend in (entry {anchor.seq} "
                f"differs): it was replaced or rewritten. {_WHAT_TO_DO}"
            )
    size = state.cut.offset if state.cut is not None else path.stat().st_size
    return LogPosition(len(state.entries), state.head, size), record


def _anchors(site: str, audit_logs: list[Path]) -> list[_Anchor]:
    """Every privacy spend the site's own audit logs record, with where they anchor it."""
    anchors = []
    for log in audit_logs:
        try:
            entries, _ = read_log(log)
        except AuditLogTamperedError as error:
            raise LedgerError(f"cannot check the release ledger against {log}: {error}. {_WHAT_TO_DO}") from None
        for entry in entries:
            if entry.event == Event.DP_ROUND and entry.actor == site:
                seq, head = entry.details.get(ANCHOR_SEQ), entry.details.get(ANCHOR_HEAD)
                where = f"{log}, line {entry.seq + 1}"
                anchors.append(_Anchor(where, entry.time, seq if isinstance(seq, int) else None, head))
    return anchors
