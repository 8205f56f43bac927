"""The names of audit-log events, as both bindings write them and the audit tools read them.

A ``StrEnum``: an event is written and compared as its plain string, so logs stay
readable JSON and an older log reads the same.
"""

from __future__ import annotations

from enum import StrEnum


class Event(StrEnum):
    """Every event a fedcost party logs."""

    # Every party.
    MESSAGE_SENT = "message_sent"
    MESSAGE_RECEIVED = "message_received"
    CHECKPOINT = "checkpoint"  # signed: a round's end
    RUN_CLOSED = "run_closed"  # signed: the log is complete
    TAIL_DISCARDED = "tail_discarded"  # an interrupted write, removed when the log was reopened
    # The coordinator.
    RUN_STARTED = "run_started"
    RUN_RESUMED = "run_resumed"
    DROPOUT = "dropout"
    AGGREGATE = "aggregate"
    CHECKPOINT_MODEL = "checkpoint_model"
    # A node.
    JOB_RECEIVED = "job_received"
    DATA_LOADED = "data_loaded"
    DP_ROUND = "dp_round"
    REFUSAL = "refusal"


# Plain strings: the bulk log reader tests membership for every line.
SIGNED = frozenset({Event.CHECKPOINT.value, Event.RUN_CLOSED.value})


class LedgerEvent(StrEnum):
    """Every event a site's release ledger records (``fedcost.privacy.ledger``)."""

    STARTED = "ledger_started"  # a new ledger: the site's first, or one an explicit reset began
    PLAN_ACCEPTED = "plan_accepted"  # a job's plan, by digest
    ANSWERED = "answered"  # one reply that left the site
    SET_SIGNED = "set_signed"  # the site let one input be unmasked within a sum over these sites
    DP_SPENT = "dp_spent"  # privacy budget spent by one release
    TABLE_RELEASED = "table_released"  # a grouped-statistics table and the cells it withheld
    EPISODE_WINDOW = "episode_window"  # the window the site's episode sums over one extract are under
    RUN_ENDED = "run_ended"  # a run closed at this site: it answers nothing more of it
    BUDGET_RESET = "budget_reset"  # an explicit site action: spending before it no longer counts
