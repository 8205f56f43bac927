"""The synthetic ecosystem: reproducible, schema-true, and as hard as real data."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fedcost import schema
from fedcost.data.synthetic import (
    EXPECTED_RISK,
    RISK,
    EcosystemSpec,
    NodeSpec,
    generate_ecosystem,
    latent_frames,
    linear_predictor,
)

SIZES = {"hospital": [24000, 9000, 2500, 400], "insurer": [18000, 5000], "pharma": [6000, 700]}
SMALL = {"hospital": [300, 120], "insurer": [200], "pharma": [80]}


@pytest.fixture(scope="module")
def mid():
    spec = EcosystemSpec.from_sizes(SIZES)
    return spec, generate_ecosystem(spec, seed=7)


def _pooled_design(frames: list[pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All nodes stacked; features a role lacks are mean-imputed and flagged."""
    rows = pd.concat(frames, ignore_index=True)
    parts = []
    for column in schema.FEATURES:
        if column.name not in rows:
            continue
        values = rows[column.name]
        if column.kind == "categorical":
            parts.append(pd.get_dummies(values.fillna("missing"), prefix=column.name, dtype=float))
        else:
            parts.append(values.isna().astype(float).rename(f"{column.name}_missing"))
            parts.append(values.fillna(values.mean()).astype(float))
    return pd.concat(parts, axis=1), rows


def _split(n: int) -> np.ndarray:
    return np.random.default_rng(0).random(n) < 0.3


def test_same_seed_same_ecosystem_and_different_seed_differs():
    spec = EcosystemSpec.from_sizes(SMALL)
    first, again, other = (generate_ecosystem(spec, seed) for seed in (3, 3, 4))
    for a, b in zip(first.nodes, again.nodes):
        assert_frame_equal(a.frame, b.frame)
    assert json.dumps(first.truth) == json.dumps(again.truth)
    assert not first.nodes[0].frame.equals(other.nodes[0].frame)
    assert first.truth["quality_effects"] != other.truth["quality_effects"]


def test_a_node_does_not_depend_on_other_nodes_sizes():
    small = generate_ecosystem(EcosystemSpec.from_sizes({"hospital": [200, 50]}), seed=1)
    large = generate_ecosystem(EcosystemSpec.from_sizes({"hospital": [200, 5000]}), seed=1)
    assert_frame_equal(small.nodes[0].frame, large.nodes[0].frame)


def test_from_sizes_names_sizes_and_regions():
    spec = EcosystemSpec.from_sizes(SMALL, quality_effect_sd=0.5)
    assert [n.name for n in spec.nodes] == ["hospital-1", "hospital-2", "insurer-1", "pharma-1"]
    assert [n.region for n in spec.nodes] == ["north", "south", "north", "north"]
    assert spec.quality_effect_sd == 0.5
    ecosystem = generate_ecosystem(spec, seed=0)
    assert [(n.name, n.role, n.region, len(n.frame)) for n in ecosystem.nodes] == [
        (n.name, n.role, n.region, n.rows) for n in spec.nodes
    ]


def test_frames_hold_exactly_their_roles_columns_within_schema(mid):
    _, ecosystem = mid
    for node in ecosystem.nodes:
        frame = node.frame
        role = schema.ROLES[node.role]
        assert list(frame.columns) == [*role.features, *role.accounting, schema.READMISSION, schema.COST]
        assert not frame.isna().any().any(), node.name
        assert (frame["region"] == node.region).all()
        for name in frame.columns:
            column, values = schema.COLUMNS[name], frame[name]
            if column.kind == "categorical":
                assert set(values) <= set(column.levels), (node.name, name)
                assert all(isinstance(v, str) for v in values.head(50)), (node.name, name)
                continue
            assert values.min() >= column.minimum, (node.name, name)
            if column.maximum is not None:
                assert values.max() <= column.maximum, (node.name, name)
            if column.integer:
                assert (values == np.round(values)).all(), (node.name, name)


def test_truth_is_json_and_consistent_with_the_data(mid):
    spec, ecosystem = mid
    truth = json.loads(json.dumps(ecosystem.truth))
    assert truth["seed"] == 7
    assert [n["name"] for n in truth["spec"]["nodes"]] == [n.name for n in spec.nodes]
    hospitals = [n.name for n in spec.nodes if n.role == "hospital"]
    assert sorted(truth["quality_effects"]) == sorted(hospitals)
    sd = spec.quality_effect_sd
    assert truth["worse_hospitals"] == [h for h in hospitals if truth["quality_effects"][h] > sd]
    assert set(truth["price_levels"]) == set(schema.COLUMNS["region"].levels)
    for node in ecosystem.nodes:
        realised = truth["nodes"][node.name]
        assert realised["readmission_rate"] == pytest.approx(node.frame[schema.READMISSION].mean())
        assert realised["mean_cost"] == pytest.approx(node.frame[schema.COST].mean())


def test_truth_reproduces_the_expected_risk():
    spec = EcosystemSpec.from_sizes(SMALL)
    truth = generate_ecosystem(spec, seed=2).truth
    for name, frame in latent_frames(spec, seed=2).items():
        expected = 1 / (1 + np.exp(-linear_predictor(frame, truth["readmission"])))
        np.testing.assert_allclose(frame[EXPECTED_RISK], expected)
        assert truth["nodes"][name]["expected_readmission_rate"] == pytest.approx(expected.mean())


