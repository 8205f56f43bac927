"""The episode linkage at the node, end to end: the real ClientApps of two hospitals and an
insurer, driven in-process by an honest coordinator (``RemoteSite`` over a grid that hands
each message to its node) and by a malicious one crafting its own messages."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import DEFAULT_TTL, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.app.message.message import make_message

from fedcost.client.app import make_client_app
from fedcost.client.node import NodeSetup
from fedcost.data.files import write_node_files
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.data.synthetic_episodes import generate_linked_extracts
from fedcost.identity import Identity
from fedcost.linkage import EpisodeWindow, link_episodes
from fedcost.linkage.episodes import EpisodePlan, EpisodeSite
from fedcost.linkage.intersection_sum import Session, answer_offer
from fedcost.linkage.windows import read_extract
from fedcost.server.episodes import RemoteSite
from fedcost.wire import records as rec
from fedcost.wire.hello import Hello
from fedcost.wire.purposes import PURPOSES

pytestmark = pytest.mark.usefixtures("inside_a_server_app")

COORDINATOR = Identity.generate("coordinator", "coordinator")
SIZES = {"hospital": [120, 6], "insurer": [80]}  # hospital-2: fewer stays than the small-cell rule
WINDOW = EpisodeWindow()
RUN = "episodes-1"
PARTIES = ("hospital-1", "hospital-2", "insurer-1")


@pytest.fixture(scope="module")
def mapping(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ecosystem = generate_ecosystem(EcosystemSpec.from_sizes(SIZES), seed=3)
    extracts = generate_linked_extracts(ecosystem, 3, WINDOW).extracts
    rows = ((n.name, n.role, n.frame) for n in ecosystem.nodes)
    return write_node_files(rows, tmp_path_factory.mktemp("data"), extracts)


@pytest.fixture(scope="module")
def identities() -> dict[str, Identity]:
    return {name: Identity.generate(name, name.split("-")[0]) for name in PARTIES}


@dataclass
class Site:
    setup: NodeSetup
    context: Context

    def __post_init__(self) -> None:
        self.app = make_client_app(lambda context: self.setup)

    def send(self, config: dict) -> Message:
        metadata = Metadata(1, "attack", 0, 1, "", "", time.time(), DEFAULT_TTL, MessageType.QUERY)
        return self.app(make_message(metadata, RecordDict({rec.CONFIG: ConfigRecord(config)})), self.context)

    def refusals(self) -> list[str]:
        lines = (self.setup.audit_dir / f"{self.setup.name}.jsonl").read_text().splitlines()
        return [entry["details"]["reason"] for entry in map(json.loads, lines) if entry["event"] == "refusal"]


def _sites(mapping: Path, folder: Path, identities: dict[str, Identity], **share: bool) -> dict[str, Site]:
    roster = tuple(sorted((name, identity.public().raw_key) for name, identity in identities.items()))
    sites = {}
    for name, identity in identities.items():
        policy = {
            "coordinator": COORDINATOR.public().key_id,
            "max_rounds": 5,
            "privacy": {"epsilon": math.inf},
            "share_episodes": share.get(name.replace("-", "_"), True),
        }
        (folder / f"{name}.toml").write_bytes(tomli_w.dumps(policy).encode())
        setup = NodeSetup(
            mapping,
            name,
            3,
            identity_key=identity.raw_private_key,
            roster=roster,
            audit_dir=folder,
            policy=folder / f"{name}.toml",
        )
        sites[name] = Site(setup, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    return sites


def _plan(payers: tuple[str, ...] = ("insurer-1",)) -> EpisodePlan:
    return EpisodePlan(RUN, WINDOW, 11, ("hospital-1", "hospital-2"), payers)


def _hello(plan: EpisodePlan) -> dict:
    hello = Hello(
        run_id=RUN,
        coordinator=COORDINATOR.public().key_id,
        secure_aggregation=True,
        rounds=1,
        min_cohort=11,
        model_parameters=0,
        outputs={"episodes": PURPOSES["episodes"].outputs},
        episodes=plan.to_json(),
    )
    return dict(hello.to_record())


class _Grid:
    """Hands each message to the ClientApp of its node (node ids: 1, 2, 3 in ``PARTIES`` order)."""

    def __init__(self, sites: dict[str, Site]):
        self.sites = [sites[name] for name in PARTIES]

    def send_and_receive(self, messages: list[Message]) -> list[Message]:
        return [self._answer(message) for message in messages]

    def _answer(self, message: Message) -> Message:
        site = self.sites[message.metadata.dst_node_id - 1]
        metadata = Metadata(1, "m", 0, message.metadata.dst_node_id, "", "", time.time(), DEFAULT_TTL, "query")
        return site.app(make_message(metadata, message.content), site.context)


def _link(mapping: Path, sites: dict[str, Site], identities: dict[str, Identity]):
    roster = {name: identity.private_key.public_key() for name, identity in identities.items()}
    grid = _Grid(sites)
    remote = [RemoteSite(grid, PARTIES.index(name) + 1, name, RUN) for name in PARTIES]  # type: ignore[arg-type]
    return link_episodes(_plan(), remote, roster)


def test_the_linkage_through_each_sites_guardian_equals_it_in_one_process(mapping, tmp_path, identities) -> None:
    sites = _sites(mapping, tmp_path, identities)
    for site in sites.values():
        reply = site.send(_hello(_plan()))
        assert not reply.has_error(), reply.error.reason
    remote = _link(mapping, sites, identities)
    roster = {name: identity.private_key.public_key() for name, identity in identities.items()}
    local = [
        EpisodeSite(
            name,
            identities[name].role,
            read_extract(identities[name].role, mapping.parent / f"{name}.episodes.csv"),
            identities[name].private_key,
            roster,
            shares_episodes=True,
            min_cohort=11,
        )
        for name in PARTIES
    ]
    assert remote == link_episodes(_plan(), local, roster)
    hospital = remote.hospitals[0]
    assert hospital.payers["insurer-1"] > 0 and hospital.stays == 120
    assert remote.hospitals[1].episode_cost is None  # 6 stays: withheld at the hospital
    assert not any(site.refusals() for site in sites.values())


def test_a_site_that_does_not_share_episodes_refuses_at_its_hello(mapping, tmp_path, identities) -> None:
    sites = _sites(mapping, tmp_path, identities, insurer_1=False)
    reply = sites["insurer-1"].send(_hello(_plan()))
    assert reply.has_error() and "share_episodes = false" in reply.error.reason
    assert any("share_episodes = false" in reason for reason in sites["insurer-1"].refusals())


def _started(mapping, tmp_path, identities) -> dict[str, Site]:
    sites = _sites(mapping, tmp_path, identities)
    for site in sites.values():
        assert not site.send(_hello(_plan())).has_error()
    return sites


def _step(stage: str, peer: str, **relayed: bytes) -> dict:
    return {
        rec.TRANSPORT: rec.LINK,
        rec.PURPOSE: "episodes",
        rec.ROUND: 0,
        rec.STAGE: stage,
        rec.PEER: peer,
        **relayed,
    }


def test_a_hospital_refuses_a_set_the_coordinator_crafted(mapping, tmp_path, identities) -> None:
    """The coordinator takes the hospital's genuine offer and answers it itself with one
    patient's days, to read that patient's cost off the hospital's report: refused."""
    sites = _started(mapping, tmp_path, identities)
    hospital = sites["hospital-1"]
    offer = hospital.send(_step("offer", "insurer-1")).content[rec.LINKAGE]
    session = Session(RUN, "hospital-1", "insurer-1")
    from fedcost.linkage.intersection_sum import Offer

    genuine = Offer(session, bytes(offer["reply_key"]), bytes(offer["items"]), bytes(offer["signature"]))
    target = read_extract("hospital", mapping.parent / "hospital-1.episodes.csv")
    one_patient = {
        (target.keys[0], day): 100_00 for day in range(int(target.admission[0]) - 3, int(target.admission[0]) + 30)
    }
    crafted, _ = answer_offer(
        genuine, session, Ed25519PrivateKey.generate(), identities["hospital-1"].private_key.public_key(), one_patient
    )
    reply = hospital.send(
        _step("report", "insurer-1", sender_key=crafted.sender_key, sealed=crafted.sealed, signature=crafted.signature)
    )
    assert reply.has_error() and not reply.has_content()
    assert "authentication failed" in reply.error.reason
    assert hospital.refusals()
    # The session is spent: not even the payer's genuine answer is taken after a crafted one.
    answer, _ = answer_offer(
        genuine, session, identities["insurer-1"].private_key, identities["hospital-1"].private_key.public_key(), {}
    )
    again = hospital.send(
        _step("report", "insurer-1", sender_key=answer.sender_key, sealed=answer.sealed, signature=answer.signature)
    )
    assert again.has_error() and "an offer it did not make" in again.error.reason


