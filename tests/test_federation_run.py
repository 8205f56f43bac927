"""A real federation on 127.0.0.1: `fedcost coordinator start`, `fedcost node start` and
`fedcost run` as separate OS processes, over TLS with SuperNode authentication.

Each test provisions its own federation on a free port and plays one operation through:
a run to its end with every log reconciled, refused nodes, a node killed mid-round, a
revocation mid-run that the run survives, a coordinator killed mid-run (resumed by hand,
or by the `fedcost run` still following it). Each takes one to a few minutes on two
cores: all are ``slow``; the README walkthrough (``test_federation_walkthrough.py``) is the
deployment test of the default suite.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from federation_processes import JOB, Processes, ecosystem, fedcost, wait_for

from fedcost.audit import verify_folder
from fedcost.federation.processes import free_port
from fedcost.linkage import EpisodeWindow

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

RUN_TIMEOUT = 1800
NO_ANALYTICS = "\n[analytics]\ngroup_by = []\nbenchmark = false\ngroup_costing = false\n"


class Federation:
    """A provisioned federation folder, its node data and its running processes."""

    def __init__(
        self,
        folder: Path,
        sizes: dict[str, tuple[int, ...]],
        *,
        days: dict[str, float] | None = None,
        window: EpisodeWindow | None = None,
    ):
        self.folder = folder
        self.root = folder / "fed"
        self.mapping, self.roles = ecosystem(folder / "data", sizes, window=window)
        self.processes = Processes(folder)
        port = free_port()
        assert fedcost("federation", "init", "fed", "--address", f"127.0.0.1:{port}", cwd=folder).returncode == 0
        for name, role in self.roles.items():
            extra = ["--days", str(days[name])] if days and name in days else []
            done = fedcost("federation", "add-node", name, "--role", role, "-f", "fed", *extra, cwd=folder)
            assert done.returncode == 0, done.stdout + done.stderr

    def start_coordinator(self, name: str = "coordinator") -> None:
        self.processes.start(name, "coordinator", "start", "fed", cwd=self.folder)
        wait_for(lambda: "coordinator ready" in self.processes.output(name), 300, "the coordinator")

    def node_args(self, name: str, kit: Path | None = None) -> list[str]:
        return [
            "node",
            "start",
            str(kit or self.root / "kits" / name),
            "--data",
            str(self.folder / "data" / f"{name}.parquet"),
            "--mapping",
            str(self.mapping),
            "--state",
            str(self.folder / "state" / name),
        ]

    def start_nodes(self, names: list[str] | None = None) -> None:
        for name in names or list(self.roles):
            self.processes.start(name, *self.node_args(name), cwd=self.folder)

    def submit(self, rounds: int) -> Path:
        (self.folder / "job.toml").write_text(JOB.format(rounds=rounds) + NO_ANALYTICS)
        done = fedcost("run", "fed", "job.toml", cwd=self.folder, timeout=RUN_TIMEOUT)
        assert done.returncode == 0, done.stdout + done.stderr
        return self.latest_run()

    def latest_run(self) -> Path:
        return sorted((self.root / "runs").iterdir())[-1]

    def collect(self, run: Path, names: list[str] | None = None) -> subprocess.CompletedProcess:
        """`fedcost federation collect`: the sites' logs and reports into the run folder, verified."""
        states = [str(self.folder / "state" / name) for name in names or self.roles]
        return fedcost("federation", "collect", run.name, *states, "-f", "fed", cwd=self.folder)

    def wait_connected(self, names: list[str] | None = None) -> None:
        for name in names or list(self.roles):
            wait_for(lambda: "waiting for jobs" in self.processes.output(name), 120, f"node {name}")

    def coordinator_log(self) -> str:
        return (self.root / "logs" / "coordinator.log").read_text()


@pytest.fixture
def make_federation(tmp_path):
    made: list[Federation] = []

    def make(sizes: dict[str, tuple[int, ...]], **kwargs) -> Federation:
        federation = Federation(tmp_path / f"f{len(made)}", sizes, **kwargs)
        federation.folder.mkdir(exist_ok=True)
        made.append(federation)
        return federation

    yield make
    for federation in made:
        federation.processes.kill_all()


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_three_nodes_train_two_rounds_over_tls_and_every_log_reconciles(make_federation):
    federation = make_federation({"hospital": (500,), "insurer": (400,), "pharma": (300,)})
    federation.start_coordinator()
    federation.start_nodes()
    federation.wait_connected()
    run = federation.submit(rounds=2)
    rounds = _metrics(run)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["secure_aggregation"] and r["nodes_included"] == 3 and not r["dropouts"] for r in rounds)
    assert rounds[-1]["readmission_auroc"] > 0.6
    assert torch.load(run / "model.pt")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["federation"] and (run / "report.html").exists()
    collected = federation.collect(run)
    assert collected.returncode == 0, collected.stdout
    verification = verify_folder(run)
    assert verification.ok, verification.problems
    assert set(verification.parties) == {"coordinator", *federation.roles}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sites_reported"] == sorted(federation.roles)
    assert all(summary["privacy"][name] == {"dp": False} for name in federation.roles)


