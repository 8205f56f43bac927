"""Two runs at once in one deployed federation, as two analysts (or one impatient one) submit them.

Three sites of ``examples/byo``, each with a policy that shares its held-out figures and
trains without DP-SGD (so a run's figures are a function of its job), one coordinator, and
two different jobs submitted back to back as two `fedcost run` processes, without waiting:
an exact GLM (Newton) of three rounds and a FedAvg GLM of two. The coordinator runs both
in threads of its one process, and each node answers both runs' messages, interleaved,
each in its own Flower context. Both must complete with the figures `fedcost simulate`
gives for the same job alone (up to SecAgg+'s quantisation), in the run's table and in
each site's own report of that run (its held-out rows, at its policy's precision); every
party's log of each run must verify with the documented commands; and no site may refuse
anything (each run's exchanges are its own, so no ledger check may fire). A second test
runs the README's job twice at once under the shipped DP policies: one budget per site,
shared by both runs. Each test takes one and a half to two and a half minutes on two cores.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from federation_processes import Processes, fedcost, wait_for

from fedcost.audit import read_log
from fedcost.federation.processes import free_port
from fedcost.wire.events import Event, LedgerEvent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "byo"
SITES = {
    "st-mary": ("hospital", "st-mary.csv"),
    "valley-general": ("hospital", "valley-general.csv"),
    "northcare": ("insurer", "northcare-claims.parquet"),
}
SEED = 7  # the job's seed, which a simulation also splits each site's rows with
METRICS = ("readmission_auroc", "readmission_brier", "cost_mae", "cost_r2")
JOBS = {"newton": 3, "fedavg": 2}  # the model's fit, and its rounds
RUN_TIMEOUT = 600
# Each site's policy: no DP-SGD, and its held-out figures shared at these places.
POLICY = """coordinator = "{zeros}"
max_rounds = 10

[privacy]
epsilon = inf

[metrics]
auroc = 3
brier = 4
mae = 0
r2 = 3
""".format(zeros="0" * 64)
PLACES = {"readmission": {"auroc": 3, "brier": 4}, "cost": {"mae": 0, "r2": 3}}


def job(fit: str, rounds: int) -> str:
    return f"""[run]
seed = {SEED}
rounds = {rounds}

[model]
kind = "glm"
fit = "{fit}"

[training]
epochs = 1

[secure_aggregation]
enabled = true

[analytics]
group_by = []
benchmark = false
"""


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _job(run: Path) -> str:
    return (run / "job.toml").read_text()


def _problems(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.lower().startswith("problem")]


def _simulated(folder: Path, fit: str) -> dict:
    """The same job alone, in `fedcost simulate` over the same sites' files: its summary."""
    (folder / f"sim-{fit}.toml").write_text(job(fit, JOBS[fit]))
    done = fedcost("simulate", f"sim-{fit}.toml", "--data-dir", str(DATA), "--out", f"sim-{fit}", cwd=folder)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((folder / f"sim-{fit}" / "summary.json").read_text())