def test_a_step_is_answered_once_and_only_by_the_party_it_is_for(mapping, tmp_path, identities) -> None:
    sites = _started(mapping, tmp_path, identities)
    hospital, insurer = sites["hospital-1"], sites["insurer-1"]
    assert not hospital.send(_step("offer", "insurer-1")).has_error()
    again = hospital.send(_step("offer", "insurer-1"))
    assert again.has_error() and "a site answers each once" in again.error.reason
    wrong = insurer.send(_step("totals", ""))
    assert wrong.has_error() and "does not fit this site's part" in wrong.error.reason
    stranger = hospital.send(_step("offer", "hospital-2"))
    assert stranger.has_error() and "does not fit this site's part" in stranger.error.reason


def test_a_linkage_request_smuggling_a_field_is_refused(mapping, tmp_path, identities) -> None:
    sites = _started(mapping, tmp_path, identities)
    reply = sites["hospital-1"].send({**_step("totals", ""), "filter": "age < 30"})
    assert reply.has_error() and "'filter'" in reply.error.reason


def test_a_hospital_of_few_stays_withholds_its_totals(mapping, tmp_path, identities) -> None:
    sites = _started(mapping, tmp_path, identities)
    reply = sites["hospital-2"].send(_step("totals", ""))
    assert not reply.has_error()
    assert dict(reply.content[rec.LINKAGE]) == {rec.STAGE: "episodes-totals", "withheld": True}


