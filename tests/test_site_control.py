"""Site control at the node, end to end: a malicious coordinator against the real ClientApp.

Each attack test drives ``make_client_app`` in-process with the Flower messages a
malicious coordinator would craft, and checks what actually leaves the node: an error
reply without any content record, and a refusal in the node's own audit log. The
accounting tests run real simulations (``fedcost simulate`` in a subprocess).
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from cryptography.hazmat.primitives import serialization
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.app.message.message import make_message

from fedcost.client.app import make_client_app
from fedcost.client.node import Node, NodeSetup
from fedcost.data.files import write_node_files
from fedcost.data.mapping import DataMapping
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.identity import Identity
from fedcost.models.nets import ModelSpec, build_model
from fedcost.models.training import TrainConfig
from fedcost.models.training_job import TrainingJob
from fedcost.privacy.distributed import calibrate_newton_noise
from fedcost.wire import records as rec
from fedcost.wire.purposes import PURPOSES
from simulations import SMALL_FEDERATION, simulate

COORDINATOR = Identity.generate("coordinator", "coordinator").public().key_id
BIG, TINY = "hospital-1", "hospital-2"  # 300 rows; 15 rows, so 3 held-out rows


def _policy(folder: Path, name: str, **overrides: object) -> Path:
    policy = {
        "coordinator": COORDINATOR,
        "require_secure_aggregation": True,
        "min_cohort": 11,
        "max_rounds": 5,
        "max_model_parameters": 100_000,
        "metrics": {"auroc": 3},
        "privacy": {"epsilon": math.inf},
        **overrides,
    }
    path = folder / f"{name}.toml"
    path.write_bytes(tomli_w.dumps(policy).encode())
    return path


@pytest.fixture(scope="module")
def mapping(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ecosystem = generate_ecosystem(EcosystemSpec.from_sizes({"hospital": [300, 15]}), seed=3)
    return write_node_files(((n.name, n.role, n.frame) for n in ecosystem.nodes), tmp_path_factory.mktemp("data"))


@dataclass
class Site:
    """One node's ClientApp as a coordinator reaches it, and what it logged."""

    setup: NodeSetup
    app: Callable[[Message, Context], Message]
    context: Context
    reads: list[str]

    def send(self, config: dict, content: dict | None = None, message_type: str = MessageType.QUERY) -> Message:
        metadata = Metadata(1, "attack", 0, 1, "", "", time.time(), DEFAULT_TTL, message_type)
        message = make_message(metadata, RecordDict({rec.CONFIG: ConfigRecord(config), **(content or {})}))
        return self.app(message, self.context)

    def events(self, event: str) -> list[dict]:
        lines = (self.setup.audit_dir / f"{self.setup.name}.jsonl").read_text().splitlines()
        return [entry for entry in map(json.loads, lines) if entry["event"] == event]

    def assert_refused(self, reply: Message, reason: str) -> None:
        assert reply.has_error() and not reply.has_content()
        assert reason in reply.error.reason
        assert any(reason in entry["details"]["reason"] for entry in self.events("refusal"))


def _site(
    mapping: Path, folder: Path, name: str = BIG, node_factory: Callable[[NodeSetup], Node] = Node, **policy
) -> Site:
    folder.mkdir(parents=True, exist_ok=True)
    identity = Identity.generate(name, "hospital")
    key = identity.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    setup = NodeSetup(mapping, name, 3, identity_key=key, audit_dir=folder, policy=_policy(folder, name, **policy))
    reads: list[str] = []

    def reading(setup: NodeSetup) -> Node:
        reads.append(setup.name)
        return node_factory(setup)

    app = make_client_app(lambda context: setup, reading)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return Site(setup, app, context, reads)


def hello(**overrides: object) -> dict:
    config = {
        rec.TRANSPORT: rec.HELLO,
        "run_id": "attack",
        "coordinator": COORDINATOR,
        "secure_aggregation": True,
        "rounds": 2,
        "min_cohort": 11,
        "model_parameters": 10_000,
        # analytics and episodes each need their plan stated (tables, the linkage): see their tests
        **{f"outputs.{kind}": list(p.outputs) for kind, p in PURPOSES.items() if kind not in ("analytics", "episodes")},
    }
    config.update(overrides)
    return config


def _job_and_weights(setup: NodeSetup) -> tuple[TrainingJob, ArrayRecord]:
    """A valid round's job and global weights for ``setup``'s node, as an honest coordinator sends them."""
    node = Node(setup)
    features = node.layout.feature_spec(node.statistics())
    spec = ModelSpec(tasks=DataMapping.load(setup.mapping).tasks)
    model = build_model(spec, features.n_features, seed=0)
    weights = ArrayRecord({k: Array(v.detach().numpy()) for k, v in model.state_dict().items()})
    return TrainingJob(spec, TrainConfig(epochs=1, batch_size=64), features, 0), weights


