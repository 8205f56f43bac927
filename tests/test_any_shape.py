"""Data of any shape (issue 16): the shipped ICU example has no roles, its own outcome names
(``died``, ``length_of_stay``) and features named like schema fields (``age``, ``sex``) with
its own values. `fedcost simulate --data-dir` must fit it exactly as pooled, report it under
its own names, and refuse analytics fields it lacks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcost.data.features import StatisticsLayout
from fedcost.data.loader import load_node
from fedcost.data.mapping import DataMapping
from fedcost.federation.job import FederationJob
from simulations import fedcost

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "icu"


@pytest.fixture(scope="module")
def icu_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("icu")
    result = fedcost("simulate", "--data-dir", str(EXAMPLE), "--out", "run", cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run"


def test_the_exact_fit_equals_pooled_on_data_of_another_shape(icu_run: Path) -> None:
    summary = json.loads((icu_run / "summary.json").read_text())
    for task, metric in (("readmission", "auroc"), ("cost", "r2")):
        assert summary[task]["federated"][metric] == pytest.approx(summary[task]["pooled"][metric], abs=1e-9)
    assert {node["role"] for node in summary["nodes"]} == {"site"}


def test_outcomes_are_reported_under_the_data_sets_own_names(icu_run: Path) -> None:
    summary = json.loads((icu_run / "summary.json").read_text())
    assert summary["outcomes"]["readmission"] == {"column": "died", "kind": "binary", "family": "logistic"}
    assert summary["outcomes"]["cost"]["column"] == "length_of_stay"
    report = (icu_run / "report.html").read_text()
    assert "<td>died</td>" in report and "<td>length_of_stay</td>" in report


def test_the_model_uses_the_declared_features_and_nothing_else(icu_run: Path) -> None:
    with (icu_run / "coefficients.csv").open() as file:
        names = {row["name"] for row in csv.DictReader(file)}
    assert {"age", "lactate", "creatinine", "ventilated", "sex=m", "admission_source=ward"} <= names
    schema_only = {"region", "payer", "diagnosis_group", "comorbidity_index", "icu_stay"}
    assert not any(name.split("=")[0].removesuffix("__missing") in schema_only for name in names)


def test_analytics_naming_a_field_the_data_set_lacks_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[analytics]\ngroup_by = ["payer"]\n')
    result = fedcost("simulate", "config.toml", "--data-dir", str(EXAMPLE), "--out", "run", cwd=tmp_path)
    assert result.returncode != 0
    assert "analytics.group_by" in result.stderr + result.stdout and "'payer'" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_a_job_declares_the_same_outcomes_and_layout_as_the_sites(tmp_path: Path) -> None:
    mapping = DataMapping.load(EXAMPLE / "mapping.toml")
    (tmp_path / "job.toml").write_text(
        '[data]\ntargets = { died = "binary", length_of_stay = "non-negative" }\n'
        'extra_numeric = ["age", "lactate", "creatinine", "ventilated"]\n'
        'extra_categorical = { sex = ["f", "m"], admission_source = ["emergency", "ward", "theatre"] }\n'
    )
    job = FederationJob.load(tmp_path / "job.toml")
    layout = job.data.layout()
    assert layout == StatisticsLayout(mapping.feature_columns, tuple(mapping.targets))
    assert "length_of_stay.count" not in layout.slots(), "the outcome hides the schema feature of its name"
    assert job.config.model.tasks == ("readmission", "cost")


def test_an_example_copied_elsewhere_runs_from_its_own_folder(tmp_path: Path) -> None:
    """Relative file paths in a mapping are read from the mapping's folder."""
    shutil.copytree(EXAMPLE, tmp_path / "icu")
    mapping = DataMapping.load(tmp_path / "icu" / "mapping.toml")
    assert all(node.file.parent == tmp_path / "icu" for node in mapping.nodes)
    assert load_node(mapping, "harbour-icu", split_seed=1).train["age"].between(18, 99).all()


