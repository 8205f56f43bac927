"""The site guardian against a deviating coordinator: each test is an attack on real nodes.

A coordinator that deviates from the protocol must get nothing out of a node beyond what
the node's accepted job allows: no replayed exchange, no secure sum over too few sites or
one that differences an input it already released, no withheld cell rebuilt from two
tables, no list of records out of a crafted model's evaluation, no budget reset by
deleting a file, and no raw exception for a malformed request. Every attack drives the
real ClientApp (``guardian_bench``); the sites are the synthetic ecosystem's hospitals.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from guardian_bench import RUN, Bench, Site

from fedcost import schema
from fedcost.analytics import GroupedStatisticsLayout, group_costing
from fedcost.client.node import Node
from fedcost.data.files import write_node_files
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.models import evaluation
from fedcost.models.evaluation import READMISSION_SUMS, SCORE_BINS
from fedcost.privacy.distributed import NOISE_CLIP, NOISE_GRID, StatisticsNoise
from fedcost.privacy.ledger import start_anew
from fedcost.secagg import ConsistencyRequest, Quantizer, SetupRequest
from fedcost.wire import records as rec
from fedcost.wire.purposes import PURPOSES

SITES = ("hospital-1", "hospital-2", "hospital-3", "hospital-4")


@pytest.fixture(scope="module")
def mapping(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ecosystem = generate_ecosystem(EcosystemSpec.from_sizes({"hospital": [300, 260, 220, 180]}), seed=3)
    return write_node_files(((n.name, n.role, n.frame) for n in ecosystem.nodes), tmp_path_factory.mktemp("data"))


@pytest.fixture
def bench(mapping: Path, tmp_path: Path) -> Bench:
    bench = Bench(tmp_path, mapping, SITES)
    assert all(not reply.has_error() for reply in bench.say_hello(bench.hello()).values())
    return bench


def _statistics_shape(bench: Bench) -> list[tuple[int, ...]]:
    return [(len(Node(bench.site(SITES[0]).setup).layout.slots()),)]


def _refused_by_all(outcome, names, reason: str) -> None:  # noqa: ANN001
    assert outcome.sums is None, "the coordinator got a sum"
    for name in names:
        assert reason in outcome.refusals.get(name, ""), (name, outcome.refusals)


# --- replays ------------------------------------------------------------------------------


def test_a_replayed_secure_sum_is_refused_and_gets_nothing(bench: Bench) -> None:
    shapes = _statistics_shape(bench)
    honest = bench.secure_sum("statistics", 0, SITES, shapes, label=f"{RUN}:s1:statistics:1")
    assert honest.sums is not None and not honest.refusals
    replay = bench.secure_sum("statistics", 0, SITES, shapes, label=f"{RUN}:s1:statistics:1")
    _refused_by_all(replay, SITES, "already answered")


def test_a_replay_through_a_fresh_flower_run_is_refused(bench: Bench) -> None:
    shapes = _statistics_shape(bench)
    assert bench.secure_sum("statistics", 0, SITES, shapes, label=f"{RUN}:s1:statistics:1").sums is not None
    for site in bench.sites.values():
        site.restart()  # nothing in memory: the node must remember on its disk
    assert all(not reply.has_error() for reply in bench.say_hello(bench.hello()).values())
    replay = bench.secure_sum("statistics", 0, SITES, shapes, label=f"{RUN}:s1:statistics:1")
    _refused_by_all(replay, SITES, "already answered")


def test_a_restarted_run_must_state_the_plan_it_was_accepted_with(bench: Bench) -> None:
    site = bench.site(SITES[0])
    site.restart()
    reply = bench.say_hello(bench.hello(rounds=3), [site.name])[site.name]
    site.assert_refused(reply, "was accepted here with another plan")


def test_a_closed_run_answers_nothing_more(bench: Bench) -> None:
    site = bench.site(SITES[0])
    assert not site.send({rec.TRANSPORT: rec.CLOSE}).has_error()
    again = site.send({rec.TRANSPORT: rec.CLOSE})
    assert again.has_error() and "closed" in again.error.reason
    site.restart()
    reply = bench.say_hello(bench.hello(), [site.name])[site.name]
    assert reply.has_error() and "closed" in reply.error.reason


# --- too few sites, and differencing over site sets ---------------------------------------


def test_two_node_secure_sums_are_refused_by_the_nodes(bench: Bench) -> None:
    shapes = _statistics_shape(bench)
    for pair in ((SITES[0], SITES[1]), (SITES[0], SITES[2]), (SITES[1], SITES[2])):
        outcome = bench.secure_sum("statistics", 0, pair, shapes, label=f"{RUN}:p:statistics:{pair[1][-1]}")
        _refused_by_all(outcome, pair, "fewer than the 3")


def test_differencing_one_input_over_two_site_sets_is_refused(bench: Bench) -> None:
    shapes = _statistics_shape(bench)
    assert bench.secure_sum("statistics", 0, SITES, shapes, label=f"{RUN}:a:statistics:1").sums is not None
    # The same sites' statistics again without hospital-4: the difference would be hospital-4's own.
    without = bench.secure_sum("statistics", 0, SITES[:3], shapes, label=f"{RUN}:a:statistics:2")
    _refused_by_all(without, SITES[:3], "could isolate hospital-4")


def test_three_site_sets_that_differ_by_one_site_are_refused(bench: Bench) -> None:
    shapes = _statistics_shape(bench)
    first = bench.secure_sum("statistics", 0, SITES[:3], shapes, label=f"{RUN}:b:statistics:1")
    assert first.sums is not None
    second = bench.secure_sum("statistics", 0, (SITES[0], SITES[1], SITES[3]), shapes, label=f"{RUN}:b:statistics:2")
    _refused_by_all(second, SITES[:2], "could isolate")


def test_differencing_a_fixed_input_across_two_jobs_is_refused(bench: Bench) -> None:
    shapes = _statistics_shape(bench)
    assert bench.secure_sum("statistics", 0, SITES, shapes, label=f"{RUN}:j:statistics:1").sums is not None
    later = bench.hello(run_id="later")
    assert all(not reply.has_error() for reply in bench.say_hello(later).values())
    outcome = bench.secure_sum("statistics", 0, SITES[:3], shapes, label="later:j:statistics:1")
    _refused_by_all(outcome, SITES[:3], "could isolate hospital-4")


def test_evaluating_one_model_over_two_site_sets_is_refused(bench: Bench) -> None:
    job, weights = bench.job_and_weights(SITES[0])
    shapes = [(n,) for (n,) in evaluation.sums_shapes(job.model.tasks)]
    first = bench.secure_sum(
        "evaluate", 1, SITES, shapes, label=f"{RUN}:e:evaluate:1", job=job.to_json(), weights=weights
    )
    assert first.sums is not None, first.refusals
    # The same weights again, in the next round, without hospital-4: its evaluation sums by difference.
    again = bench.secure_sum(
        "evaluate", 2, SITES[:3], shapes, label=f"{RUN}:e:evaluate:2", job=job.to_json(), weights=weights
    )
    _refused_by_all(again, SITES[:3], "this exact model")


def test_a_secure_sum_labelled_for_another_purpose_is_refused(bench: Bench) -> None:
    outcome = bench.secure_sum("statistics", 0, SITES, _statistics_shape(bench), label=f"{RUN}:x:analytics:1")
    _refused_by_all(outcome, SITES, "labelled for another run, purpose or round")


def test_the_same_site_set_may_sum_an_input_again(bench: Bench) -> None:
    shapes = _statistics_shape(bench)
    first = bench.secure_sum("statistics", 0, SITES, shapes, label=f"{RUN}:c:statistics:1")
    again = bench.secure_sum("statistics", 0, SITES, shapes, label=f"{RUN}:c:statistics:2")
    assert first.sums is not None and again.sums is not None
    np.testing.assert_allclose(first.sums[0], again.sums[0], rtol=0, atol=len(SITES) * 2**-10)  # stochastic rounding


def test_a_coordinator_telling_sites_different_survivor_sets_gets_no_sum(bench: Bench) -> None:
    def tamper(name: str, request):  # noqa: ANN001, ANN202
        if isinstance(request, ConsistencyRequest) and name == SITES[0]:
            return ConsistencyRequest(tuple(s for s in request.survivors if s != 4))
        return request

    outcome = bench.secure_sum("statistics", 0, SITES, _statistics_shape(bench), tamper=tamper)
    assert outcome.sums is None


def test_a_sum_over_a_node_outside_the_roster_is_refused(bench: Bench) -> None:
    def tamper(name: str, request):  # noqa: ANN001, ANN202
        if isinstance(request, SetupRequest):
            config = request.config
            return SetupRequest(type(config)(**{**config.__dict__, "node_ids": (*config.node_ids, 9)}))
        return request

    outcome = bench.secure_sum("statistics", 0, SITES[:3], _statistics_shape(bench), tamper=tamper)
    assert outcome.sums is None
    assert all("outside the federation's roster" in reason for reason in outcome.refusals.values())


# --- differencing statistics tables -------------------------------------------------------

BY_GROUP = GroupedStatisticsLayout(("diagnosis_group",), ("total_cost",))
BY_GROUP_AND_SEX = GroupedStatisticsLayout(("diagnosis_group", "sex"), ("total_cost",))


def _plain_bench(mapping: Path, folder: Path) -> Bench:
    return Bench(folder, mapping, SITES, require_secure_aggregation=False)


def _analytics_hello(bench: Bench, tables: list[GroupedStatisticsLayout], run: str = RUN):  # noqa: ANN202
    return bench.hello(
        run_id=run,
        secure_aggregation=False,
        outputs={"analytics": PURPOSES["analytics"].outputs},
        tables=tuple(t.to_json() for t in tables),
        rounds=1,
        model_parameters=0,
    )


def _table(bench: Bench, name: str, layout: GroupedStatisticsLayout) -> np.ndarray:
    config = {rec.TRANSPORT: rec.PLAIN, rec.PURPOSE: "analytics", rec.ROUND: 0, rec.JOB: layout.to_json()}
    reply = bench.site(name).send(config)
    assert not reply.has_error(), reply.error.reason
    return rec.arrays_list(reply.content[rec.CONTRIBUTION])[0]


def _cells(layout: GroupedStatisticsLayout, vector: np.ndarray) -> dict[tuple[str, ...], tuple[int, float]]:
    """Rows and the exact cost sum (cents) of every cell of one node's vector."""
    block = vector[: layout.n_cells * layout.width].reshape(layout.n_cells, layout.width)
    slots = layout.measure_slots(0)
    out = {}
    for cell, row in zip(layout.cells, block):
        limbs = row[slots][1 : 1 + 3]
        out[cell] = (int(round(row[0])), sum(int(round(v)) << (30 * j) for j, v in enumerate(limbs)))
    return out


