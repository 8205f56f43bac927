"""One party's log: writer, strict reader, interrupted writes, reopening."""

from __future__ import annotations

import gc
import json
import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcost.audit import GENESIS_HASH, AuditLog, Entry, LogPosition, read_log, verify_log
from fedcost.audit.entry import CHECKPOINT_EVENTS, canonical_json, entry_hash, format_time, read_lines, seal
from fedcost.errors import AuditLogTamperedError
from fedcost.identity import Identity

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def identity() -> Identity:
    return Identity.generate("hospital-1", "hospital")


def _small_log(path: Path, identity: Identity, *, close: bool = True) -> None:
    log = AuditLog(path, identity)
    log.append("job_received", details={"secure_aggregation": True}, at=T0)
    log.message_sent(b"update", recipient="coordinator", kind="masked_update", round=0, at=T0)
    log.checkpoint(round=0, at=T0)
    log.append("data_loaded", details={"rows": 120}, at=T0 + timedelta(seconds=1))
    if close:
        log.close(at=T0 + timedelta(seconds=2))


def test_written_log_verifies_and_round_trips_byte_for_byte(tmp_path: Path, identity: Identity) -> None:
    path = tmp_path / "hospital-1.jsonl"
    _small_log(path, identity)

    result = verify_log(path, identity.public())
    assert result.ok and result.checkpoints == 2 and result.signed_through == 4
    assert [e.seq for e in result.entries] == [0, 1, 2, 3, 4]
    assert result.entries[0].prev == GENESIS_HASH
    assert result.entries[1].time == "2025-03-01T09:00:00.000000Z"
    assert result.entries[1].details == {"recipient": "coordinator", "kind": "masked_update", "bytes": 6}
    for line, entry in zip(path.read_bytes().splitlines(), result.entries):
        assert entry.to_bytes() == line
        assert Entry.from_dict(entry.to_dict()) == entry


def test_ordinary_lines_are_rfc8785_canonical_json(tmp_path: Path, identity: Identity) -> None:
    path = tmp_path / "hospital-1.jsonl"
    _small_log(path, identity)
    line = path.read_bytes().splitlines()[1]
    assert rfc8785.dumps(json.loads(line)) == line


def test_unrecognized_fields_survive_a_round_trip(identity: Identity) -> None:
    data = {
        "seq": 0,
        "time": "2025-03-01T09:00:00.000000Z",
        "actor": "hospital-1",
        "event": "x",
        "round": None,
        "details": {},
        "digest": None,
        "prev": GENESIS_HASH,
        "site_note": [1, "a"],
    }
    entry = Entry.from_dict(dict(data))
    assert entry.unrecognized_fields == {"site_note": [1, "a"]}
    again = Entry.from_bytes(entry.to_bytes())
    assert again == entry and again.hash == entry.hash


def test_concurrent_appends_keep_one_consecutive_chain(tmp_path: Path, identity: Identity) -> None:
    path = tmp_path / "hospital-1.jsonl"
    log = AuditLog(path, identity)

    def worker(n: int) -> None:
        for i in range(100):
            log.append("message_received", round=0, details={"thread": n, "i": i})

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert len(verify_log(path, identity.public()).entries) == 801


def test_reopening_continues_the_chain(tmp_path: Path, identity: Identity) -> None:
    path = tmp_path / "hospital-1.jsonl"
    _small_log(path, identity, close=False)
    log = AuditLog(path, identity)
    assert log.append("aggregate", round=1, at=T0).seq == 4
    log.close(at=T0)
    assert verify_log(path, identity.public()).ok


def test_closed_log_takes_no_more_entries(tmp_path: Path, identity: Identity) -> None:
    path = tmp_path / "hospital-1.jsonl"
    log = AuditLog(path, identity)
    log.close(at=T0)
    with pytest.raises(ValueError, match="closed"):
        log.append("late", at=T0)
    with pytest.raises(ValueError, match="closed"):
        AuditLog(path, identity)


@pytest.mark.parametrize("event", ["checkpoint", "run_closed"])
def test_checkpoints_cannot_be_appended_unsigned(tmp_path: Path, identity: Identity, event: str) -> None:
    with pytest.raises(ValueError, match="signed checkpoint"):
        AuditLog(tmp_path / "hospital-1.jsonl", identity).append(event)


def test_naive_clock_is_refused(tmp_path: Path, identity: Identity) -> None:
    with pytest.raises(ValueError, match="naive datetime"):
        AuditLog(tmp_path / "hospital-1.jsonl", identity).append("x", at=datetime(2025, 3, 1))