def test_unenrolled_revoked_and_expired_nodes_are_refused_with_the_reason_in_the_coordinator_log(make_federation):
    federation = make_federation(
        {"hospital": (200, 200), "insurer": (200,)},
        days={"hospital-2": 1 / 86400},
    )
    assert fedcost("federation", "revoke", "hospital-1", "-f", "fed", cwd=federation.folder).returncode == 0
    # A stranger with the federation's CA certificate and a kit copied from insurer-1, but its own key.
    stranger = federation.folder / "stranger-kit"
    shutil.copytree(federation.root / "kits" / "insurer-1", stranger)
    (stranger / "auth.key.pem").write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    federation.start_coordinator()
    log = federation.coordinator_log
    wait_for(lambda: "'hospital-1'" in log() and "'hospital-2'" in log(), 60, "the admission decisions")
    assert "not admitted: node 'hospital-1'" in log() and "was revoked" in log()
    assert "not admitted: node 'hospital-2'" in log() and "expired" in log()
    assert "admitted node 'insurer-1'" in log()

    revoked = fedcost(*federation.node_args("hospital-1"), cwd=federation.folder, timeout=600)
    assert revoked.returncode == 2 and "refused this node's key" in revoked.stdout
    assert "refused a SuperNode: node 'hospital-1'" in log()

    expired = fedcost(*federation.node_args("hospital-2"), cwd=federation.folder, timeout=600)
    assert expired.returncode == 2 and "expired" in expired.stdout and "ask your federation operator" in expired.stdout

    unknown = fedcost(*federation.node_args("insurer-1", kit=stranger), cwd=federation.folder, timeout=600)
    assert unknown.returncode == 2 and "refused this node's key" in unknown.stdout
    assert "never enrolled in this federation" in log()


def test_a_node_killed_mid_round_drops_out_and_the_run_goes_on(make_federation):
    federation = make_federation({"hospital": (400, 300), "insurer": (300,), "pharma": (250,)})
    federation.start_coordinator()
    federation.start_nodes()
    victim = "pharma-1"

    def asked_to_set_up_round_1() -> bool:  # the round's model step: FedAvg's train or an exact GLM's newton
        logs = list((federation.folder / "state" / victim / "audit").glob(f"*/{victim}.jsonl"))
        return (
            bool(logs)
            and re.search(
                r'"kind":"secagg:(train|newton):setup","sender":"coordinator"\},'
                r'"digest":"[0-9a-f]+","event":"message_received",[^\n]*"round":1',
                logs[0].read_text(),
            )
            is not None
        )

    (federation.folder / "job.toml").write_text(JOB.format(rounds=2) + NO_ANALYTICS)
    submitted = federation.processes.start("run", "run", "fed", "job.toml", cwd=federation.folder)
    # Killed within a few hundredths of a second of its first message of round 1: two
    # exchanges before its masked input (a round takes about a second). A site lost after
    # its masked input and before it signs the survivor set would stop the run instead: the
    # sum aborts, and the other sites refuse to be summed again without it.
    wait_for(asked_to_set_up_round_1, RUN_TIMEOUT, "the victim's first message of round 1", every=0.02)
    federation.processes.kill(victim)
    submitted.wait(timeout=RUN_TIMEOUT)
    assert submitted.returncode == 0, federation.processes.output("run")
    rounds = _metrics(federation.latest_run())
    assert [r["round"] for r in rounds] == [1, 2]
    assert victim in rounds[0]["dropouts"] and rounds[0]["nodes_included"] == 3
    assert rounds[1]["nodes_included"] == 3


