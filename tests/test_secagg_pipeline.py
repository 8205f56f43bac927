"""The next secure sum's setup rides on this sum's unmask: fewer exchanges, the same sums, the
same guardian.

``SharedSums`` drives real nodes (the ClientApp of ``guardian_bench``) over a grid that
hands each message to its site and counts the exchanges. Sums whose setup rode on the
unmask before them must equal the same sums set up afresh; a site that refuses the next
setup still answers the unmask, and the next sum is set up afresh. The attacks drive the
nodes message by message: a next setup is checked as a lone setup request is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from guardian_bench import RUN, Bench, policy_file

from fedcost.client import outgoing
from fedcost.client.node import Node
from fedcost.config import SecureAggregationSection
from fedcost.data.files import write_node_files
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.errors import PolicyViolationError
from fedcost.models import evaluation
from fedcost.secagg import Quantizer, Request, RoundConfig, SetupRequest, Stage, UnmaskRequest
from fedcost.server.shared_sum import SUMS_CLIP, SUMS_LEVELS, NextSum, SharedSums
from fedcost.wire import records as rec
from fedcost.wire import requests
from fedcost.wire.purposes import PURPOSES, WITHHOLDS

SITES = ("hospital-1", "hospital-2", "hospital-3", "hospital-4")


@pytest.fixture(scope="module")
def mapping(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ecosystem = generate_ecosystem(EcosystemSpec.from_sizes({"hospital": [300, 260, 220, 180]}), seed=3)
    return write_node_files(((n.name, n.role, n.frame) for n in ecosystem.nodes), tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _inside_a_server_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds a coordinator's messages only inside a ServerApp's run; this is one."""
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class SitesGrid:
    """Flower's grid as ``SharedSums`` uses it: each message goes to its site's ClientApp.
    ``exchanges`` lists, per exchange, the kinds of its requests; ``last`` each site's last reply."""

    def __init__(self, bench: Bench):
        self.sites = {site.node_id: site for site in bench.sites.values()}
        self.exchanges: list[set[str]] = []
        self.last: dict[str, Message] = {}

    def send_and_receive(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self.exchanges.append({rec.message_kind(m.content) for m in messages})
        replies = []
        for message in messages:
            site = self.sites[message.metadata.dst_node_id]
            replies.append(site.answer(message.content, message.metadata.message_type))
            self.last[site.name] = replies[-1]
        return replies


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
    """Train 1, evaluate 1, train 2 over every site; with ``carried``, each sum's setup rides
    on the unmask of the one before."""
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


def test_sums_whose_setup_rode_on_the_unmask_before_equal_the_same_sums_set_up_afresh(
    mapping: Path, tmp_path: Path
) -> None:
    carried, pipelined = _rounds(_bench(mapping, tmp_path / "carried"), carried=True)
    fresh, afresh = _rounds(_bench(mapping, tmp_path / "fresh"), carried=False)
    for carried_sum, fresh_sum in zip(carried, fresh, strict=True):
        for a, b in zip(carried_sum, fresh_sum, strict=True):
            # Stochastic rounding (each node, each sum) is the only difference.
            np.testing.assert_allclose(a, b, rtol=0, atol=len(SITES) * 2 * SUMS_CLIP / SUMS_LEVELS + 1e-5)
    assert len(afresh.exchanges) == 15
    assert len(pipelined.exchanges) == 13, "the second and third sums start at share-keys"
    setups = [kinds for kinds in pipelined.exchanges if any(kind.endswith(":setup") for kind in kinds)]
    assert setups == [{"secagg:train:setup"}], "only the first sum sets up on its own"


def test_a_site_that_refuses_the_next_setup_still_answers_the_unmask_and_the_next_sum_sets_up_afresh(
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
    assert trained.included == sorted(SITES), "the refusing site's unmask counts"
    unmask = grid.last["hospital-4"]
    assert rec.NEXT_SECAGG not in unmask.content and rec.SECAGG in unmask.content
    assert WITHHOLDS in str(unmask.content[rec.NEXT_REFUSED][rec.REASON])
    refusals = bench.site("hospital-4").events("refusal")
    assert refusals[-1]["details"]["kind"] == "secagg:evaluate:setup" and refusals[-1]["round"] == 1
    assert WITHHOLDS in refusals[-1]["details"]["reason"]
    exchanges = len(grid.exchanges)
    train = rec.update_shapes(weights)
    then = NextSum("train", 2, tuple(train), tuple(nodes), job.to_json())
    evaluated = sums.run("evaluate", 1, shapes, nodes, weights, job.to_json(), then=then)
    assert grid.exchanges[exchanges] == {"secagg:evaluate:setup"}, "set up afresh"
    assert evaluated.included == ["hospital-1", "hospital-2", "hospital-3"]
    assert WITHHOLDS in evaluated.dropouts["hospital-4"]
    # The next training sum's setup goes to hospital-4 alone, in the evaluation's unmask exchange.
    assert grid.exchanges[-1] == {"secagg:evaluate:unmask", "secagg:train:setup"}
    exchanges = len(grid.exchanges)
    trained = sums.run("train", 2, train, nodes, weights, job.to_json())
    assert trained.included == sorted(SITES)
    assert len(grid.exchanges) - exchanges == 4, "it starts at share-keys"


def test_a_dropout_during_the_next_setup_is_handled_as_a_dropout(mapping: Path, tmp_path: Path) -> None:
    bench = _bench(mapping, tmp_path)
    site = bench.site("hospital-2")
    site.setup = dataclasses.replace(site.setup, drop_rounds=(2,), drop_stage="advertise-keys")
    sums, grid = _sums(bench)
    job, weights = bench.job_and_weights(SITES[0])
    nodes, shapes = sorted(sums.sites), rec.update_shapes(weights)
    then = NextSum("train", 2, tuple(shapes), tuple(nodes), job.to_json())
    evaluated = sums.run(
        "evaluate", 1, evaluation.sums_shapes(job.model.tasks, noisy=False), nodes, weights, job.to_json(), then=then
    )
    assert evaluated.included == sorted(SITES), "its unmask counts"
    assert "drops out" in str(grid.last["hospital-2"].content[rec.NEXT_REFUSED][rec.REASON])
    trained = sums.run("train", 2, shapes, nodes, weights, job.to_json(), then=None)
    assert trained.included == ["hospital-1", "hospital-3", "hospital-4"]
    assert "advertise-keys" in trained.dropouts["hospital-2"]


# --- attacks: a next setup is checked as a lone setup request is ----------------------------


def _statistics_shape(bench: Bench) -> list[tuple[int, ...]]:
    return [(len(Node(bench.site(SITES[0]).setup).layout.slots()),)]


def _next_setup(
    bench: Bench, purpose: str, round_: int, names: Iterable[str], label: str, job: str | None = None
) -> dict:
    """The records that carry a next sum's setup on an unmask request, as ``SharedSums`` builds them."""
    names = sorted(names)
    shapes = _statistics_shape(bench) if purpose == "statistics" else [(len(evaluation.READMISSION_SUMS),)]
    quantizer = Quantizer(SUMS_CLIP, SUMS_LEVELS, len(names))
    config = RoundConfig.create(
        run_id=label,
        round=round_,
        node_ids=sorted(rec.secure_id(bench.roster, name) for name in names),
        dim=quantizer.length(shapes),
        bits=quantizer.bits,
    )
    base = {rec.TRANSPORT: rec.SECURE, rec.PURPOSE: purpose, rec.ROUND: round_, **rec.quantizer_config(quantizer)}
    secagg, _ = rec.split_message_dict(SetupRequest(config).to_dict())
    return {rec.NEXT_CONFIG: ConfigRecord({**base, **({rec.JOB: job} if job else {})}), rec.NEXT_SECAGG: secagg}


def _on_unmask(records: dict) -> Callable[[str, Request], dict]:
    return lambda name, request: records if isinstance(request, UnmaskRequest) else {}


@pytest.mark.parametrize("stage", ["setup", "share-keys", "masked-input", "consistency"])
def test_a_next_setup_on_any_stage_but_unmask_is_refused(mapping: Path, tmp_path: Path, stage: str) -> None:
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])
    records = _next_setup(bench, "evaluate", 1, SITES, f"{RUN}:n:evaluate:ahead1", job.to_json())
    outcome = bench.secure_sum(
        "statistics",
        0,
        SITES,
        _statistics_shape(bench),
        carry=lambda name, request: records if name == SITES[0] and request.stage.value == stage else {},
    )
    assert "records it should not carry (next-config, next-secagg)" in outcome.refusals[SITES[0]]