def test_differencing_diagnosis_group_against_diagnosis_group_by_sex_rebuilds_no_withheld_cell(
    mapping: Path, tmp_path: Path
) -> None:
    bench = _plain_bench(mapping, tmp_path)
    assert all(
        not r.has_error() for r in bench.say_hello(_analytics_hello(bench, [BY_GROUP, BY_GROUP_AND_SEX])).values()
    )
    for name in SITES:
        coarse = _cells(BY_GROUP, _table(bench, name, BY_GROUP))
        fine = _cells(BY_GROUP_AND_SEX, _table(bench, name, BY_GROUP_AND_SEX))
        rows = Node(bench.site(name).setup).rows
        for (group,), (n, _) in coarse.items():
            hidden = n - sum(m for (g, _sex), (m, _) in fine.items() if g == group)
            assert hidden == 0 or hidden >= 11, (name, group, hidden)
        # and the grand total (derivable from other releases) hides no small remainder either
        for cells in (coarse, fine):
            remainder = len(rows) - sum(n for n, _ in cells.values())
            assert remainder == 0 or remainder >= 11, (name, remainder)


def test_a_later_job_cannot_difference_its_table_against_an_earlier_one(mapping: Path, tmp_path: Path) -> None:
    bench = _plain_bench(mapping, tmp_path)
    assert all(not r.has_error() for r in bench.say_hello(_analytics_hello(bench, [BY_GROUP_AND_SEX])).values())
    earlier = {name: _cells(BY_GROUP_AND_SEX, _table(bench, name, BY_GROUP_AND_SEX)) for name in SITES}
    for site in bench.sites.values():
        site.restart()
    replies = bench.say_hello(_analytics_hello(bench, [BY_GROUP], run="later"))
    for name, reply in replies.items():
        if reply.has_error():
            assert "rebuild cells one of them withheld" in reply.error.reason
            continue
        coarse = _cells(BY_GROUP, _table(bench, name, BY_GROUP))
        for (group,), (n, _) in coarse.items():
            hidden = n - sum(m for (g, _sex), (m, _) in earlier[name].items() if g == group)
            assert hidden == 0 or hidden >= 11, (name, group, hidden)


