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
anything (each run's exchanges are its own, so no ledger check may fire). About two
minutes on two cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from federation_processes import Processes, fedcost, wait_for

from fedcost.federation.processes import free_port

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


def test_two_runs_submitted_at_once_each_complete_with_their_own_figures_and_logs(tmp_path):
    port = free_port()
    processes = Processes(tmp_path)
    runs = tmp_path / "fed" / "runs"
    try:
        assert fedcost("federation", "init", "fed", "--address", f"127.0.0.1:{port}", cwd=tmp_path).returncode == 0
        for name, (role, _) in SITES.items():
            done = fedcost("federation", "add-node", name, "--role", role, "-f", "fed", cwd=tmp_path)
            assert done.returncode == 0, done.stdout + done.stderr
        processes.start("coordinator", "coordinator", "start", "fed", cwd=tmp_path)
        wait_for(lambda: "coordinator ready" in processes.output("coordinator"), 120, "the coordinator")
        (tmp_path / "policy.toml").write_text(POLICY)
        for name, (_, data) in SITES.items():
            done = fedcost("node", "policy", f"fed/kits/{name}", "policy.toml", f"{name}.toml", cwd=tmp_path)
            assert done.returncode == 0, done.stdout + done.stderr
            processes.start(
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
                cwd=tmp_path,
            )
        for name in SITES:
            wait_for(lambda: "waiting for jobs" in processes.output(name), 120, f"node {name}")

        # Both submitted back to back, without waiting: two `fedcost run` processes at once.
        submitted = {}
        for fit, rounds in JOBS.items():
            (tmp_path / f"{fit}.toml").write_text(job(fit, rounds) + '\n[data]\nextra_numeric = ["bmi"]\n')
            submitted[fit] = processes.start(f"run-{fit}", "run", f"{fit}.toml", "-f", "fed", cwd=tmp_path)
        for fit, process in submitted.items():
            process.wait(timeout=RUN_TIMEOUT)
            assert process.returncode == 0, processes.output(f"run-{fit}")
        folders = {fit: folder for folder in runs.iterdir() for fit in JOBS if f'fit = "{fit}"' in _job(folder)}
        assert sorted(folders) == sorted(JOBS), list(runs.iterdir())
        log = (tmp_path / "fed" / "logs" / "coordinator.log").read_text()
        assert log.count("finished: completed") == 2 and "Traceback" not in log, log
        # They ran at once: each started before either finished.
        assert all(log.index(f"run {f.name} ") < log.index("finished: completed") for f in folders.values()), log

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

        # Every party's log of each run verifies with the documented commands.
        states = [f"state/{name}" for name in SITES]
        for fit, folder in folders.items():
            collected = fedcost("federation", "collect", folder.name, *states, "-f", "fed", cwd=tmp_path)
            assert collected.returncode == 0 and not _problems(collected.stdout), collected.stdout + collected.stderr
            verified = fedcost("audit", "verify", f"fed/runs/{folder.name}", "--federation", "fed", cwd=tmp_path)
            assert verified.returncode == 0 and not _problems(verified.stdout), verified.stdout + verified.stderr
            assert sorted(p.stem for p in (folder / "audit").glob("*.jsonl")) == sorted(["coordinator", *SITES])
            summary = json.loads((folder / "summary.json").read_text())
            assert summary["sites_reported"] == sorted(SITES) and summary["audit"]["verified"]
            # Each site's report of this run scores this run's final model on its held-out rows.
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
                assert '"event":"refusal"' not in site_log.read_text().replace(" ", ""), site_log
            node_log = (tmp_path / "state" / name / "node.log").read_text()
            assert "ERROR" not in node_log and "could not be" not in node_log, node_log
    finally:
        processes.kill_all()