def test_a_next_setup_on_a_plain_request_or_a_hello_is_refused(mapping: Path, tmp_path: Path) -> None:
    bench = Bench(tmp_path, mapping, SITES)
    site = bench.site(SITES[0])
    records = _next_setup(bench, "statistics", 0, SITES, f"{RUN}:n:statistics:ahead1")
    site.assert_refused(site.send(dict(bench.hello().to_record()), records), "records it should not carry")
    assert not site.send(dict(bench.hello().to_record())).has_error()
    plain = {rec.TRANSPORT: rec.PLAIN, rec.PURPOSE: "statistics", rec.ROUND: 0}
    site.assert_refused(site.send(plain, records), "records it should not carry")


def test_half_a_next_setup_is_refused(mapping: Path, tmp_path: Path) -> None:
    bench = _bench(mapping, tmp_path)
    records = _next_setup(bench, "statistics", 0, SITES, f"{RUN}:n:statistics:ahead1")
    del records[rec.NEXT_SECAGG]
    outcome = bench.secure_sum("statistics", 0, SITES, _statistics_shape(bench), carry=_on_unmask(records))
    assert all("no next-secagg record" in outcome.refusals[name] for name in SITES)


@pytest.mark.parametrize(
    ("purpose", "round_", "reason"),
    [
        ("benchmark", 2, "not part of the accepted job"),
        ("evaluate", 7, "asks for round 7 of evaluate"),
        ("statistics", 0, "labelled for another run, purpose or round"),  # an evaluate label
    ],
)
def test_a_next_setup_outside_the_plan_is_refused_and_the_unmask_still_answered(
    mapping: Path, tmp_path: Path, purpose: str, round_: int, reason: str
) -> None:
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])
    label = f"{RUN}:n:evaluate:ahead1" if purpose == "statistics" else f"{RUN}:n:{purpose}:ahead1"
    records = _next_setup(bench, purpose, round_, SITES, label, None if purpose == "statistics" else job.to_json())
    outcome = bench.secure_sum("statistics", 0, SITES, _statistics_shape(bench), carry=_on_unmask(records))
    assert outcome.sums is not None and not outcome.refusals, "the unmask is answered"
    for name in SITES:
        reply = outcome.replies[name].content
        assert reason in str(reply[rec.NEXT_REFUSED][rec.REASON]) and rec.NEXT_SECAGG not in reply
        refusal = bench.site(name).events("refusal")[-1]
        assert refusal["details"]["kind"] == f"secagg:{purpose}:setup" and reason in refusal["details"]["reason"]