class TwoRuns:
    """A loopback federation of the three sites, each node started with its own policy."""

    def __init__(self, folder: Path, policy: Callable[[str, str], Path]):
        self.folder = folder
        self.runs = folder / "fed" / "runs"
        self.processes = Processes(folder)
        port = free_port()
        assert fedcost("federation", "init", "fed", "--address", f"127.0.0.1:{port}", cwd=folder).returncode == 0
        for name, (role, _) in SITES.items():
            done = fedcost("federation", "add-node", name, "--role", role, "-f", "fed", cwd=folder)
            assert done.returncode == 0, done.stdout + done.stderr
        self.processes.start("coordinator", "coordinator", "start", "fed", cwd=folder)
        wait_for(lambda: "coordinator ready" in self.processes.output("coordinator"), 120, "the coordinator")
        for name, (role, data) in SITES.items():
            done = fedcost("node", "policy", f"fed/kits/{name}", str(policy(name, role)), f"{name}.toml", cwd=folder)
            assert done.returncode == 0, done.stdout + done.stderr
            self.processes.start(
                name,
                "node",
                "start",
                f"fed/kits/{name}",
                "--data",
                str(DATA / data),
                "--mapping",
                str(DATA / "mapping.toml"),
                "--policy",
                f"{name}.toml",
                "--state",
                f"state/{name}",
                "--split-seed",
                str(SEED),
                cwd=folder,
            )
        for name in SITES:
            wait_for(lambda: "waiting for jobs" in self.processes.output(name), 120, f"node {name}")

    def submit_at_once(self, jobs: dict[str, Path]) -> dict[str, subprocess.Popen]:
        """Each job by its own `fedcost run`, back to back, without waiting; returns them ended."""
        submitted = {
            name: self.processes.start(f"run-{name}", "run", str(job), "-f", "fed", cwd=self.folder)
            for name, job in jobs.items()
        }
        for process in submitted.values():
            process.wait(timeout=RUN_TIMEOUT)
        return submitted

    def coordinator_log(self) -> str:
        return (self.folder / "fed" / "logs" / "coordinator.log").read_text()

    def assert_ran_at_once(self) -> None:
        """Every run started before any finished."""
        log = self.coordinator_log()
        assert all(log.index(f"run {folder.name} ") < log.index("finished: ") for folder in self.runs.iterdir()), log

    def collect_and_verify(self, run: Path) -> dict:
        """The documented commands: the sites' logs and reports collected, every log verified; the summary."""
        states = [f"state/{name}" for name in SITES]
        collected = fedcost("federation", "collect", run.name, *states, "-f", "fed", cwd=self.folder)
        assert collected.returncode == 0 and not _problems(collected.stdout), collected.stdout + collected.stderr
        verified = fedcost("audit", "verify", f"fed/runs/{run.name}", "--federation", "fed", cwd=self.folder)
        assert verified.returncode == 0 and not _problems(verified.stdout), verified.stdout + verified.stderr
        assert sorted(p.stem for p in (run / "audit").glob("*.jsonl")) == sorted(["coordinator", *SITES])
        summary = json.loads((run / "summary.json").read_text())
        assert summary["sites_reported"] == sorted(SITES) and summary["audit"]["verified"]
        return summary


@pytest.fixture
def federation(tmp_path):
    made: list[TwoRuns] = []

    def make(policy: Callable[[str, str], Path]) -> TwoRuns:
        made.append(TwoRuns(tmp_path, policy))
        return made[-1]

    yield make
    for federation in made:
        federation.processes.kill_all()


