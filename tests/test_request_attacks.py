"""A coordinator's malformed requests against a real node: refused with a reason, and logged.

The site guardian of ``guardian_bench`` (fedcost's real ClientApp) is sent requests no honest
coordinator sends. Each must come back as a refusal whose reason names what is wrong (not
the generic "could not answer" of a fault), and the request must be in the site's audit log.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ArrayRecord
from guardian_bench import Bench

from fedcost.data.files import write_node_files
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.wire import records as rec

SITES = ("hospital-1", "hospital-2", "hospital-3")


@pytest.fixture(scope="module")
def mapping(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ecosystem = generate_ecosystem(EcosystemSpec.from_sizes({"hospital": [300, 260, 220]}), seed=3)
    return write_node_files(((n.name, n.role, n.frame) for n in ecosystem.nodes), tmp_path_factory.mktemp("data"))


def _plain_bench(mapping: Path, folder: Path) -> Bench:
    bench = Bench(folder, mapping, SITES, require_secure_aggregation=False)
    assert not any(reply.has_error() for reply in bench.say_hello(bench.hello(secure_aggregation=False)).values())
    return bench


@pytest.mark.parametrize("round_", [2**53, 2**62])
def test_a_round_beyond_what_the_audit_log_holds_is_refused_and_logged(
    mapping: Path, tmp_path: Path, round_: int
) -> None:
    """The log's write of the request failed (JSON holds integers below 2**53 exactly): the
    guardian neither logged nor answered it, and the node replied only with its fault."""
    bench = _plain_bench(mapping, tmp_path)
    site = bench.site(SITES[0])
    reply = site.send({rec.TRANSPORT: rec.PLAIN, rec.PURPOSE: "statistics", rec.ROUND: round_})
    site.assert_refused(reply, f"it asks for round {round_} of statistics")
    received = site.events("message_received")[-1]
    assert received["details"]["kind"] == "plain:statistics" and received["round"] is None


def test_an_empty_model_record_is_refused_as_a_model_that_does_not_fit_the_job(mapping: Path, tmp_path: Path) -> None:
    """An empty record passed the model check as if it carried no model; loading it failed."""
    bench = _plain_bench(mapping, tmp_path)
    site = bench.site(SITES[0])
    job, _ = bench.job_and_weights(SITES[0])
    config = {rec.TRANSPORT: rec.PLAIN, rec.PURPOSE: "train", rec.ROUND: 1, rec.JOB: job.to_json()}
    reply = site.send(config, {rec.ARRAYS: ArrayRecord({})}, "train")
    site.assert_refused(reply, "its model weights do not fit the model its job states")