def test_a_next_setup_over_fewer_sites_than_the_sites_minimum_is_refused(mapping: Path, tmp_path: Path) -> None:
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])
    records = _next_setup(bench, "evaluate", 1, SITES[:2], f"{RUN}:n:evaluate:ahead1", job.to_json())
    outcome = bench.secure_sum("statistics", 0, SITES, _statistics_shape(bench), carry=_on_unmask(records))
    assert outcome.sums is not None
    for name in SITES[:2]:
        assert "fewer than the 3" in str(outcome.replies[name].content[rec.NEXT_REFUSED][rec.REASON])


def test_a_next_setup_that_would_take_the_unmask_reply_past_the_sites_size_limit_is_refused(
    mapping: Path, tmp_path: Path
) -> None:
    """Attack: the unmask reply and the next sum's key advertisement each pass the egress guard
    alone, but a site's max_message_bytes bounds what leaves in one reply: where the two together
    exceed it, the site answers the unmask and refuses the setup (which it then answers alone)."""
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])
    records = _next_setup(bench, "evaluate", 1, SITES, f"{RUN}:n:evaluate:ahead1", job.to_json())
    limit = 400  # the unmask reply of a sum over four sites, and not its setup's advertisement too

    def at_the_unmask(name: str, request: Request) -> dict:
        if not isinstance(request, UnmaskRequest):
            return {}
        policy_file(bench.site(name).setup.audit_dir, name, max_message_bytes=limit)
        return records

    outcome = bench.secure_sum("statistics", 0, SITES, _statistics_shape(bench), carry=at_the_unmask)
    assert outcome.sums is not None and not outcome.refusals, "the unmask is answered"
    for name in SITES:
        reply = outcome.replies[name].content
        assert rec.NEXT_SECAGG not in reply and "max_message_bytes (400)" in str(reply[rec.NEXT_REFUSED][rec.REASON])
        assert outgoing.reply_bytes(reply) <= limit
    for site in bench.sites.values():
        alone = site.send(dict(records[rec.NEXT_CONFIG]), {rec.SECAGG: records[rec.NEXT_SECAGG]}, "evaluate")
        assert not alone.has_error(), f"the setup it would not carry, {site.name} answers alone"


