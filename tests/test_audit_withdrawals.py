"""The two ends of a deployed run that leave a message one side never logged, and the
forgeries that try to pass as them.

A **withdrawn** site: the operator revokes pharma-1 in round 2; its key is refused before
its round-2 update arrives, so its log ends unclosed; the coordinator logs it dropped and
the run ends without it. That passes only where the federation's CA revoked the site and
the coordinator's own log records the dropout after the last message the two logs share.

A **restarted** coordinator: killed in round 2 after the nodes sent their updates, it comes
back, says hello again and resumes after round 1 (``run_resumed``), so the updates sent to
the dead one are never logged as received. That passes only where the coordinator's log
resumes from before the updates' round, after a hello the node logged after sending them.
"""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from audit_mutations import write_lines

from fedcost.audit import AuditLog, verify_folder
from fedcost.audit.authority import TrustedCA
from fedcost.identity import Identity
from fedcost.identity.federation_ca import Authority, certificate_to_pem

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
NODES = {"hospital-1": "hospital", "insurer-1": "insurer", "pharma-1": "pharma"}
WITHDRAWN = "pharma-1"


class Run:
    """A run folder being written: every party's log on one clock, and a CA for the parties."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.ids = {"coordinator": Identity.generate("coordinator", "coordinator")}
        self.ids.update({name: Identity.generate(name, role) for name, role in NODES.items()})
        (folder / "audit").mkdir(parents=True)
        (folder / "identities").mkdir()
        self.ca = Authority.generate("test-federation", lifetime=timedelta(days=30), at=T0 - timedelta(days=1))
        self.certificates = {}
        for name, identity in self.ids.items():
            identity.public().save(folder / "identities")
            certificate = self.ca.issue_party(identity.public(), lifetime=timedelta(days=10), at=T0 - timedelta(days=1))
            (folder / "identities" / f"{name}.cert.pem").write_bytes(certificate_to_pem(certificate))
            self.certificates[name] = certificate
        self.logs = {
            name: AuditLog(folder / "audit" / f"{name}.jsonl", identity) for name, identity in self.ids.items()
        }
        self.coordinator = self.logs["coordinator"]
        self.clock = itertools.count()
        self.rng = random.Random(11)

    def at(self) -> datetime:
        return T0 + timedelta(seconds=next(self.clock))

    def send(self, sender: str, recipient: str, kind: str, round_: int | None, *, arrives: bool = True) -> None:
        payload = self.rng.randbytes(self.rng.randint(40, 200))
        self.logs[sender].message_sent(payload, recipient=recipient, kind=kind, round=round_, at=self.at())
        if arrives:
            self.logs[recipient].message_received(payload, sender=sender, kind=kind, round=round_, at=self.at())

    def hello(self, nodes: list[str]) -> None:
        self.coordinator.append("run_started", details={"rounds": 2}, at=self.at())
        for node in nodes:
            self.send("coordinator", node, "hello", None)
            self.logs[node].append("job_received", at=self.at())
            self.send(node, "coordinator", "hello>reply", None)

    def round(self, round_: int, nodes: list[str]) -> None:
        for node in nodes:
            self.send("coordinator", node, "secagg:train:masked-input", round_)
            self.send(node, "coordinator", "secagg:train:masked-input>reply", round_)
        for party in ["coordinator", *nodes]:
            self.logs[party].checkpoint(round=round_, at=self.at())

    def close(self, nodes: list[str]) -> None:
        for node in nodes:
            self.send("coordinator", node, "close", None)
            self.send(node, "coordinator", "close>reply", None)
            self.logs[node].close(at=self.at())
        self.coordinator.close(at=self.at())

    def trust(self, revoked: dict[str, datetime]) -> TrustedCA:
        serials = {self.certificates[name].serial_number: when for name, when in revoked.items()}
        crl = self.ca.revocation_list(serials, lifetime=timedelta(days=30), at=T0 + timedelta(hours=1))
        return TrustedCA(self.ca.certificate, self.folder / "ca.cert.pem", crl)


def withdrawn_run(folder: Path, *, dropout_by: str | None = "coordinator", dropout_round: int = 2) -> Run:
    """pharma-1 is revoked in round 2: it takes the round's model and sends its update, which
    never arrives; ``dropout_by`` logs it dropped (in ``dropout_round``); the run ends without it."""
    run = Run(folder)
    nodes = list(NODES)
    run.hello(nodes)
    run.round(1, nodes)
    if dropout_round == 1 and dropout_by:
        run.logs[dropout_by].append("dropout", round=1, details={"party": WITHDRAWN, "reason": "no reply"}, at=run.at())
    run.revoked_at = run.at()
    staying = [node for node in nodes if node != WITHDRAWN]
    for node in nodes:
        run.send("coordinator", node, "secagg:train:masked-input", 2)
        run.send(node, "coordinator", "secagg:train:masked-input>reply", 2, arrives=node != WITHDRAWN)
    if dropout_round == 2 and dropout_by:
        run.logs[dropout_by].append("dropout", round=2, details={"party": WITHDRAWN, "reason": "revoked"}, at=run.at())
    for party in ["coordinator", *staying]:
        run.logs[party].checkpoint(round=2, at=run.at())
    run.send("coordinator", WITHDRAWN, "close", None, arrives=False)
    run.close(staying)
    return run


def _problems(folder: Path, trust: TrustedCA | None) -> list[str]:
    return [str(p) for p in verify_folder(folder, trust=trust).problems]


def test_a_revoked_sites_unclosed_log_passes_where_the_coordinator_logged_it_dropped(tmp_path: Path) -> None:
    run = withdrawn_run(tmp_path)
    result = verify_folder(tmp_path, trust=run.trust({WITHDRAWN: run.revoked_at}))
    assert result.ok, result.problems
    assert result.parties[WITHDRAWN].status == "unclosed"
    assert any(
        note.startswith(
            f"{WITHDRAWN}'s log ends without run_closed: the federation's CA revoked it, and "
            "coordinator logged it dropped"
        )
        for note in result.notes
    ), result.notes


def test_without_the_cas_revocation_list_an_unclosed_log_is_truncated(tmp_path: Path) -> None:
    run = withdrawn_run(tmp_path)
    for trust in (None, run.trust({})):  # no CA, and a CA that revoked nothing
        problems = _problems(tmp_path, trust)
        assert any(
            p.startswith(f"{WITHDRAWN}: TAMPERED:") and "not a signed run_closed" in p and "line" in p for p in problems
        ), problems


def test_a_dropout_the_coordinator_never_logged_explains_nothing(tmp_path: Path) -> None:
    run = withdrawn_run(tmp_path, dropout_by=None)
    problems = _problems(tmp_path, run.trust({WITHDRAWN: run.revoked_at}))
    assert any(p.startswith(f"{WITHDRAWN}: TAMPERED:") for p in problems), problems


def test_a_dropout_the_site_logged_of_itself_explains_nothing(tmp_path: Path) -> None:
    run = withdrawn_run(tmp_path, dropout_by=WITHDRAWN)
    problems = _problems(tmp_path, run.trust({WITHDRAWN: run.revoked_at}))
    assert any(p.startswith(f"{WITHDRAWN}: TAMPERED:") for p in problems), problems


def test_a_dropout_before_the_last_shared_message_explains_nothing(tmp_path: Path) -> None:
    """Dropped in round 1, yet it took part in round 2: its log should have gone on to the close."""
    run = withdrawn_run(tmp_path, dropout_round=1)
    problems = _problems(tmp_path, run.trust({WITHDRAWN: run.revoked_at}))
    assert any(p.startswith(f"{WITHDRAWN}: TAMPERED:") for p in problems), problems


def test_a_withdrawn_sites_log_cut_before_what_the_coordinator_received_is_caught(tmp_path: Path) -> None:
    run = withdrawn_run(tmp_path)
    path = tmp_path / "audit" / f"{WITHDRAWN}.jsonl"
    lines = path.read_bytes().splitlines()
    write_lines(path, lines[:-4])  # drops its round-1 update, which the coordinator logged as received
    problems = _problems(tmp_path, run.trust({WITHDRAWN: run.revoked_at}))
    assert any(
        p.startswith("coordinator seq") and f"message_received from {WITHDRAWN}" in p and "matches no message_sent" in p
        for p in problems
    ), problems


def test_a_site_revoked_before_its_log_began_is_not_vouched_for(tmp_path: Path) -> None:
    run = withdrawn_run(tmp_path)
    problems = _problems(tmp_path, run.trust({WITHDRAWN: T0}))
    assert any(p.startswith(f"{WITHDRAWN}: UNCERTIFIED:") and "revoked" in p for p in problems), problems


def test_a_site_revoked_mid_run_that_signed_on_until_dropped_passes_as_witnessed(tmp_path: Path) -> None:
    """Fast rounds: the site signs its round-2 checkpoint after the revocation, before the
    coordinator (which logged every one of those messages) drops it."""
    run = withdrawn_run(tmp_path)
    first_signed = T0 + timedelta(seconds=13)  # after pharma-1 took the hello, before its round-1 checkpoint
    result = verify_folder(tmp_path, trust=run.trust({WITHDRAWN: first_signed}))
    assert result.ok, result.problems
    assert any("while its log ran" in note for note in result.notes), result.notes


def test_a_site_revoked_mid_run_cannot_claim_what_the_coordinator_never_sent(tmp_path: Path) -> None:
    run = withdrawn_run(tmp_path)
    forged = b"a model the coordinator never sent"
    run.logs[WITHDRAWN].message_received(forged, sender="coordinator", kind="secagg:train:setup", round=2, at=run.at())
    run.logs[WITHDRAWN].checkpoint(round=2, at=run.at())
    problems = _problems(tmp_path, run.trust({WITHDRAWN: T0 + timedelta(seconds=13)}))
    assert any(WITHDRAWN in p and "matches no message_sent" in p for p in problems), problems


def restarted_run(
    folder: Path, *, resumed_after: int | None = 1, resumed_by: str = "coordinator", late_send: bool = False
) -> Run:
    """The coordinator dies in round 2 after the nodes sent their updates; it comes back, says
    hello again, logs ``run_resumed`` (by ``resumed_by``, after round ``resumed_after``) and
    runs round 2 again. ``late_send``: hospital-1 also claims an update sent after the
    restart's hello, which the coordinator never logged."""
    run = Run(folder)
    nodes = list(NODES)
    run.hello(nodes)
    run.round(1, nodes)
    for node in nodes:
        run.send("coordinator", node, "secagg:train:masked-input", 2)
        run.send(node, "coordinator", "secagg:train:masked-input>reply", 2, arrives=False)
    run.hello(nodes)
    if resumed_after is not None:
        run.logs[resumed_by].append("run_resumed", details={"after_round": resumed_after}, at=run.at())
    if late_send:
        run.send("hospital-1", "coordinator", "secagg:train:masked-input>reply", 2, arrives=False)
    run.round(2, nodes)
    run.close(nodes)
    return run