def plain_request(purpose: str, round_: int, job: TrainingJob, weights: ArrayRecord) -> tuple[dict, dict]:
    config = {rec.TRANSPORT: rec.PLAIN, rec.PURPOSE: purpose, rec.ROUND: round_, rec.JOB: job.to_json()}
    return config, {rec.ARRAYS: weights}


# --- an honest coordinator gets its answers -------------------------------------------------


def test_an_accepted_job_is_answered_through_the_guard(mapping: Path, tmp_path: Path) -> None:
    site = _site(mapping, tmp_path, require_secure_aggregation=False)
    reply = site.send(hello(secure_aggregation=False))
    assert not reply.has_error()
    assert dict(reply.content[rec.NODE]) == {"name": BIG, "role": "hospital"}
    job, weights = _job_and_weights(site.setup)
    reply = site.send(*plain_request("train", 1, job, weights), message_type=MessageType.TRAIN)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content[rec.METRICS][rec.WEIGHT] == len(Node(site.setup).data.train)
    assert reply.content[rec.CONTRIBUTION][f"{len(weights):04d}"].numpy().tolist() == [0.0], "no train-loss metric"
    assert not site.events("refusal")


# --- the attacks ---------------------------------------------------------------------------


def test_job_asking_for_raw_rows(mapping: Path, tmp_path: Path) -> None:
    site = _site(mapping, tmp_path)
    site.assert_refused(site.send(hello(**{"outputs.statistics": ["rows"]})), "raw rows never leave a site")
    assert not site.reads, "the job is refused before the node reads its rows"


def test_job_asking_for_per_record_predictions(mapping: Path, tmp_path: Path) -> None:
    site = _site(mapping, tmp_path)
    site.assert_refused(site.send(hello(**{"outputs.evaluate": ["sums", "predictions"]})), "per-record predictions")
    assert not site.reads


def test_metric_over_a_3_row_subgroup(mapping: Path, tmp_path: Path) -> None:
    site = _site(mapping, tmp_path)
    site.assert_refused(site.send(hello(subgroup="age < 30 and zip = 02139")), "'subgroup'")
    tiny = _site(mapping, tmp_path, TINY, require_secure_aggregation=False)
    assert not tiny.send(hello(secure_aggregation=False)).has_error()
    job, weights = _job_and_weights(tiny.setup)
    assert len(Node(tiny.setup).data.test) == 3
    reply = tiny.send(*plain_request("evaluate", 1, job, weights), message_type=MessageType.EVALUATE)
    tiny.assert_refused(reply, "a cohort smaller than the site's min_cohort (11)")


def test_minimum_cohort_lowered_to_1_by_the_job(mapping: Path, tmp_path: Path) -> None:
    site = _site(mapping, tmp_path)
    site.assert_refused(site.send(hello(min_cohort=1)), "its min_cohort 1 is below this site's min_cohort 11")
    assert not site.reads


def test_more_rounds_than_the_policy_allows(mapping: Path, tmp_path: Path) -> None:
    site = _site(mapping, tmp_path)
    site.assert_refused(site.send(hello(rounds=50)), "it asks for 50 rounds; this site allows 1 to 5")
    assert not site.send(hello(rounds=2)).has_error()
    job, weights = _job_and_weights(site.setup)
    beyond = site.send(*plain_request("train", 3, job, weights), message_type=MessageType.TRAIN)
    site.assert_refused(beyond, "round 3 of train; the accepted job of 2 rounds asks for it in rounds 1 to 2")


def test_secure_aggregation_switched_off_when_the_policy_requires_it(mapping: Path, tmp_path: Path) -> None:
    site = _site(mapping, tmp_path)
    site.assert_refused(site.send(hello(secure_aggregation=False)), "this site requires secure aggregation")
    assert not site.send(hello()).has_error()
    job, weights = _job_and_weights(site.setup)
    reply = site.send(*plain_request("train", 1, job, weights), message_type=MessageType.TRAIN)
    site.assert_refused(reply, "switches secure aggregation off")


