"""Provisioning: federation folder, startup kits, revocation, expiry, the roster a node trusts,
job files and the checks a node runs before it starts. All in-process and quick."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from fedcost.data.files import write_node_files
from fedcost.data.mapping import DataMapping
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.errors import CertificateError, ConfigError, CoordinatorUnreachableError, DataValidationError, KitError
from fedcost.federation import roster
from fedcost.federation.job import FederationJob
from fedcost.federation.processes import free_port, prepare_node, probe_coordinator
from fedcost.federation.provision import Federation, FederationConfig, Kit, fleet_address
from fedcost.identity import Identity
from fedcost.identity.federation_ca import Authority, utc_now

NOW = utc_now()


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Federation:
    root = tmp_path_factory.mktemp("federations") / "demo"
    federation = Federation.init(root, FederationConfig("demo", "127.0.0.1:9093"), at=NOW)
    for name, role in (("h1", "hospital"), ("i1", "insurer"), ("p1", "pharma")):
        federation.add_node(name, role, at=NOW)
    return federation


def _private_key_blobs(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and b"PRIVATE KEY" in p.read_bytes()
    }


def test_startup_kit_holds_no_other_partys_secret(federation):
    kit = federation.kit_dir("h1")
    assert sorted(p.name for p in kit.iterdir()) == [
        "auth.key.pem",
        "auth.pub",
        "ca.cert.pem",
        "coordinator.cert.pem",
        "h1.key.pem",
        "h1.pub.json",
        "kit.toml",
        "node.cert.pem",
    ]
    own = set(_private_key_blobs(kit).values())
    others = {
        **_private_key_blobs(federation.root / "ca"),
        **_private_key_blobs(federation.coordinator_dir),
        **_private_key_blobs(federation.kit_dir("i1")),
        **_private_key_blobs(federation.kit_dir("p1")),
    }
    assert others and not own & set(others.values())
    assert set(_private_key_blobs(kit)) == {"auth.key.pem", "h1.key.pem"}


def test_operator_keeps_no_node_secret_outside_the_kits(federation):
    assert _private_key_blobs(federation.root / "nodes") == {}


def test_kit_loads_and_names_the_coordinator_key(federation):
    kit = Kit.load(federation.kit_dir("h1"))
    assert (kit.name, kit.role, kit.address) == ("h1", "hospital", "127.0.0.1:9093")
    assert kit.coordinator.key_id == federation.coordinator_identity().public().key_id


def test_kit_with_a_swapped_certificate_is_refused(federation, tmp_path):
    kit = tmp_path / "kit"
    shutil.copytree(federation.kit_dir("h1"), kit)
    (kit / "node.cert.pem").write_bytes((federation.kit_dir("i1") / "node.cert.pem").read_bytes())
    with pytest.raises(KitError, match="does not certify this kit's identity key"):
        Kit.load(kit)


def test_every_enrolled_node_is_admitted(federation):
    assert {name: reason for name, (_, reason) in federation.admission(at=NOW).items()} == {
        "h1": None,
        "i1": None,
        "p1": None,
    }


def test_revoked_and_expired_nodes_are_not_admitted_and_say_why(tmp_path):
    federation = Federation.init(tmp_path / "f", FederationConfig("f", "127.0.0.1:9093"), at=NOW)
    federation.add_node("ok", "hospital", at=NOW)
    federation.add_node("gone", "insurer", at=NOW)
    federation.add_node("short", "pharma", at=NOW, days=1 / 86400)
    federation.revoke("gone", at=NOW)
    reasons = {name: reason for name, (_, reason) in federation.admission(at=NOW + timedelta(seconds=5)).items()}
    assert reasons["ok"] is None
    assert "revoked" in reasons["gone"]
    assert "expired" in reasons["short"]
    with pytest.raises(KitError, match="expired .* ask your federation operator for a new kit"):
        Kit.load(federation.kit_dir("short")).check_valid(at=NOW + timedelta(seconds=5))


def test_a_name_is_enrolled_once(federation):
    with pytest.raises(ConfigError, match="already enrolled"):
        federation.add_node("h1", "hospital", at=NOW)


def test_node_trusts_the_roster_its_ca_signed(federation):
    kit = Kit.load(federation.kit_dir("h1"))
    record = roster.roster_record([federation.node(n).certificate for n in ("h1", "i1", "p1")], federation.crl())
    members = roster.trusted_roster(record, kit, at=NOW)
    assert [name for name, _ in members] == ["h1", "i1", "p1"]


def test_node_refuses_a_roster_key_the_coordinator_substituted(federation):
    """A coordinator without the CA key mints its own certificate for i1: refused."""
    rogue = Authority.generate("demo", lifetime=timedelta(days=1), at=NOW)
    forged = rogue.issue_party(Identity.generate("i1", "insurer").public(), lifetime=timedelta(days=1), at=NOW)
    record = roster.roster_record([federation.node("h1").certificate, forged], federation.crl())
    with pytest.raises(CertificateError, match="'i1' is not issued by the federation's CA"):
        roster.trusted_roster(record, Kit.load(federation.kit_dir("h1")), at=NOW)


def test_node_refuses_a_roster_without_its_own_certificate(federation):
    record = roster.roster_record([federation.node(n).certificate for n in ("i1", "p1")], federation.crl())
    with pytest.raises(CertificateError, match="own certificate"):
        roster.trusted_roster(record, Kit.load(federation.kit_dir("h1")), at=NOW)


def test_job_refuses_simulation_sections(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[run]\nrounds = 2\n[ecosystem]\ncase_mix_shift = 0.1\n")
    with pytest.raises(ConfigError, match=r"job.toml, field 'ecosystem'.*fedcost simulate"):
        FederationJob.load(path)


def test_job_round_trips_with_its_data_section(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[run]\nrounds = 2\n[data]\ntargets = ["readmitted_30d"]\n')
    job = FederationJob.load(path)
    (tmp_path / "again.toml").write_bytes(job.to_toml())
    again = FederationJob.load(tmp_path / "again.toml")
    assert again.to_dict() == job.to_dict()
    assert again.config.model.tasks == ("readmission",)


def test_node_with_a_bad_cell_fails_before_it_connects(federation, tmp_path):
    """``--data`` replaces the mapping's file; its first bad cell is named by file, row and column."""
    node = generate_ecosystem(EcosystemSpec.from_sizes({"hospital": (60,)}), 3).nodes[0]
    mapping = write_node_files([("h1", "hospital", node.frame)], tmp_path)
    frame = node.frame.astype({"age": "object"})
    frame.loc[16, "age"] = "abc"
    frame.to_csv(tmp_path / "h1.csv", index=False)
    with pytest.raises(DataValidationError, match=r"h1.csv, row 17, column 'age'"):
        prepare_node(
            federation.kit_dir("h1"),
            data=tmp_path / "h1.csv",
            mapping=mapping,
            policy=None,
            state=tmp_path / "state",
            split_seed=1,
            test_fraction=0.2,
            at=NOW,
        )


