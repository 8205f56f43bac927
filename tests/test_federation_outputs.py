"""A federation run's outputs without a federation: summary, site reports, report, progress.

The summary a deployed coordinator writes, the sites' own reports folded into it by
``fedcost federation collect``, the HTML report and the terminal table of such a run,
the progress line of ``fedcost run``, and ``fedcost node policy``. Quick.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from fedcost.config import SimulationConfig
from fedcost.errors import ConfigError
from fedcost.federation.collect import add_reports
from fedcost.federation.commands import federation_table
from fedcost.federation.follow import stage_text
from fedcost.federation.provision import Federation, FederationConfig
from fedcost.federation.site_report import read_report
from fedcost.identity.federation_ca import utc_now
from fedcost.privacy import SitePolicy
from fedcost.report import write_report
from fedcost.report.progress import federation_summary

REPO = Path(__file__).resolve().parent.parent
ROUNDS = [
    {
        "round": 1,
        "train_loss": None,
        "readmission_auroc": 0.61,
        "readmission_brier": 0.17,
        "cost_mae": 9000.0,
        "cost_rmse": 20000.0,
        "cost_r2": 0.1,
        "nodes_included": 3,
        "dropouts": {},
        "seconds": 4.0,
    },
    {
        "round": 2,
        "train_loss": None,
        "readmission_auroc": 0.66,
        "readmission_brier": 0.16,
        "cost_mae": 8800.0,
        "cost_rmse": 19800.0,
        "cost_r2": 0.2,
        "nodes_included": 2,
        "dropouts": {"northcare": "node unavailable"},
        "seconds": 3.5,
    },
]
ROLES = {"st-mary": "hospital", "valley-general": "hospital", "northcare": "insurer"}


def _report(site: str, **changes: object) -> dict:
    report = {
        "site": site,
        "role": ROLES[site],
        "run_id": "r1",
        "written_at": "2026-01-01T00:00:00+00:00",
        "train_rows": 400,
        "test_rows": 100,
        "privacy": {"dp": True, "epsilon_budget": 8.0, "epsilon_spent": 2.5, "delta": 1e-5, "rounds_trained": 2},
        "held_out": {"readmission": {"auroc": 0.655}},
    }
    return {**report, **changes}


def _summary() -> dict:
    config = SimulationConfig.from_dict({"run": {"rounds": 2}, "model": {"kind": "glm"}}, source="test")
    return federation_summary("r1", config, ROLES, ROUNDS, {}, seconds=12.34)


def test_a_federation_summary_scores_the_federated_model_from_the_last_round_only():
    summary = _summary()
    assert summary["federation"] and summary["task"] == "train" and summary["seconds"] == 12.3
    assert summary["readmission"] == {"federated": {"auroc": 0.66, "brier": 0.16}}
    assert summary["cost"]["federated"] == {"mae": 8800.0, "rmse": 19800.0, "r2": 0.2}
    assert summary["dropouts"] == {2: {"northcare": "node unavailable"}}
    assert summary["per_site"] == {} and summary["privacy"] == {} and summary["sites_reported"] == []


def test_site_reports_add_rows_privacy_and_per_site_figures_and_nothing_else():
    summary = _summary()
    add_reports(summary, [_report("st-mary"), _report("northcare", privacy={"dp": False}, held_out={})])
    assert summary["sites_reported"] == ["northcare", "st-mary"]
    assert summary["privacy"]["st-mary"]["epsilon_spent"] == 2.5 and summary["privacy"]["northcare"] == {"dp": False}
    assert summary["per_site"]["st-mary"] == {"role": "hospital", "readmission": {"federated": {"auroc": 0.655}}}
    nodes = {n["name"]: n for n in summary["nodes"]}
    assert nodes["st-mary"]["train_rows"] == 400 and "train_rows" not in nodes["valley-general"]
    assert "test_rows" not in summary  # only once every site reported
    add_reports(summary, [_report("valley-general")])
    assert summary["test_rows"] == 300


@pytest.mark.parametrize(
    "change, field",
    [
        ({"train_rows": "400"}, "train_rows"),
        ({"privacy": None}, "privacy"),
        ({"run_id": 3}, "run_id"),
    ],
)
def test_a_malformed_site_report_is_refused_naming_the_file_and_field(tmp_path, change, field):
    path = tmp_path / "r1.json"
    path.write_text(json.dumps(_report("st-mary", **change)))
    with pytest.raises(ConfigError, match=field) as refused:
        read_report(path)
    assert str(path) in str(refused.value)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable site report"):
        read_report(path)


def test_the_report_and_terminal_table_of_a_federation_show_the_federated_model_and_each_site(tmp_path):
    summary = _summary()
    add_reports(summary, [_report("st-mary")])
    page = write_report(tmp_path, summary, ROUNDS).read_text()
    assert "Federated model" in page and "1 of 3 sites sent their own report" in page
    assert "2.50 / 8" in page and "readmission auroc 0.6550" in page and "<th>pooled</th>" not in page
    assert (tmp_path / "plots" / "rounds.png").exists() and (tmp_path / "plots" / "sites.png").exists()
    console = Console(record=True, width=160)
    console.print(federation_table(summary))
    text = console.export_text()
    assert "Federated model after round 2" in text and "0.6600" in text and "8,800" in text
    assert "not in the model" not in page + text


def test_the_report_and_terminal_table_name_what_the_model_lacks(tmp_path):
    summary = _summary() | {"features_left_out": ["ecog=2", "sex=female"], "missing_flagged": []}
    page = write_report(tmp_path, summary, ROUNDS).read_text()
    console = Console(record=True, width=300)
    console.print(federation_table(summary))
    for text in (page, " ".join(console.export_text().split())):
        assert "not in the model: ecog=2, sex=female (no site released them over 11 training rows" in text.lower()


@pytest.mark.parametrize(
    "progress, text",
    [
        ({"kind": "hello", "round": None}, "stating the job to the sites"),
        ({"kind": "secagg:statistics:share-keys", "round": 0}, "before training: statistics, share-keys"),
        ({"kind": "secagg:train:masked-input", "round": 2}, "round 2: train, masked-input"),
        ({"kind": "plain:evaluate", "round": 3}, "round 3: evaluate"),
        ({"kind": "close", "round": None}, "closing the run"),
    ],
)
def test_fedcost_run_names_the_stage_under_way(progress, text):
    assert stage_text(progress) == text


def test_node_policy_trusts_the_coordinator_of_the_kit_and_keeps_the_rest(tmp_path):
    federation = Federation.init(tmp_path / "demo", FederationConfig("demo", "127.0.0.1:9093"), at=utc_now())
    kit = federation.add_node("northcare", "insurer", at=utc_now())
    template = REPO / "configs" / "policies" / "insurer.toml"
    command = [sys.executable, "-c", "from fedcost.cli import app; app()", "node", "policy", str(kit), str(template)]
    done = subprocess.run([*command, str(tmp_path / "northcare.toml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    written, shipped = SitePolicy.load(tmp_path / "northcare.toml"), SitePolicy.load(template)
    assert written.coordinator == federation.coordinator_identity().public().key_id != shipped.coordinator
    assert written.min_cohort == shipped.min_cohort == 20 and math.isclose(written.privacy.epsilon, 4.0)
    again = subprocess.run([*command, str(tmp_path / "northcare.toml")], capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stdout


def test_the_terminal_table_says_what_the_figures_cover_or_why_there_are_none(tmp_path):
    config = SimulationConfig.from_dict({"run": {"rounds": 2}, "model": {"kind": "glm"}}, source="test")
    covered = {**ROUNDS[1], "evaluated_sites": ["st-mary", "valley-general"], "evaluated_rows": 412}
    covered["withheld"] = {"northcare": "site northcare: withholds this sum: fewer held-out rows than min_cohort"}
    console = Console(record=True, width=300)
    console.print(federation_table(federation_summary("r1", config, ROLES, [ROUNDS[0], covered], {}, seconds=1.0)))
    text = " ".join(console.export_text().split())
    assert "412 held-out rows at 2 of 3 sites (northcare withheld theirs)" in text, text
    none = {"round": 2, "evaluated_sites": [], "evaluated_rows": 0, "withheld": {}, "nodes_included": 3}
    none["evaluation_withheld"] = "fewer than 3 site(s) hold min_cohort held-out rows"
    withheld = federation_summary("r1", config, ROLES, [dict(none, round=1), none], {}, seconds=1.0)
    assert withheld["readmission"] == {"federated": {}}
    console = Console(record=True, width=300)
    console.print(federation_table(withheld))
    text = " ".join(console.export_text().split())
    assert "no federated figures: fewer than 3 site(s) hold min_cohort held-out rows" in text, text
    write_report(tmp_path, withheld, [dict(none, round=1), none])
    assert not (tmp_path / "plots" / "rounds.png").exists()