def test_data_smuggled_in_metric_names_or_string_values(mapping: Path, tmp_path: Path) -> None:
    site = _site(mapping, tmp_path)
    site.assert_refused(site.send(hello(**{"outputs.evaluate": ["sums", "dob-1961-03-02"]})), "'dob-1961-03-02'")
    site.assert_refused(site.send(hello(**{"outputs.train": "weights"})), "must be a list of output names")

    class LeakyRole(Node):  # node code that would put a patient's data in a string value
        @property
        def role(self) -> str:
            return "hospital; patient 4411 born 1961-03-02"

    leaky = _site(mapping, tmp_path / "leaky", node_factory=LeakyRole)
    leaky.assert_refused(leaky.send(hello()), "a config field 'role' whose value has the wrong form")

    class LeakyMetric(Node):  # node code that would put a value in the weight of a sum
        def contribution(self, ask, dp=None):  # noqa: ANN001, ANN201
            found = super().contribution(ask, dp)
            return type(found)(found.arrays, 1961)

    metric = _site(mapping, tmp_path / "metric", node_factory=LeakyMetric, require_secure_aggregation=False)
    assert not metric.send(hello(secure_aggregation=False)).has_error()
    request = {rec.TRANSPORT: rec.PLAIN, rec.PURPOSE: "statistics", rec.ROUND: 0}
    metric.assert_refused(metric.send(request), "a metric outside the site's whitelist")


def test_oversized_model_or_one_with_nan_or_inf(mapping: Path, tmp_path: Path) -> None:
    site = _site(mapping, tmp_path, require_secure_aggregation=False)
    site.assert_refused(site.send(hello(model_parameters=10**9)), "this site allows at most 100000")
    assert not site.send(hello(secure_aggregation=False, model_parameters=50)).has_error()
    job, weights = _job_and_weights(site.setup)
    oversized = site.send(*plain_request("train", 1, job, weights), message_type=MessageType.TRAIN)
    site.assert_refused(oversized, "the accepted job stated 50")
    assert not site.send(hello(secure_aggregation=False, run_id="another")).has_error()
    for bad in (np.nan, np.inf):
        poisoned = ArrayRecord({k: Array(np.full_like(a.numpy(), bad)) for k, a in weights.items()})
        reply = site.send(*plain_request("train", 1, job, poisoned), message_type=MessageType.TRAIN)
        site.assert_refused(reply, "its model weights are not finite")


def test_unknown_message_type(mapping: Path, tmp_path: Path) -> None:
    site = _site(mapping, tmp_path)
    before_hello = site.send({rec.TRANSPORT: rec.PLAIN, rec.PURPOSE: "statistics", rec.ROUND: 0})
    site.assert_refused(before_hello, "no accepted job")
    assert not site.send(hello()).has_error()
    site.assert_refused(site.send({rec.TRANSPORT: "export", rec.PURPOSE: "rows"}), "unknown request type 'export'")
    site.assert_refused(site.send({rec.TRANSPORT: rec.SECURE, rec.PURPOSE: "dump", rec.ROUND: 1}), "purpose 'dump'")
    site.assert_refused(site.send({"query": "SELECT *"}), "unknown request type 'None'")


def test_job_from_another_coordinator(mapping: Path, tmp_path: Path) -> None:
    site = _site(mapping, tmp_path)
    impostor = Identity.generate("impostor", "coordinator").public().key_id
    site.assert_refused(site.send(hello(coordinator=impostor)), "this site trusts only")


# --- differential privacy at the node ------------------------------------------------------


def test_a_dp_round_is_paid_in_the_ledger_before_training_and_refused_once_spent(mapping: Path, tmp_path: Path) -> None:
    # 240 training rows, batch 64: rounds cost ε 2.61, 3.40, 4.02 at noise multiplier 1.5.
    privacy = {"epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplier": 1.5}
    site = _site(mapping, tmp_path, require_secure_aggregation=False, privacy=privacy)
    fedavg = hello(secure_aggregation=False, rounds=5)
    del fedavg["outputs.newton"]  # a DP site trains only by DP-SGD: no exact Newton sums
    assert not site.send(fedavg).has_error()
    job, weights = _job_and_weights(site.setup)
    spent = []
    for round_ in range(1, 6):
        reply = site.send(*plain_request("train", round_, job, weights), message_type=MessageType.TRAIN)
        if reply.has_error():
            break
        spent.append(site.events("dp_round")[-1]["details"]["dp_epsilon_spent"])
    assert len(spent) == 2 and spent == sorted(spent) and spent[-1] <= 4.0
    site.assert_refused(reply, "the site's privacy budget is epsilon=4")
    ledger = [json.loads(line) for line in site.setup.ledger_path.read_text().splitlines()]
    assert sum(entry["event"] == "dp_spent" for entry in ledger) == len(spent), "the refused round was not recorded"


def _newton_noise(epsilon: float, rounds: int) -> dict:
    """The hello fields of a plan's Newton noise, calibrated as a coordinator does."""
    noise = calibrate_newton_noise(
        epsilon=epsilon, delta=1e-6, rounds=rounds, sites=3, parameters=60, blocks=5, feature_clip=1.0, response_clip=10
    )
    return {f"newton_noise_{name}": value for name, value in dataclasses.asdict(noise).items()}