def test_a_table_the_plan_did_not_state_is_refused(mapping: Path, tmp_path: Path) -> None:
    bench = _plain_bench(mapping, tmp_path)
    bench.say_hello(_analytics_hello(bench, [BY_GROUP]))
    config = {rec.TRANSPORT: rec.PLAIN, rec.PURPOSE: "analytics", rec.ROUND: 0, rec.JOB: BY_GROUP_AND_SEX.to_json()}
    site = bench.site(SITES[0])
    site.assert_refused(site.send(config), "a statistics table the accepted job did not state")


BY_SITE_AND_GROUP = group_costing.layout(SITES)
BY_GROUP_AND_PAYER = GroupedStatisticsLayout(("diagnosis_group", "payer"), ("total_cost",))


def test_group_costing_by_site_rebuilds_no_withheld_cell_and_shows_only_the_sites_own_block(
    mapping: Path, tmp_path: Path
) -> None:
    """Each node's cells by site and disease group, next to its table by group and payer of
    the same plan: no difference of the two isolates 1 to 10 rows, no cell shown holds fewer
    than 11, the node writes into its own block only, and a payment shows only with its cell."""
    bench = _plain_bench(mapping, tmp_path)
    replies = bench.say_hello(_analytics_hello(bench, [BY_GROUP_AND_PAYER, BY_SITE_AND_GROUP]))
    assert all(not r.has_error() for r in replies.values())
    payment = BY_SITE_AND_GROUP.measure_slots(BY_SITE_AND_GROUP.measures.index(schema.PAYMENT))
    withheld = 0
    for name in SITES:
        vector = _table(bench, name, BY_SITE_AND_GROUP)
        costing = _cells(BY_SITE_AND_GROUP, vector)
        fine = _cells(BY_GROUP_AND_PAYER, _table(bench, name, BY_GROUP_AND_PAYER))
        assert all(n == 0 for (site, _), (n, _) in costing.items() if site != name), "another site's block"
        groups = {group: cell for (site, group), cell in costing.items() if site == name}
        assert all(n == 0 or n >= 11 for n, _ in groups.values()), name
        withheld += len(Node(bench.site(name).setup).rows) - sum(n for n, _ in groups.values())
        for group, (n, _) in groups.items():
            hidden = n - sum(m for (g, _payer), (m, _) in fine.items() if g == group)
            assert hidden == 0 or hidden >= 11, (name, group, hidden)
        paid = vector.reshape(BY_SITE_AND_GROUP.n_cells, BY_SITE_AND_GROUP.width)[:, payment][:, 0]
        shown = np.array([n for n, _ in costing.values()])
        assert ((paid == shown) | (paid == 0)).all() and (paid[shown == 0] == 0).all(), name
    assert withheld > 0, "the small hospitals' small groups stayed home"