def test_a_restarted_coordinator_resumes_from_its_checkpoint(make_federation):
    """The final model of a run interrupted in round 2 equals an uninterrupted one's, up to
    SecAgg+'s stochastic rounding (seeded from ``secrets``) and the statistics' fixed point:
    quantisation steps of 8/2**20 per update entry and 2**-10 per statistics total."""
    federation = make_federation({"hospital": (400,), "insurer": (300,), "pharma": (250,)})
    federation.start_coordinator()
    federation.start_nodes()
    reference = federation.submit(rounds=2)

    (federation.folder / "job.toml").write_text(JOB.format(rounds=2) + NO_ANALYTICS)
    federation.processes.start("run", "run", "fed", "job.toml", cwd=federation.folder)
    wait_for(
        lambda: federation.latest_run() != reference and (federation.latest_run() / "checkpoint.npz").exists(),
        RUN_TIMEOUT,
        "the checkpoint of round 1",
    )
    interrupted = federation.latest_run()
    federation.processes.kill("coordinator")
    federation.processes.kill("run")
    assert [r["round"] for r in _metrics(interrupted)] == [1]

    federation.start_coordinator("coordinator-again")
    resumed = fedcost("run", "fed", "--resume", interrupted.name, cwd=federation.folder, timeout=RUN_TIMEOUT)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [r["round"] for r in _metrics(interrupted)] == [1, 2]
    audit = (interrupted / "audit" / "coordinator.jsonl").read_text()
    assert '"run_resumed"' in audit and '"after_round":1' in audit.replace(" ", "")
    expected, got = torch.load(reference / "model.pt"), torch.load(interrupted / "model.pt")
    for name in expected:
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), atol=1e-3)


def test_a_node_revoked_mid_run_is_dropped_and_the_run_completes_without_it(make_federation):
    """Four sites: the revoked one's exchanges come back as dropouts, the other three finish the
    run (or it stops with the reason, if the revocation lands inside a secure sum: see below);
    the revoked node is told and exits; a site enrolled meanwhile is admitted; the
    coordinator keeps serving throughout."""
    federation = make_federation({"hospital": (400, 300), "insurer": (300,), "pharma": (250,)})
    federation.start_coordinator()
    federation.start_nodes()
    federation.wait_connected()
    victim = "pharma-1"
    # Five rounds: a revocation takes a few seconds to reach the coordinator and the node
    # (more on a loaded machine), and a round of four sites takes about two.
    (federation.folder / "job.toml").write_text(JOB.format(rounds=5) + NO_ANALYTICS)
    submitted = federation.processes.start("run", "run", "fed", "job.toml", cwd=federation.folder)
    wait_for(lambda: any(_metrics(r) for r in (federation.root / "runs").iterdir()), RUN_TIMEOUT, "round 1")
    assert fedcost("federation", "revoke", victim, "-f", "fed", cwd=federation.folder).returncode == 0
    assert (
        fedcost(
            "federation", "add-node", "hospital-9", "--role", "hospital", "-f", "fed", cwd=federation.folder
        ).returncode
        == 0
    )
    submitted.wait(timeout=RUN_TIMEOUT)
    rounds = _metrics(federation.latest_run())
    if submitted.returncode == 0:
        assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
        assert rounds[0]["nodes_included"] == 4 and rounds[-1]["nodes_included"] == 3
    else:
        # The revocation reached a secure sum after the victim's masked input and before it
        # signed the survivor set (a round takes about two seconds, that window up to one):
        # the sum aborts, and no smaller set may be summed over the same inputs (the sites
        # refuse: it would isolate the victim's), so the run stops with the reason.
        assert "did not sign the survivor set" in federation.processes.output("run")
        assert rounds and rounds[0]["nodes_included"] == 4
    wait_for(lambda: federation.processes.started[victim].poll() is not None, 60, "the revoked node to stop")
    assert federation.processes.started[victim].returncode == 2
    assert "refused this node's key" in federation.processes.output(victim)
    assert federation.processes.started["coordinator"].poll() is None
    log = federation.coordinator_log()
    assert f"dropped node '{victim}'" in log and "admitted node 'hospital-9'" in log and "Traceback" not in log


def test_a_coordinator_killed_mid_run_comes_back_and_the_run_resumes_by_itself(make_federation):
    """`fedcost run` keeps following: it waits for the restarted coordinator, which has forgotten
    the run (its state is in memory), and submits it again; the run resumes after its last
    checkpoint, no round is counted twice, and every party's log verifies and reconciles:
    the replies in flight when the coordinator was killed (sent by the nodes in the
    interrupted round, never received) are explained by the coordinator's ``run_resumed``
    from the round before, after a hello each node logged after sending them."""
    federation = make_federation({"hospital": (400,), "insurer": (300,), "pharma": (250,)})
    federation.start_coordinator()
    federation.start_nodes()
    federation.wait_connected()
    (federation.folder / "job.toml").write_text(JOB.format(rounds=3) + NO_ANALYTICS)
    submitted = federation.processes.start("run", "run", "fed", "job.toml", cwd=federation.folder)
    runs = federation.root / "runs"
    wait_for(
        lambda: any(runs.iterdir()) and (federation.latest_run() / "checkpoint.npz").exists(),
        RUN_TIMEOUT,
        "the checkpoint of round 1",
    )
    run = federation.latest_run()
    federation.processes.kill("coordinator")
    federation.start_coordinator("coordinator-again")
    submitted.wait(timeout=RUN_TIMEOUT)
    output = federation.processes.output("run")
    assert submitted.returncode == 0, output
    assert "lost the coordinator" in output and "resumes from its last checkpoint" in output
    assert [r["round"] for r in _metrics(run)] == [1, 2, 3]
    assert '"run_resumed"' in (run / "audit" / "coordinator.jsonl").read_text()
    federation.collect(run)
    verification = verify_folder(run)
    assert all(status.status == "ok" for status in verification.parties.values()), verification.parties
    assert verification.ok, verification.problems


