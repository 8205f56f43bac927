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
