"""Cross-checking parties' logs: every message one side logged, the other side logged too.

A party can only rewrite its own log (and then only by re-signing it, which its own log
cannot reveal). Reconciliation catches that: a coordinator that claims to have received
an update no node sent, or a node that claims to have sent bytes nobody received, shows
up as an unmatched message.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedcost.audit.entry import Entry
from fedcost.wire.events import Event

# A message is identified by (sender, recipient, round, kind, digest, bytes).
_Key = tuple[str, str, int | None, str, str, int]
_PEER = {Event.MESSAGE_SENT: "recipient", Event.MESSAGE_RECEIVED: "sender"}


@dataclass(frozen=True)
class Problem:
    """One finding: the party whose log shows it, the entry (if any), and what is wrong."""

    party: str
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = "" if self.seq is None else f" seq {self.seq}"
        return f"{self.party}{where}: {self.message}"


def _message_key(party: str, entry: Entry) -> _Key | str:
    """The message's identity, or what the entry lacks to have one."""
    peer_field = _PEER[entry.event]
    peer, kind, size = (entry.details.get(name) for name in (peer_field, "kind", "bytes"))
    if type(peer) is not str or type(kind) is not str or type(size) is not int or entry.digest is None:
        return (f"{entry.event} needs details.{peer_field} and details.kind (strings), "
                "details.bytes (integer) and a digest")
    if entry.event == Event.MESSAGE_SENT:
        return party, peer, entry.round, kind, entry.digest, size
    return peer, party, entry.round, kind, entry.digest, size


def _describe(key: _Key) -> str:
    _, _, round_, kind, digest, size = key
    return f"(round {round_}, kind {kind!r}, {size} bytes, digest {digest[:16]}…)"


def reconcile(logs: Mapping[str, Sequence[Entry]]) -> list[Problem]:
    """Check verified logs against each other and return every problem found.

    - every log ends with run_closed;
    - every message_received matches a message_sent by the named sender to this party
      (same round, kind, byte count and digest), one for one;
    - every message_sent appears as received by its recipient, unless the sender or the
      recipient logged the other as dropped ("dropout", details.party) in that round;
    - a party named in a message but absent from ``logs`` is reported once.
    """
    problems: list[Problem] = []
    sent: dict[_Key, list[tuple[str, int]]] = defaultdict(list)
    received: dict[_Key, list[tuple[str, int]]] = defaultdict(list)
    dropped: set[tuple[str, int | None, object]] = set()  # (logged by, round, party)
    for party, entries in logs.items():
        if not entries or entries[-1].event != Event.RUN_CLOSED:
            last = entries[-1].seq if entries else None
            problems.append(Problem(party, last, "log does not end with run_closed"))
        for entry in entries:
            if entry.event == Event.DROPOUT:
                dropped.add((party, entry.round, entry.details.get("party")))
            elif entry.event in _PEER:
                key = _message_key(party, entry)
                if isinstance(key, str):
                    problems.append(Problem(party, entry.seq, key))
                else:
                    (sent if entry.event == Event.MESSAGE_SENT else received)[key].append((party, entry.seq))

    unlogged: dict[str, int] = defaultdict(int)
    for key, receipts in received.items():
        sender = key[0]
        if sender not in logs:
            unlogged[sender] += len(receipts)
            continue
        for party, seq in receipts[len(sent.get(key, ())):]:
            problems.append(Problem(party, seq, f"message_received from {sender} {_describe(key)} "
                                                f"matches no message_sent in {sender}'s log"))
    for key, sends in sent.items():
        sender, recipient, round_ = key[:3]
        if recipient not in logs:
            unlogged[recipient] += len(sends)
            continue
        if (sender, round_, recipient) in dropped or (recipient, round_, sender) in dropped:
            continue
        for party, seq in sends[len(received.get(key, ())):]:
            problems.append(Problem(party, seq, f"message_sent to {recipient} {_describe(key)} "
                                                f"was never logged as received by {recipient}"))
    for party, count in sorted(unlogged.items()):
        problems.append(Problem(party, None, f"no verified audit log to check {count} message(s) against"))
    return problems
