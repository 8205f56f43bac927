"""The next secure sum runs on this sum's last two stages: its setup on the consistency
requests, its share-keys on the unmask requests. Fewer exchanges, the same sums, the same
guardian.

``SharedSums`` drives real nodes (the ClientApp of ``guardian_bench``) over a grid that
hands each message to its site and counts the exchanges. Sums run so must equal the same
sums set up afresh; a site that refuses the next sum's part still answers the sum it rides
on, and the next sum is set up afresh. The attacks drive the nodes message by message: a
carried part is checked as a lone request of its stage is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from guardian_bench import RUN, Bench, policy_file

from fedcost.client import outgoing
from fedcost.client.node import Node
from fedcost.config import SecureAggregationSection
from fedcost.data.files import write_node_files
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.errors import PolicyViolationError
from fedcost.models import evaluation
from fedcost.secagg import Coordinator as SecAggCoordinator
from fedcost.secagg import (
    MaskedInputRequest,
    Quantizer,
    Reply,
    Request,
    RoundConfig,
    ShareKeysRequest,
    Stage,
    reply_from_dict,
)
from fedcost.server.shared_sum import SUMS_CLIP, SUMS_LEVELS, NextSum, SharedSums
from fedcost.wire import records as rec
from fedcost.wire import requests
from fedcost.wire.purposes import PURPOSES, WITHHOLDS

pytestmark = pytest.mark.usefixtures("inside_a_server_app")

SITES = ("hospital-1", "hospital-2", "hospital-3", "hospital-4")


@pytest.fixture(scope="module")
def mapping(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ecosystem = generate_ecosystem(EcosystemSpec.from_sizes({"hospital": [300, 260, 220, 180]}), seed=3)
    return write_node_files(((n.name, n.role, n.frame) for n in ecosystem.nodes), tmp_path_factory.mktemp("data"))


class SitesGrid:
    """Flower's grid as ``SharedSums`` uses it: each message goes to its site's ClientApp.
    ``exchanges`` lists, per exchange, the kinds of its requests (a carried part's kind included),
    ``replies`` each site's reply in it."""

    def __init__(self, bench: Bench):
        self.sites = {site.node_id: site for site in bench.sites.values()}
        self.exchanges: list[set[str]] = []
        self.replies: list[dict[str, Message]] = []

    def send_and_receive(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self.exchanges.append({kind for m in messages for kind in _kinds(m.content)})
        self.replies.append({})
        replies = []
        for message in messages:
            site = self.sites[message.metadata.dst_node_id]
            replies.append(site.answer(message.content, message.metadata.message_type))
            self.replies[-1][site.name] = replies[-1]
        return replies

    def reply(self, kind: str, name: str) -> RecordDict:
        """A site's reply in the last exchange of ``kind``."""
        at = max(i for i, kinds in enumerate(self.exchanges) if kind in kinds)
        return self.replies[at][name].content


def _kinds(content: RecordDict) -> set[str]:
    kinds = {rec.message_kind(content)}
    if rec.NEXT_CONFIG in content:
        kinds.add(
            rec.message_kind(RecordDict({rec.CONFIG: content[rec.NEXT_CONFIG], rec.SECAGG: content[rec.NEXT_SECAGG]}))
        )
    return kinds


def _sums(bench: Bench) -> tuple[SharedSums, SitesGrid]:
    grid = SitesGrid(bench)
    sites = {site.node_id: site.name for site in bench.sites.values()}
    return SharedSums(grid, sites, SecureAggregationSection(), RUN, bench.roster), grid  # type: ignore[arg-type]


def _bench(mapping: Path, folder: Path, **policy: object) -> Bench:
    bench = Bench(folder, mapping, SITES, **policy)
    hello = bench.hello(min_cohort=policy.get("min_cohort", 11))
    assert all(not reply.has_error() for reply in bench.say_hello(hello).values())
    return bench


def _rounds(bench: Bench, carried: bool) -> tuple[list[list[np.ndarray]], SitesGrid]:
    """Train 1, evaluate 1, train 2 over every site; with ``carried``, each sum runs its first
    stages on the last stages of the one before."""
    sums, grid = _sums(bench)
    job, weights = bench.job_and_weights(SITES[0])
    nodes = sorted(sums.sites)
    train = {"shapes": rec.update_shapes(weights), "job": job.to_json()}
    evaluate = {"shapes": evaluation.sums_shapes(job.model.tasks, noisy=False), "job": job.to_json()}
    plan = [("train", 1, train), ("evaluate", 1, evaluate), ("train", 2, train)]
    results = []
    for i, (purpose, round_, sum_) in enumerate(plan):
        following = plan[i + 1] if carried and i + 1 < len(plan) else None
        then = None
        if following is not None:
            shapes = tuple(following[2]["shapes"])
            then = NextSum(following[0], following[1], shapes, tuple(nodes), following[2]["job"])
        result = sums.run(purpose, round_, sum_["shapes"], nodes, weights, sum_["job"], then=then)
        assert result.included == sorted(SITES) and not result.dropouts, result.dropouts
        results.append(result.arrays)
    return results, grid


def test_sums_run_on_the_last_stages_of_the_sum_before_equal_the_same_sums_set_up_afresh(
    mapping: Path, tmp_path: Path
) -> None:
    carried, pipelined = _rounds(_bench(mapping, tmp_path / "carried"), carried=True)
    fresh, afresh = _rounds(_bench(mapping, tmp_path / "fresh"), carried=False)
    for carried_sum, fresh_sum in zip(carried, fresh, strict=True):
        for a, b in zip(carried_sum, fresh_sum, strict=True):
            # Stochastic rounding (each node, each sum) is the only difference.
            np.testing.assert_allclose(a, b, rtol=0, atol=len(SITES) * 2 * SUMS_CLIP / SUMS_LEVELS + 1e-5)
    assert len(afresh.exchanges) == 15
    assert len(pipelined.exchanges) == 11, "the second and third sums start at masked input"
    assert pipelined.exchanges[3] == {"secagg:train:consistency", "secagg:evaluate:setup"}
    assert pipelined.exchanges[4] == {"secagg:train:unmask", "secagg:evaluate:share-keys"}
    assert pipelined.exchanges[5] == {"secagg:evaluate:masked-input"}
    alone = [kinds for kinds in pipelined.exchanges if len(kinds) == 1 and kinds & {"secagg:train:setup"}]
    assert alone == [{"secagg:train:setup"}], "only the first sum sets up on its own"


def test_a_site_that_refuses_the_next_setup_still_answers_the_consistency_and_the_next_sum_sets_up_afresh(
    mapping: Path, tmp_path: Path
) -> None:
    # At a min_cohort of 40, hospital-4 (180 rows, 36 held out) withholds evaluation sums.
    bench = _bench(mapping, tmp_path, min_cohort=40)
    sums, grid = _sums(bench)
    job, weights = bench.job_and_weights(SITES[0])
    nodes = sorted(sums.sites)
    shapes = evaluation.sums_shapes(job.model.tasks, noisy=False)
    then = NextSum("evaluate", 1, tuple(shapes), tuple(nodes), job.to_json())
    trained = sums.run("train", 1, rec.update_shapes(weights), nodes, weights, job.to_json(), then=then)
    assert trained.included == sorted(SITES), "the refusing site's consistency and unmask count"
    consistency = grid.reply("secagg:train:consistency", "hospital-4")
    assert rec.NEXT_SECAGG not in consistency and rec.SECAGG in consistency
    assert WITHHOLDS in str(consistency[rec.NEXT_REFUSED][rec.REASON])
    refusals = bench.site("hospital-4").events("refusal")
    assert refusals[-1]["details"]["kind"] == "secagg:evaluate:setup" and refusals[-1]["round"] == 1
    assert WITHHOLDS in refusals[-1]["details"]["reason"]
    assert grid.exchanges[-1] == {"secagg:train:unmask"}, "no share-keys rides on a setup a site refused"
    exchanges = len(grid.exchanges)
    train = rec.update_shapes(weights)
    then = NextSum("train", 2, tuple(train), tuple(nodes), job.to_json())
    evaluated = sums.run("evaluate", 1, shapes, nodes, weights, job.to_json(), then=then)
    assert grid.exchanges[exchanges] == {"secagg:evaluate:setup"}, "set up afresh"
    assert evaluated.included == ["hospital-1", "hospital-2", "hospital-3"]
    assert WITHHOLDS in evaluated.dropouts["hospital-4"]
    # The next training sum's parts go to hospital-4 alone, in the evaluation's last exchanges.
    assert grid.exchanges[-2] == {"secagg:evaluate:consistency", "secagg:train:setup"}
    assert grid.exchanges[-1] == {"secagg:evaluate:unmask", "secagg:train:share-keys"}
    assert rec.SECAGG in grid.replies[-1]["hospital-4"].content, "its share-keys reply, alone"
    exchanges = len(grid.exchanges)
    trained = sums.run("train", 2, train, nodes, weights, job.to_json())
    assert trained.included == sorted(SITES)
    assert len(grid.exchanges) - exchanges == 3, "it starts at masked input"


@pytest.mark.parametrize(("stage", "carrier"), [("advertise-keys", "consistency"), ("share-keys", "unmask")])
def test_a_dropout_during_the_next_sums_part_is_handled_as_a_dropout(
    mapping: Path, tmp_path: Path, stage: str, carrier: str
) -> None:
    bench = _bench(mapping, tmp_path)
    site = bench.site("hospital-2")
    site.setup = dataclasses.replace(site.setup, drop_rounds=(2,), drop_stage=stage)
    sums, grid = _sums(bench)
    job, weights = bench.job_and_weights(SITES[0])
    nodes, shapes = sorted(sums.sites), rec.update_shapes(weights)
    then = NextSum("train", 2, tuple(shapes), tuple(nodes), job.to_json())
    evaluated = sums.run(
        "evaluate", 1, evaluation.sums_shapes(job.model.tasks, noisy=False), nodes, weights, job.to_json(), then=then
    )
    assert evaluated.included == sorted(SITES), "its consistency and unmask count"
    assert "drops out" in str(grid.reply(f"secagg:evaluate:{carrier}", "hospital-2")[rec.NEXT_REFUSED][rec.REASON])
    exchanges = len(grid.exchanges)
    trained = sums.run("train", 2, shapes, nodes, weights, job.to_json(), then=None)
    assert grid.exchanges[exchanges] == {"secagg:train:setup"}, "set up afresh"
    assert trained.included == ["hospital-1", "hospital-3", "hospital-4"]
    assert stage in trained.dropouts["hospital-2"]


# --- attacks: a carried part is checked as a lone request of its stage is ---------------------


def _statistics_shape(bench: Bench) -> list[tuple[int, ...]]:
    return [(len(Node(bench.site(SITES[0]).setup).layout.slots()),)]


class Ahead:
    """A next sum as ``SharedSums`` runs it on another sum's requests: its setup on the
    consistency requests, its share-keys on the unmask requests; ``carry`` and ``answered`` go
    to ``Bench.secure_sum``. ``tamper`` may change a site's share-keys request."""

    def __init__(
        self,
        bench: Bench,
        purpose: str,
        round_: int,
        names: Iterable[str],
        label: str,
        job: str | None = None,
        tamper: Callable[[str, ShareKeysRequest], Request] | None = None,
    ):
        names = sorted(names)
        self.ids = {name: rec.secure_id(bench.roster, name) for name in names}
        shapes = _statistics_shape(bench) if purpose == "statistics" else [(len(evaluation.READMISSION_SUMS),)]
        quantizer = Quantizer(SUMS_CLIP, SUMS_LEVELS, len(names))
        config = RoundConfig.create(
            run_id=label,
            round=round_,
            node_ids=sorted(self.ids.values()),
            dim=quantizer.length(shapes),
            bits=quantizer.bits,
        )
        identities = rec.roster_identities(bench.roster)
        self.coordinator = SecAggCoordinator(config, {i: identities[i] for i in config.node_ids})
        base = {rec.TRANSPORT: rec.SECURE, rec.PURPOSE: purpose, rec.ROUND: round_, **rec.quantizer_config(quantizer)}
        self.config = ConfigRecord({**base, **({rec.JOB: job} if job else {})})
        self.requests: dict[int, Request] = dict(self.coordinator.start())
        self.tamper = tamper
        self.parts: list[Reply] = []
        self.refusals: dict[str, str] = {}
        self._carrier: Stage | None = None

    def records(self, name: str) -> dict:
        """The records that carry this sum's pending request to ``name``."""
        request = self.requests[self.ids[name]]
        if self.tamper is not None and isinstance(request, ShareKeysRequest):
            request = self.tamper(name, request)
        secagg, _ = rec.split_message_dict(request.to_dict())
        return {rec.NEXT_CONFIG: self.config, rec.NEXT_SECAGG: secagg}

    def carry(self, name: str, request: Request) -> dict:
        if request.stage not in rec.CARRIED or name not in self.ids:
            return {}
        if request.stage is not self._carrier:
            self.advance()
            self._carrier = request.stage
        return self.records(name) if self.requests else {}

    def answered(self, name: str, reply: Message) -> None:
        if reply.has_error() or rec.NEXT_CONFIG in reply.content:
            return
        if rec.NEXT_SECAGG in reply.content:
            self.parts.append(reply_from_dict(rec.join_message_dict(reply.content[rec.NEXT_SECAGG], None)))
        elif rec.NEXT_REFUSED in reply.content:
            self.refusals[name] = str(reply.content[rec.NEXT_REFUSED][rec.REASON])

    def advance(self) -> None:
        """Hand the parts that came back to the coordinator, where a stage's parts came back."""
        if self._carrier is not None:
            self.requests = self.coordinator.handle(self.parts) if self.parts else {}
            self.parts = []

    def run(self, bench: Bench, names: Iterable[str] = SITES, label: str = f"{RUN}:c:statistics:1"):  # noqa: ANN201
        """A statistics sum over ``names`` that carries this sum; then this sum's next requests."""
        outcome = bench.secure_sum(
            "statistics", 0, names, _statistics_shape(bench), label=label, carry=self.carry, answered=self.answered
        )
        self.advance()
        return outcome


def _setup_on(stage: str, ahead: Ahead) -> Callable[[str, Request], dict]:
    """The next sum's setup, carried on ``stage`` (to the first site only)."""
    return lambda name, request: ahead.records(name) if name == SITES[0] and request.stage.value == stage else {}


@pytest.mark.parametrize(
    ("stage", "reason"),
    [
        ("setup", "records it should not carry (next-config, next-secagg)"),
        ("share-keys", "records it should not carry (next-config, next-secagg)"),
        ("masked-input", "records it should not carry (next-config, next-secagg)"),
        ("unmask", "the next sum's part a unmask request carries must be its share-keys"),
    ],
)
def test_a_next_setup_on_any_stage_but_consistency_is_refused(
    mapping: Path, tmp_path: Path, stage: str, reason: str
) -> None:
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])
    ahead = Ahead(bench, "evaluate", 1, SITES, f"{RUN}:n:evaluate:ahead1", job.to_json())
    outcome = bench.secure_sum("statistics", 0, SITES, _statistics_shape(bench), carry=_setup_on(stage, ahead))
    assert reason in outcome.refusals[SITES[0]]