def test_pooled_readmission_model_is_realistically_hard(mid):
    spec, ecosystem = mid
    features, rows = _pooled_design([node.frame for node in ecosystem.nodes])
    outcome = rows[schema.READMISSION].to_numpy()
    test = _split(len(rows))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(features[~test], outcome[~test])
    auroc = roc_auc_score(outcome[test], model.predict_proba(features[test])[:, 1])
    assert 0.65 <= auroc <= 0.80
    assert 0.10 <= outcome.mean() <= 0.20
    latent = pd.concat(latent_frames(spec, seed=7).values())
    oracle = roc_auc_score(latent[schema.READMISSION], latent[RISK])
    assert auroc <= oracle + 0.01
    assert 0.65 <= oracle <= 0.85


def test_costs_are_heavy_tailed_with_some_zeros_and_partly_predictable(mid):
    _, ecosystem = mid
    features, rows = _pooled_design([node.frame for node in ecosystem.nodes if node.role == "hospital"])
    cost = rows[schema.COST].to_numpy()
    median = np.median(cost)
    assert (cost >= 0).all()
    assert 0.01 <= (cost == 0).mean() <= 0.06
    assert cost.mean() > median and np.quantile(cost, 0.99) > 5 * median
    counts = [c.name for c in schema.FEATURES if c.integer and c.maximum > 1 and c.name in rows]
    features = features.join(np.log1p(rows[counts + ["length_of_stay"]]).add_prefix("log1p_"))
    test = _split(len(rows))
    log_fit = LinearRegression().fit(features[~test], np.log1p(cost[~test]))
    smearing = np.mean(np.exp(np.log1p(cost[~test]) - log_fit.predict(features[~test])))
    assert r2_score(cost[test], np.expm1(log_fit.predict(features[test])) * smearing) > 0.2


def test_a_worse_hospital_readmits_more_than_its_case_mix_explains():
    spec = EcosystemSpec.from_sizes({"hospital": [3000] * 6}, quality_effect_sd=0.8)
    ecosystem = generate_ecosystem(spec, seed=11)
    truth = ecosystem.truth
    ratio = {
        n.name: n.frame[schema.READMISSION].mean() / truth["nodes"][n.name]["expected_readmission_rate"]
        for n in ecosystem.nodes
    }
    worst = max(truth["quality_effects"], key=truth["quality_effects"].get)
    best = min(truth["quality_effects"], key=truth["quality_effects"].get)
    assert truth["quality_effects"][worst] > 0.8 > -0.8 > truth["quality_effects"][best]
    assert ratio[worst] > 1 > ratio[best]


def test_knobs_at_zero_make_sites_alike():
    spec = EcosystemSpec.from_sizes(SMALL, quality_effect_sd=0, price_level_sd=0, case_mix_shift=0)
    truth = generate_ecosystem(spec, seed=5).truth
    assert set(truth["quality_effects"].values()) == {0.0}
    assert set(truth["price_levels"].values()) == {1.0}
    assert truth["worse_hospitals"] == []
    assert all(v == 0 for v in truth["nodes"]["hospital-1"]["case_mix"]["diagnosis_logits"].values())


def test_generation_is_fast():
    spec = EcosystemSpec.from_sizes({"hospital": [30000, 20000], "insurer": [30000], "pharma": [20000]})
    start = time.perf_counter()
    generate_ecosystem(spec, seed=0)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    ("make", "names"),
    [
        (lambda: NodeSpec("h", "clinic", 10, "north"), "'h'"),
        (lambda: NodeSpec("h", "hospital", 0, "north"), "'h'"),
        (lambda: NodeSpec("h", "hospital", 10, "mars"), "'h'"),
        (lambda: EcosystemSpec((NodeSpec("h", "hospital", 5, "north"),) * 2), "h"),
        (lambda: EcosystemSpec.from_sizes({"hospital": [5]}, price_level_sd=-0.1), "price_level_sd"),
        (lambda: EcosystemSpec.from_sizes({"hospital": [5]}, case_mix_shift=float("nan")), "case_mix_shift"),
        (lambda: EcosystemSpec(()), "node"),
    ],
)
def test_spec_validation_names_the_culprit(make, names):
    with pytest.raises(ValueError, match=names):
        make()


def test_payments_are_the_drg_formula_for_hospitals_and_insurers(mid):
    """payment = base rate x group weight x regional price level, for hospitals and insurers
    only, so a group's margin is known to be positive in some groups and negative in others."""
    _, ecosystem = mid
    truth = ecosystem.truth["payment"]
    margins = []
    for node in ecosystem.nodes:
        frame = node.frame
        if schema.PAYMENT not in schema.ROLES[node.role].accounting:
            assert schema.PAYMENT not in frame.columns
            continue
        weights = frame[schema.DISEASE_GROUP].map(truth["group_weights"])
        expected = (truth["base_rate"] * weights * ecosystem.truth["price_levels"][node.region]).round(2)
        assert (frame[schema.PAYMENT] == expected).all(), node.name
        margins.append(frame.groupby(schema.DISEASE_GROUP)[[schema.PAYMENT, schema.COST]].sum())
    pooled = pd.concat(margins).groupby(level=0).sum()
    margin = pooled[schema.PAYMENT] - pooled[schema.COST]
    assert (margin > 0).any() and (margin < 0).any()
    assert set(truth["roles"]) == {"hospital", "insurer"}
