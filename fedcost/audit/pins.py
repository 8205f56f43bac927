"""Keys pinned by the other parties: the key id each party's log recorded for every other.

At the start of a run each party records the keys it holds for the others, in
``details["key_ids"]`` (party name -> ``PublicIdentity.key_id``) of the coordinator's
``run_started`` entry and of each node's ``job_received`` entry. A log that verified binds
that record with its party's signature, so an identity file must agree with what the
other parties held: a key replaced together with a re-signed log is named by every party
that ran with the real one. Only a forger who rewrites every log of the run escapes it,
which the federation's CA (``fedcost.audit.authority``) stops.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedcost.audit.authority import short
from fedcost.audit.entry import Entry
from fedcost.audit.reconcile import Problem
from fedcost.wire.events import Event

KEY_IDS = "key_ids"
PIN_EVENTS = frozenset({Event.RUN_STARTED.value, Event.JOB_RECEIVED.value})  # the coordinator's, a node's
_KEY_ID = re.compile(r"[0-9a-f]{64}")


def _names(parties: Sequence[str]) -> str:
    return parties[0] if len(parties) == 1 else f"{', '.join(parties[:-1])} and {parties[-1]}"


@dataclass(frozen=True)
class Pins:
    """Which key ids verified logs recorded for each party (never a party's own), and by whom."""

    recorded: dict[str, dict[str, list[str]]]  # party -> key id -> the parties whose logs recorded it
    recorders: frozenset[str]  # the parties whose logs record key ids at all
    problems: list[Problem]  # records that are not a map of names to key ids

    @classmethod
    def from_logs(cls, logs: Mapping[str, Sequence[Entry]]) -> Pins:
        """Read ``details.key_ids`` of every pinning entry; pass only logs whose own chain verified."""
        recorded: dict[str, dict[str, list[str]]] = {}
        recorders: set[str] = set()
        problems: list[Problem] = []
        for recorder, entries in sorted(logs.items()):
            for entry in entries:
                if entry.event not in PIN_EVENTS or KEY_IDS not in entry.details:
                    continue
                recorders.add(recorder)
                key_ids = entry.details[KEY_IDS]
                if type(key_ids) is not dict or not all(
                    type(key_id) is str and _KEY_ID.fullmatch(key_id) for key_id in key_ids.values()
                ):
                    problems.append(
                        Problem(
                            recorder,
                            entry.seq,
                            f"details.{KEY_IDS} of {entry.event} must map "
                            "party names to key ids (64 hex digits); the software that wrote this "
                            "log is faulty, so it pins no key",
                        )
                    )
                    continue
                for party, key_id in key_ids.items():
                    if party == recorder:
                        continue  # a party's word for its own key pins nothing
                    by = recorded.setdefault(party, {}).setdefault(key_id, [])
                    if recorder not in by:
                        by.append(recorder)
        return cls(recorded, frozenset(recorders), problems)

    def describe(self, party: str, *, besides: str | None = None) -> str:
        """Who recorded what for ``party``, leaving out key id ``besides``: "a and b recorded 9c1d… for party"."""
        groups = [
            f"{_names(by)} recorded {short(key_id)}"
            for key_id, by in sorted(self.recorded.get(party, {}).items())
            if key_id != besides
        ]
        return f"{'; '.join(groups)} for {party} at the start of the run"

    def disputes(self, party: str, key_id: str) -> bool:
        """Whether another party's log recorded a key id other than ``key_id`` for ``party``."""
        return any(recorded != key_id for recorded in self.recorded.get(party, {}))