def test_two_runs_submitted_at_once_each_complete_with_their_own_figures_and_logs(tmp_path, federation):
    (tmp_path / "policy.toml").write_text(POLICY)
    sites = federation(lambda name, role: tmp_path / "policy.toml")
    for fit, rounds in JOBS.items():
        (tmp_path / f"{fit}.toml").write_text(job(fit, rounds) + '\n[data]\nextra_numeric = ["bmi"]\n')
    for fit, process in sites.submit_at_once({fit: tmp_path / f"{fit}.toml" for fit in JOBS}).items():
        assert process.returncode == 0, sites.processes.output(f"run-{fit}")
    folders = {fit: folder for folder in sites.runs.iterdir() for fit in JOBS if f'fit = "{fit}"' in _job(folder)}
    assert sorted(folders) == sorted(JOBS), list(sites.runs.iterdir())
    log = sites.coordinator_log()
    assert log.count("finished: completed") == 2 and "Traceback" not in log, log
    sites.assert_ran_at_once()

    # Each run's figures are its own job's, as a simulation of that job alone gives them.
    simulated = {fit: _simulated(tmp_path, fit) for fit in JOBS}
    for fit, rounds in JOBS.items():
        deployed, alone = _metrics(folders[fit]), _metrics(tmp_path / f"sim-{fit}")
        assert [r["round"] for r in deployed] == list(range(1, rounds + 1))
        assert all(r["secure_aggregation"] and r["nodes_included"] == 3 and not r["dropouts"] for r in deployed)
        for got, expected in zip(deployed, alone, strict=True):
            for metric in METRICS:
                assert math.isclose(got[metric], expected[metric], rel_tol=1e-3, abs_tol=1e-4), (
                    fit,
                    got["round"],
                    metric,
                    got[metric],
                    expected[metric],
                )
        summary = json.loads((folders[fit] / "summary.json").read_text())
        assert summary["run_id"] == folders[fit].name and summary["rounds"] == rounds
        assert summary["federated_evaluation"] == deployed[-1]

    # Every party's log of each run verifies; each site's report of a run scores that run's
    # final model on its held-out rows.
    for fit, folder in folders.items():
        summary = sites.collect_and_verify(folder)
        for name in SITES:
            for task, places in PLACES.items():
                for metric, digits in places.items():
                    got = summary["per_site"][name][task]["federated"][metric]
                    expected = simulated[fit]["per_site"][name][task]["federated"][metric]
                    assert abs(got - expected) <= 10**-digits, (fit, name, task, metric, got, expected)

    # No site refused anything of either run, and none logged a failure.
    for name in SITES:
        site_logs = list((tmp_path / "state" / name / "audit").glob(f"*/{name}.jsonl"))
        assert len(site_logs) == 2
        for site_log in site_logs:
            assert all(entry.event != Event.REFUSAL for entry in read_log(site_log)[0]), site_log
        node_log = (tmp_path / "state" / name / "node.log").read_text()
        assert "ERROR" not in node_log and "could not be" not in node_log, node_log


def test_two_dp_runs_at_once_share_each_sites_budget_and_never_overspend_it(federation):
    """The README's job twice at once under the shipped policies: every site trains under
    DP-SGD, both runs pay from its one ledger, round by round. A run's first paid round holds
    its later rounds at the site, so the other run prices on what is left after them: a
    site that derives its noise from the budget left (the hospitals) trains each run at one
    noise from its first round to its last (it used to squeeze the run that ended last to
    many times the noise, silently), or refuses the later run naming the open one (the run
    then stops with the reason). Whatever the interleaving, no site spends beyond its
    budget, each run's round is paid once, and every log verifies."""
    sites = federation(lambda name, role: REPO / "configs" / "policies" / f"{role}.toml")
    submitted = sites.submit_at_once({"a": REPO / "configs" / "job.toml", "b": REPO / "configs" / "job.toml"})
    for name, process in submitted.items():
        output = sites.processes.output(f"run-{name}")
        assert process.returncode == 0 or (process.returncode == 2 and "open run(s)" in output), output
    sites.assert_ran_at_once()
    runs = sorted(sites.runs.iterdir())
    summaries = [sites.collect_and_verify(run) for run in runs]
    for name in SITES:
        paid = [
            entry.details
            for entry in read_log(sites.folder / "state" / name / f"{name}.ledger")[0]
            if entry.event == LedgerEvent.DP_SPENT
        ]
        spends = [(spend["run_id"], spend["round"]) for spend in paid]
        assert len(spends) == len(set(spends)) and {run for run, _ in spends} <= {run.name for run in runs}, spends
        for run, summary in zip(runs, summaries, strict=True):
            noise = {spend["release"]["noise_multiplier"] for spend in paid if spend["run_id"] == run.name}
            assert len(noise) <= 1 or max(noise) <= 1.001 * min(noise), (name, run.name, noise)
            # and the run's summary says at what noise the site trained it
            assert summary["privacy"][name].get("noise_multiplier") == (max(noise) if noise else None)
        # Each site's report, written when a run closed there, states all its spending so far.
        reported = [summary["privacy"][name] for summary in summaries]
        assert all(p["dp"] and p["epsilon_spent"] <= p["epsilon_budget"] for p in reported), (name, reported)
        assert max(p["rounds_trained"] for p in reported) == len(spends), (name, reported, spends)