def test_a_deployed_job_links_every_admitted_hospital_with_every_payer_by_role(tmp_path) -> None:
    """A deployed coordinator knows its sites' roles from their certificates, not their
    mappings: the plan links them all (a site without an extract refuses at the hello), and
    a federation without a hospital or a payer stops the job with the reason."""
    from fedcost.errors import FederationError
    from fedcost.federation.coordinator_app import _episode_plan
    from fedcost.federation.job import FederationJob

    job = tmp_path / "job.toml"
    job.write_text('[model]\nkind = "glm"\n\n[analytics]\nepisodes = { before_days = 2, after_days = 14 }\n')
    roles = {"st-mary": "hospital", "northcare": "insurer", "valley": "hospital", "medco": "pharma"}
    plan = _episode_plan(FederationJob.load(job), "r1", roles)
    assert plan is not None and plan.hospitals == ("st-mary", "valley") and plan.payers == ("medco", "northcare")
    assert (plan.window.before_days, plan.window.after_days) == (2, 14)
    with pytest.raises(FederationError, match="leave \\[analytics\\] episodes out"):
        _episode_plan(FederationJob.load(job), "r1", {"st-mary": "hospital", "valley": "hospital"})


@pytest.mark.parametrize(
    ("configs", "allowed"),
    [
        ({"reply_key": bytes(32), "items": bytes(64), "signature": bytes(64)}, True),
        ({"reply_key": bytes(32), "items": bytes(65), "signature": bytes(64)}, False),  # not whole points
        ({"reply_key": bytes(32), "items": bytes(64), "signature": bytes(64), "note": "p1"}, False),
        ({"reply_key": bytes(32), "items": "p1,2024-01-01", "signature": bytes(64)}, False),
    ],
)
def test_the_egress_guard_lets_an_offer_carry_curve_points_and_nothing_else(configs, allowed) -> None:
    from fedcost.privacy import OutgoingMessage, SitePolicy, inspect_outgoing
    from fedcost.privacy.policy import PrivacySettings

    policy = SitePolicy(COORDINATOR.public().key_id, PrivacySettings(epsilon=math.inf), 5, share_episodes=True)
    message = OutgoingMessage(
        kind="query",
        stage="episodes-offer",
        arrays={},
        metrics={},
        configs={"name": "hospital-1", "role": "hospital", "stage": "episodes-offer", **configs},
        cohort_size=0,
        expected_arrays={},
    )
    assert inspect_outgoing(policy, message).allowed is allowed


def test_a_bad_extract_fails_the_hello_and_the_site_log_names_file_row_and_column(
    mapping, tmp_path, identities, caplog
) -> None:
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(mapping.parent, folder)
    claims = folder / "insurer-1.episodes.csv"
    lines = claims.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",-12.50"
    claims.write_text("\n".join(lines) + "\n")
    sites = _sites(folder / mapping.name, tmp_path, identities)
    reply = sites["insurer-1"].send(_hello(_plan()))
    assert reply.has_error() and "the site's own data or configuration failed its check" in reply.error.reason
    assert f"{claims}, row 3, column 'cost'" in caplog.text


def test_a_second_job_with_another_window_over_the_same_extract_is_refused(mapping, tmp_path, identities) -> None:
    """Sums over windows of 30 and 29 days after discharge differ by what a payer paid on the
    30th day around a hospital's stays: a handful of patients. The first window holds."""
    sites = _sites(mapping, tmp_path, identities)
    insurer = sites["insurer-1"]
    assert not insurer.send(_hello(_plan())).has_error()
    narrower = EpisodePlan("episodes-2", EpisodeWindow(3, 29), 11, ("hospital-1", "hospital-2"), ("insurer-1",))
    reply = insurer.send({**_hello(narrower), "run_id": "episodes-2"})
    assert reply.has_error() and "a site keeps one window per extract" in reply.error.reason
    same = EpisodePlan("episodes-3", WINDOW, 11, ("hospital-1", "hospital-2"), ("insurer-1",))
    assert not insurer.send({**_hello(same), "run_id": "episodes-3"}).has_error()