def test_a_dp_site_refuses_newton_sums_without_noise_naming_the_setting(mapping: Path, tmp_path: Path) -> None:
    privacy = {"epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplier": 1.5}
    site = _site(mapping, tmp_path, privacy=privacy)
    reply = site.send(hello(rounds=5))
    site.assert_refused(reply, "set the job's [glm_privacy] epsilon to at most what is left")
    assert 'fit = "fedavg"' in reply.error.reason and not site.reads


def test_a_dp_site_accepts_noisy_newton_sums_its_budget_pays_for(mapping: Path, tmp_path: Path) -> None:
    privacy = {"epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0}
    site = _site(mapping, tmp_path, privacy=privacy)
    reply = site.send(hello(rounds=5, **_newton_noise(2.0, 5)))
    assert not reply.has_error(), reply.error.reason
    partial = {key: value for key, value in _newton_noise(2.0, 5).items() if key != "newton_noise_grid"}
    again = _site(mapping, tmp_path / "again", privacy=privacy)
    again.assert_refused(again.send(hello(rounds=5, **partial)), "states its noise only in part")


def test_a_site_whose_budget_cannot_pay_for_the_noisy_plan_refuses_naming_what_to_change(
    mapping: Path, tmp_path: Path
) -> None:
    privacy = {"epsilon": 1.0, "delta": 1e-5, "max_grad_norm": 1.0}
    site = _site(mapping, tmp_path, privacy=privacy)
    reply = site.send(hello(rounds=5, **_newton_noise(3.0, 5)))
    site.assert_refused(reply, "lower the job's [glm_privacy] epsilon below what is left, or its rounds")
    assert "its budget is 1, of which 0 is spent" in reply.error.reason and not site.reads
    plain = _site(mapping, tmp_path / "plain", require_secure_aggregation=False, privacy=privacy)
    refused = plain.send(hello(rounds=5, secure_aggregation=False, **_newton_noise(0.5, 5)))
    plain.assert_refused(refused, "without secure aggregation")


# --- accounting in real simulations --------------------------------------------------------

# DP sites train only by DP-SGD, so these federations fit the GLM by FedAvg.
SIMULATION = (
    SMALL_FEDERATION.replace("rounds = 3", "rounds = {rounds}").replace('kind = "glm"', 'kind = "glm"\nfit = "fedavg"')
    + "\n[simulation]\n{policies}\n"
)


def _simulate(folder: Path, name: str, rounds: int, policies: str) -> tuple[subprocess.CompletedProcess, Path]:
    return simulate(folder, SIMULATION.format(rounds=rounds, policies=policies), name)


@pytest.mark.slow
def test_every_site_at_epsilon_1_reports_at_most_1(tmp_path: Path) -> None:
    _policy(tmp_path, "dp", privacy={"epsilon": 1.0, "delta": 1e-5, "max_grad_norm": 1.0}, metrics={})
    result, run = _simulate(tmp_path, "eps1", 2, 'default_policy = "dp.toml"')
    assert result.returncode == 0, result.stdout + result.stderr
    privacy = json.loads((run / "summary.json").read_text())["privacy"]
    assert len(privacy) == 5
    assert all(site["dp"] and 0 < site["epsilon_spent"] <= 1.0 for site in privacy.values()), privacy


@pytest.mark.slow
def test_a_site_whose_budget_runs_out_stops_participating_with_a_clear_message(tmp_path: Path) -> None:
    # hospital-1 (1,200 training rows, batch 128): one round costs ε 3.6, two cost 4.45.
    _policy(
        tmp_path, "tight-budget", privacy={"epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplier": 1.0}
    )
    result, run = _simulate(tmp_path, "tight", 3, 'policies = { hospital-1 = "tight-budget.toml" }')
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["hospital-1"]["rounds_trained"] == 1
    assert summary["privacy"]["hospital-1"]["noise_multiplier"] == 1.0
    assert summary["privacy"]["hospital-1"]["epsilon_spent"] <= 4.0
    for round_ in ("2", "3"):
        reason = summary["dropouts"][round_]["hospital-1"]
        assert "site hospital-1: the site's privacy budget is epsilon=4 at delta=1e-05" in reason


@pytest.mark.slow
def test_a_refused_hello_stops_the_run_naming_the_site_and_the_reason(tmp_path: Path) -> None:
    _policy(tmp_path, "short", max_rounds=1)
    result, run = _simulate(tmp_path, "refused", 2, 'policies = { pharma-1 = "short.toml" }')
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "site pharma-1: the site policy refuses this job: it asks for 2 rounds; this site allows 1 to 1" in output
    assert not run.exists()