def test_a_next_setup_of_the_sum_it_rides_on_is_refused_and_that_sum_goes_on(mapping: Path, tmp_path: Path) -> None:
    """Attack: a statistics sum's consistency carries the setup of another statistics sum of
    round 0. Answered, it would replace the state of the sum still to be unmasked; the site
    refuses that part and unmasks its sum."""
    bench = _bench(mapping, tmp_path)
    ahead = Ahead(bench, "statistics", 0, SITES, f"{RUN}:n:statistics:ahead1")
    outcome = ahead.run(bench)
    assert outcome.sums is not None and not outcome.refusals, "the sum it rode on is unmasked"
    assert len(ahead.refusals) == len(SITES)
    assert all("the sum whose request it rides on" in reason for reason in ahead.refusals.values())


def test_a_next_share_keys_on_a_consistency_request_is_refused(mapping: Path, tmp_path: Path) -> None:
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])
    ahead = Ahead(bench, "evaluate", 1, SITES, f"{RUN}:n:evaluate:ahead1", job.to_json())
    ahead.requests = {i: ShareKeysRequest(()) for i in ahead.ids.values()}
    outcome = bench.secure_sum("statistics", 0, SITES, _statistics_shape(bench), carry=_setup_on("consistency", ahead))
    assert "the next sum's part a consistency request carries must be its setup" in outcome.refusals[SITES[0]]


