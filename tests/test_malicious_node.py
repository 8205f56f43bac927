"""A malicious node against the coordinator: what it sends back through the real message path.

``SharedSums`` drives real nodes (the ClientApp of ``guardian_bench``) over a grid that
hands each message to its site; one site's replies are then rewritten as a node running
modified code could write them. The coordinator must not crash, must not take a sum no
set of honest nodes could have sent, and must name the site in the reason it logs.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from guardian_bench import RUN, Bench

from fedcost.client.node import Node
from fedcost.config import SecureAggregationSection
from fedcost.data.files import write_node_files
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.errors import ConfigError, FederationError, SumNotRecoveredError
from fedcost.federation.collect import collect
from fedcost.federation.provision import Federation, FederationConfig
from fedcost.federation.site_report import read_report
from fedcost.identity.federation_ca import utc_now
from fedcost.run_folder import RunFolder
from fedcost.secagg import shamir
from fedcost.server.app import say_hello
from fedcost.server.shared_sum import SharedSums, SumResult
from fedcost.wire import records as rec

pytestmark = pytest.mark.usefixtures("inside_a_server_app")

SITES = ("hospital-1", "hospital-2", "hospital-3", "hospital-4")
ATTACKER = "hospital-2"

# A rewrite of the attacker's reply: (the request's records, the reply's records) -> new records.
Rewrite = Callable[[RecordDict, RecordDict], RecordDict]


@pytest.fixture(scope="module")
def mapping(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ecosystem = generate_ecosystem(EcosystemSpec.from_sizes({"hospital": [300, 260, 220, 180]}), seed=5)
    return write_node_files(((n.name, n.role, n.frame) for n in ecosystem.nodes), tmp_path_factory.mktemp("data"))


class AttackerGrid:
    """Each message goes to its site's real ClientApp; the attacker's answers are rewritten."""

    def __init__(self, bench: Bench, rewrite: Rewrite):
        self.sites = {site.node_id: site for site in bench.sites.values()}
        self.rewrite = rewrite

    def send_and_receive(self, messages: Iterable[Message]) -> list[Message]:
        replies = []
        for message in messages:
            site = self.sites[message.metadata.dst_node_id]
            reply = site.answer(message.content, message.metadata.message_type)
            if site.name == ATTACKER and not reply.has_error():
                reply.content = self.rewrite(message.content, reply.content)
            replies.append(reply)
        return replies


def _bench(mapping: Path, folder: Path, secure: bool = True) -> Bench:
    bench = Bench(folder, mapping, SITES, require_secure_aggregation=secure)
    hello = bench.hello(secure_aggregation=secure)
    assert all(not reply.has_error() for reply in bench.say_hello(hello).values())
    return bench


def _train(bench: Bench, rewrite: Rewrite, *, secure: bool = True) -> SumResult:
    """One training sum over every site, as the coordinator asks for it (the federation's rows as
    the round's total weight); no retries, so what one attempt does is what the test sees."""
    sites = {site.node_id: site.name for site in bench.sites.values()}
    settings = SecureAggregationSection(enabled=secure, retries=0)
    sums = SharedSums(AttackerGrid(bench, rewrite), sites, settings, RUN, bench.roster)  # type: ignore[arg-type]
    job, weights = bench.job_and_weights(SITES[0])
    rows = sum(len(Node(bench.site(name).setup).data.train) for name in SITES)
    shapes = rec.update_shapes(weights)
    return sums.run("train", 1, shapes, sorted(sites), weights, job.to_json(), total_weight=rows)


def _stage(request: RecordDict) -> str:
    return str(request[rec.SECAGG]["stage"])


def _secagg(content: RecordDict) -> dict:
    return rec.join_message_dict(content[rec.SECAGG], content.array_records.get(rec.CONTRIBUTION))


def _with_secagg(content: RecordDict, data: dict) -> RecordDict:
    secagg, arrays = rec.split_message_dict(data)
    content[rec.SECAGG] = secagg
    if len(arrays):
        content[rec.CONTRIBUTION] = arrays
    elif rec.CONTRIBUTION in content:
        del content[rec.CONTRIBUTION]
    return content


# --- secure sums ----------------------------------------------------------------------------


class Replayer:
    """The attacker answers ``stage`` with its own reply to the stage before."""

    def __init__(self, stage: str):
        self.stage = stage
        self.last: dict | None = None

    def __call__(self, request: RecordDict, content: RecordDict) -> RecordDict:
        if _stage(request) == self.stage:
            assert self.last is not None
            return _with_secagg(content, self.last)
        self.last = _secagg(content)
        return content


@pytest.mark.parametrize("stage", ["share-keys", "masked-input", "unmask"])
def test_a_reply_for_another_stage_is_its_sites_dropout_and_the_others_still_sum(
    mapping: Path, tmp_path: Path, stage: str
) -> None:
    """It aborted the whole round, the site unnamed: one node could stop every sum."""
    result = _train(_bench(mapping, tmp_path), Replayer(stage))
    if stage == "unmask":  # a node lost during unmask is still in the sum
        assert result.included == sorted(SITES)
    else:
        assert result.included == sorted(set(SITES) - {ATTACKER})
    assert f"where a {stage} reply was owed" in result.dropouts[ATTACKER]


def test_a_reply_for_another_stage_at_consistency_is_named_in_the_abort(mapping: Path, tmp_path: Path) -> None:
    with pytest.raises(SumNotRecoveredError) as refused:
        _train(_bench(mapping, tmp_path), Replayer("consistency"))
    assert "where a consistency reply was owed" in refused.value.dropouts[ATTACKER]


@pytest.mark.parametrize("claim", [1, 10**9, -(10**4)])
def test_a_summed_weight_no_honest_sites_can_send_is_refused(mapping: Path, tmp_path: Path, claim: int) -> None:
    """A node adds to its masked input's weight entry (the masks cancel as ever): one more row than
    the federation's, a billion rows to outweigh every other site, or a negative weight. The
    coordinator took the sum, and its mean, as it came."""

    def heavier(request: RecordDict, content: RecordDict) -> RecordDict:
        if _stage(request) != "masked-input":
            return content
        data = _secagg(content)
        bits = rec.quantizer_from_config(request[rec.CONFIG]).bits
        masked = data["masked"].astype(object)
        masked[-1] = (masked[-1] + claim) % 2**bits
        return _with_secagg(content, {**data, "masked": masked.astype(data["masked"].dtype)})

    with pytest.raises(SumNotRecoveredError, match="the summed weight .* is outside") as refused:
        _train(_bench(mapping, tmp_path), heavier)
    assert ", ".join(sorted(SITES)) in str(refused.value)


def _at(stage: str, change: Callable[[dict], dict]) -> Rewrite:
    """The attacker rewrites its secure-aggregation reply at ``stage``."""

    def rewrite(request: RecordDict, content: RecordDict) -> RecordDict:
        return _with_secagg(content, change(_secagg(content))) if _stage(request) == stage else content

    return rewrite


def test_a_reply_claiming_another_nodes_id_is_its_sites_dropout(mapping: Path, tmp_path: Path) -> None:
    bench = _bench(mapping, tmp_path)
    other = rec.secure_id(bench.roster, "hospital-3")
    result = _train(bench, _at("masked-input", lambda data: {**data, "node_id": other}))
    assert result.included == sorted(set(SITES) - {ATTACKER})
    assert f"reply claims to come from node {other}" in result.dropouts[ATTACKER]


def test_a_plain_contribution_in_a_secure_sum_is_its_sites_dropout(mapping: Path, tmp_path: Path) -> None:
    """Its input in the clear where a masked one was owed: the coordinator neither reads nor adds it."""

    def in_the_clear(request: RecordDict, content: RecordDict) -> RecordDict:
        if _stage(request) != "masked-input":
            return content
        del content[rec.SECAGG]
        content[rec.CONTRIBUTION] = rec.arrays_record([np.ones(3)])
        content[rec.METRICS] = MetricRecord({rec.WEIGHT: 240})
        return content

    result = _train(_bench(mapping, tmp_path), in_the_clear)
    assert result.included == sorted(set(SITES) - {ATTACKER})
    assert "malformed secure-aggregation reply" in result.dropouts[ATTACKER]


def test_an_unmask_reply_revealing_a_live_neighbours_mask_key_share_is_left_out(mapping: Path, tmp_path: Path) -> None:
    """Its seed shares and, besides, the key shares of live neighbours: with both, a live node's
    input could be unmasked alone. The coordinator takes neither; the sum needs no more shares."""

    def both(data: dict) -> dict:
        return {**data, **{f"key_{column}": data[f"seed_{column}"] for column in ("owners", "xs", "values")}}

    result = _train(_bench(mapping, tmp_path), _at("unmask", both))
    assert result.included == sorted(SITES), "a node lost in unmask is still in the sum"
    assert "shares do not match the survivor set" in result.dropouts[ATTACKER]


def test_a_false_seed_share_in_unmask_aborts_the_sum_naming_its_revealers(mapping: Path, tmp_path: Path) -> None:
    """One seed share off by one rebuilt a neighbour's seed off by a field element that still fits
    32 bytes: a wrong self-mask was taken out, and noise passed for the sum. The shares beyond
    the threshold now check each other."""

    def off_by_one(data: dict) -> dict:
        values = [(int.from_bytes(v, "big") + 1).to_bytes(len(v), "big") for v in data["seed_values"]]
        return {**data, "seed_values": values}

    bench = _bench(mapping, tmp_path)
    with pytest.raises(SumNotRecoveredError, match="disagree: one of them revealed a false share") as refused:
        _train(bench, _at("unmask", off_by_one))
    revealers = re.search(r"revealed by nodes \[([\d, ]+)\]", str(refused.value))
    assert revealers is not None and rec.secure_id(bench.roster, ATTACKER) in map(int, revealers[1].split(", "))


@pytest.mark.parametrize("false", range(5))
def test_a_false_share_is_seen_wherever_it_sits_among_more_shares_than_the_threshold(false: int) -> None:
    shares = shamir.share(secrets.token_bytes(shamir.SECRET_SIZE), 3, 5)
    assert shamir.consistent(shares, 3)
    x, value = shares[false]
    shares[false] = (x, (int.from_bytes(value, "big") + 1).to_bytes(len(value), "big"))
    assert not shamir.consistent(shares, 3)
    assert shamir.consistent(shares[:3], 3), "at the threshold, nothing checks a share"


# --- plain sums -----------------------------------------------------------------------------


def _metrics(weight: object) -> Rewrite:
    def lie(request: RecordDict, content: RecordDict) -> RecordDict:
        del content[rec.METRICS]
        if weight is not None:
            record = ConfigRecord if isinstance(weight, str) else MetricRecord
            content[rec.METRICS] = record({rec.WEIGHT: weight})
        return content

    return lie


def _arrays(change: Callable[[list[np.ndarray]], list[np.ndarray]] | None) -> Rewrite:
    def lie(request: RecordDict, content: RecordDict) -> RecordDict:
        arrays = rec.arrays_list(content[rec.CONTRIBUTION])
        del content[rec.CONTRIBUTION]
        if change is not None:
            content[rec.CONTRIBUTION] = rec.arrays_record(change(arrays))
        return content

    return lie


def _first(value: float) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    return lambda arrays: [np.full_like(arrays[0], value), *arrays[1:]]


@pytest.mark.parametrize(
    ("rewrite", "reason"),
    [
        (_metrics(None), "lacks its 'contribution' arrays or its 'weight' metric"),
        (_metrics("many"), "lacks its 'contribution' arrays or its 'weight' metric"),  # not a metric record
        (_metrics(float("nan")), "its weight nan is not an integer"),
        (_metrics(10**9), "its weight 1000000000 is not an integer in 1.."),
        (_metrics(0), "its weight 0 is not an integer"),
        (_metrics(-5), "its weight -5 is not an integer"),
        (_metrics(240.5), "its weight 240.5 is not an integer"),
        (_arrays(None), "lacks its 'contribution' arrays"),
        (_arrays(_first(float("nan"))), "NaN or infinite"),
        (_arrays(_first(float("-inf"))), "NaN or infinite"),
        (_arrays(lambda arrays: [arrays[0].T, *arrays[1:]]), "not the sum's"),
    ],
)
def test_a_plain_contribution_out_of_bounds_is_its_sites_dropout(
    mapping: Path, tmp_path: Path, rewrite: Rewrite, reason: str
) -> None:
    """A run with secure aggregation off: the coordinator crashed (a KeyError, a ValueError) or
    summed a NaN, a negative or a billion-row weight into the model."""
    result = _train(_bench(mapping, tmp_path, secure=False), rewrite, secure=False)
    assert result.included == sorted(set(SITES) - {ATTACKER})
    assert reason in result.dropouts[ATTACKER]
    assert all(np.isfinite(array).all() for array in result.arrays)


def test_a_plain_contribution_is_clipped_as_secure_aggregation_clips_it(mapping: Path, tmp_path: Path) -> None:
    huge = _train(_bench(mapping, tmp_path / "huge", secure=False), _arrays(_first(1e30)), secure=False)
    assert huge.included == sorted(SITES)
    clip = SecureAggregationSection().update_clip
    assert np.abs(huge.arrays[0]).max() <= clip * huge.weight


def test_a_node_whose_shares_do_not_decrypt_is_named_by_the_sites_it_sent_them_to(
    mapping: Path, tmp_path: Path
) -> None:
    """Its neighbours refuse the masked input and drop out; their reasons said only
    "authentication failed", so the log blamed the three honest sites and not the sender."""

    def garble(request: RecordDict, content: RecordDict) -> RecordDict:
        if _stage(request) != "share-keys":
            return content
        data = _secagg(content)
        data["ciphertexts"] = [c[:-1] + bytes([c[-1] ^ 1]) for c in data["ciphertexts"]]
        return _with_secagg(content, data)

    bench = _bench(mapping, tmp_path)
    with pytest.raises(SumNotRecoveredError) as refused:
        _train(bench, garble)
    sender = rec.secure_id(bench.roster, ATTACKER)
    victims = set(SITES) - {ATTACKER}
    assert set(refused.value.dropouts) == victims
    for name in victims:
        assert f"in the encrypted share from node {sender}" in refused.value.dropouts[name]
        assert f"from node {sender}" in bench.site(name).events("refusal")[-1]["details"]["reason"]


def test_a_plain_weight_of_every_row_of_the_federation_is_refused_with_each_sites_claim(
    mapping: Path, tmp_path: Path
) -> None:
    """Alone it is a weight the round allows; with the other sites' rows the sum is more than
    the federation has."""
    bench = _bench(mapping, tmp_path, secure=False)
    rows = sum(len(Node(bench.site(name).setup).data.train) for name in SITES)
    with pytest.raises(SumNotRecoveredError, match="the summed weight .* is outside") as refused:
        _train(bench, _metrics(rows), secure=False)
    assert f"{ATTACKER} {rows}" in str(refused.value)


# --- a site's own report, at `fedcost federation collect` -----------------------------------


def _report(site: str, **changes: object) -> dict:
    report = {
        "site": site,
        "role": "hospital",
        "run_id": "r1",
        "train_rows": 400,
        "test_rows": 100,
        "privacy": {"dp": True, "epsilon_budget": 8.0, "epsilon_spent": 2.5},
        "held_out": {"readmission": {"auroc": 0.655}},
    }
    return {**report, **changes}


def _site_folder(folder: Path, report: dict, logs: Iterable[str]) -> Path:
    (folder / "audit" / "r1").mkdir(parents=True)
    for site in logs:
        (folder / "audit" / "r1" / f"{site}.jsonl").write_text("")
    (folder / "reports").mkdir()
    (folder / "reports" / "r1.json").write_text(json.dumps(report))
    return folder


def test_a_sites_report_in_another_sites_name_is_refused_at_collect(tmp_path: Path) -> None:
    """Reports are not signed: hospital-2's folder held hospital-3's "report", and collect put its
    figures (rows, ε, held-out metrics) into the summary as hospital-3's."""
    federation = Federation.init(tmp_path / "f", FederationConfig("f", "127.0.0.1:9093"), at=utc_now())
    run = RunFolder(federation.runs_dir / "r1")
    run.audit.mkdir(parents=True)
    run.identities.mkdir(parents=True)
    for site in SITES:
        (run.identities / f"{site}.pub.json").write_text("{}")
    forged = _site_folder(tmp_path / "hospital-2", _report("hospital-3"), [ATTACKER])
    with pytest.raises(ConfigError, match="no audit/r1/hospital-3.jsonl beside it"):
        collect(federation, "r1", [forged])
    own = _site_folder(tmp_path / "own", _report(ATTACKER), [ATTACKER])
    assert collect(federation, "r1", [own]).reports == [ATTACKER]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"privacy": {"dp": True, "epsilon_budget": 8.0, "epsilon_spent": "<b>0</b>"}}, "privacy"),
        ({"privacy": {"dp": True}}, "privacy"),
        ({"privacy": {"dp": "yes"}}, "privacy"),
        ({"held_out": {"readmission": {"auroc": "0.9<script>"}}}, "held_out"),
        ({"held_out": {"readmission": 0.9}}, "held_out"),
        ({"held_out": {"readmission": {"rows": 3.0}}}, "held_out"),
        ({"held_out": {"<img>": {"auroc": 0.9}}}, "held_out"),
    ],
)
def test_a_site_report_whose_figures_are_not_numbers_is_refused(tmp_path: Path, change: dict, field: str) -> None:
    """They reached summary.json as they were, and report.html's writing failed on a string
    where a number belongs (a traceback from `collect`)."""
    path = tmp_path / "r1.json"
    path.write_text(json.dumps(_report(ATTACKER, **change)))
    with pytest.raises(ConfigError, match=field):
        read_report(path)