def test_log_of_another_party_cannot_be_continued(tmp_path: Path, identity: Identity) -> None:
    path = tmp_path / "hospital-1.jsonl"
    _small_log(path, identity, close=False)
    with pytest.raises(AuditLogTamperedError, match="signature does not verify"):
        AuditLog(path, Identity.generate("hospital-1", "hospital"))


def test_interrupted_write_verifies_up_to_last_entry_and_says_cut(tmp_path: Path, identity: Identity) -> None:
    path = tmp_path / "hospital-1.jsonl"
    _small_log(path, identity)
    whole = path.read_bytes()
    last_line_start = whole.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(whole[: last_line_start + 40])  # the run_closed line was half written

    result = verify_log(path, identity.public())
    assert not result.ok and not result.closed
    assert result.cut is not None and result.cut.line == 5 and len(result.cut.tail) == 40
    assert [e.seq for e in result.entries] == [0, 1, 2, 3]
    assert result.signed_through == 2  # seq 3 was written but never signed
    assert "CUT: line 5" in result.describe()


def test_reopening_after_a_crash_discards_the_cut_tail_and_logs_it(tmp_path: Path, identity: Identity) -> None:
    path = tmp_path / "hospital-1.jsonl"
    _small_log(path, identity, close=False)
    with path.open("ab") as f:
        f.write(b'{"actor":"hospital-1","det')
    log = AuditLog(path, identity)
    log.close(at=T0)

    entries = verify_log(path, identity.public()).entries
    discarded = entries[4]
    assert discarded.event == "tail_discarded" and discarded.details == {"line": 5, "bytes": 26}
    assert entries[-1].event == "run_closed"


VALID = {
    "seq": 0,
    "time": "2025-03-01T09:00:00.000000Z",
    "actor": "hospital-1",
    "event": "data_loaded",
    "round": None,
    "details": {},
    "digest": None,
    "prev": GENESIS_HASH,
}
SIG = "A" * 86 + "=="


def _line(**changes: object) -> bytes:
    data = {**VALID, **changes}
    return rfc8785.dumps({k: v for k, v in data.items() if v is not ...})


NOT_CANONICAL = "not in RFC 8785 canonical form"
BAD_LINES = {
    "not JSON": (b"{oops", "line 2: not valid JSON: unexpected character"),
    "not an object": (b"[1, 2]", "expected a JSON object, got list"),
    "trailing data": (_line() + b" {}", "unexpected content after document"),
    "NaN": (_line()[:-1] + b',"x":NaN}', "not valid JSON: unexpected character, expected a JSON value"),
    "not UTF-8": (b'{"actor":"\xff"}', "not valid UTF-8"),
    "missing field": (_line(prev=...), "field 'prev' is missing"),
    "seq as text": (_line(seq="1"), "field 'seq' must be an integer"),
    "seq as boolean": (_line(seq=True), "field 'seq' must be an integer"),
    "local time": (_line(time="2025-03-01T10:00:00.000000+01:00"), "field 'time' must be UTC"),
    "non-ASCII digits": (_line(time="٢٠٢٥-03-01T09:00:00.000000Z"), "field 'time' must be UTC"),
    "negative round": (_line(round=-1), "field 'round' must be an integer >= 0"),
    "details as list": (_line(details=[]), "field 'details' must be an object"),
    "upper-case digest": (_line(digest="AB" * 32), "field 'digest' must be 64 lowercase hex"),
    "short prev": (_line(prev="ab"), "field 'prev' must be 64"),
    "unsigned checkpoint": (_line(event="checkpoint"), "field 'sig' must be a base64 Ed25519 signature"),
    "signed ordinary entry": (_line()[:-1] + f',"sig":"{SIG}"}}'.encode(), "field 'sig'"),
    "sig not last": (_line(event="checkpoint", sig=SIG), "'sig' must be a string and the last member"),
    "event as list": (_line(event=["checkpoint"]), "field 'event' must be a non-empty string"),
    "spaced": (_line().replace(b'":', b'": ', 1), NOT_CANONICAL),
    "keys out of order": (json.dumps(VALID, separators=(",", ":")).encode(), NOT_CANONICAL),
    "repeated key": (_line()[:-1] + b',"seq":0}', NOT_CANONICAL),
    "escaped letter": (_line().replace(b'"hospital-1"', b'"\\u0068ospital-1"'), NOT_CANONICAL),
    "negative zero": (_line(round=0).replace(b'"round":0', b'"round":-0'), NOT_CANONICAL),
    "float as orjson writes it": (_line(details={"x": 1.0}).replace(b'"x":1', b'"x":1.0'), NOT_CANONICAL),
}


