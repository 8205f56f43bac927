"""Bad input to the exact federated GLM, end to end through `fedcost simulate --data-dir`.

Every case either stops the run with a message that says what to change (exit code 2,
no traceback) or has a documented behaviour the test pins: the default ridge penalty
makes a constant feature and collinear features well-posed (the constant's coefficient
is 0, the collinear pair shares its effect), and a site with fewer rows than the model
has coefficients only adds to the sums, so the fit is still the pooled one. Nothing
leaves a NaN model. The core's own cases (the same ones on plain arrays, and perfect
separation) are in test_glm.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from byo_sites import sites_frames, write_sites

from fedcost import schema
from fedcost.data.features import FeatureSpec
from fedcost.data.loader import load_node
from fedcost.data.mapping import DataMapping
from fedcost.models import glm
from fedcost.models.spec import ModelSpec
from simulations import fedcost

SEED = 4
# Seven sites; the last has 16 rows (13 for training), fewer than the model's coefficients.
SIZES = [160, 120, 90, 60, 40, 28, 16]
CONFIG = f"""
[run]
seed = {SEED}
rounds = {{rounds}}

[model]
kind = "glm"
{{penalty}}

[analytics]
group_by = []
benchmark = false
"""


def _run(folder: Path, frames: dict[str, pd.DataFrame], *, penalty: str = "", rounds: int = 20):
    """`fedcost simulate --data-dir` on ``frames`` written as CSVs; the process and its run folder."""
    write_sites(folder / "data", frames)
    (folder / "run.toml").write_text(CONFIG.format(penalty=penalty, rounds=rounds))
    result = fedcost("simulate", "run.toml", "--data-dir", "data", "--out", "run", cwd=folder)
    return result, folder / "run"


def _odd_frames() -> dict[str, pd.DataFrame]:
    """A feature with one value everywhere (bmi) and one that is an exact linear function of
    another (systolic_bp of medication_adherence)."""
    frames = sites_frames(SIZES, seed=SEED)
    for rows in frames.values():
        rows["bmi"] = 25.0
        rows["systolic_bp"] = 100.0 + 50.0 * rows["medication_adherence"]
    return frames


def _stopped(result, *expected: str) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    text = " ".join(result.stdout.split())  # rich wraps long lines
    for phrase in expected:
        assert phrase in text, text[-2000:]


@pytest.fixture(scope="module")
def ridge_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    result, run = _run(tmp_path_factory.mktemp("ridge"), _odd_frames())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


def test_the_default_ridge_fits_a_constant_and_a_collinear_feature_as_pooled(ridge_run: Path) -> None:
    summary = json.loads((ridge_run / "summary.json").read_text())
    mapping = DataMapping.load(ridge_run.parent / "data" / "mapping.toml")
    nodes = [load_node(mapping, n.name, split_seed=SEED, test_fraction=0.2) for n in mapping.nodes]
    features = FeatureSpec.from_dict(json.loads((ridge_run / "features.json").read_text()))
    parameters = len(features.design_names) + 1
    assert len(nodes[-1].train) < parameters, "the smallest site has fewer rows than coefficients"
    rows = pd.concat([node.train for node in nodes], ignore_index=True)
    x = features.design(rows)
    targets = {
        "readmission": rows[schema.READMISSION].to_numpy(float),
        "cost": rows[schema.COST].to_numpy(float) / features.cost_scale,
    }
    for task, table in summary["inference"].items():
        model = glm.FittedGlm.from_dict(json.loads((ridge_run / "glm.json").read_text())[task])
        assert table["converged"] and model.penalty == ModelSpec().penalty and model.rows == len(rows)
        pooled = glm.fit_pooled(x, targets[task], family=model.family, penalty=ModelSpec().penalty)
        np.testing.assert_allclose(model.coefficients, pooled.coefficients, rtol=0, atol=1e-6, err_msg=task)
        estimates = {row["name"]: row["estimate"] for row in table["coefficients"]}
        # zero, up to the fit's stopping rule (relative change below 1e-8)
        assert abs(estimates["bmi"]) < 1e-7, "a feature with no variation gets no weight under the ridge"
        # Collinear: the ridge splits the effect (nearly) equally at the optimum: the two columns
        # differ only by the secure sums' rounding of their means and spreads, which the pooled
        # fit on the same design shares. Each estimate is within 1e-6 of the pooled one (above),
        # so their gap within 2e-6 of the pooled fit's gap.
        first, second = (1 + model.feature_names.index(name) for name in ("systolic_bp", "medication_adherence"))
        gaps = [fit.coefficients[first] - fit.coefficients[second] for fit in (model, pooled)]
        assert abs(gaps[0] - gaps[1]) <= 2e-6 and abs(gaps[1]) < 1e-4, gaps
        for row in table["coefficients"]:
            assert all(math.isfinite(row[k]) for k in ("estimate", "std_error", "lower", "upper")), row
    assert all(record["nodes_included"] == len(SIZES) for record in map(json.loads, _lines(ridge_run)))


def _lines(run: Path) -> list[str]:
    return (run / "metrics.jsonl").read_text().splitlines()


@pytest.mark.slow
def test_without_a_penalty_a_constant_feature_is_named(tmp_path: Path) -> None:
    frames = sites_frames(SIZES, seed=SEED)
    for rows in frames.values():
        rows["bmi"] = 25.0
    result, _ = _run(tmp_path, frames, penalty="penalty = 0.0")
    _stopped(result, "feature 'bmi' is 0 at every row of every site", "one value everywhere", "penalty > 0")


@pytest.mark.slow
def test_without_a_penalty_collinear_features_are_named(tmp_path: Path) -> None:
    frames = sites_frames(SIZES, seed=SEED)
    for rows in frames.values():
        rows["systolic_bp"] = 100.0 + 50.0 * rows["medication_adherence"]
    result, _ = _run(tmp_path, frames, penalty="penalty = 0.0")
    _stopped(result, "'medication_adherence'", "'systolic_bp'", "collinear", "penalty > 0")


@pytest.mark.slow
def test_one_class_at_every_site_stops_the_run(tmp_path: Path) -> None:
    frames = sites_frames(SIZES, seed=SEED)
    for rows in frames.values():
        rows[schema.READMISSION] = 0
    result, _ = _run(tmp_path, frames)
    _stopped(result, "the target is 0 at every row of every site")


@pytest.mark.slow
def test_without_a_penalty_separated_classes_stop_the_run_with_the_cause(tmp_path: Path) -> None:
    """Separated classes drive the coefficients off; as they grow, the sums' weight falls on ever
    fewer rows until the sites refuse the rounds (min_cohort) and the sum cannot be formed:
    the run stops naming the refusing sites, the separation and the penalty as the cure."""
    frames = sites_frames(SIZES[:5], seed=SEED)
    for rows in frames.values():
        rows[schema.READMISSION] = (rows["bmi"] > 27).astype(int)
    result, _ = _run(tmp_path, frames, penalty="penalty = 0.0", rounds=8)
    _stopped(result, "earlier Newton rounds were refused by site-", "separate the classes", "set [model] penalty > 0")