def test_a_next_setup_on_a_plain_request_or_a_hello_is_refused(mapping: Path, tmp_path: Path) -> None:
    bench = Bench(tmp_path, mapping, SITES)
    site = bench.site(SITES[0])
    records = Ahead(bench, "statistics", 0, SITES, f"{RUN}:n:statistics:ahead1").records(SITES[0])
    site.assert_refused(site.send(dict(bench.hello().to_record()), records), "records it should not carry")
    assert not site.send(dict(bench.hello().to_record())).has_error()
    plain = {rec.TRANSPORT: rec.PLAIN, rec.PURPOSE: "statistics", rec.ROUND: 0}
    site.assert_refused(site.send(plain, records), "records it should not carry")


def test_half_a_next_setup_is_refused(mapping: Path, tmp_path: Path) -> None:
    bench = _bench(mapping, tmp_path)
    ahead = Ahead(bench, "statistics", 0, SITES, f"{RUN}:n:statistics:ahead1")

    def half(name: str, request: Request) -> dict:
        records = ahead.carry(name, request)
        records.pop(rec.NEXT_SECAGG, None)
        return records

    outcome = bench.secure_sum("statistics", 0, SITES, _statistics_shape(bench), carry=half)
    assert all("no next-secagg record" in outcome.refusals[name] for name in SITES)