def _write_small_sites(folder: Path, sizes: dict[str, int], seed: int) -> None:
    """Sites of ``sizes`` rows, one numeric feature and one binary outcome."""
    rng = np.random.default_rng(seed)
    lines = ['[targets.died]\nkind = "binary"\n\n[features]\nnumeric = ["score"]\n']
    for name, n in sizes.items():
        score = rng.normal(0, 1, n)
        died = (rng.random(n) < 1 / (1 + np.exp(1.5 - score))).astype(int)
        pd.DataFrame({"score": score.round(3), "died": died}).to_csv(folder / f"{name}.csv", index=False)
        lines.append(f'[nodes.{name}]\nfile = "{name}.csv"\n')
    (folder / "mapping.toml").write_text("\n".join(lines))


def test_a_site_with_fewer_rows_than_min_cohort_is_left_out_and_named(tmp_path: Path) -> None:
    """Its policy withholds every sum over its rows: the run goes on without it (rather than
    stopping at the statistics stage), says so, and never learns how many rows it has."""
    _write_small_sites(tmp_path, {"a": 150, "b": 100, "c": 60, "d": 40, "tiny": 8}, seed=11)
    result = fedcost("simulate", "--data-dir", str(tmp_path), "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    last = summary["federated_evaluation"]
    assert "tiny" not in last["evaluated_sites"]
    for reasons in (last["withheld"], last["dropouts"]):
        assert "withholds this sum" in reasons["tiny"] and "min_cohort (11)" in reasons["tiny"]
        assert not any(str(n) in reasons["tiny"].replace("(11)", "") for n in range(1, 11))
    assert summary["readmission"]["federated"]["auroc"] > 0.6


def test_a_run_where_too_few_sites_can_evaluate_trains_on_and_says_why_per_round(tmp_path: Path) -> None:
    """Two sites hold min_cohort held-out rows, three hold too few to send an evaluation sum
    (but enough training rows): no secure evaluation sum can be formed over two sites, so
    each round's figures are withheld, saying why, and the model still trains on all five."""
    _write_small_sites(tmp_path, {"a": 150, "b": 100, "c": 40, "d": 40, "e": 30}, seed=12)
    result = fedcost("simulate", "--data-dir", str(tmp_path), "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rounds and all("fewer than 3 site(s)" in r["evaluation_withheld"] for r in rounds), rounds
    assert all(r["evaluated_sites"] == [] and "died_auroc" not in r for r in rounds)
    assert set(rounds[-1]["withheld"]) == {"c", "d", "e"}
    assert rounds[-1]["nodes_included"] == 5  # every site trained
    assert summary["readmission"]["federated"]["auroc"] > 0.6


def test_a_level_every_site_holds_too_few_of_to_release_is_in_the_model(tmp_path: Path) -> None:
    """Four clinics of 45 patients, 9 of them of a rare stage at each: under 11 training rows
    everywhere, so no clinic releases its count, yet 36 in all. Each clinic's bit (4 rows or
    more) under secure aggregation takes the level in, and the fit has its coefficient."""
    rng = np.random.default_rng(5)
    lines = [
        '[targets.died]\nkind = "binary"\n\n[features]\nnumeric = ["score"]\n',
        'categorical = { stage = ["early", "late"] }\n',
    ]
    for name in ("a", "b", "c", "d"):
        stage = np.array(["early"] * 36 + ["late"] * 9)
        score = rng.normal(0, 1, 45)
        died = (rng.random(45) < 1 / (1 + np.exp(1.0 - score - 2.0 * (stage == "late")))).astype(int)
        pd.DataFrame({"score": score.round(3), "stage": stage, "died": died}).to_csv(
            tmp_path / f"{name}.csv", index=False
        )
        lines.append(f'[nodes.{name}]\nfile = "{name}.csv"\n')
    (tmp_path / "mapping.toml").write_text("\n".join(lines))
    result = fedcost("simulate", "--data-dir", str(tmp_path), "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    features = json.loads((tmp_path / "run" / "features.json").read_text())
    assert features["vocabularies"]["stage"] == ["early", "late"] and features["left_out"] == []
    coefficients = pd.read_csv(tmp_path / "run" / "coefficients.csv")
    assert "stage=late" in set(coefficients["name"]), coefficients
