"""Federated preprocessing: summed node statistics give exactly the pooled encoding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedcost import schema
from fedcost.data.features import FeatureSpec, StatisticsLayout
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem

LAYOUT = StatisticsLayout(schema.FEATURES, (schema.READMISSION, schema.COST))


@pytest.fixture(scope="module")
def node_rows() -> list[pd.DataFrame]:
    ecosystem = generate_ecosystem(EcosystemSpec.from_sizes({"hospital": [500, 80], "insurer": [300], "pharma": [120]}), seed=3)
    return [node.frame.reindex(columns=[c.name for c in schema.FEATURES] + [schema.READMISSION, schema.COST]) for node in ecosystem.nodes]


def test_summed_node_statistics_equal_the_pooled_statistics(node_rows: list[pd.DataFrame]) -> None:
    summed = np.sum([LAYOUT.local_statistics(rows) for rows in node_rows], axis=0)
    pooled = LAYOUT.local_statistics(pd.concat(node_rows, ignore_index=True))
    np.testing.assert_allclose(summed, pooled, rtol=1e-12)


def test_spec_matches_pooled_means_scales_and_vocabularies(node_rows: list[pd.DataFrame]) -> None:
    pooled = pd.concat(node_rows, ignore_index=True)
    spec = LAYOUT.feature_spec(np.sum([LAYOUT.local_statistics(rows) for rows in node_rows], axis=0))
    age_mean, age_scale = spec.numeric["age"]
    assert age_mean == pytest.approx(pooled["age"].mean())
    assert age_scale == pytest.approx(pooled["age"].std(ddof=0))
    stay_mean, _ = spec.numeric["length_of_stay"]
    assert stay_mean == pytest.approx(np.log1p(pooled["length_of_stay"].dropna()).mean()), "stay length is log-scaled"
    assert set(spec.vocabularies["diagnosis_group"]) == set(pooled["diagnosis_group"].dropna())
    assert spec.readmission_rate == pytest.approx(pooled[schema.READMISSION].mean())
    assert spec.cost_scale == pytest.approx(pooled[schema.COST].mean())


def test_columns_a_role_lacks_are_imputed_and_flagged_not_zero(node_rows: list[pd.DataFrame]) -> None:
    spec = LAYOUT.feature_spec(np.sum([LAYOUT.local_statistics(rows) for rows in node_rows], axis=0))
    assert "icu_stay" in spec.flagged and "age" not in spec.flagged
    pharma = node_rows[-1]
    encoded = spec.encode(pharma)
    names = spec.feature_names
    flag = encoded[:, names.index("icu_stay__missing")]
    assert flag.tolist() == [1.0] * len(pharma)
    assert np.all(encoded[:, names.index("icu_stay")] == 0.0), "imputed at the federation mean (0 after standardising)"
    hospital_flags = spec.encode(node_rows[0])[:, names.index("icu_stay__missing")]
    assert hospital_flags.sum() == 0


def test_spec_round_trips_through_json_form(node_rows: list[pd.DataFrame]) -> None:
    spec = LAYOUT.feature_spec(LAYOUT.local_statistics(node_rows[0]))
    again = FeatureSpec.from_dict(spec.to_dict())
    assert again == spec
    np.testing.assert_array_equal(again.encode(node_rows[1]), spec.encode(node_rows[1]))