@pytest.mark.parametrize(
    ("purpose", "round_", "labelled", "reason"),
    [
        ("benchmark", 2, "benchmark", "not part of the accepted job"),
        ("evaluate", 7, "evaluate", "asks for round 7 of evaluate"),
        ("evaluate", 1, "train", "labelled for another run, purpose or round"),
    ],
)
def test_a_next_setup_outside_the_plan_is_refused_and_the_consistency_still_answered(
    mapping: Path, tmp_path: Path, purpose: str, round_: int, labelled: str, reason: str
) -> None:
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])
    label = f"{RUN}:n:{labelled}:ahead1"
    ahead = Ahead(bench, purpose, round_, SITES, label, job.to_json())
    outcome = ahead.run(bench)
    assert outcome.sums is not None and not outcome.refusals, "the consistency and unmask are answered"
    for name in SITES:
        reply = outcome.stages["consistency"][name].content
        assert reason in str(reply[rec.NEXT_REFUSED][rec.REASON]) and rec.NEXT_SECAGG not in reply
        assert rec.NEXT_CONFIG not in outcome.stages["unmask"][name].content, "nothing rides on a refused setup"
        refusal = bench.site(name).events("refusal")[-1]
        assert refusal["details"]["kind"] == f"secagg:{purpose}:setup" and reason in refusal["details"]["reason"]


