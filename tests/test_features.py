"""Federated preprocessing: summed node statistics give exactly the pooled encoding, and no
count in them describes 1 to min_cohort - 1 training rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcost import schema
from fedcost.data.features import FeatureSpec, StatisticsLayout, withhold_small_counts
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.report.html import left_out_note
from fedcost.secagg.quantize import Quantizer
from fedcost.server.shared_sum import SUMS_CLIP, SUMS_LEVELS

LAYOUT = StatisticsLayout(schema.FEATURES, (schema.READMISSION, schema.COST))


@pytest.fixture(scope="module")
def node_rows() -> list[pd.DataFrame]:
    ecosystem = generate_ecosystem(
        EcosystemSpec.from_sizes({"hospital": [500, 80], "insurer": [300], "pharma": [120]}), seed=3
    )
    return [
        node.frame.reindex(columns=[c.name for c in schema.FEATURES] + [schema.READMISSION, schema.COST])
        for node in ecosystem.nodes
    ]


def test_summed_node_statistics_equal_the_pooled_statistics(node_rows: list[pd.DataFrame]) -> None:
    summed = LAYOUT.sums(np.sum([LAYOUT.local_statistics(rows, min_cohort=1) for rows in node_rows], axis=0))
    pooled = LAYOUT.sums(LAYOUT.local_statistics(pd.concat(node_rows, ignore_index=True), min_cohort=1))
    assert summed.keys() == pooled.keys()
    np.testing.assert_allclose(list(summed.values()), list(pooled.values()), rtol=1e-12)


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


def _slots(rows: pd.DataFrame, min_cohort: int = 11) -> dict[str, float]:
    return LAYOUT.sums(LAYOUT.local_statistics(rows, min_cohort=min_cohort))


def _frame(n: int, **columns: list) -> pd.DataFrame:
    base = {c.name: [None] * n if c.kind == "categorical" else [np.nan] * n for c in schema.FEATURES}
    return pd.DataFrame(base | columns | {schema.READMISSION: [0.0] * n, schema.COST: [100.0] * n})


def test_a_small_level_and_the_complement_that_would_give_it_away_are_withheld() -> None:
    types = ["emergency"] * 50 + ["urgent"] * 5 + ["elective"] * 30
    slots = _slots(_frame(85, admission_type=types))
    # 5 urgent alone would be rows - 50 - 30; the smallest released level goes with it
    assert [slots[f"admission_type={t}"] for t in ("emergency", "urgent", "elective")] == [50, 0, 0]
    assert slots["admission_type.missing"] == 0 and slots["rows"] == 85
    slots = _slots(_frame(85, admission_type=["emergency"] * 50 + ["urgent"] * 5 + ["elective"] * 8 + [None] * 22))
    assert [slots[f"admission_type={t}"] for t in ("emergency", "urgent", "elective")] == [50, 0, 0]
    assert slots["admission_type.missing"] == 22, "13 withheld rows are no small cell"


def test_a_numeric_column_leaves_only_where_it_and_its_absence_are_no_small_cell() -> None:
    def age_slots(values: list) -> list[float]:
        slots = _slots(_frame(len(values), age=values))
        return [slots["age.count"], slots["age.sum"], slots["age.sumsq"]]

    assert age_slots([60.0] * 40) == [40, 2400, 144000]
    assert age_slots([60.0] * 8 + [np.nan] * 40) == [0, 0, 0]
    assert age_slots([60.0] * 40 + [np.nan] * 12) == [40, 2400, 144000]


@pytest.mark.parametrize("lacking", [1, 5, 10])
def test_a_few_rows_lacking_a_value_are_neither_counted_nor_cost_the_column(lacking: int) -> None:
    """rows - count would count the few without an age, and withholding the column for them
    dropped it wherever every site lacked a handful: the present rows' sums leave scaled to
    all rows, whatever the number lacking."""
    ages = [50.0, 70.0] * 20
    slots = _slots(_frame(40 + lacking, age=ages + [np.nan] * lacking))
    count, total, squares = slots["age.count"], slots["age.sum"], slots["age.sumsq"]
    assert count == slots["rows"] == 40 + lacking
    assert total / count == pytest.approx(60.0) and squares / count == pytest.approx(3700.0)

    types = ["emergency"] * 50 + ["elective"] * 30 + [None] * lacking
    slots = _slots(_frame(80 + lacking, admission_type=types))
    released = [slots[f"admission_type={t}"] for t in ("emergency", "urgent", "elective")]
    assert slots["admission_type.missing"] == 0 and sum(released) == pytest.approx(slots["rows"])
    scaled = [n * (80 + lacking) / 80 for n in (50, 0, 30)]
    assert released == pytest.approx(scaled, abs=1), "the present rows' counts scaled, in whole rows"


def test_a_column_every_site_lacks_a_few_values_of_stays_in_the_model() -> None:
    rng = np.random.default_rng(3)
    sites = []
    for lacking in (2, 4, 7, 10):
        ages = list(rng.normal(60, 12, 60))
        types = list(rng.choice(["emergency", "elective"], 60, p=[0.8, 0.2]))
        sites.append(_frame(60 + lacking, age=ages + [np.nan] * lacking, admission_type=types + [None] * lacking))
    spec = LAYOUT.feature_spec(np.sum([LAYOUT.local_statistics(rows) for rows in sites], axis=0))
    pooled = pd.concat(sites)["age"]
    mean, scale = spec.numeric["age"]
    assert mean == pytest.approx(pooled.mean(), abs=0.5) and scale == pytest.approx(pooled.std(), rel=0.05)
    assert spec.vocabularies["admission_type"] == ("emergency", "elective")
    assert "age" not in spec.flagged and "admission_type" not in spec.flagged


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=4, max_size=4), st.integers(2, 15))
def test_no_released_count_or_withheld_union_describes_a_small_group(counts: list[int], min_cohort: int) -> None:
    released = withhold_small_counts(counts, min_cohort)
    assert all(n == 0 or n >= min_cohort for n in released)
    assert all(r in (0, n) for r, n in zip(released, counts)), "counts are released whole or not at all"
    union = sum(counts) - sum(released)
    assert union == 0 or union >= min_cohort or not any(released)


def test_flags_and_vocabularies_follow_the_released_counts(node_rows: list[pd.DataFrame]) -> None:
    totals = np.sum([LAYOUT.local_statistics(rows) for rows in node_rows], axis=0)
    slots = dict(zip(LAYOUT.slots(), totals.tolist(), strict=True))
    spec = LAYOUT.feature_spec(totals)
    assert "admission_type" in spec.flagged and slots["admission_type.missing"] > 0, "pharma has no admission type"
    assert "sex" not in spec.flagged and slots["sex.missing"] == 0
    slots["sex=female"] = 0.0
    slots["sex.missing"] = 7.0
    spec = LAYOUT.feature_spec(np.array(list(slots.values())))
    assert spec.vocabularies["sex"] == ("male",) and "sex" in spec.flagged


def test_the_secure_sums_rounding_adds_no_level_and_no_missing_flag(node_rows: list[pd.DataFrame]) -> None:
    """A zero count may decode as one grid step per node (fixed point, stochastic rounding):
    that is no row, so no level and no missing flag may come of it."""
    step = Quantizer(SUMS_CLIP, SUMS_LEVELS, max_nodes=len(node_rows)).step
    totals = np.sum([LAYOUT.local_statistics(rows) for rows in node_rows], axis=0)
    slots = dict(zip(LAYOUT.slots(), totals.tolist(), strict=True))
    assert slots["sex.missing"] == 0 and slots["age.count"] == slots["rows"]
    slots["payer=self_pay"] = 0.0  # a level no node has
    exact = LAYOUT.feature_spec(np.array(list(slots.values())))
    for name in ("rows", "sex.missing", "payer=self_pay"):
        slots[name] += len(node_rows) * step
    rounded = LAYOUT.feature_spec(np.array(list(slots.values())))
    assert "self_pay" not in rounded.vocabularies["payer"]
    assert "sex" not in rounded.flagged and "age" not in rounded.flagged
    assert rounded.vocabularies == exact.vocabularies and rounded.flagged == exact.flagged


def test_what_no_site_could_release_is_named_as_left_out_of_the_model() -> None:
    """Three sites of 8 urgent admissions each, in the clear: 24 in all, but a small cell at
    every site, so the level is not in the model (nor elective, which would give it away; in
    a secure sum the sites' bits would take both in, below); a declared weight
    loss every site holds in 5 rows leaves with it. A report must say so rather than show a
    model that silently lacks them. A schema column no site holds (sex) is not the data set's."""
    weight_loss = schema.Column("wt_loss", "numeric", "declared numeric feature", minimum=None)
    layout = StatisticsLayout((schema.COLUMNS["admission_type"], schema.COLUMNS["sex"], weight_loss), ())
    types = ["emergency"] * 50 + ["elective"] * 20 + ["urgent"] * 8
    site = pd.DataFrame({"admission_type": types, "sex": [None] * 78, "wt_loss": [3.0] * 5 + [np.nan] * 73})
    spec = layout.feature_spec(np.sum([layout.local_statistics(site) for _ in range(3)], axis=0))
    assert spec.vocabularies == {"admission_type": ("emergency",)}
    assert spec.left_out == ("admission_type=urgent", "admission_type=elective", "wt_loss")
    assert FeatureSpec.from_dict(spec.to_dict()).left_out == spec.left_out
    note = left_out_note({"min_cohort": 11, **spec.coverage()})
    assert "not in the model: admission_type=urgent, admission_type=elective, wt_loss" in note
    assert "11 training rows" in note
    assert left_out_note({"min_cohort": 11, "features_left_out": []}) == ""


def _urgent_sites(urgent: list[int]) -> list[pd.DataFrame]:
    """Sites of 50 emergency, 20 elective and some urgent admissions (each count under 11)."""
    return [_frame(70 + n, admission_type=["emergency"] * 50 + ["elective"] * 20 + ["urgent"] * n) for n in urgent]


def _vocabulary(sites: list[pd.DataFrame], *, secure: bool, min_cohort: int = 11) -> tuple[str, ...]:
    vectors = [LAYOUT.local_statistics(rows, min_cohort=min_cohort, secure=secure) for rows in sites]
    spec = LAYOUT.feature_spec(np.sum(vectors, axis=0), min_cohort=min_cohort)
    return spec.vocabularies.get("admission_type", ())


def test_a_level_no_site_can_release_enters_where_enough_sites_hold_a_share_of_it() -> None:
    """Every site holds 4 to 10 urgent admissions, a small cell it withholds, with elective
    (which would give it away); in a secure sum each site's bit (4 rows or more) proves 12
    rows over 3 sites, and both levels are in."""
    assert _vocabulary(_urgent_sites([5, 4, 9]), secure=True) == ("emergency", "urgent", "elective")
    assert _vocabulary(_urgent_sites([5, 4, 9]), secure=False) == ("emergency",), "in the clear: no bits"
    assert "urgent" not in _vocabulary(_urgent_sites([10, 10, 3]), secure=True), "only 2 sites hold 4 or more"
    assert "urgent" not in _vocabulary(_urgent_sites([9, 9, 9, 9]), secure=True, min_cohort=20), "4 x 4 < 20"
    assert "urgent" in _vocabulary(_urgent_sites([4] * 5), secure=True, min_cohort=20)


def test_a_levels_bit_is_the_same_whatever_min_cohort_a_job_asks() -> None:
    """Were the share the job's min_cohort / 3, jobs asking 11, 14, 17, ... would set a
    withheld count between two thresholds; the bit is fixed at LEVEL_SHARE rows."""
    (site,) = _urgent_sites([5])
    bits = [name.endswith(".sites") for name in LAYOUT.slots()]
    vectors = [LAYOUT.local_statistics(site, min_cohort=m, secure=True)[bits] for m in (11, 14, 20, 30)]
    assert all(np.array_equal(vectors[0], v) for v in vectors)
    noisy = LAYOUT.local_statistics(site, cost_clip=1e5, secure=True)[bits]
    assert not noisy.any(), "a noisy release sends its counts whole and no bits"


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 10), min_size=3, max_size=8), st.integers(11, 25))
def test_a_level_taken_in_on_sites_bits_holds_min_cohort_rows(urgent: list[int], min_cohort: int) -> None:
    if "urgent" in _vocabulary(_urgent_sites(urgent), secure=True, min_cohort=min_cohort):
        assert sum(urgent) >= min_cohort