def test_a_next_setup_on_the_unmask_of_a_sum_the_site_refused_is_not_answered(mapping: Path, tmp_path: Path) -> None:
    """Attack: the site refused a sum's consistency (it would isolate hospital-4); the coordinator
    sends its unmask anyway, carrying the next sum's setup. The unmask is refused whole: the setup
    is not answered (no key advertisement) nor recorded, and the site answers it when it comes alone."""
    bench = _bench(mapping, tmp_path)
    shapes = _statistics_shape(bench)
    assert bench.secure_sum("statistics", 0, SITES, shapes, label=f"{RUN}:a:statistics:1").sums is not None
    refused = bench.secure_sum("statistics", 0, SITES[:3], shapes, label=f"{RUN}:a:statistics:2")
    assert "could isolate hospital-4" in refused.refusals[SITES[0]]
    job, _ = bench.job_and_weights(SITES[0])
    records = _next_setup(bench, "evaluate", 1, SITES, f"{RUN}:n:evaluate:ahead1", job.to_json())
    unmask, _ = rec.split_message_dict(UnmaskRequest((1, 2, 3), (bytes(64),) * 3).to_dict())
    site = bench.site(SITES[0])
    config = {
        rec.TRANSPORT: rec.SECURE,
        rec.PURPOSE: "statistics",
        rec.ROUND: 0,
        **rec.quantizer_config(Quantizer(SUMS_CLIP, SUMS_LEVELS, 3)),
    }
    reply = site.send(config, {rec.SECAGG: unmask, **records})
    assert reply.has_error() and not reply.has_content(), "the refused sum's unmask carries nothing back"
    assert not any(entry["details"]["kind"].endswith(":setup") for entry in site.events("refusal"))
    alone = site.send(dict(records[rec.NEXT_CONFIG]), {rec.SECAGG: records[rec.NEXT_SECAGG]}, "evaluate")
    assert not alone.has_error(), "the setup was never answered, so it is answered now"


def test_a_replayed_next_setup_is_refused_by_the_ledger(mapping: Path, tmp_path: Path) -> None:
    bench = _bench(mapping, tmp_path)
    job, _ = bench.job_and_weights(SITES[0])
    label = f"{RUN}:n:evaluate:ahead1"
    records = _next_setup(bench, "evaluate", 1, SITES, label, job.to_json())
    shapes = _statistics_shape(bench)
    first = bench.secure_sum("statistics", 0, SITES, shapes, label=f"{RUN}:r:statistics:1", carry=_on_unmask(records))
    assert all(rec.NEXT_SECAGG in reply.content for reply in first.replies.values())
    again = bench.secure_sum("statistics", 0, SITES, shapes, label=f"{RUN}:r:statistics:2", carry=_on_unmask(records))
    assert again.sums is not None
    for reply in again.replies.values():
        assert "already answered" in str(reply.content[rec.NEXT_REFUSED][rec.REASON])
    shape = [(len(evaluation.READMISSION_SUMS),)]
    alone = bench.secure_sum("evaluate", 1, SITES, shape, label=label, job=job.to_json())
    assert alone.sums is None and all("already answered" in alone.refusals[name] for name in SITES)


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
