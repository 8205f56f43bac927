"""The README's "Join a federation", followed command by command on 127.0.0.1.

The commands are read from the README's walkthrough block and run as written (only the
port is a free one): three enrolled sites of ``examples/byo`` with the shipped policies
and ``configs/job.toml``. The job runs to its end, the sites' reports and logs are
collected and every log verifies against the federation's CA. Then the same job again,
and mid-run the operator revokes ``northcare`` with the README's own revoke command: with
two sites left, below secure aggregation's three, the run stops at once with the reason
and closes at every remaining party; the revoked node says its key is refused and exits
non-zero; the coordinator and the other nodes keep serving; every party's log of that
run verifies and reconciles, the revoked site's too: it ends unclosed where its key was
refused (it cannot sign a close), which the CA's revocation and the coordinator's logged
dropout explain, and the auditor says so in a note.
In the default suite: about a minute and a half on two cores.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from federation_processes import Processes, fedcost, wait_for

from fedcost.federation.processes import free_port

pytestmark = pytest.mark.timeout(400)

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Join a federation"
README_ADDRESS = "127.0.0.1:9093"
SITES = ("st-mary", "valley-general", "northcare")
REVOKED = "northcare"


def walkthrough() -> tuple[list[str], str]:
    """The walkthrough block's `fedcost` commands, and the section's revoke command."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    commands = [line for line in blocks[0].splitlines() if line.startswith("fedcost ")]
    revoke = [line for block in blocks for line in block.splitlines() if line.startswith("fedcost federation revoke")]
    assert commands and len(revoke) == 1, "the README's walkthrough lost its commands"
    return commands, revoke[0]


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _problems(output: str) -> list[str]:
    """The problem lines of `federation collect` and `audit verify`."""
    return [line for line in output.splitlines() if line.lower().startswith("problem")]


def test_the_readme_walkthrough_runs_then_survives_a_revocation_mid_run(tmp_path):
    commands, revoke = walkthrough()
    for shared in ("examples", "configs"):
        (tmp_path / shared).symlink_to(REPO / shared)
    port = free_port()
    processes = Processes(tmp_path)
    runs = tmp_path / "demo" / "runs"
    run_line = ""
    try:
        # 1. The walkthrough as written: the job runs to its end, its logs verify.
        for line in commands:
            line = line.replace(README_ADDRESS, f"127.0.0.1:{port}")
            args = shlex.split(line)[1:]
            if args[:2] == ["coordinator", "start"]:
                processes.start("coordinator", *args, cwd=tmp_path)
                wait_for(lambda: "coordinator ready" in processes.output("coordinator"), 60, "the coordinator")
                continue
            if args[:2] == ["node", "start"]:
                processes.start(Path(args[2]).name, *args, cwd=tmp_path)
                continue
            if args[0] == "run":
                run_line = line
                for site in SITES:
                    wait_for(lambda: "waiting for jobs" in processes.output(site), 120, f"node {site}")
            if "RUN_ID" in line:
                line = line.replace("RUN_ID", next(runs.iterdir()).name)
            done = fedcost(*shlex.split(line)[1:], cwd=tmp_path)
            assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
        first = next(runs.iterdir())
        summary = json.loads((first / "summary.json").read_text())
        assert [r["round"] for r in _metrics(first)] == [1, 2, 3] and (first / "report.html").exists()
        assert summary["federation"] and summary["sites_reported"] == sorted(SITES)
        assert summary["audit"]["verified"] and summary["privacy"]["northcare"]["epsilon_spent"] > 0
        assert summary["privacy"]["northcare"]["noise_multiplier"] == 1.1  # the shipped insurer policy's

        # 2. The same job again; mid-run the operator revokes a site with the README's command.
        submitted = processes.start("run", *shlex.split(run_line)[1:], cwd=tmp_path)
        wait_for(lambda: len(list(runs.iterdir())) == 2 and _metrics(sorted(runs.iterdir())[-1]), 120, "round 1")
        second = sorted(runs.iterdir())[-1]
        revoked = fedcost(*shlex.split(revoke)[1:], cwd=tmp_path)
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        submitted.wait(timeout=120)
        output = processes.output("run")
        assert submitted.returncode == 2, output
        assert f"node '{REVOKED}' is no longer admitted" in output or "aborted" in output, output
        assert f"to try again: fedcost run demo/runs/{second.name}/job.toml -f demo" in output
        # The revoked node is told, and stops; the coordinator and the other nodes keep serving.
        wait_for(lambda: processes.started[REVOKED].poll() is not None, 60, "the revoked node to stop")
        assert processes.started[REVOKED].returncode == 2
        assert "refused this node's key" in processes.output(REVOKED)
        assert "ask your federation operator" in processes.output(REVOKED)
        assert processes.started["coordinator"].poll() is None
        assert all(processes.started[site].poll() is None for site in SITES if site != REVOKED)
        log = (tmp_path / "demo" / "logs" / "coordinator.log").read_text()
        assert f"dropped node '{REVOKED}'" in log and "Traceback" not in log
        # Collect and verify the stopped run: the revoked site's unclosed log is explained.
        for line in commands:
            if "RUN_ID" in line:
                done = fedcost(*shlex.split(line.replace("RUN_ID", second.name))[1:], cwd=tmp_path)
                assert done.returncode == 0 and not _problems(done.stdout), f"{line}\n{done.stdout}{done.stderr}"
                if line.startswith("fedcost audit verify"):
                    assert f"UNCLOSED         {REVOKED}" in done.stdout, done.stdout
                    assert f"{REVOKED}'s log ends without run_closed: the federation's CA revoked it" in done.stdout
        assert sorted(p.stem for p in (second / "audit").glob("*.jsonl")) == sorted(["coordinator", *SITES])
    finally:
        processes.kill_all()