def test_a_site_that_shares_no_site_tables_refuses_group_costing(mapping: Path, tmp_path: Path) -> None:
    bench = Bench(tmp_path, mapping, SITES, require_secure_aggregation=False, share_site_tables=False)
    for name, reply in bench.say_hello(_analytics_hello(bench, [BY_SITE_AND_GROUP])).items():
        bench.site(name).assert_refused(reply, "share_site_tables = false")


def test_a_table_by_site_that_does_not_name_the_site_is_refused(mapping: Path, tmp_path: Path) -> None:
    bench = _plain_bench(mapping, tmp_path)
    others = group_costing.layout(tuple(name for name in SITES if name != SITES[0]) + ("hospital-9",))
    reply = bench.say_hello(_analytics_hello(bench, [others]), [SITES[0]])[SITES[0]]
    bench.site(SITES[0]).assert_refused(reply, "does not name this site")


# --- crafted models -----------------------------------------------------------------------


def _crafted_age_model(bench: Bench, name: str) -> tuple[str, ArrayRecord, list[float]]:
    """A GLM whose readmission score is a steep function of age alone."""
    job, _ = bench.job_and_weights(name)
    job = type(job)(type(job.model)(kind="glm", tasks=job.model.tasks), job.training, job.features, job.seed)
    names = job.features.feature_names
    age = names.index("age")
    weights = {}
    from fedcost.models.nets import build_model

    for key, tensor in build_model(job.model, job.features.n_features, seed=0).state_dict().items():
        array = np.zeros(tuple(tensor.shape), dtype="float32")
        if key == "heads.readmission.weight":
            array[0, age] = 1.0
        weights[key] = array
    ages = Node(bench.site(name).setup).data.test["age"].tolist()
    return job.to_json(), ArrayRecord({k: Array(v) for k, v in weights.items()}), ages