# --- the hello ------------------------------------------------------------------------------


@pytest.mark.parametrize("claim", [None, 7])
def test_a_hello_reply_without_a_roster_name_stops_the_run_naming_the_node(
    mapping: Path, tmp_path: Path, claim: object
) -> None:
    """A reply with no name record was a KeyError at the coordinator (a traceback, no node named)."""
    bench = Bench(tmp_path, mapping, SITES)

    def rename(request: RecordDict, content: RecordDict) -> RecordDict:
        del content[rec.NODE]
        if claim is not None:
            content[rec.NODE] = ConfigRecord({"name": claim})
        return content

    grid = AttackerGrid(bench, rename)
    node_ids = sorted(site.node_id for site in bench.sites.values())
    attacker = bench.site(ATTACKER).node_id
    with pytest.raises(FederationError, match=f"node {attacker} calls itself {claim!r}, not an enrolled, unclaimed"):
        say_hello(grid, node_ids, bench.hello().to_record(), set(SITES))  # type: ignore[arg-type]


def test_a_node_claiming_another_sites_name_is_named_beside_that_site(mapping: Path, tmp_path: Path) -> None:
    """The second claimant of a name was blamed alone, whichever of the two lied (the honest
    site, when the attacker answered first); the coordinator cannot tell, so it names both."""
    bench = Bench(tmp_path, mapping, SITES)
    honest = next(name for name in SITES if name != ATTACKER)

    def impersonate(request: RecordDict, content: RecordDict) -> RecordDict:
        content[rec.NODE] = ConfigRecord({"name": honest})
        return content

    node_ids = sorted(site.node_id for site in bench.sites.values())
    pair = sorted((bench.site(ATTACKER).node_id, bench.site(honest).node_id))
    with pytest.raises(FederationError, match=rf"nodes {pair[0]} and {pair[1]} both call themselves '{honest}'"):
        say_hello(AttackerGrid(bench, impersonate), node_ids, bench.hello().to_record(), set(SITES))  # type: ignore[arg-type]