def test_unreachable_coordinator_is_named_with_what_to_do(federation):
    with pytest.raises(
        CoordinatorUnreachableError, match="cannot reach the coordinator at 127.0.0.1:.*check that it is running"
    ):
        probe_coordinator(f"127.0.0.1:{free_port()}", federation.ca_cert_file, timeout=2)


def test_an_omop_sites_data_is_its_extracts_folder(federation, tmp_path):
    """``--data`` replaces an OMOP node's folder: the node checks the extract it is given."""
    example = Path(__file__).resolve().parents[1] / "examples" / "omop"
    mapping = tmp_path / "mapping.toml"
    mapping.write_text((example / "mapping.toml").read_text().replace("[nodes.riverside]", "[nodes.h1]"))
    state = tmp_path / "state"
    kit = prepare_node(
        federation.kit_dir("h1"),
        data=example / "lakeside",
        mapping=mapping,
        policy=None,
        state=state,
        split_seed=1,
        test_fraction=0.2,
        at=NOW,
    )
    assert kit.name == "h1"
    assert DataMapping.load(state / "mapping.toml").node("h1").omop.folder == (example / "lakeside").resolve()
    with pytest.raises(DataValidationError, match="the OMOP person table is required"):
        prepare_node(
            federation.kit_dir("h1"),
            data=tmp_path,
            mapping=mapping,
            policy=None,
            state=state,
            split_seed=1,
            test_fraction=0.2,
            at=NOW,
        )


def test_nodes_reach_the_coordinator_on_the_port_after_its_address():
    assert fleet_address("coordinator.example.org:9093") == "coordinator.example.org:9094"
    assert fleet_address("[::1]:9093") == "[::1]:9094"
    with pytest.raises(ValueError, match="below 65535.*its nodes use the next port"):
        FederationConfig("demo", "127.0.0.1:65535")


def test_every_mistake_of_a_job_is_reported_together(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(
        "[run]\ntest_fraction = 0.3\nseeed = 1\n[ecosystem]\ncase_mix_shift = 0.1\n"
        '[data]\ntargets = { died = "count" }\n'
    )
    with pytest.raises(ConfigError) as caught:
        FederationJob.load(path)
    assert [error.field for error in caught.value.errors] == [
        "ecosystem",
        "run.test_fraction",
        "data.targets.died",
        "run.seeed",
    ]


def test_a_federation_file_and_a_kit_file_name_each_mistake(federation, tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    (root / "federation.toml").write_text('name = "f"\naddress = "127.0.0.1:9093"\ncert_days = "ten"\nport = 1\n')
    with pytest.raises(ConfigError) as caught:
        Federation.load(root)
    assert [error.field for error in caught.value.errors] == ["port", "cert_days"]
    kit = tmp_path / "kit"
    shutil.copytree(federation.kit_dir("h1"), kit)
    text = (kit / "kit.toml").read_text()
    (kit / "kit.toml").write_text(text.replace("role =", "rol =").replace('name = "h1"', "name = 1"))
    with pytest.raises(KitError) as caught:
        Kit.load(kit)
    assert [error.field for error in caught.value.errors] == ["rol", "name", "role"]
    assert "kit.toml, field 'role': required" in str(caught.value)