def test_a_next_setup_over_fewer_sites_than_the_sites_minimum_is_refused(mapping: Path, tmp_path: Path) -> None:
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])
    ahead = Ahead(bench, "evaluate", 1, SITES[:2], f"{RUN}:n:evaluate:ahead1", job.to_json())
    outcome = ahead.run(bench)
    assert outcome.sums is not None
    assert all("fewer than the 3" in reason for reason in ahead.refusals.values()) and len(ahead.refusals) == 2


@pytest.mark.parametrize("carrier", ["consistency", "unmask"])
def test_a_next_part_that_would_take_the_reply_past_the_sites_size_limit_is_refused(
    mapping: Path, tmp_path: Path, carrier: str
) -> None:
    """Attack: the carrier's reply and the next sum's part each pass the egress guard alone, but a
    site's max_message_bytes bounds what leaves in one reply: where the two together exceed it,
    the site answers the carrier and refuses the part (which it then answers alone)."""
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])
    reference = Ahead(bench, "evaluate", 1, SITES, f"{RUN}:n:evaluate:ahead0", job.to_json())
    joined = reference.run(bench, label=f"{RUN}:s:statistics:0").stages[carrier]
    limit = min(outgoing.reply_bytes(reply.content) for reply in joined.values()) - 1
    ahead = Ahead(bench, "evaluate", 1, SITES, f"{RUN}:n:evaluate:ahead1", job.to_json())

    sent: dict[str, dict] = {}

    def limited(name: str, request: Request) -> dict:
        records = ahead.carry(name, request)
        at_carrier = request.stage.value == carrier
        policy_file(bench.site(name).setup.audit_dir, name, **({"max_message_bytes": limit} if at_carrier else {}))
        if at_carrier:
            sent[name] = records
        return records

    outcome = bench.secure_sum("statistics", 0, SITES, _statistics_shape(bench), carry=limited, answered=ahead.answered)
    assert outcome.sums is not None and not outcome.refusals, "the carrier is answered"
    for name in SITES:
        reply = outcome.stages[carrier][name].content
        assert rec.NEXT_SECAGG not in reply and f"max_message_bytes ({limit})" in str(
            reply[rec.NEXT_REFUSED][rec.REASON]
        )
        assert outgoing.reply_bytes(reply) <= limit
    for site in bench.sites.values():
        records = sent[site.name]
        alone = site.send(dict(records[rec.NEXT_CONFIG]), {rec.SECAGG: records[rec.NEXT_SECAGG]}, "evaluate")
        assert not alone.has_error(), f"the part it would not carry, {site.name} answers alone"