def test_a_nodes_reason_is_kept_escaped_and_cut(mapping: Path, tmp_path: Path) -> None:
    """A refusal's reason is the node's own text: a newline in it forged a line of the
    coordinator's log, and its length was the node's to choose."""
    forged = "x\n2026-12-07 INFO fedcost.coordinator round 1 train: every site included\x1b[2J" + "y" * 10**6

    class Refusing(AttackerGrid):
        def send_and_receive(self, messages: Iterable[Message]) -> list[Message]:
            replies = super().send_and_receive(messages)
            return [
                Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, forged), reply_to=message)
                if self.sites[message.metadata.dst_node_id].name == ATTACKER
                else reply
                for message, reply in zip(messages, replies, strict=True)
            ]

    bench = _bench(mapping, tmp_path)
    sites = {site.node_id: site.name for site in bench.sites.values()}
    sums = SharedSums(Refusing(bench, lambda _, c: c), sites, SecureAggregationSection(), RUN, bench.roster)  # type: ignore[arg-type]
    shapes = [(len(Node(bench.site(SITES[0]).setup).layout.slots()),)]
    result = sums.run("statistics", 0, shapes, sorted(sites))
    reason = result.dropouts[ATTACKER]
    assert "\n" not in reason and "\x1b" not in reason and "x\\n2026-12-07" in reason
    assert len(reason) < rec.MAX_REASON + 200