def test_a_job_whose_data_section_is_not_the_sites_data_is_refused_at_the_hello(make_federation):
    """Every site refuses a job that lists an extra column its mapping does not declare, at
    the hello, naming the field and what to change; each logs the refusal; the run stops
    with the reason and the coordinator keeps serving."""
    federation = make_federation({"hospital": (400,), "insurer": (300,), "pharma": (250,)})
    federation.start_coordinator()
    federation.start_nodes()
    federation.wait_connected()
    job = JOB.format(rounds=1) + NO_ANALYTICS + '\n[data]\nextra_numeric = ["bmi"]\n'
    (federation.folder / "job.toml").write_text(job)
    done = fedcost("run", "fed", "job.toml", cwd=federation.folder, timeout=RUN_TIMEOUT)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "its [data] extra_numeric lists 'bmi', which this site's mapping does not declare" in output, output
    refusals = [
        line
        for name in federation.roles
        for log in (federation.folder / "state" / name / "audit").rglob(f"{name}.jsonl")
        for line in log.read_text().splitlines()
        if '"event":"refusal"' in line
    ]
    assert refusals and all("extra_numeric lists 'bmi'" in line for line in refusals), refusals
    assert not (federation.latest_run() / "metrics.jsonl").exists() or not _metrics(federation.latest_run())
    assert federation.processes.started["coordinator"].poll() is None


def test_a_deployed_exact_glm_carries_the_newton_noise_its_job_plans(make_federation):
    """A job's [glm_privacy] reaches a deployed run as a simulated one: every site adds its
    share of the planned noise to the Newton sums, and summary.json states the plan."""
    federation = make_federation({"hospital": (400,), "insurer": (300,), "pharma": (250,)})
    federation.start_coordinator()
    federation.start_nodes()
    federation.wait_connected()
    job = JOB.format(rounds=2) + NO_ANALYTICS + "\n[glm_privacy]\nepsilon = 3.0\n"
    (federation.folder / "job.toml").write_text(job)
    done = fedcost("run", "fed", "job.toml", cwd=federation.folder, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((federation.latest_run() / "summary.json").read_text())
    assert summary["glm_privacy"]["epsilon"] == 3.0 and summary["glm_privacy"]["noise_sd"] > 0
    assert all(np.isfinite(r["readmission_auroc"]) for r in _metrics(federation.latest_run()))


def test_a_deployed_run_links_episode_costs_equal_to_the_pooled_join(make_federation):
    """Each node reads its episode extract beside its mapping; the coordinator links every
    hospital with every payer by their certified roles; the released episode costs equal
    the synthetic truth's pooled join, and every log reconciles."""
    window = EpisodeWindow(before_days=3, after_days=30)
    federation = make_federation({"hospital": (500, 400), "insurer": (400,), "pharma": (300,)}, window=window)
    federation.start_coordinator()
    federation.start_nodes()
    federation.wait_connected()
    job = JOB.format(rounds=1) + NO_ANALYTICS + "episodes = { before_days = 3, after_days = 30 }\n"
    (federation.folder / "job.toml").write_text(job)
    done = fedcost("run", "fed", "job.toml", cwd=federation.folder, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    run = federation.latest_run()
    truth = json.loads((federation.folder / "data" / "truth.json").read_text())["hospitals"]
    released = json.loads((run / "summary.json").read_text())["analytics"]["episodes"]["hospitals"]
    assert set(released) == set(truth) == {"hospital-1", "hospital-2"}
    for hospital, expected in truth.items():
        assert released[hospital]["stays"] == expected["stays"]
        assert {p: round(v * 100) for p, v in released[hospital]["payers"].items()} == {
            p: round(v * 100) for p, v in expected["paid_by"].items()
        }
    collected = federation.collect(run)
    assert collected.returncode == 0, collected.stdout
    assert verify_folder(run).ok