def test_a_next_setup_on_the_consistency_of_a_sum_the_site_refuses_is_not_answered(
    mapping: Path, tmp_path: Path
) -> None:
    """Attack: the site refuses a sum's consistency (it would isolate hospital-4), which carries
    the next sum's setup. The consistency is refused whole: the setup is not answered (no key
    advertisement) nor recorded, and the site answers it when it comes alone."""
    bench = _bench(mapping, tmp_path)
    shapes = _statistics_shape(bench)
    assert bench.secure_sum("statistics", 0, SITES, shapes, label=f"{RUN}:a:statistics:1").sums is not None
    job, _ = bench.job_and_weights(SITES[0])
    ahead = Ahead(bench, "evaluate", 1, SITES, f"{RUN}:n:evaluate:ahead1", job.to_json())
    refused = bench.secure_sum(
        "statistics", 0, SITES[:3], shapes, label=f"{RUN}:a:statistics:2", carry=_setup_on("consistency", ahead)
    )
    assert "could isolate hospital-4" in refused.refusals[SITES[0]]
    site = bench.site(SITES[0])
    assert not refused.stages["consistency"][SITES[0]].has_content(), "the refused consistency carries nothing back"
    assert not any(entry["details"]["kind"].endswith(":setup") for entry in site.events("refusal"))
    records = ahead.records(SITES[0])
    alone = site.send(dict(records[rec.NEXT_CONFIG]), {rec.SECAGG: records[rec.NEXT_SECAGG]}, "evaluate")
    assert not alone.has_error(), "the setup was never answered, so it is answered now"


def test_a_replayed_next_setup_is_refused_by_the_ledger(mapping: Path, tmp_path: Path) -> None:
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])
    label = f"{RUN}:n:evaluate:ahead1"
    first = Ahead(bench, "evaluate", 1, SITES, label, job.to_json())
    first.run(bench, label=f"{RUN}:r:statistics:1")
    assert not first.refusals and all(isinstance(r, MaskedInputRequest) for r in first.requests.values())
    again = Ahead(bench, "evaluate", 1, SITES, label, job.to_json())
    assert again.run(bench, label=f"{RUN}:r:statistics:2").sums is not None
    assert len(again.refusals) == len(SITES) and all("already answered" in r for r in again.refusals.values())
    shape = [(len(evaluation.READMISSION_SUMS),)]
    alone = bench.secure_sum("evaluate", 1, SITES, shape, label=label, job=job.to_json())
    assert alone.sums is None and all("already answered" in alone.refusals[name] for name in SITES)


def test_a_replayed_next_share_keys_is_refused_by_the_ledger(mapping: Path, tmp_path: Path) -> None:
    """Attack: the coordinator sends a site the share-keys it already answered on the unmask
    again, alone (to have it share its secrets anew). The ledger refuses it."""
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])
    sent: dict[str, dict] = {}
    ahead = Ahead(bench, "evaluate", 1, SITES, f"{RUN}:n:evaluate:ahead1", job.to_json())

    def keep(name: str, request: Request) -> dict:
        records = ahead.carry(name, request)
        if request.stage is Stage.UNMASK:
            sent[name] = records
        return records

    outcome = bench.secure_sum("statistics", 0, SITES, _statistics_shape(bench), carry=keep, answered=ahead.answered)
    assert outcome.sums is not None and not ahead.refusals
    site = bench.site(SITES[0])
    records = sent[SITES[0]]
    again = site.send(dict(records[rec.NEXT_CONFIG]), {rec.SECAGG: records[rec.NEXT_SECAGG]}, "evaluate")
    site.assert_refused(again, "already answered")


def test_a_next_sum_run_on_the_last_stages_of_a_sum_reaches_its_masked_input(mapping: Path, tmp_path: Path) -> None:
    """Every site answers the setup on the consistency and the share-keys on the unmask; the next
    sum's coordinator then holds a masked-input request for every site, whose shares each site
    accepts (the sum then runs to its end)."""
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])
    ahead = Ahead(bench, "evaluate", 1, SITES, f"{RUN}:n:evaluate:ahead1", job.to_json())
    outcome = ahead.run(bench)
    assert outcome.sums is not None and not ahead.refusals
    for name in SITES:
        assert outcome.stages["unmask"][name].content[rec.NEXT_SECAGG]["stage"] == "share-keys"
    assert set(ahead.requests) == set(ahead.ids.values())
    assert all(isinstance(request, MaskedInputRequest) for request in ahead.requests.values())


