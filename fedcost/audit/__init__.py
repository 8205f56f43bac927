"""The tamper-evident audit log: entries, hash chain, signed checkpoints, verify, reconcile.

Pure apart from the log files themselves: no Flower, no network. The command-line
sub-app lives in ``fedcost.audit.commands`` (``audit_app``).
"""

from fedcost.audit.entry import GENESIS_HASH, Entry
from fedcost.audit.folder import FolderVerification, PartyStatus, verify_folder
from fedcost.audit.log import AuditLog, Cut, LogPosition, LogVerification, read_log, verify_chain, verify_log
from fedcost.audit.reconcile import Problem, reconcile
from fedcost.audit.report import audit_report, render_report

__all__ = [
    "GENESIS_HASH",
    "AuditLog",
    "Cut",
    "Entry",
    "FolderVerification",
    "LogPosition",
    "LogVerification",
    "PartyStatus",
    "Problem",
    "audit_report",
    "read_log",
    "reconcile",
    "render_report",
    "verify_chain",
    "verify_folder",
    "verify_log",
]
