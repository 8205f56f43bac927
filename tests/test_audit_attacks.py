"""Attacks on a run's audit logs, each named for what it tries; every one must be caught.

The logs come from a small simulated run: a coordinator and three nodes, three rounds.
Each round the coordinator sends the global model to every node and each node sends a
masked update back; every party checkpoints at each round end and closes at the end.
pharma-1 refuses round 2 (budget exhausted) and the coordinator logs it as dropped.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from audit_mutations import assert_mutations_detected
from audit_mutations import encode as _encode
from audit_mutations import rechain as _rechain
from audit_mutations import write_lines as _write
from typer.testing import CliRunner

from fedcost.audit import AuditLog, reconcile, verify_folder, verify_log
from fedcost.audit.commands import audit_app
from fedcost.errors import AuditLogTamperedError
from fedcost.identity import Identity

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
NODES = {"hospital-1": "hospital", "insurer-1": "insurer", "pharma-1": "pharma"}
PARTIES = ["coordinator", *NODES]
Pristine = tuple[Path, dict[str, Identity]]  # the untouched run folder and every party's identity


def simulate_run(
    folder: Path, *, lost_update: tuple[str, int] | None = None, excused: bool = True
) -> dict[str, Identity]:
    """Write a run folder; ``lost_update`` = (node, round) whose update never arrives."""
    rng = random.Random(7)
    ids = {"coordinator": Identity.generate("coordinator", "coordinator")}
    ids.update({name: Identity.generate(name, role) for name, role in NODES.items()})
    (folder / "audit").mkdir(parents=True)
    (folder / "identities").mkdir()
    for identity in ids.values():
        identity.public().save(folder / "identities")
    logs = {name: AuditLog(folder / "audit" / f"{name}.jsonl", identity) for name, identity in ids.items()}
    coordinator, clock = logs["coordinator"], itertools.count()

    def at() -> datetime:
        return T0 + timedelta(seconds=next(clock))

    coordinator.append("run_started", details={"secure_aggregation": True, "rounds": 3}, at=at())
    for node in NODES:
        logs[node].append("job_received", details={"secure_aggregation": True, "dp_epsilon": 3.0}, at=at())
    for round_ in range(3):
        for node in NODES:
            model = rng.randbytes(64)
            coordinator.message_sent(model, recipient=node, kind="global_model", round=round_, at=at())
            logs[node].message_received(model, sender="coordinator", kind="global_model", round=round_, at=at())
            if (node, round_) == ("pharma-1", 2):
                logs[node].append("refusal", round=round_, details={"reason": "budget exhausted"}, at=at())
                coordinator.append("dropout", round=round_, details={"party": node}, at=at())
                continue
            update = rng.randbytes(rng.randint(100, 400))
            logs[node].message_sent(
                update,
                recipient="coordinator",
                kind="masked_update",
                round=round_,
                details={"dp_epsilon_spent": 0.5 * (round_ + 1)},
                at=at(),
            )
            if lost_update == (node, round_):
                if excused:
                    coordinator.append("dropout", round=round_, details={"party": node}, at=at())
                continue
            coordinator.message_received(update, sender=node, kind="masked_update", round=round_, at=at())
        coordinator.append("aggregate", round=round_, at=at())
        for log in logs.values():
            log.checkpoint(round=round_, at=at())
    for log in logs.values():
        log.close(at=at())
    return ids


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    folder = tmp_path_factory.mktemp("pristine")
    return folder, simulate_run(folder)


@pytest.fixture
def run(pristine: Pristine, tmp_path: Path) -> Path:
    shutil.copytree(pristine[0], tmp_path / "run")
    return tmp_path / "run"


def _log(run: Path, party: str) -> Path:
    return run / "audit" / f"{party}.jsonl"


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def _caught(run: Path, party: str) -> list[str]:
    """The folder must fail, with a problem that names the party and a line."""
    result = verify_folder(run)
    found = [str(p) for p in result.problems if p.party == party]
    assert not result.ok and any(re.search(r"line \d+", p) for p in found), found
    return found


def test_untouched_run_verifies_and_reconciles(run: Path) -> None:
    result = verify_folder(run)
    assert result.ok, result.problems
    assert {p: s.status for p, s in result.parties.items()} == dict.fromkeys(PARTIES, "ok")
    assert reconcile({p: s.verification.entries for p, s in result.parties.items()}) == []


@pytest.mark.parametrize(
    "keep",
    [10, 9, 7, 5],
    ids=[
        "close removed",
        "last checkpoint and close removed",
        "cut after an earlier checkpoint",
        "cut before a checkpoint",
    ],
)
def test_truncation_is_detected(run: Path, pristine: Pristine, keep: int) -> None:
    path = _log(run, "hospital-1")
    _write(path, _lines(path)[:keep])
    with pytest.raises(AuditLogTamperedError, match=rf"hospital-1 .*line {keep} \(seq {keep - 1}\): log ends with"):
        verify_log(path, pristine[1]["hospital-1"].public())
    _caught(run, "hospital-1")


def test_deleted_entry_is_detected(run: Path) -> None:
    path = _log(run, "insurer-1")
    lines = _lines(path)
    _write(path, lines[:3] + lines[4:])
    assert any("line 4 (seq 4): seq 4 where 3 was expected" in p for p in _caught(run, "insurer-1"))


def test_reordered_entries_are_detected(run: Path) -> None:
    path = _log(run, "coordinator")
    lines = _lines(path)
    lines[5], lines[6] = lines[6], lines[5]
    _write(path, lines)
    assert any("line 6 (seq 6): seq 6 where 5 was expected" in p for p in _caught(run, "coordinator"))


def test_duplicated_entry_is_detected(run: Path) -> None:
    path = _log(run, "pharma-1")
    lines = _lines(path)
    _write(path, lines[:3] + lines[2:])
    assert any("line 4 (seq 2): seq 2 where 3 was expected" in p for p in _caught(run, "pharma-1"))


def test_edited_entry_is_detected_at_the_next_link(run: Path) -> None:
    path = _log(run, "hospital-1")
    lines = _lines(path)
    data = json.loads(lines[2])
    data["details"]["bytes"] += 1000
    lines[2] = _encode(data)
    _write(path, lines)
    assert any("line 4 (seq 3): prev does not match the hash of line 3" in p for p in _caught(run, "hospital-1"))


def test_edited_close_breaks_its_signature(run: Path) -> None:
    path = _log(run, "hospital-1")
    lines = _lines(path)
    data = json.loads(lines[-1])
    data["time"] = "2025-03-02T09:00:00.000000Z"
    lines[-1] = _encode(data)
    _write(path, lines)
    assert any("checkpoint signature does not verify" in p for p in _caught(run, "hospital-1"))


def test_inserted_and_relinked_entry_fails_the_next_checkpoint(run: Path) -> None:
    path = _log(run, "coordinator")
    lines = _lines(path)
    forged = {**json.loads(lines[4]), "digest": "ab" * 32}
    relinked = _rechain(lines[:5] + [_encode(forged)] + lines[5:], 5)
    _write(path, relinked)
    assert any("checkpoint signature does not verify" in p for p in _caught(run, "coordinator"))


def test_resigned_log_under_other_key_is_detected(run: Path) -> None:
    path = _log(run, "insurer-1")
    impostor = Identity.generate("insurer-1", "insurer")
    _write(path, _rechain(_lines(path), 0, sign=impostor.sign))
    found = _caught(run, "insurer-1")
    assert any("line 4 (seq 3): checkpoint signature does not verify against insurer-1's key" in p for p in found)


def test_edited_digest_breaks_reconciliation(run: Path, pristine: Pristine) -> None:
    """The coordinator itself rewrites a received digest and re-signs: only the nodes' logs can tell."""
    path = _log(run, "coordinator")
    lines = _lines(path)
    seq = next(i for i, line in enumerate(lines) if b'"sender":"insurer-1"' in line)
    data = json.loads(lines[seq])
    data["digest"] = "00" * 32
    lines[seq] = _encode(data)
    _write(path, _rechain(lines, seq, sign=pristine[1]["coordinator"].sign))

    result = verify_folder(run)
    assert result.parties["coordinator"].status == "ok"
    problems = [str(p) for p in result.problems]
    assert len(problems) == 2
    assert problems[0].startswith(f"coordinator seq {seq}: message_received from insurer-1 (round 0")
    assert re.match(r"insurer-1 seq \d+: message_sent to coordinator \(round 0.*never logged as received", problems[1])