def test_a_crafted_model_cannot_turn_evaluation_into_a_list_of_ages(mapping: Path, tmp_path: Path) -> None:
    bench = _plain_bench(mapping, tmp_path)
    bench.say_hello(bench.hello(secure_aggregation=False))
    name = SITES[3]
    job, weights, ages = _crafted_age_model(bench, name)
    config = {rec.TRANSPORT: rec.PLAIN, rec.PURPOSE: "evaluate", rec.ROUND: 1, rec.JOB: job}
    reply = bench.site(name).send(config, {rec.ARRAYS: weights}, "evaluate")
    assert not reply.has_error(), reply.error.reason
    sums = rec.arrays_list(reply.content[rec.CONTRIBUTION])[0]
    k = len(READMISSION_SUMS)
    histogram = sums[k : k + SCORE_BINS] + sums[k + SCORE_BINS : k + 2 * SCORE_BINS]
    assert math.isclose(histogram.sum(), len(ages))
    # On the old node every occupied bin held the rows of one age: here the histogram is flat
    # over groups of at least 11 rows, so no bin singles out an age.
    runs, start = [], 0
    for i in range(1, SCORE_BINS + 1):
        if i == SCORE_BINS or not math.isclose(histogram[i], histogram[start], rel_tol=1e-9, abs_tol=1e-12):
            runs.append(histogram[start:i].sum())
            start = i
    assert all(total < 1e-9 or total >= 11 - 1e-6 for total in runs), runs
    assert sum(total > 0 for total in runs) <= len(ages) // 11


# --- the privacy budget's ledger ----------------------------------------------------------

