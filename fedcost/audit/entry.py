"""Audit entries, their bytes and their hashes.

A log is JSON Lines, one entry per line. An ordinary line is exactly the RFC 8785
canonical JSON of the entry. A checkpoint line is the canonical JSON of the entry without
its signature, with ``"sig"`` appended as the last member::

    {"actor":...,"time":"..."}                       ordinary entry
    {"actor":...,"time":"...","sig":"<base64>"}       checkpoint

The entry hash is ``SHA-256(ENTRY_HASH_PREFIX || body)``, where body is the canonical JSON
of the entry without ``sig``; each entry stores the previous entry's hash in ``prev``.
The reader hashes the body bytes *as stored*, and refuses a body that is not exactly the
RFC 8785 form of what it parses to. So the hash commits to every byte on disk and to
exactly one meaning: no spacing, key order, escape, number form or repeated key (which
parsers resolve differently) can make two verifiers see different entries, or a
re-canonicalising verifier compute a different chain.

``read_lines`` proves all that for a whole log at once, at C speed (one orjson call to
re-encode every ordinary line, field rules checked column by column); a line it cannot
prove that way goes through ``Entry.from_bytes``, the line-by-line reference reader, and
any doubt at all sends the caller back to that reader to name the first bad line.

A checkpoint ("checkpoint" at each round end, "run_closed" at the end) is signed with the
party's Ed25519 identity key over ``CHECKPOINT_CONTEXT || RFC 8785({"actor", "head",
"seq"})``, where ``head`` is the checkpoint's own hash: one signature covers the checkpoint
and, through the ``prev`` links, every entry before it. Canonical JSON is the signed form.
"""

from __future__ import annotations

import base64
import hashlib
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain, compress, count, repeat
from types import MappingProxyType
from typing import Any, NamedTuple

import orjson
import rfc8785

from fedcost.wire.events import SIGNED

# Domain separation: an entry hash, the genesis value and a checkpoint signature can never
# be mistaken for one another, nor for anything else the identity key signs (SecAgg+).
ENTRY_HASH_PREFIX = b"fedcost/audit/entry/v1\x00"
CHECKPOINT_CONTEXT = b"fedcost/audit/checkpoint/v1\x00"
GENESIS_HASH = hashlib.sha256(b"fedcost/audit/genesis/v1").hexdigest()

CHECKPOINT_EVENTS = SIGNED

_REQUIRED = ("seq", "time", "actor", "event", "round", "details", "digest", "prev")
_KNOWN = frozenset(_REQUIRED) | {"sig"}
_get_required = operator.itemgetter(*_REQUIRED)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIG = re.compile(r"[A-Za-z0-9+/]{86}==")  # base64 of 64 bytes
# [0-9], not \d: \d also matches other scripts' digits.
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
_RULES = {
    "seq": "must be an integer >= 0",
    "time": "must be UTC with microseconds, like 2025-01-31T12:00:00.000000Z",
    "actor": "must be a non-empty string",
    "event": "must be a non-empty string",
    "round": "must be an integer >= 0 or null",
    "details": "must be an object",
    "digest": "must be 64 lowercase hex digits or null",
    "prev": "must be 64 lowercase hex digits",
    "sig": "must be a base64 Ed25519 signature on checkpoints and absent elsewhere",
}


def _parse_object(line: bytes) -> dict[str, Any]:
    """One line as a JSON object, strictly: valid UTF-8, no NaN or Infinity, nothing after.

    orjson parses a line about 4.5 times faster than the standard library here, which is
    what lets chain verification keep up with long logs.
    """
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    if type(obj) is not dict:
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


# RFC 8785 requires integers within the I-JSON safe range.
_SAFE_INT = 2**53 - 1


def canonical_json(value: Any) -> bytes:
    """RFC 8785 canonical JSON of ``value``.

    For values without floats, with ASCII keys and safe integers (every audit entry but
    the few that carry a float), orjson with sorted keys writes exactly the same bytes as
    RFC 8785 — escapes, key order and all (tested) — about 70 times faster; anything
    else goes through the reference ``rfc8785`` implementation.
    """
    if _orjson_matches_rfc8785(value):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    return rfc8785.dumps(value)


def _orjson_matches_rfc8785(value: Any) -> bool:
    if type(value) is dict:
        return all(k.isascii() and _orjson_matches_rfc8785(v) for k, v in value.items())
    if type(value) is list:
        return all(_orjson_matches_rfc8785(v) for v in value)
    if type(value) is int:
        return -_SAFE_INT <= value <= _SAFE_INT
    return value is None or type(value) in (str, bool)


