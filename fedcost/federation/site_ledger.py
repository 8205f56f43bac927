"""A site operator's own actions on its node's state folder, with the node stopped.

A node serves from one state folder (its mapping, audit logs and release ledger) and holds
a lock on it while it runs, so a second node on the same folder, or an operator's action
on the ledger, cannot interleave writes with it. The actions:

- ``close_run``: a run that will not come back (its coordinator is gone for good) still
  holds the rounds it planned in the site's DP budget (``fedcost.client.budget``); closing
  it here frees them, and the site answers nothing more of it.
- ``start_ledger_anew``: the ledger failed its check or was lost; the site starts a new one
  with its reason signed into it (``fedcost.privacy.ledger.start_anew``), the old file kept.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedcost.errors import ConfigError
from fedcost.federation.provision import Kit
from fedcost.privacy.ledger import SUFFIX, ReleaseLedger, start_anew

LOCK_FILE = "node.lock"


@contextmanager
def holding(state: Path) -> Iterator[None]:
    """Hold the state folder's lock for as long as the block runs; ``ConfigError`` naming the
    folder when it does not exist, or when a node (or another operator action) holds it."""
    if not state.is_dir():
        raise ConfigError("no such state folder; give the node's --state (default: KIT/state)", path=str(state))
    descriptor = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                "a node is serving from this state folder (or another fedcost command holds it); stop that node "
                "(Ctrl-C, or SIGTERM to its process) and run this again",
                path=str(state),
            ) from None
        yield
    finally:
        os.close(descriptor)


def _ledger_path(kit: Kit, state: Path) -> Path:
    path = state / f"{kit.name}{SUFFIX}"
    if not path.is_file():
        raise ConfigError(
            f"no release ledger of {kit.name} here ({path.name}); give the node's --state", path=str(state)
        )
    return path


def close_run(kit: Kit, state: Path, run_id: str, *, reason: str) -> bool:
    """Close ``run_id`` at this site, with the operator's ``reason`` signed into the ledger;
    False when it was already closed. ``ConfigError`` for a run the site never accepted
    (the message lists its open runs)."""
    if not reason.strip():
        raise ConfigError("say why the run is closed here, e.g. --reason 'its coordinator was retired'", field="reason")
    with holding(state):
        path = _ledger_path(kit, state)
        audit_logs = sorted((state / "audit").rglob(f"{kit.name}.jsonl"))
        with ReleaseLedger.open(path, kit.identity, audit_logs=audit_logs) as ledger:
            runs = ledger.runs()
            if run_id not in runs:
                open_runs = ", ".join(run for run, closed in sorted(runs.items()) if not closed) or "none"
                raise ConfigError(f"this site never accepted run {run_id!r}; its open runs: {open_runs}", field="run")
            if runs[run_id]:
                return False
            ledger.end_run(run_id, reason=reason)
    return True


def start_ledger_anew(kit: Kit, state: Path, *, reason: str) -> Path | None:
    """Start the site's ledger anew with ``reason``; returns where the old one was kept."""
    if not reason.strip():
        raise ConfigError(
            "say why the ledger starts anew, e.g. --reason 'restored after a disk failure'", field="reason"
        )
    with holding(state):
        return start_anew(state / f"{kit.name}{SUFFIX}", kit.identity, reason=reason)