def test_a_next_share_keys_for_a_sum_the_site_never_set_up_is_refused_and_the_unmask_answered(
    mapping: Path, tmp_path: Path
) -> None:
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])
    ahead = Ahead(bench, "evaluate", 1, SITES, f"{RUN}:n:evaluate:ahead1", job.to_json())
    ahead.requests = {i: ShareKeysRequest(()) for i in ahead.ids.values()}
    outcome = bench.secure_sum(
        "statistics", 0, SITES, _statistics_shape(bench), carry=_setup_on("unmask", ahead), answered=ahead.answered
    )
    assert outcome.sums is not None and not outcome.refusals, "the unmask is answered"
    assert "no secure sum of evaluate round 1 is in progress" in ahead.refusals[SITES[0]]


def test_a_next_share_keys_with_a_forged_key_advertisement_is_refused_and_the_unmask_answered(
    mapping: Path, tmp_path: Path
) -> None:
    """Attack: the coordinator swaps a neighbour's key advertisement for its own keys in the
    share-keys it carries on the unmask. The site refuses that part, naming the forged node,
    and still answers the unmask."""
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])

    def forged(name: str, request: ShareKeysRequest) -> Request:
        if name != SITES[0]:
            return request
        first, *rest = request.advertisements
        return ShareKeysRequest((dataclasses.replace(first, signature=bytes(64)), *rest))

    ahead = Ahead(bench, "evaluate", 1, SITES, f"{RUN}:n:evaluate:ahead1", job.to_json(), tamper=forged)
    outcome = ahead.run(bench)
    assert outcome.sums is not None and not outcome.refusals, "the unmask is answered"
    assert "in the key advertisement of node" in ahead.refusals[SITES[0]]
    assert set(ahead.refusals) == {SITES[0]}


def test_a_sum_set_up_afresh_ends_the_sum_set_up_ahead_at_a_site(mapping: Path, tmp_path: Path) -> None:
    """A lone setup clears every other sum's state at the node: the share-keys of a sum set up
    on an earlier consistency, sent after it, finds no sum in progress."""
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])
    ahead = Ahead(bench, "evaluate", 1, SITES, f"{RUN}:n:evaluate:ahead1", job.to_json())
    shapes = _statistics_shape(bench)
    carried = bench.secure_sum(
        "statistics", 0, SITES, shapes, label=f"{RUN}:e:statistics:1", carry=_setup_on("consistency", ahead)
    )
    assert carried.stages["consistency"][SITES[0]].content[rec.NEXT_SECAGG]["stage"] == "advertise-keys"
    assert bench.secure_sum("statistics", 0, SITES, shapes, label=f"{RUN}:e:statistics:2").sums is not None
    site = bench.site(SITES[0])
    secagg, _ = rec.split_message_dict(ShareKeysRequest(()).to_dict())
    reply = site.send(dict(ahead.config), {rec.SECAGG: secagg}, "evaluate")
    site.assert_refused(reply, "no secure sum of evaluate round 1 is in progress")


@pytest.mark.parametrize("record", [rec.NEXT_SECAGG, rec.NEXT_REFUSED, "rows"])
def test_the_egress_guard_passes_no_record_a_reply_is_not_built_of(record: str) -> None:
    """The next sum's part joins an unmask reply only after both passed the guard on their own
    (``outgoing.with_next``): the guard itself lets no other record through, that one included."""
    request = requests.Request(rec.SECURE, ConfigRecord(), RecordDict(), PURPOSES["statistics"], 0, Stage.UNMASK)
    content = RecordDict(
        {
            rec.NODE: ConfigRecord({"name": "hospital-1", "role": "hospital"}),
            rec.SECAGG: ConfigRecord({"stage": "unmask", "node_id": 1}),
            record: ConfigRecord({"stage": "advertise-keys", "node_id": 1}),
        }
    )
    with pytest.raises(PolicyViolationError, match=f"a record it does not send \\('{record}'\\)"):
        outgoing.outgoing_message(request, content, {}, 100)
    del content[record]
    assert outgoing.outgoing_message(request, content, {}, 100).stage == "unmask"
