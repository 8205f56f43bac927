"""Cross-checking parties' logs: every message one side logged, the other side logged too.

A party can only rewrite its own log (and then only by re-signing it, which its own log
cannot reveal). Reconciliation catches that: a coordinator that claims to have received
an update no node sent, or a node that claims to have sent bytes nobody received, shows
up as an unmatched message.

Two ends of a deployed run leave messages one side never logged, and each is accepted
only where logs the other party cannot write explain it:

- a **withdrawn** site: the federation's CA revoked its certificate (after its log's last
  entry) and a coordinator's log records it dropped after the last message the two logs
  share. Its log may end there unclosed (its key is refused: it cannot be told the run is
  over), and what either side sent the other after that point may go unlogged.
- a **restarted** coordinator: a message in flight when the coordinator stopped, before a
  hello both logs show, after which the coordinator's log resumes the run from a round
  before the message's (``run_resumed``): that round was run again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from fedcost.audit.entry import Entry
from fedcost.wire.events import Event

# A message is identified by (sender, recipient, round, kind, digest, bytes).
_Key = tuple[str, str, int | None, str, str, int]
_PEER = {Event.MESSAGE_SENT: "recipient", Event.MESSAGE_RECEIVED: "sender"}
HELLO = "hello"  # the kind of the message that opens (or reopens) a run at a node


@dataclass(frozen=True)
class Problem:
    """One finding: the party whose log shows it, the entry (if any), and what is wrong."""

    party: str
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = "" if self.seq is None else f" seq {self.seq}"
        return f"{self.party}{where}: {self.message}"


@dataclass(frozen=True)
class _Message:
    """One message as the two logs show it: its seq in the sender's log and in the
    recipient's (``None`` where that side never logged it)."""

    key: _Key
    sent: int | None
    received: int | None

    @property
    def sender(self) -> str:
        return self.key[0]

    @property
    def recipient(self) -> str:
        return self.key[1]

    @property
    def round(self) -> int | None:
        return self.key[2]

    def seq_at(self, party: str) -> int | None:
        return self.sent if party == self.sender else self.received


@dataclass(frozen=True)
class Withdrawal:
    """A revoked site's unclosed log, as a coordinator's log explains it: the last message
    the two logs share (its seq on each side, -1 for none) and the dropout logged after it."""

    party: str
    coordinator: str
    shared_until: dict[str, int]
    dropout: Entry

    def covers(self, message: _Message) -> bool:
        """A message between the two, sent after the last one they share."""
        ends = {self.party, self.coordinator}
        sent = message.sent
        return (
            {message.sender, message.recipient} == ends
            and sent is not None
            and sent > self.shared_until[message.sender]
        )

    def __str__(self) -> str:
        reason = self.dropout.details.get("reason")
        return (
            f"{self.party}'s log ends without run_closed: the federation's CA revoked it, and "
            f"{self.coordinator} logged it dropped (seq {self.dropout.seq}{f': {reason}' if reason else ''}) after "
            "the last message their logs share"
        )


def _message_key(party: str, entry: Entry) -> _Key | str:
    """The message's identity, or what the entry lacks to have one."""
    peer_field = _PEER[entry.event]
    peer, kind, size = (entry.details.get(name) for name in (peer_field, "kind", "bytes"))
    if type(peer) is not str or type(kind) is not str or type(size) is not int or entry.digest is None:
        return (
            f"{entry.event} needs details.{peer_field} and details.kind (strings), details.bytes (integer) and a digest"
        )
    if entry.event == Event.MESSAGE_SENT:
        return party, peer, entry.round, kind, entry.digest, size
    return peer, party, entry.round, kind, entry.digest, size


def _describe(key: _Key) -> str:
    _, _, round_, kind, digest, size = key
    return f"(round {round_}, kind {kind!r}, {size} bytes, digest {digest[:16]}…)"


def _messages(logs: Mapping[str, Sequence[Entry]]) -> tuple[list[_Message], list[Problem]]:
    """Every message either side logged, sends of a key paired with its receipts in order, the
    earliest sends left unreceived where there are more sends than receipts (a restarted
    coordinator sends a round's identical message again: the one lost in flight is the first);
    and the message entries too malformed to pair."""
    sent: dict[_Key, list[int]] = defaultdict(list)
    received: dict[_Key, list[int]] = defaultdict(list)
    problems = []
    for party, entries in logs.items():
        for entry in entries:
            if entry.event in _PEER:
                key = _message_key(party, entry)
                if isinstance(key, str):
                    problems.append(Problem(party, entry.seq, key))
                else:
                    (sent if entry.event == Event.MESSAGE_SENT else received)[key].append(entry.seq)
    messages = []
    for key in dict.fromkeys([*sent, *received]):
        sends, receipts = sent.get(key, []), received.get(key, [])
        lost = max(0, len(sends) - len(receipts))
        messages += [_Message(key, seq, None) for seq in sends[:lost]]
        paired = sends[lost:]
        for i in range(max(len(paired), len(receipts))):
            messages.append(
                _Message(key, paired[i] if i < len(paired) else None, receipts[i] if i < len(receipts) else None)
            )
    return messages, problems


def _unclosed(entries: Sequence[Entry]) -> bool:
    return not entries or entries[-1].event != Event.RUN_CLOSED