def test_updates_in_flight_when_the_coordinator_restarted_pass_where_it_resumed_before_their_round(
    tmp_path: Path,
) -> None:
    restarted_run(tmp_path)
    result = verify_folder(tmp_path)
    assert result.ok, result.problems


def _lost_updates(problems: list[str]) -> set[str]:
    return {p.split(" seq")[0] for p in problems if "was never logged as received by coordinator" in p}


def test_a_restart_without_run_resumed_explains_no_lost_update(tmp_path: Path) -> None:
    restarted_run(tmp_path, resumed_after=None)
    assert _lost_updates(_problems(tmp_path, None)) == set(NODES)


def test_a_restart_that_claims_the_round_was_done_explains_no_lost_update(tmp_path: Path) -> None:
    restarted_run(tmp_path, resumed_after=2)
    assert _lost_updates(_problems(tmp_path, None)) == set(NODES)


def test_a_run_resumed_a_node_logged_explains_no_lost_update(tmp_path: Path) -> None:
    restarted_run(tmp_path, resumed_by="insurer-1")
    assert _lost_updates(_problems(tmp_path, None)) == set(NODES)


def test_an_update_sent_after_the_restarts_hello_must_still_arrive(tmp_path: Path) -> None:
    restarted_run(tmp_path, late_send=True)
    problems = _problems(tmp_path, None)
    assert _lost_updates(problems) == {"hospital-1"} and len(problems) == 1, problems


def test_a_message_lost_at_the_restart_and_sent_again_identical_pairs_with_its_receipt(tmp_path: Path) -> None:
    """A round's message whose bytes do not change when the round runs again (a survivor
    set's signatures): lost in flight at the kill, sent again after the restart, received
    once. The receipt is the resend's; the lost first send is explained by the restart."""
    run = Run(tmp_path)
    nodes = list(NODES)
    run.hello(nodes)
    run.round(1, nodes)
    same = b"the survivor set and its signatures, as both incarnations send it"
    kind = "secagg:train:consistency"
    run.logs["coordinator"].message_sent(same, recipient="hospital-1", kind=kind, round=2, at=run.at())
    run.hello(nodes)
    run.logs["coordinator"].append("run_resumed", details={"after_round": 1}, at=run.at())
    run.logs["coordinator"].message_sent(same, recipient="hospital-1", kind=kind, round=2, at=run.at())
    run.logs["hospital-1"].message_received(same, sender="coordinator", kind=kind, round=2, at=run.at())
    run.round(2, nodes)
    run.close(nodes)
    result = verify_folder(tmp_path)
    assert result.ok, result.problems