DP = {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplier": 1.5}


def _dp_bench(mapping: Path, folder: Path) -> Bench:
    bench = Bench(folder, mapping, SITES, require_secure_aggregation=False, privacy=DP)
    assert all(not r.has_error() for r in bench.say_hello(bench.hello(secure_aggregation=False)).values())
    return bench


def _train(bench: Bench, name: str, round_: int):  # noqa: ANN202
    job, weights = bench.job_and_weights(name)
    config = {rec.TRANSPORT: rec.PLAIN, rec.PURPOSE: "train", rec.ROUND: round_, rec.JOB: job.to_json()}
    return bench.site(name).send(config, {rec.ARRAYS: weights}, "train")


def _paid_site(mapping: Path, folder: Path):  # noqa: ANN202
    bench = _dp_bench(mapping, folder)
    site = bench.site(SITES[0])
    assert not _train(bench, site.name, 1).has_error()
    assert site.events("dp_round")[-1]["details"]["ledger_seq"] >= 0
    return bench, site, site.setup.ledger_path


def test_a_deleted_ledger_fails_closed(mapping: Path, tmp_path: Path) -> None:
    bench, site, ledger = _paid_site(mapping, tmp_path)
    ledger.unlink()
    site.assert_refused(_train(bench, site.name, 2), "is missing")
    assert not ledger.exists() or "dp_spent" not in ledger.read_text()


def test_an_edited_ledger_fails_closed(mapping: Path, tmp_path: Path) -> None:
    bench, site, ledger = _paid_site(mapping, tmp_path)
    text = ledger.read_text()
    assert '"noise_multiplier":1.5' in text
    ledger.write_text(text.replace('"noise_multiplier":1.5', '"noise_multiplier":9.5'))
    site.assert_refused(_train(bench, site.name, 2), "failed its check")


def test_a_ledger_emptied_of_its_spending_fails_closed(mapping: Path, tmp_path: Path) -> None:
    bench, site, ledger = _paid_site(mapping, tmp_path)
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text("".join(lines[:2]))  # the first entry and its checkpoint: a chain that verifies
    site.assert_refused(_train(bench, site.name, 2), "is cut short")


def test_a_ledger_cut_in_the_middle_of_a_paid_entry_fails_closed(mapping: Path, tmp_path: Path) -> None:
    bench, site, ledger = _paid_site(mapping, tmp_path)
    anchor = site.events("dp_round")[-1]["details"]["ledger_seq"]
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(b"".join(lines[:anchor]) + lines[anchor][:30])
    site.assert_refused(_train(bench, site.name, 2), "is cut short")


def test_an_interrupted_last_write_is_repaired_not_refused(mapping: Path, tmp_path: Path) -> None:
    bench, site, ledger = _paid_site(mapping, tmp_path)
    ledger.write_bytes(ledger.read_bytes()[:-20])  # the last checkpoint, after everything the logs anchor
    assert not _train(bench, site.name, 2).has_error()
    assert "tail_discarded" in ledger.read_text()


def test_a_garbled_ledger_is_a_clear_refusal_not_a_decode_error(mapping: Path, tmp_path: Path) -> None:
    bench, site, ledger = _paid_site(mapping, tmp_path)
    ledger.write_bytes(b"{not json\n")
    site.assert_refused(_train(bench, site.name, 2), "failed its check")


def test_only_an_explicit_signed_reset_restarts_the_budget(mapping: Path, tmp_path: Path) -> None:
    bench, site, ledger = _paid_site(mapping, tmp_path)
    ledger.unlink()
    site.assert_refused(_train(bench, site.name, 2), "is missing")
    start_anew(ledger, bench.identity(site.name), reason="restored the site after a disk failure; budget waived")
    assert not _train(bench, site.name, 2).has_error()
    assert "restored the site after a disk failure" in ledger.read_text()


# --- malformed requests are typed refusals ------------------------------------------------


def test_a_secure_stage_before_its_setup_is_a_refusal(bench: Bench) -> None:
    site = bench.site(SITES[0])
    config = {
        rec.TRANSPORT: rec.SECURE,
        rec.PURPOSE: "statistics",
        rec.ROUND: 0,
        "q_clip": 1.0,
        "q_levels": 2,
        "q_max_nodes": 4,
        "q_max_weight": 1,
    }
    reply = site.send(
        config,
        {rec.SECAGG: ConfigRecord({"stage": "masked-input", "senders": [], "recipients": [], "ciphertexts": []})},
    )
    site.assert_refused(reply, "no secure sum of statistics round 0 is in progress")


@pytest.mark.parametrize(
    ("config", "records", "reason"),
    [
        ({rec.PURPOSE: "statistics", rec.ROUND: -1}, {}, "round -1"),
        ({rec.PURPOSE: "statistics", rec.ROUND: True}, {}, "not a whole number"),
        ({rec.PURPOSE: "statistics", rec.ROUND: 0, "subgroup": "age > 90"}, {}, "which a node does not read"),
        ({rec.PURPOSE: "statistics", rec.ROUND: 0}, {"extra": ConfigRecord({"a": 1})}, "records it should not carry"),
        ({rec.PURPOSE: "rows", rec.ROUND: 0}, {}, "unknown purpose"),
        ({rec.PURPOSE: "benchmark", rec.ROUND: 2}, {}, "must state its job"),
    ],
)
def test_malformed_requests_are_typed_refusals(mapping: Path, tmp_path: Path, config, records, reason) -> None:  # noqa: ANN001
    bench = _plain_bench(mapping, tmp_path)
    bench.say_hello(bench.hello(secure_aggregation=False))
    site = bench.site(SITES[0])
    site.assert_refused(site.send({rec.TRANSPORT: rec.PLAIN, **config}, records), reason)


def test_weights_too_large_for_any_trained_model_are_refused(mapping: Path, tmp_path: Path) -> None:
    bench = _plain_bench(mapping, tmp_path)
    bench.say_hello(bench.hello(secure_aggregation=False))
    site = bench.site(SITES[0])
    job, weights = bench.job_and_weights(site.name)
    huge = ArrayRecord({k: Array(np.full_like(a.numpy(), 1e38)) for k, a in weights.items()})
    config = {rec.TRANSPORT: rec.PLAIN, rec.PURPOSE: "train", rec.ROUND: 1, rec.JOB: job.to_json()}
    site.assert_refused(site.send(config, {rec.ARRAYS: huge}, "train"), "exceed")


def test_a_job_that_feeds_a_target_in_as_a_feature_is_refused(mapping: Path, tmp_path: Path) -> None:
    bench = _plain_bench(mapping, tmp_path)
    bench.say_hello(bench.hello(secure_aggregation=False))
    site = bench.site(SITES[0])
    job, weights = bench.job_and_weights(site.name)
    features = job.features.to_dict()
    features["numeric"] = {"total_cost": [0.0, 1.0], **features["numeric"]}
    crafted = json.loads(job.to_json())
    crafted["features"] = features
    config = {rec.TRANSPORT: rec.PLAIN, rec.PURPOSE: "evaluate", rec.ROUND: 1, rec.JOB: json.dumps(crafted)}
    site.assert_refused(site.send(config, {rec.ARRAYS: weights}, "evaluate"), "which are not feature columns")


# --- a job whose [data] is not the site's data --------------------------------------------

HONEST_DATA = {"targets": ["readmitted_30d", "total_cost"], "extra_numeric": [], "extra_categorical": {}}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (
            {"extra_numeric": ["bmi"]},
            "its [data] extra_numeric lists 'bmi', which this site's mapping does not declare "
            "([features] numeric in mapping.toml)",
        ),
        (
            {"targets": ["total_cost"]},
            "its [data] targets does not list 'readmitted_30d', which this site's mapping "
            "declares ([targets.*] in mapping.toml)",
        ),
        (
            {"extra_categorical": {"ward": ["medical", "surgical"]}},
            "its [data] extra_categorical lists 'ward', which this site's mapping does not declare",
        ),
    ],
    ids=["an extra column", "one target", "an extra category"],
)
def test_a_job_whose_data_section_is_not_the_sites_data_is_refused_at_the_hello(
    mapping: Path, tmp_path: Path, data: dict, reason: str
) -> None:
    bench = Bench(tmp_path, mapping, SITES)
    replies = bench.say_hello(bench.hello(data=json.dumps({**HONEST_DATA, **data})))
    for name, reply in replies.items():
        bench.site(name).assert_refused(reply, reason)
        assert "fix the job, or this site's mapping and restart its node" in reply.error.reason
    statistics = bench.secure_sum("statistics", 0, SITES, _statistics_shape(bench), label=f"{RUN}:d:statistics:1")
    _refused_by_all(statistics, SITES, "no accepted job")