def _withdrawals(
    logs: Mapping[str, Sequence[Entry]],
    messages: list[_Message],
    coordinators: Collection[str],
    revoked: Collection[str],
) -> dict[str, Withdrawal]:
    """The revoked parties whose unclosed logs a coordinator's log explains."""
    found = {}
    for party in sorted(set(revoked) - set(coordinators)):
        if party not in logs or not _unclosed(logs[party]):
            continue
        for coordinator in sorted(set(coordinators) & logs.keys()):
            shared = [
                m
                for m in messages
                if {m.sender, m.recipient} == {party, coordinator} and m.sent is not None and m.received is not None
            ]
            until = {side: max((m.seq_at(side) for m in shared), default=-1) for side in (party, coordinator)}
            dropout = next(
                (
                    entry
                    for entry in logs[coordinator]
                    if entry.event == Event.DROPOUT
                    and entry.details.get("party") == party
                    and entry.seq > until[coordinator]
                ),
                None,
            )
            if dropout is not None:
                found[party] = Withdrawal(party, coordinator, until, dropout)
                break
    return found


def _in_flight_at_restart(
    message: _Message, logs: Mapping[str, Sequence[Entry]], messages: list[_Message], coordinators: Collection[str]
) -> bool:
    """Sent before the next hello both sides logged, after which the coordinator's log
    resumes the run from a round before the message's."""
    coordinator = next((p for p in (message.sender, message.recipient) if p in coordinators and p in logs), None)
    if coordinator is None or message.round is None or message.sent is None:
        return False
    node = message.recipient if coordinator == message.sender else message.sender
    hellos = sorted(
        (
            m
            for m in messages
            if m.key[:2] == (coordinator, node) and m.key[3] == HELLO and m.sent is not None and m.received is not None
        ),
        key=lambda m: m.sent or 0,
    )
    after = next((h for h in hellos if h.seq_at(message.sender) > message.sent), None)  # type: ignore[operator]
    if after is None or after.sent is None:
        return False
    resumed = next((e for e in logs[coordinator] if e.event == Event.RUN_RESUMED and e.seq > after.sent), None)
    restart = resumed.details.get("after_round") if resumed is not None else None
    return type(restart) is int and restart < message.round


def withdrawals(
    logs: Mapping[str, Sequence[Entry]], *, coordinators: Collection[str] = (), revoked: Collection[str] = ()
) -> dict[str, Withdrawal]:
    """The parties in ``revoked`` (by the federation's CA, after or while their logs ran) whose
    unclosed logs a log of one of ``coordinators`` explains (see the module's docstring)."""
    return _withdrawals(logs, _messages(logs)[0], coordinators, revoked)


def reconcile(
    logs: Mapping[str, Sequence[Entry]], *, coordinators: Collection[str] = (), revoked: Collection[str] = ()
) -> list[Problem]:
    """Check verified logs against each other and return every problem found.

    - every log ends with run_closed, but a withdrawn site's (``withdrawals``);
    - every message_received matches a message_sent by the named sender to this party
      (same round, kind, byte count and digest), one for one;
    - every message_sent appears as received by its recipient, unless the sender or the
      recipient logged the other as dropped ("dropout", details.party) in that round, it
      went between a withdrawn site and the coordinator after their last shared message,
      or it was in flight when the coordinator restarted (see the module's docstring);
    - a party named in a message but absent from ``logs`` is reported once.

    ``coordinators``: the parties whose logs may explain a withdrawal or a restart (their
    identity's role); ``revoked``: the parties the federation's CA revoked after or while their logs ran.
    """
    messages, problems = _messages(logs)
    withdrawn = _withdrawals(logs, messages, coordinators, revoked)
    dropped: set[tuple[str, int | None, object]] = set()  # (logged by, round, party)
    for party, entries in logs.items():
        if _unclosed(entries) and party not in withdrawn:
            problems.append(Problem(party, entries[-1].seq if entries else None, "log does not end with run_closed"))
        dropped |= {(party, e.round, e.details.get("party")) for e in entries if e.event == Event.DROPOUT}

    unlogged: dict[str, int] = defaultdict(int)
    for message in messages:
        sender, recipient = message.sender, message.recipient
        if message.sent is not None:
            continue
        if sender not in logs:
            unlogged[sender] += 1
        else:
            problems.append(
                Problem(
                    recipient,
                    message.received,
                    f"message_received from {sender} "
                    f"{_describe(message.key)} matches no message_sent in {sender}'s log",
                )
            )
    for message in messages:
        sender, recipient, round_ = message.sender, message.recipient, message.round
        if message.received is None:
            if recipient not in logs:
                unlogged[recipient] += 1
            elif not (
                (sender, round_, recipient) in dropped
                or (recipient, round_, sender) in dropped
                or any(w.covers(message) for w in withdrawn.values())
                or _in_flight_at_restart(message, logs, messages, coordinators)
            ):
                problems.append(
                    Problem(
                        sender,
                        message.sent,
                        f"message_sent to {recipient} {_describe(message.key)} "
                        f"was never logged as received by {recipient}",
                    )
                )
    for party, count in sorted(unlogged.items()):
        problems.append(Problem(party, None, f"no verified audit log to check {count} message(s) against"))
    return problems
