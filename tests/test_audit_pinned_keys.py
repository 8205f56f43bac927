"""Attacks on the identities a run's logs are verified against; every one must be named.

A forger who can write the run folder can re-sign a party's log with a fresh key and put
that key's identity file beside it: the log then verifies against its identity. What the
folder cannot rewrite names it: the key ids the other parties' logs recorded at the start
of the run, and the federation's CA. The runs here are small and real: a coordinator and
three nodes, one round, real ``AuditLog`` files, real identities and a real CA.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from audit_mutations import rechain, write_lines
from cryptography import x509
from typer.testing import CliRunner

from fedcost.audit import AuditLog, verify_folder, verify_log
from fedcost.audit.authority import TrustedCA, short
from fedcost.audit.commands import audit_app
from fedcost.federation.provision import Federation, FederationConfig
from fedcost.identity import Identity, PublicIdentity
from fedcost.identity.federation_ca import Authority, certificate_to_pem, crl_to_pem
from fedcost.wire.events import Event

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
ROLES = {"coordinator": "coordinator", "hospital-1": "hospital", "insurer-1": "insurer", "pharma-1": "pharma"}
OTHERS = {party: [other for other in ROLES if other != party] for party in ROLES}


def _identities() -> dict[str, Identity]:
    return {name: Identity.generate(name, role) for name, role in ROLES.items()}


def _key_ids(ids: Mapping[str, Identity]) -> dict[str, str]:
    return {name: identity.public().key_id for name, identity in ids.items()}


def write_run(
    folder: Path, ids: Mapping[str, Identity], *, held: Mapping[str, Mapping[str, str]] | None = None
) -> Path:
    """A one-round run: the coordinator sends each node the model and gets a masked update back.

    ``held``: the key ids each party records at the start of the run, as the bindings do
    (default: every party's real key); a party missing from it records none, like a log
    written before the bindings recorded them.
    """
    held = {party: _key_ids(ids) for party in ids} if held is None else held
    (folder / "audit").mkdir(parents=True)
    (folder / "identities").mkdir()
    for identity in ids.values():
        identity.public().save(folder / "identities")
    logs = {name: AuditLog(folder / "audit" / f"{name}.jsonl", identity) for name, identity in ids.items()}
    clock = itertools.count()

    def at() -> datetime:
        return T0 + timedelta(seconds=next(clock))

    def pinned(party: str) -> dict[str, object]:
        return {"key_ids": dict(held[party])} if party in held else {}

    coordinator = logs["coordinator"]
    coordinator.append(Event.RUN_STARTED, details={"rounds": 1, **pinned("coordinator")}, at=at())
    for node in OTHERS["coordinator"]:
        logs[node].append(Event.JOB_RECEIVED, details={"rounds": 1, **pinned(node)}, at=at())
        model, update = node.encode() * 8, node.encode() * 16
        coordinator.message_sent(model, recipient=node, kind="global_model", round=0, at=at())
        logs[node].message_received(model, sender="coordinator", kind="global_model", round=0, at=at())
        logs[node].message_sent(update, recipient="coordinator", kind="masked_update", round=0, at=at())
        coordinator.message_received(update, sender=node, kind="masked_update", round=0, at=at())
    for log in logs.values():
        log.checkpoint(round=0, at=at())
    for log in logs.values():
        log.close(at=at())
    return folder


def swap_in_fresh_key(run: Path, party: str) -> Identity:
    """The forgery: re-sign the party's log with a fresh key and put that key's identity file in place."""
    impostor = Identity.generate(party, ROLES[party])
    path = run / "audit" / f"{party}.jsonl"
    write_lines(path, rechain(path.read_bytes().splitlines(), 0, sign=impostor.sign))
    impostor.public().save(run / "identities")
    assert verify_log(path, impostor.public()).ok  # on its own, the forged log is flawless
    return impostor


def _problems(run: Path, trust: TrustedCA | None = None) -> list[str]:
    return [str(problem) for problem in verify_folder(run, trust=trust).problems]


# ---- pinned by the other parties ---------------------------------------------------------


def test_a_run_whose_parties_pinned_each_other_verifies(tmp_path: Path) -> None:
    result = verify_folder(write_run(tmp_path, _identities()))
    assert result.ok, result.problems
    assert {party: status.status for party, status in result.parties.items()} == dict.fromkeys(ROLES, "ok")
    assert result.notes == []


def test_a_log_resigned_with_a_fresh_key_and_a_swapped_identity_file_is_named(tmp_path: Path) -> None:
    ids = _identities()
    run = write_run(tmp_path, ids)
    impostor = swap_in_fresh_key(run, "hospital-1")

    result = verify_folder(run)
    assert result.parties["hospital-1"].status == "key disputed"
    assert [str(p) for p in result.problems] == [
        f"hospital-1: KEY DISPUTED: identities/hospital-1.pub.json has key id {short(impostor.public().key_id)}; "
        f"coordinator, insurer-1 and pharma-1 recorded {short(ids['hospital-1'].public().key_id)} for hospital-1 "
        "at the start of the run: the identity file (or the log it verifies) was replaced, or they ran with a "
        "substituted key; verify with --ca to tell which"
    ]


@pytest.mark.parametrize("party", ROLES)
def test_a_swapped_identity_passes_nowhere_when_the_other_parties_pinned_it(tmp_path: Path, party: str) -> None:
    run = write_run(tmp_path, _identities())
    swap_in_fresh_key(run, party)

    result = verify_folder(run)
    disputed = result.parties[party]
    assert not result.ok and disputed.status == "key disputed"
    assert f"{' and '.join([', '.join(OTHERS[party][:-1]), OTHERS[party][-1]])} recorded" in disputed.detail
    assert all(result.parties[other].status == "ok" for other in OTHERS[party])


def test_a_party_no_other_log_pins_is_trusted_only_from_the_folder(tmp_path: Path) -> None:
    ids = _identities()
    everyone = _key_ids(ids)
    without_the_coordinator = {name: key_id for name, key_id in everyone.items() if name != "coordinator"}
    held = {"coordinator": everyone} | dict.fromkeys(OTHERS["coordinator"], without_the_coordinator)
    run = write_run(tmp_path, ids, held=held)
    swap_in_fresh_key(run, "coordinator")

    assert _problems(run) == [
        "coordinator: KEY UNPINNED: coordinator's key is pinned by no other party's log; its identity is trusted "
        "only from this folder (identities/coordinator.pub.json): verify with --ca, or collect the logs of the "
        "parties that ran with it"
    ]


def test_logs_from_before_key_ids_verify_with_a_note_saying_what_they_trust(tmp_path: Path) -> None:
    run = write_run(tmp_path, _identities(), held={})
    swap_in_fresh_key(run, "hospital-1")  # nothing in these logs can tell: the limit the note states

    result = verify_folder(run)
    assert result.ok
    assert result.notes == [
        "no log records the key ids its party held for the others (logs from before fedcost "
        "recorded them), so every key is trusted from this folder only; verify with --ca or "
        "--federation to pin the keys to the federation's CA"
    ]


def test_a_party_deleted_whole_is_named_by_those_who_pinned_it(tmp_path: Path) -> None:
    ids = _identities()
    run = write_run(tmp_path, ids)
    (run / "audit" / "pharma-1.jsonl").unlink()
    (run / "identities" / "pharma-1.pub.json").unlink()

    result = verify_folder(run)
    assert result.parties["pharma-1"].status == "missing party"
    assert _problems(run)[0] == (
        f"pharma-1: MISSING PARTY: coordinator, hospital-1 and insurer-1 recorded {short(_key_ids(ids)['pharma-1'])} "
        "for pharma-1 at the start of the run, but this folder has neither audit/pharma-1.jsonl nor "
        "identities/pharma-1.pub.json: collect both from pharma-1"
    )


def test_a_tampered_log_cannot_accuse_another_party(tmp_path: Path) -> None:
    ids = _identities()
    held = {party: _key_ids(ids) for party in ROLES}
    held["coordinator"]["hospital-1"] = Identity.generate("hospital-1", "hospital").public().key_id
    run = write_run(tmp_path, ids, held=held)
    assert verify_folder(run).parties["hospital-1"].status == "key disputed"  # a signed log's word counts

    coordinator_log = run / "audit" / "coordinator.jsonl"
    write_lines(coordinator_log, coordinator_log.read_bytes().splitlines()[:-1])
    result = verify_folder(run)
    assert result.parties["coordinator"].status == "tampered"
    assert result.parties["hospital-1"].status == "ok"  # an unverified log pins nothing


def test_key_ids_that_are_no_key_ids_are_a_problem_of_the_log_that_holds_them(tmp_path: Path) -> None:
    ids = _identities()
    held = {party: _key_ids(ids) for party in ROLES}
    held["coordinator"] = {"hospital-1": "not a key id"}
    problems = _problems(write_run(tmp_path, ids, held=held))
    assert problems == [
        "coordinator seq 0: details.key_ids of run_started must map party names to key ids "
        "(64 hex digits); the software that wrote this log is faulty, so it pins no key"
    ]


def test_an_unreadable_log_is_named_not_a_traceback(tmp_path: Path) -> None:
    run = write_run(tmp_path, _identities())
    (run / "audit" / "pharma-1.jsonl").unlink()
    (run / "audit" / "pharma-1.jsonl").mkdir()
    status = verify_folder(run).parties["pharma-1"]
    assert status.status == "unreadable log" and status.detail.startswith("audit/pharma-1.jsonl cannot be read (")


# ---- pinned by the federation's CA -------------------------------------------------------


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority.generate("demo", lifetime=timedelta(days=3650), at=T0 - timedelta(days=30))


def _certify(
    run: Path, ids: Mapping[str, Identity], authority: Authority, *, at: datetime = T0 - timedelta(days=1)
) -> dict[str, x509.Certificate]:
    """Write ``identities/<party>.cert.pem`` for every party, as the coordinator's binding does."""
    certificates = {}
    for name, identity in ids.items():
        certificates[name] = authority.issue_party(identity.public(), lifetime=timedelta(days=365), at=at)
        (run / "identities" / f"{name}.cert.pem").write_bytes(certificate_to_pem(certificates[name]))
    return certificates


@pytest.fixture
def ca_file(tmp_path: Path, authority: Authority) -> Path:
    path = tmp_path / "ca.cert.pem"
    path.write_bytes(certificate_to_pem(authority.certificate))
    return path


@pytest.fixture
def certified_run(tmp_path: Path, authority: Authority) -> tuple[Path, dict[str, Identity]]:
    ids = _identities()
    run = write_run(tmp_path / "run", ids)
    _certify(run, ids, authority)
    return run, ids


def test_with_the_ca_a_run_of_certified_parties_verifies(certified_run: tuple[Path, dict], ca_file: Path) -> None:
    result = verify_folder(certified_run[0], trust=TrustedCA.from_file(ca_file))
    assert result.ok, result.problems
    assert result.notes == [
        f"no revocation list came with {ca_file}, so revocations were not checked; "
        "--federation DIR checks them against DIR/ca/revoked.crl.pem"
    ]


def test_with_the_ca_a_fully_rewritten_run_is_caught(
    certified_run: tuple[Path, dict], ca_file: Path, tmp_path: Path
) -> None:
    run, ids = certified_run
    fresh = _identities()
    forged = write_run(tmp_path / "forged", fresh)  # every log, identity and key id rewritten
    for certificate in (run / "identities").glob("*.cert.pem"):
        shutil.copy(certificate, forged / "identities")
    assert verify_folder(forged).ok  # the limit of pinning by the parties alone

    result = verify_folder(forged, trust=TrustedCA.from_file(ca_file))
    for party in ROLES:
        assert result.parties[party].status == "uncertified"
        assert result.parties[party].detail == (
            f"identities/{party}.pub.json has key id {short(fresh[party].public().key_id)}, but "
            f"identities/{party}.cert.pem from the federation's CA certifies {short(ids[party].public().key_id)} "
            f"for {party}: the identity file (or the log it verifies) was replaced"
        )


def test_a_certificate_from_another_ca_is_refused(certified_run: tuple[Path, dict], ca_file: Path) -> None:
    run, _ = certified_run
    impostor = swap_in_fresh_key(run, "hospital-1")
    forger_ca = Authority.generate("demo", lifetime=timedelta(days=3650), at=T0 - timedelta(days=30))
    certificate = forger_ca.issue_party(impostor.public(), lifetime=timedelta(days=365), at=T0 - timedelta(days=1))
    (run / "identities" / "hospital-1.cert.pem").write_bytes(certificate_to_pem(certificate))

    result = verify_folder(run, trust=TrustedCA.from_file(ca_file))
    assert result.parties["hospital-1"].status == "uncertified"
    assert str(result.problems[0]) == (
        f"hospital-1: UNCERTIFIED: identities/hospital-1.cert.pem is not issued by the federation's CA ({ca_file}): "
        "the key it certifies is not the federation's key for hospital-1"
    )


def test_a_missing_certificate_is_named(certified_run: tuple[Path, dict], ca_file: Path) -> None:
    run, _ = certified_run
    (run / "identities" / "pharma-1.cert.pem").unlink()
    result = verify_folder(run, trust=TrustedCA.from_file(ca_file))
    assert result.parties["pharma-1"].detail == (
        "no certificate for pharma-1 (looked for identities/pharma-1.cert.pem): without one from the federation's "
        "CA its key is trusted from this folder only; ask the federation operator for it"
    )


@pytest.mark.parametrize(
    "forgery, expected",
    [
        ("another party's", "identities/hospital-1.cert.pem certifies 'insurer-1', not hospital-1"),
        (
            "another role",
            "identities/hospital-1.cert.pem certifies hospital-1 as insurer, but "
            "identities/hospital-1.pub.json says hospital: the identity file was replaced",
        ),
    ],
)
def test_a_certificate_for_another_party_or_role_is_refused(
    certified_run: tuple[Path, dict], ca_file: Path, authority: Authority, forgery: str, expected: str
) -> None:
    run, ids = certified_run
    target = run / "identities" / "hospital-1.cert.pem"
    if forgery == "another party's":
        shutil.copy(run / "identities" / "insurer-1.cert.pem", target)
    else:
        as_insurer = PublicIdentity("hospital-1", "insurer", ids["hospital-1"].public().public_key)
        certificate = authority.issue_party(as_insurer, lifetime=timedelta(days=365), at=T0 - timedelta(days=1))
        target.write_bytes(certificate_to_pem(certificate))
    assert verify_folder(run, trust=TrustedCA.from_file(ca_file)).parties["hospital-1"].detail.startswith(expected)


@pytest.mark.parametrize(
    "revoked_at, fails",
    [(T0 + timedelta(days=1), False), (T0 + timedelta(seconds=5), True)],
    ids=["after the run", "during the run"],
)
def test_a_certificate_revoked_after_the_run_is_reported_not_failed(
    tmp_path: Path, authority: Authority, revoked_at: datetime, fails: bool
) -> None:
    ids = _identities()
    run = write_run(tmp_path, ids)
    serial = _certify(run, ids, authority)["insurer-1"].serial_number
    crl = authority.revocation_list({serial: revoked_at}, lifetime=timedelta(days=30), at=revoked_at)
    trust = TrustedCA(authority.certificate, tmp_path / "ca.cert.pem", crl)

    result = verify_folder(run, trust=trust)
    insurer = result.parties["insurer-1"]
    when = f"{revoked_at:%Y-%m-%d %H:%M:%S} UTC"
    if fails:
        assert insurer.status == "uncertified"
        assert insurer.detail.startswith(
            f"identities/insurer-1.cert.pem was revoked at {when}, before insurer-1's log ended"
        )
    else:
        assert result.ok, result.problems
        assert result.notes[0].startswith(
            f"insurer-1's certificate (identities/insurer-1.cert.pem) was revoked at {when}, after its log ended"
        )


def test_a_log_signed_before_its_certificate_was_issued_is_refused(
    tmp_path: Path, authority: Authority, ca_file: Path
) -> None:
    ids = _identities()
    run = write_run(tmp_path / "run", ids)
    _certify(run, ids, authority, at=T0 + timedelta(days=1))
    result = verify_folder(run, trust=TrustedCA.from_file(ca_file))
    assert all(status.status == "uncertified" for status in result.parties.values())
    assert "but coordinator's log runs from 2025-03-01 09:00:00 UTC" in result.parties["coordinator"].detail


# ---- pinned by a federation folder -------------------------------------------------------


@pytest.fixture
def federation(tmp_path: Path) -> Federation:
    federation = Federation.init(
        tmp_path / "demo", FederationConfig("demo", "127.0.0.1:9093"), at=T0 - timedelta(days=1)
    )
    for name, role in ROLES.items():
        if name != "coordinator":
            federation.add_node(name, role, at=T0 - timedelta(days=1))
    return federation


def _federation_run(folder: Path, federation: Federation) -> Path:
    ids = {name: Identity.load(federation.kit_dir(name), name) for name in OTHERS["coordinator"]}
    return write_run(folder, {"coordinator": federation.coordinator_identity(), **ids})


def test_with_the_federation_folder_its_certificates_and_revocations_pin_the_run(
    tmp_path: Path, federation: Federation
) -> None:
    run = _federation_run(tmp_path / "run", federation)  # no certificates in the run: the federation's count
    assert verify_folder(run, trust=federation.trusted_ca(at=T0 + timedelta(days=2))).ok

    federation.revoke("pharma-1", at=T0 + timedelta(days=1))
    result = verify_folder(run, trust=federation.trusted_ca(at=T0 + timedelta(days=2)))
    assert result.ok and len(result.notes) == 1 and result.notes[0].startswith("pharma-1's certificate")

    swap_in_fresh_key(run, "insurer-1")
    result = verify_folder(run, trust=federation.trusted_ca(at=T0 + timedelta(days=2)))
    assert result.parties["insurer-1"].status == "uncertified"
    assert f"but {federation.root / 'nodes' / 'insurer-1' / 'node.cert.pem'} from the federation's CA" in (
        result.parties["insurer-1"].detail
    )


# ---- the command line ----------------------------------------------------------------------


def test_cli_verify_pins_with_the_ca_and_names_the_swapped_file(
    certified_run: tuple[Path, dict], ca_file: Path, tmp_path: Path, federation: Federation
) -> None:
    run, _ = certified_run
    runner = CliRunner()
    passed = runner.invoke(audit_app, ["verify", str(run), "--ca", str(ca_file)])
    assert passed.exit_code == 0 and "all logs verified and reconciled" in passed.output
    assert "NOTE     no revocation list" in passed.output

    federated = _federation_run(tmp_path / "federated", federation)
    passed = runner.invoke(audit_app, ["verify", str(federated), "--federation", str(federation.root)])
    assert passed.exit_code == 0 and "NOTE" not in passed.output, passed.output

    swap_in_fresh_key(run, "pharma-1")
    failed = runner.invoke(audit_app, ["verify", str(run), "--ca", str(ca_file)])
    assert failed.exit_code == 1
    assert "PROBLEM  pharma-1: UNCERTIFIED: identities/pharma-1.pub.json has key id" in failed.output


def _foreign_crl(federation: Federation) -> None:
    other = Authority.generate("other", lifetime=timedelta(days=3650), at=T0)
    federation.crl_file.write_bytes(crl_to_pem(other.revocation_list({}, lifetime=timedelta(days=3650), at=T0)))


@pytest.mark.parametrize(
    "case",
    ["no CA file", "a party's certificate", "not PEM", "not a federation", "a foreign revocation list", "both options"],
)
def test_cli_a_bad_option_is_one_line_naming_the_file_and_exit_2(
    certified_run: tuple[Path, dict], federation: Federation, tmp_path: Path, case: str
) -> None:
    run, _ = certified_run
    options, expected = {
        "no CA file": (["--ca", str(tmp_path / "nowhere.pem")], f"{tmp_path / 'nowhere.pem'}: cannot be read"),
        "a party's certificate": (
            ["--ca", str(run / "identities" / "coordinator.cert.pem")],
            "coordinator.cert.pem: not a CA certificate",
        ),
        "not PEM": (
            ["--ca", str(run / "identities" / "coordinator.pub.json")],
            "coordinator.pub.json: not a PEM certificate",
        ),
        "not a federation": (["--federation", str(run)], f"{run}: not a federation folder"),
        "a foreign revocation list": (
            ["--federation", str(federation.root)],
            f"{federation.crl_file}: the revocation list is not signed by the federation",
        ),
        "both options": (
            ["--ca", str(federation.ca_cert_file), "--federation", str(federation.root)],
            "give --ca or --federation, not both",
        ),
    }[case]
    if case == "a foreign revocation list":
        _foreign_crl(federation)
    result = CliRunner().invoke(audit_app, ["verify", str(run), *options])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and expected in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
