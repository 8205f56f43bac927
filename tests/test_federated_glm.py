"""An exact federated GLM in a real federation equals the pooled fit of the same rows.

`fedcost simulate` runs ten sites, three of them under 30 rows, with secure aggregation on
and one site dropping out of a Newton round; the readmission and cost GLMs it fits must
equal statsmodels' fit of all the sites' training rows pooled: every coefficient to 1e-6,
every standard error to 1e-4 (relative). The sites are hospitals, whose rows hold every
column: other roles lack whole columns by design, so their missing flags are collinear and
need the default ridge penalty, which statsmodels' standard errors do not cover.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from fedcost import schema
from fedcost.data.features import FeatureSpec
from fedcost.data.loader import load_node
from fedcost.data.mapping import DataMapping
from simulations import exchanges, simulate

CONFIG = """
[run]
seed = 3

[ecosystem.sizes]
hospital = [600, 500, 400, 300, 200, 120, 80, 25, 28, 27]

[model]
kind = "glm"
penalty = 0.0
cost_family = "tweedie"
tweedie_power = 1.5

[analytics]
group_by = []
benchmark = false

[simulation.drop_nodes]
hospital-2 = [2]
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    result, folder = simulate(tmp_path_factory.mktemp("glm"), CONFIG, "glm")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder


def _pooled(run: Path) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    mapping = DataMapping.load(run / "data" / "mapping.toml")
    rows = pd.concat(
        [load_node(mapping, node.name, split_seed=3, test_fraction=0.2).train for node in mapping.nodes],
        ignore_index=True,
    )
    features = FeatureSpec.from_dict(json.loads((run / "features.json").read_text()))
    x = sm.add_constant(features.design(rows), has_constant="add")
    targets = {
        "readmission": rows[schema.READMISSION].to_numpy(float),
        "cost": rows[schema.COST].to_numpy(float) / features.cost_scale,
    }
    return x, targets, ["intercept", *features.design_names]


def test_the_federated_glm_is_the_pooled_fit_with_its_standard_errors(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["secure_aggregation"] and summary["dropouts"], "SecAgg+ on, and a site dropped out of a round"
    rows = [node["train_rows"] for node in summary["nodes"]]
    assert len(rows) >= 10 and sum(n < 30 for n in rows) >= 3, rows
    x, targets, names = _pooled(run)
    families = {
        "readmission": sm.families.Binomial(),
        "cost": sm.families.Tweedie(var_power=1.5, link=sm.families.links.Log()),
    }
    for task, family in families.items():
        reference = sm.GLM(targets[task], x, family=family).fit(tol=1e-12, maxiter=100)
        table = summary["inference"][task]
        assert table["converged"]
        rows = {row["name"]: row for row in table["coefficients"]}
        assert list(rows) == names
        estimates = np.array([rows[name]["estimate"] for name in names])
        errors = np.array([rows[name]["std_error"] for name in names])
        np.testing.assert_allclose(estimates, reference.params, rtol=0, atol=1e-6, err_msg=task)
        np.testing.assert_allclose(errors, reference.bse, rtol=1e-4, err_msg=task)


def test_the_run_saves_the_fit_and_its_coefficient_table(run: Path) -> None:
    table = pd.read_csv(run / "coefficients.csv")
    assert {"task", "name", "estimate", "std_error", "lower", "upper", "ratio"} <= set(table.columns)
    readmission = table[table["task"] == "readmission"]
    assert (readmission["lower"] < readmission["estimate"]).all() and (
        readmission["estimate"] < readmission["upper"]
    ).all()
    np.testing.assert_allclose(readmission["ratio"], np.exp(readmission["estimate"]))
    saved = json.loads((run / "glm.json").read_text())
    assert set(saved) == {"readmission", "cost"}


def test_a_glm_round_is_six_exchanges(run: Path) -> None:
    """Each sum's setup rides on the consistency before it and its share-keys on the unmask
    (``shared_sum.NextSum``), or goes alone in that exchange to a node it does not ask (the three
    small sites withhold evaluation sums; hospital-2 drops out of a Newton sum): only the run's
    first Newton sum, and its first evaluation (whose setup the three small sites refuse), set
    up in exchanges of their own. A sum is then its masked input, consistency and unmask."""
    by_round: dict[int, list[set[str]]] = {}
    for round_, kinds in exchanges(run):
        if round_:
            by_round.setdefault(round_, []).append(kinds)
    own = {r: [kinds for kinds in sent if all(k.endswith(":setup") for k in kinds)] for r, sent in by_round.items()}
    assert [len(by_round[1]), own[1]] == [10, [{"secagg:newton:setup"}, {"secagg:evaluate:setup"}]]
    assert len(by_round) > 2, "the fit converged before a second round"
    for round_ in range(2, len(by_round) + 1):
        assert len(by_round[round_]) == 6 and not own[round_], (round_, by_round[round_])
    consistency = next(kinds for kinds in by_round[2] if "secagg:newton:consistency" in kinds)
    unmask = next(kinds for kinds in by_round[2] if "secagg:newton:unmask" in kinds)
    assert consistency == {"secagg:newton:consistency", "secagg:evaluate:setup"}, "hospital-2's setup went alone"
    assert unmask == {"secagg:newton:unmask", "secagg:evaluate:share-keys"}, "and its share-keys"