@pytest.mark.parametrize("excused", [True, False], ids=["dropout logged", "silently lost"])
def test_update_lost_without_a_logged_dropout_is_reported(tmp_path: Path, excused: bool) -> None:
    simulate_run(tmp_path, lost_update=("insurer-1", 1), excused=excused)
    problems = [str(p) for p in verify_folder(tmp_path).problems]
    if excused:
        assert problems == []
    else:
        assert len(problems) == 1 and "insurer-1 seq" in problems[0] and "(round 1" in problems[0]


def test_deleted_log_file_is_detected(run: Path) -> None:
    _log(run, "pharma-1").unlink()
    result = verify_folder(run)
    assert result.parties["pharma-1"].status == "missing log"
    assert [str(p) for p in result.problems if p.party == "pharma-1"] == [
        "pharma-1: MISSING LOG: no pharma-1.jsonl",
        "pharma-1: no verified audit log to check 5 message(s) against",
    ]


def test_log_without_identity_is_not_trusted(run: Path) -> None:
    (run / "identities" / "hospital-1.pub.json").unlink()
    result = verify_folder(run)
    assert result.parties["hospital-1"].status == "missing identity" and not result.ok


def test_logs_and_identities_side_by_side_verify(run: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in [*(run / "audit").iterdir(), *(run / "identities").iterdir()]:
        shutil.copy(path, flat)
    assert verify_folder(flat).ok


# ---- many random single mutations ------------------------------------------------------


def test_a_thousand_random_mutations_are_all_detected(run: Path) -> None:
    roles = {party: NODES.get(party, "coordinator") for party in PARTIES}
    kinds = assert_mutations_detected(run, roles, count=1000, seed=20250301)
    assert len(kinds) == 10 and min(kinds.values()) >= 50, kinds


# ---- the command line ------------------------------------------------------------------


def test_cli_verify_exit_codes(run: Path) -> None:
    runner = CliRunner()
    passed = runner.invoke(audit_app, ["verify", str(run)])
    assert passed.exit_code == 0 and "all logs verified and reconciled" in passed.output

    path = _log(run, "pharma-1")
    _write(path, _lines(path)[:-1])
    failed = runner.invoke(audit_app, ["verify", str(run)])
    assert failed.exit_code == 1
    assert "pharma-1" in failed.output and "line 10 (seq 9)" in failed.output and "run_closed" in failed.output

    missing = runner.invoke(audit_app, ["verify", str(run / "nowhere")])
    assert missing.exit_code == 1


def test_cli_report_html_names_every_site(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = CliRunner().invoke(audit_app, ["report", str(run), "--format", "html", "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.startswith("<!doctype html>") and "<script" not in page and "http" not in page
    for party in PARTIES:
        assert f"<td>{party}</td>" in page


def test_cli_report_json_summarises_what_each_site_sent(run: Path) -> None:
    result = CliRunner().invoke(audit_app, ["report", str(run), "--format", "json"])
    report = json.loads(result.output)
    pharma = report["sites"]["pharma-1"]
    assert report["ok"] and pharma["rounds_joined"] == [0, 1] and pharma["messages_sent"] == 2
    assert pharma["output_kinds"] == ["masked_update"]
    assert pharma["protections"] == {"secure_aggregation": True, "dp_epsilon": 3, "dp_epsilon_spent": 1}
    assert pharma["refusals"] == [
        {"seq": 8, "time": pharma["refusals"][0]["time"], "round": 2, "reason": "budget exhausted"}
    ]
    table = CliRunner().invoke(audit_app, ["report", str(run)]).output
    assert all(party in table for party in PARTIES)