def test_a_job_whose_data_section_is_the_sites_data_is_accepted(mapping: Path, tmp_path: Path) -> None:
    bench = Bench(tmp_path, mapping, SITES)
    replies = bench.say_hello(bench.hello(data=json.dumps(HONEST_DATA)))
    assert not any(reply.has_error() for reply in replies.values()), replies
    assert bench.secure_sum("statistics", 0, SITES, _statistics_shape(bench), label=f"{RUN}:d:statistics:1").sums


# --- distributed DP on every sum but training updates ------------------------------------

STATISTICS_DP = {"epsilon": 8.0, "delta": 1e-6, "max_grad_norm": 1.0, "statistics": {"epsilon": 2.0}}


def _noisy_hello(bench: Bench, sd: float, sites: int = 4):  # noqa: ANN202
    return bench.hello(
        outputs={"statistics": PURPOSES["statistics"].outputs},
        rounds=1,
        model_parameters=0,
        noise=StatisticsNoise(sd, sites, 1e5),
    )


def test_a_site_that_requires_noisy_statistics_refuses_a_job_without_noise(mapping: Path, tmp_path: Path) -> None:
    bench = Bench(tmp_path, mapping, SITES, privacy=STATISTICS_DP)
    for name, reply in bench.say_hello(bench.hello()).items():
        bench.site(name).assert_refused(reply, "the job adds none")


def test_a_job_whose_noise_is_too_weak_for_the_site_is_refused(mapping: Path, tmp_path: Path) -> None:
    bench = Bench(tmp_path, mapping, SITES, privacy=STATISTICS_DP)
    for name, reply in bench.say_hello(_noisy_hello(bench, sd=1.0)).items():
        bench.site(name).assert_refused(reply, "this site allows 2")


def _noisy_statistics(bench: Bench, label: str, sites=SITES):  # noqa: ANN001, ANN202
    quantizer = Quantizer(NOISE_CLIP, int(NOISE_CLIP) * NOISE_GRID, len(sites))
    return bench.secure_sum("statistics", 0, sites, _statistics_shape(bench), label=label, quantizer=quantizer)


def test_noisy_sums_carry_the_noise_and_are_paid_for_in_the_ledger(mapping: Path, tmp_path: Path) -> None:
    bench = Bench(tmp_path, mapping, SITES, privacy=STATISTICS_DP)
    assert all(not r.has_error() for r in bench.say_hello(_noisy_hello(bench, sd=40.0)).values())
    outcome = _noisy_statistics(bench, f"{RUN}:n:statistics:1")
    assert outcome.sums is not None, outcome.refusals
    layout = Node(bench.site(SITES[0]).setup).layout
    exact = sum(layout.local_statistics(Node(site.setup).data.train, cost_clip=1e5) for site in bench.sites.values())
    error = outcome.sums[0] - exact / layout.noisy_bounds(1e5)  # in normalised units, where the noise is sd = 40
    assert 25 < float(np.std(error)) < 60, "each slot carries the job's noise, not less and not much more"
    for site in bench.sites.values():
        ledger = [json.loads(line) for line in site.setup.ledger_path.read_text().splitlines()]
        spends = [entry["details"]["release"] for entry in ledger if entry["event"] == "dp_spent"]
        assert [spend["mechanism"] for spend in spends] == ["skellam"]
        assert site.events("dp_round")[-1]["details"]["noise_sd"] == 40.0


def test_a_noisy_sum_is_not_unmasked_over_fewer_sites_than_its_noise_is_shared_among(
    mapping: Path, tmp_path: Path
) -> None:
    bench = Bench(tmp_path, mapping, SITES, privacy=STATISTICS_DP)
    assert all(not r.has_error() for r in bench.say_hello(_noisy_hello(bench, sd=40.0)).values())
    outcome = _noisy_statistics(bench, f"{RUN}:n:statistics:1", sites=SITES[:3])
    _refused_by_all(outcome, SITES[:3], "the job's noise is shared among 4")