def _is_canonical(body: bytes, value: dict[str, Any]) -> bool:
    """Whether ``body`` is exactly the RFC 8785 form of ``value``, the object it parses to."""
    try:
        return canonical_json(value) == body
    except (TypeError, rfc8785.CanonicalizationError):  # orjson.JSONEncodeError is a TypeError
        return False  # e.g. an integer outside the I-JSON range: no canonical form


_PREFIXED = hashlib.sha256(ENTRY_HASH_PREFIX)


def entry_hash(body: bytes) -> str:
    """Hash of an entry's canonical body (the entry without ``sig``)."""
    hasher = _PREFIXED.copy()  # the prefix is hashed once, not per entry
    hasher.update(body)
    return hasher.hexdigest()


def checkpoint_message(actor: str, seq: int, head: str) -> bytes:
    """The exact bytes a checkpoint signature covers."""
    return CHECKPOINT_CONTEXT + canonical_json({"actor": actor, "head": head, "seq": seq})


def format_time(at: datetime | None) -> str:
    """ISO-8601 UTC with microseconds; fixed width, so text order is time order."""
    if at is None:
        at = datetime.now(UTC)
    elif at.tzinfo is None:
        raise ValueError("naive datetime: pass an aware one, e.g. datetime.now(timezone.utc)")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _sig_trailer(sig: str) -> bytes:
    return f',"sig":"{sig}"}}'.encode()


def _first_bad_field(
    seq: Any, time: Any, actor: Any, event: Any, round_: Any, details: Any, digest: Any, prev: Any, sig: Any
) -> str | None:
    """Name the first field that breaks its rule in ``_RULES`` (None when all hold)."""
    if type(seq) is not int or seq < 0:
        return "seq"
    if type(time) is not str or not _TIME.fullmatch(time):
        return "time"
    if type(actor) is not str or not actor:
        return "actor"
    if type(event) is not str or not event:
        return "event"
    if round_ is not None and (type(round_) is not int or round_ < 0):
        return "round"
    if type(details) is not dict:
        return "details"
    if digest is not None and (type(digest) is not str or not _HEX64.fullmatch(digest)):
        return "digest"
    if type(prev) is not str or not _HEX64.fullmatch(prev):
        return "prev"
    if (event in CHECKPOINT_EVENTS) != (type(sig) is str and _SIG.fullmatch(sig) is not None):
        return "sig"
    return None


_NO_FIELDS: Mapping[str, Any] = MappingProxyType({})


class Entry(NamedTuple):
    """One audit entry; ``hash`` is derived, ``unrecognized_fields`` survive a round-trip.

    A named tuple: read-only, and the bulk reader builds a whole log's entries in C
    (``tuple.__new__`` over columns), at a third of a dataclass's cost per entry.
    """

    seq: int
    time: str
    actor: str
    event: str
    round: int | None
    details: dict[str, Any]
    digest: str | None
    prev: str
    sig: str | None
    hash: str
    unrecognized_fields: Mapping[str, Any] = _NO_FIELDS

    @classmethod
    def _checked(cls, data: dict[str, Any], hash_: str) -> Entry:
        try:
            fields = _get_required(data)
        except KeyError as e:
            raise ValueError(f"field {e} is missing") from None
        sig = data.get("sig")
        bad = _first_bad_field(*fields, sig)
        if bad is not None:
            raise ValueError(f"field '{bad}' {_RULES[bad]}, got {data.get(bad)!r}")
        extra = _NO_FIELDS
        if len(data) > len(_REQUIRED) + ("sig" in data):
            extra = {key: value for key, value in data.items() if key not in _KNOWN}
        return cls(*fields, sig, hash_, extra)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Entry:
        """Check every field (raising ``ValueError`` naming the first bad one) and hash."""
        body = {key: value for key, value in data.items() if key != "sig"}
        return cls._checked(data, entry_hash(canonical_json(body)))

    def to_dict(self) -> dict[str, Any]:
        data = self.body()
        if self.sig is not None:
            data["sig"] = self.sig
        return data

    def body(self) -> dict[str, Any]:
        """The fields the entry hash covers: all but ``sig``."""
        return {
            "seq": self.seq,
            "time": self.time,
            "actor": self.actor,
            "event": self.event,
            "round": self.round,
            "details": self.details,
            "digest": self.digest,
            "prev": self.prev,
            **self.unrecognized_fields,
        }

    @classmethod
    def from_bytes(cls, line: bytes) -> Entry:
        """Parse one line (without its newline) strictly and hash its stored body bytes.

        The reference reader: checks every rule one line at a time, canonical form last.
        """
        data = _parse_object(line)
        body, body_data = line, data
        if "sig" in data:
            sig = data["sig"]
            trailer = _sig_trailer(sig) if type(sig) is str else b""
            if not trailer or not line.endswith(trailer):
                raise ValueError("'sig' must be a string and the last member of the line")
            body = line[: -len(trailer)] + b"}"
            body_data = {key: value for key, value in data.items() if key != "sig"}
        entry = cls._checked(data, entry_hash(body))
        if not _is_canonical(body, body_data):
            raise ValueError(
                "not in RFC 8785 canonical form (spacing, key order, escapes, number "
                "form or a repeated key), so its hash would not be the entry's"
            )
        return entry

    def to_bytes(self) -> bytes:
        canonical = canonical_json(self.body())
        return canonical if self.sig is None else canonical[:-1] + _sig_trailer(self.sig)

    def signature(self) -> bytes:
        """The raw checkpoint signature (``b""`` on ordinary entries)."""
        return b"" if self.sig is None else base64.b64decode(self.sig)