@pytest.mark.parametrize("line, reason", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_reader_names_the_first_bad_line(tmp_path: Path, line: bytes, reason: str) -> None:
    path = tmp_path / "hospital-1.jsonl"
    path.write_bytes(_line() + b"\n" + line + b"\n" + b"garbage\n")
    with pytest.raises(AuditLogTamperedError, match=r"hospital-1.jsonl\), line 2: ") as caught:
        read_log(path)
    assert reason in str(caught.value)


def test_a_float_written_as_orjson_would_fails_verification(tmp_path: Path, identity: Identity) -> None:
    path = tmp_path / "hospital-1.jsonl"
    log = AuditLog(path, identity)
    log.append("dp_round", round=0, details={"dp_epsilon_spent": 1.0}, at=T0)
    log.close(at=T0)
    lines = path.read_bytes().splitlines()
    assert b'"dp_epsilon_spent":1}' in lines[0]
    lines[0] = lines[0].replace(b'"dp_epsilon_spent":1}', b'"dp_epsilon_spent":1.0}')  # same value
    # Even linked to the edited bytes and re-signed by the party's own key, as a party
    # would do to show different verifiers different entries.
    close = {key: value for key, value in json.loads(lines[1]).items() if key != "sig"}
    lines[1] = seal({**close, "prev": entry_hash(lines[0])}, identity.sign)[1]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    with pytest.raises(AuditLogTamperedError, match=r"line 1: not in RFC 8785 canonical form"):
        verify_log(path, identity.public())


@pytest.mark.parametrize("line, reason", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_bulk_reader_leaves_every_bad_line_to_the_line_reader(line: bytes, reason: str) -> None:
    assert read_lines([_line(), line]) is None


@pytest.mark.parametrize("enabled", [True, False])
def test_reading_leaves_the_callers_garbage_collector_as_it_was(
    tmp_path: Path, identity: Identity, enabled: bool
) -> None:
    """The reader pauses the cyclic GC and files its entries with the long-lived objects; a
    caller's own setting and its frozen objects (kept frozen before a fork) survive that."""
    path = tmp_path / "hospital-1.jsonl"
    _small_log(path, identity)
    was_enabled = gc.isenabled()
    gc.freeze()
    frozen = gc.get_freeze_count()
    (gc.enable if enabled else gc.disable)()
    try:
        assert verify_log(path, identity.public()).ok
        assert gc.isenabled() is enabled
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
        (gc.enable if was_enabled else gc.disable)()


def test_resuming_at_the_recorded_end_continues_the_chain(tmp_path: Path) -> None:
    identity = Identity.generate("hospital-1", "hospital")
    path = tmp_path / "hospital-1.jsonl"
    with AuditLog(path, identity) as log:
        log.append("data_loaded", details={"train_rows": 10})
        position = log.position
    with AuditLog(path, identity, resume=position) as log:
        log.append("job_received")
        log.close()
    assert verify_log(path, identity.public()).closed


def _two_entry_log(tmp_path: Path) -> tuple[Identity, Path, LogPosition]:
    """A node's log of two entries and where it ends, as a node keeps it to resume."""
    identity = Identity.generate("hospital-1", "hospital")
    path = tmp_path / "hospital-1.jsonl"
    with AuditLog(path, identity) as log:
        log.append("data_loaded", details={"train_rows": 10})
        log.append("job_received")
        return identity, path, log.position


def test_resuming_a_log_that_no_longer_ends_there_verifies_it_in_full(tmp_path: Path) -> None:
    identity, path, position = _two_entry_log(tmp_path)
    path.write_bytes(path.read_bytes().replace(b'"train_rows":10', b'"train_rows":100'))
    with pytest.raises(AuditLogTamperedError, match="line 2"):
        AuditLog(path, identity, resume=position)


def test_an_edit_behind_a_resumed_log_is_still_caught_by_verification(tmp_path: Path) -> None:
    identity, path, position = _two_entry_log(tmp_path)
    path.write_bytes(path.read_bytes().replace(b'"train_rows":10', b'"train_rows":99'))
    with AuditLog(path, identity, resume=position) as log:
        log.close()
    with pytest.raises(AuditLogTamperedError, match="line 2"):
        verify_log(path, identity.public())


_JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False)
)
_JSON_VALUES = st.recursive(
    _JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(_JSON_VALUES)
@settings(max_examples=400, deadline=None)
def test_canonical_json_is_byte_for_byte_rfc8785(value: object) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


_IDENTITY = Identity.generate("hospital-1", "hospital")
_EVENTS = st.sampled_from(["message_sent", "data_loaded", "checkpoint"])
# Mostly flat and ASCII, as real details are; the rest is left to the line reader.
_ASCII = st.text(st.characters(max_codepoint=0x7F), max_size=6)
_FLAT = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | _ASCII
    | st.floats(allow_nan=False, allow_infinity=False)
)
_DETAILS = st.dictionaries(_ASCII, _FLAT, max_size=4) | st.dictionaries(st.text(max_size=8), _JSON_VALUES, max_size=3)
_INSERTS = st.sampled_from([b" ", b"0", b".0", b"-", b'"', b",", b"\\u0041", b'"seq":1,', b"\xc3\xa9"])