def test_noisy_sums_stop_at_the_sites_budget(mapping: Path, tmp_path: Path) -> None:
    tight = {**STATISTICS_DP, "epsilon": 1.0, "statistics": {"epsilon": 1.0}}
    bench = Bench(tmp_path, mapping, SITES, privacy=tight)
    assert all(not r.has_error() for r in bench.say_hello(_noisy_hello(bench, sd=40.0)).values())
    answered = 0
    for attempt in range(1, 30):
        outcome = _noisy_statistics(bench, f"{RUN}:b:statistics:{attempt}")
        if outcome.sums is None:
            _refused_by_all(outcome, SITES, "privacy budget")
            break
        answered += 1
    assert 1 <= answered < 29, "the same job's sums are paid again each time, until the budget is spent"


def test_a_secure_sum_set_up_under_one_job_is_not_finished_under_another(mapping: Path, tmp_path: Path) -> None:
    """Attack: a noisy sum over three sites, begun under a job whose noise is shared among four
    (its consistency would be refused), then a hello of another job, shared among three, before
    its consistency: the sum must not be unmasked with three quarters of the noise it was paid for."""
    bench = Bench(tmp_path, mapping, SITES, privacy=STATISTICS_DP)
    assert all(not r.has_error() for r in bench.say_hello(_noisy_hello(bench, sd=40.0)).values())
    swapped = dataclasses.replace(_noisy_hello(bench, sd=40.0, sites=3), run_id="swapped")

    def swap_the_job(name: str, request):  # noqa: ANN001, ANN202
        if isinstance(request, ConsistencyRequest):
            assert not bench.site(name).send(dict(swapped.to_record())).has_error(), "the other job is accepted"
        return request

    quantizer = Quantizer(NOISE_CLIP, int(NOISE_CLIP) * NOISE_GRID, 3)
    outcome = bench.secure_sum(
        "statistics",
        0,
        SITES[:3],
        _statistics_shape(bench),
        label=f"{RUN}:w:statistics:1",
        quantizer=quantizer,
        tamper=swap_the_job,
    )
    _refused_by_all(outcome, SITES[:3], "set up under another job")


BY_SEX = GroupedStatisticsLayout(("sex",), ("total_cost",))
# A site's rows by diagnosis group and sex where the order of two jobs' tables matters.
INTERLEAVED = {
    ("heart_failure", "female"): 6,
    ("heart_failure", "male"): 2,
    ("copd", "female"): 6,
    ("copd", "male"): 23,
    ("pneumonia", "female"): 15,
    ("pneumonia", "male"): 11,
}


def test_a_job_whose_plan_another_runs_tables_changed_midway_releases_no_more_tables(tmp_path: Path) -> None:
    """Attack: two Flower runs at one node (each its own context, no hello between them). Run
    "first" plans by diagnosis group, and by diagnosis group and sex; it gets the first table.
    Run "second" then gets a table by sex, decided against it. Decided anew against that, the
    first run's plan would release a finer table that fits a first table that never left: with
    the one that did, and the table by sex, it rebuilds a group of fewer than 11 patients."""
    size = sum(INTERLEAVED.values())
    frame = generate_ecosystem(EcosystemSpec.from_sizes({"hospital": [size]}), seed=3).nodes[0].frame
    cells = [cell for cell, n in INTERLEAVED.items() for _ in range(n)]
    frame["diagnosis_group"], frame["sex"] = [group for group, _ in cells], [sex for _, sex in cells]
    mapping = write_node_files([(SITES[0], "hospital", frame)], tmp_path / "data")
    bench = Bench(tmp_path, mapping, SITES[:1], require_secure_aggregation=False)
    first = bench.site(SITES[0])
    second = Site(first.setup, first.node_id)  # another Flower run at the same node
    assert not first.send(dict(_analytics_hello(bench, [BY_GROUP, BY_GROUP_AND_SEX], "first").to_record())).has_error()
    assert not second.send(dict(_analytics_hello(bench, [BY_SEX], "second").to_record())).has_error()
    _table(bench, first.name, BY_GROUP)
    config = {rec.TRANSPORT: rec.PLAIN, rec.PURPOSE: "analytics", rec.ROUND: 0}
    assert not second.send({**config, rec.JOB: BY_SEX.to_json()}).has_error()
    finer = first.send({**config, rec.JOB: BY_GROUP_AND_SEX.to_json()})
    first.assert_refused(finer, "part of the plan left under the old decision")