# The rules of _first_bad_field for whole columns, as byte shapes that bytes.translate checks in C.
_HEX_DIGITS = b"0123456789abcdef"
_TIME_SHAPE = b"0000-00-00T00:00:00.000000Z"  # a time with every digit written as 0
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")


def _all_of(kind: type, values: Sequence[Any]) -> bool:
    """Whether every value is exactly of ``kind`` (``bool`` is not taken for ``int``)."""
    return {*map(type, values)} <= {kind}


def _joined_ascii(values: Sequence[str]) -> bytes:
    """The strings joined as bytes; anything but ASCII becomes bytes no shape accepts."""
    return "".join(values).encode("utf-8", "surrogatepass")


def _all_hex64(values: Sequence[str]) -> bool:
    return {*map(len, values)} <= {64} and not _joined_ascii(values).translate(None, _HEX_DIGITS)


def _all_times(values: Sequence[str]) -> bool:
    return {*map(len, values)} <= {len(_TIME_SHAPE)} and _joined_ascii(values).translate(
        _DIGITS_AS_ZERO
    ) == _TIME_SHAPE * len(values)


def _columns_keep_the_rules(
    seqs: list[Any],
    times: list[Any],
    actors: set[Any],
    events: set[Any],
    rounds: list[Any],
    details: list[Any],
    digests: list[Any],
    prevs: list[Any],
    sigs: list[Any],
    chained: bool,
    checkpoints: list[int],
) -> bool:
    """Whether ``_first_bad_field`` would pass every entry, checked a column at a time.

    The bulk reader's form of the rules: a few C-level passes over each column instead of
    a Python call per entry (tested to agree with the line reader). Actors and events come
    as sets of the distinct values; details are objects already (``_written_alike`` raised
    otherwise). In an intact chain every prev is the hash before it,
    so that one comparison also proves them hex.
    """
    rounds = [value for value in rounds if value is not None]
    digests = [value for value in digests if value is not None]
    return (
        _all_of(int, seqs)
        and min(seqs, default=0) >= 0
        and _all_of(str, times)
        and _all_times(times)
        and _all_of(str, actors)
        and all(actors)
        and _all_of(str, events)
        and all(events)
        and _all_of(int, rounds)
        and min(rounds, default=0) >= 0
        and _all_of(str, digests)
        and _all_hex64(digests)
        and (chained or _all_of(str, prevs) and _all_hex64(prevs))
        and _only_checkpoints_signed(checkpoints, sigs)
    )


def _only_checkpoints_signed(checkpoints: list[int], sigs: list[Any]) -> bool:
    """Whether exactly the checkpoints carry a signature, each well-formed."""
    signed = list(compress(count(), map(operator.is_not, sigs, repeat(None))))
    return checkpoints == signed and all(type(sigs[i]) is str and _SIG.fullmatch(sigs[i]) for i in signed)


# Values that orjson writes exactly as RFC 8785 does (floats it does not; nesting could hide one).
_LEAVES = frozenset({str, int, bool, type(None)})
_SORTED_SAFE = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER  # unsafe integers raise


