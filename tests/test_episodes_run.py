"""`fedcost simulate` with episodes on, through the bindings: episode costs equal the pooled
join of the synthetic truth exactly, land in the run folder, the report and the terminal, and
every party's audit log verifies; a site whose policy does not share episodes refuses the job
at its hello, naming the setting, and logs its refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fedcost.privacy import PrivacySettings, SitePolicy
from tests.simulations import simulate

EPISODES = """
[run]
seed = 5
rounds = 3

[ecosystem.sizes]
hospital = [900, 600, 400]
insurer = [600]
pharma = [400]

[model]
kind = "glm"

[analytics]
group_costing = false
episodes = {{ before_days = 3, after_days = 30 }}

[simulation]
policies = {{ hospital-1 = "hospital.toml", pharma-1 = "pharma.toml" }}
"""


def _policy(folder: Path, name: str, *, share_episodes: bool) -> None:
    policy = SitePolicy("0" * 64, PrivacySettings(epsilon=float("inf")), max_rounds=50, share_episodes=share_episodes)
    (folder / f"{name}.toml").write_text(
        "\n".join(f"{k} = {json.dumps(v)}" for k, v in policy.to_dict().items() if not isinstance(v, dict))
        + "\n[privacy]\nepsilon = inf\n"
    )


@pytest.mark.slow
def test_simulate_reports_episode_costs_equal_to_the_pooled_join(tmp_path: Path) -> None:
    _policy(tmp_path, "hospital", share_episodes=True)
    _policy(tmp_path, "pharma", share_episodes=True)
    result, run = simulate(tmp_path, EPISODES.format(), "episodes")
    assert result.returncode == 0, result.stdout + result.stderr
    truth = json.loads((run / "truth.json").read_text())["episodes"]["hospitals"]
    summary = json.loads((run / "summary.json").read_text())["analytics"]["episodes"]
    table = pd.read_csv(run / "episodes.csv").set_index("hospital")
    for hospital, expected in truth.items():
        released = summary["hospitals"][hospital]
        assert released["stays"] == expected["stays"] == table.loc[hospital, "stays"]
        assert {p: round(v * 100) for p, v in released["payers"].items()} == {
            p: round(v * 100) for p, v in expected["paid_by"].items()
        }
        assert round(released["episode_cost"] * 100) == round(expected["episode_cost"] * 100)
        assert round(table.loc[hospital, "episode_cost"] * 100) == round(expected["episode_cost"] * 100)
    assert any(v > 0 for h in truth.values() for v in h["paid_by"].values())
    assert "Episode cost per hospital" in (run / "report.html").read_text()
    assert "Episode cost per hospital" in result.stdout
    assert json.loads((run / "summary.json").read_text())["audit"]["verified"]
    # Every step went through each site's guardian: in its audit log, reconciled with the coordinator's.
    for party in ("hospital-1", "insurer-1", "coordinator"):
        assert "linkage:episodes" in (run / "audit" / f"{party}.jsonl").read_text()
    # The extracts stay with their sites' data; the model rows carry no patient key.
    assert "patient_key" not in pd.read_parquet(run / "data" / "hospital-1.parquet").columns


@pytest.mark.slow
def test_a_site_that_does_not_share_episodes_stops_the_run_before_training(tmp_path: Path) -> None:
    _policy(tmp_path, "hospital", share_episodes=True)
    _policy(tmp_path, "pharma", share_episodes=False)
    result, run = simulate(tmp_path, EPISODES.format(), "refused")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "site pharma-1: the site policy refuses this job" in output, output
    assert "episode linkage" in output and "share_episodes = false" in output, output
    assert "Traceback" not in output
    failed = tmp_path / "refused.failed"
    assert not (failed / "summary.json").exists() and not (failed / "episodes.csv").exists()
    refusals = [
        json.loads(line)
        for line in (failed / "audit" / "pharma-1.jsonl").read_text().splitlines()
        if '"refusal"' in line
    ]
    assert refusals and "share_episodes = false" in refusals[0]["details"]["reason"]