@st.composite
def _written_lines(draw: st.DrawFn) -> list[bytes]:
    """A short log as the writer lays it out: random details, checkpoints signed."""
    lines, head = [], GENESIS_HASH
    for seq in range(draw(st.integers(1, 5))):
        event = draw(_EVENTS)
        body = {
            "seq": seq,
            "time": format_time(T0),
            "actor": "hospital-1",
            "event": event,
            "round": draw(st.none() | st.integers(0, 3)),
            "details": draw(_DETAILS),
            "digest": draw(st.none() | st.just("ab" * 32)),
            "prev": head,
        }
        entry, line = seal(body, _IDENTITY.sign if event in CHECKPOINT_EVENTS else None)
        lines.append(line)
        head = entry.hash
    return lines


@st.composite
def _edited(draw: st.DrawFn, lines: list[bytes]) -> list[bytes]:
    """``lines`` with at most one line changed: a byte inserted, dropped or replaced, its first
    integer written as a float (the same number, as orjson would write it), or the line
    re-encoded by the standard library (its own float forms, escapes, spacing); or whole
    lines deleted or swapped, which leaves every line well-formed and breaks the chain."""
    i = draw(st.integers(0, len(lines) - 1))
    line, at = lines[i], draw(st.integers(0, len(lines[i]) - 1))
    edit = draw(st.sampled_from(["none", "insert", "drop", "replace", "float", "stdlib", "delete line", "swap"]))
    if edit == "none":
        return lines
    if edit == "delete line":  # every line still well-formed; the chain is broken
        return lines[:i] + lines[i + 1 :]
    if edit == "swap":
        return [lines[-1], *lines[1:-1], lines[0]] if len(lines) > 1 else lines
    if edit == "insert":
        line = line[:at] + draw(_INSERTS) + line[at:]
    elif edit == "drop":
        line = line[:at] + line[at + 1 :]
    elif edit == "replace":
        line = line[:at] + bytes([draw(st.integers(0, 255))]) + line[at + 1 :]
    elif edit == "float":
        line = re.sub(rb"(?<=[:\[,])(-?[0-9]+)(?=[,}\]])", rb"\1.0", line, count=1)
    else:
        line = json.dumps(json.loads(line), ensure_ascii=draw(st.booleans()), separators=(",", ":")).encode()
    return lines[:i] + [line] + lines[i + 1 :]


def _line_by_line(lines: list[bytes]) -> list[Entry] | None:
    try:
        return [Entry.from_bytes(line) for line in lines]
    except ValueError:
        return None


def _bulk(lines: list[bytes]) -> list[Entry] | None:
    """The bulk reader's entries, after checking what it says of the chain against them."""
    read = read_lines(lines)
    if read is None:
        return None
    entries = read.entries
    hashes = [entry.hash for entry in entries]
    assert read.linked == (
        [entry.seq for entry in entries] == list(range(len(entries)))
        and [entry.prev for entry in entries] == [GENESIS_HASH, *hashes][:-1]
    )
    assert read.actors == {entry.actor for entry in entries}
    assert read.checkpoints == [i for i, entry in enumerate(entries) if entry.event in CHECKPOINT_EVENTS]
    return entries


@given(_written_lines().flatmap(_edited))
@settings(max_examples=500, deadline=None)
def test_bulk_reader_agrees_with_the_line_reader(lines: list[bytes]) -> None:
    assert _bulk(lines) == _line_by_line(lines)


def test_bulk_reader_reads_a_written_log_without_help(tmp_path: Path, identity: Identity) -> None:
    path = tmp_path / "hospital-1.jsonl"
    _small_log(path, identity)
    lines = path.read_bytes().splitlines()
    assert _bulk(lines) == _line_by_line(lines) is not None