def _written_alike(
    lines: list[bytes], objects: list[dict[str, Any]], details: list[Any], sigs: list[Any]
) -> list[bool]:
    """Per line, whether orjson re-encodes it exactly as RFC 8785 would, as it does most lines.

    That needs the eight required members only (no signature, no unrecognised field), ASCII
    (RFC 8785 orders other keys by UTF-16 units), and details of str/int/bool/None values;
    the other fields' types are the rules'. Raises TypeError where details is no object.
    Maps, not Python loops, as this runs per line. Every object holds the eight (the caller
    took their columns), so when the members add up to eight per line plus the signatures,
    no line has an unrecognised field and the unsigned lines are the candidates. Details
    are looked at all at once, and one by one only if some hold other values.
    """
    unsigned = list(map(operator.is_, sigs, repeat(None)))
    members = len(_REQUIRED) * len(objects) + unsigned.count(False)
    if sum(map(len, objects)) == members and all(map(bytes.isascii, lines)):
        alike: Iterable[bool] = unsigned
    else:
        alike = map(operator.and_, map(len(_REQUIRED).__eq__, map(len, objects)), map(bytes.isascii, lines))
    if not {*map(type, chain.from_iterable(map(dict.values, details)))} <= _LEAVES:
        leaves_only = map(_LEAVES.issuperset, map(map, repeat(type), map(dict.values, details)))
        alike = map(operator.and_, alike, leaves_only)
    return list(alike)


@dataclass(frozen=True)
class BulkRead:
    """A whole log proved well-formed and canonical by ``read_lines``, and what it saw of the chain.

    ``linked``: seq counts 0, 1, 2, ... and every prev is the hash of the entry before
    (the genesis hash first). ``actors``: the distinct actors. ``checkpoints``: the
    positions of the checkpoint entries. A verifier that finds the log linked and its
    actor the party's has only the checkpoints' signatures left to check.
    """

    entries: list[Entry]
    linked: bool
    actors: frozenset[str]
    checkpoints: list[int]


def read_lines(lines: list[bytes]) -> BulkRead | None:
    """The entries of whole lines when every line is provably a well-formed canonical entry.

    The bulk twin of ``Entry.from_bytes``: it proves the same of a whole log with C-level
    passes instead of Python calls per line. It parses every line; re-encodes, in one
    orjson call, the lines that orjson writes as RFC 8785 does, and compares that with those
    lines joined; checks the field rules over columns; and reads the other lines
    (checkpoints, floats, unrecognised fields) with ``Entry.from_bytes``. It returns None at
    the first doubt, without saying where: the caller then reads line by line to name the
    first bad line.

    The one comparison proves each line canonical: every line parsed on its own to one
    object, so where a line and its re-encoding first differ in length, one of them would be
    a whole object followed by more text, which neither a line nor orjson's output can be.
    """
    try:
        objects = list(map(orjson.loads, lines))
        columns = [list(map(operator.itemgetter(key), objects)) for key in _REQUIRED]
        seqs, times, actors, events, rounds, details, digests, prevs = columns
        sigs = list(map(dict.get, objects, repeat("sig")))
        alike = _written_alike(lines, objects, details, sigs)
        encoded = orjson.dumps(list(compress(objects, alike)), option=_SORTED_SAFE)
        actor_names, event_names = {*actors}, {*events}
        checkpoints = list(compress(count(), map(CHECKPOINT_EVENTS.__contains__, events)))
    except (orjson.JSONDecodeError, KeyError, TypeError):  # orjson.JSONEncodeError is a TypeError
        return None  # TypeError also where an actor or event is a list or an object
    joined = b",".join(compress(lines, alike))
    # startswith at 1 compares inside orjson's [ ] without copying either.
    if len(encoded) != len(joined) + 2 or not encoded.startswith(joined, 1):
        return None
    try:
        others = {i: Entry.from_bytes(lines[i]) for i in compress(count(), map(operator.not_, alike))}
    except ValueError:
        return None
    hashes = list(map(entry_hash, lines))
    for i, entry in others.items():
        hashes[i] = entry.hash  # a checkpoint's hash leaves out its signature
    linked = seqs == list(range(len(seqs))) and prevs == [GENESIS_HASH, *hashes][:-1]
    if not _columns_keep_the_rules(
        seqs, times, actor_names, event_names, rounds, details, digests, prevs, sigs, linked, checkpoints
    ):
        return None
    entries = list(map(tuple.__new__, repeat(Entry), zip(*columns, sigs, hashes, repeat(_NO_FIELDS))))
    for i, entry in others.items():
        entries[i] = entry
    return BulkRead(entries, linked, frozenset(actor_names), checkpoints)


def seal(body: dict[str, Any], sign: Callable[[bytes], bytes] | None = None) -> tuple[Entry, bytes]:
    """Hash (and, for a checkpoint, sign) a new entry; return it and its line (no newline)."""
    canonical = canonical_json(body)
    hash_ = entry_hash(canonical)
    if sign is None:
        return Entry._checked(body, hash_), canonical
    sig = base64.b64encode(sign(checkpoint_message(body["actor"], body["seq"], hash_))).decode("ascii")
    return Entry._checked({**body, "sig": sig}, hash_), canonical[:-1] + _sig_trailer(sig)
