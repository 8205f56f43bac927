"""Bring-your-own-data validation: every bad input is refused naming file, row and column."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedcost.data.loader import load_node
from fedcost.data.mapping import DataMapping
from fedcost.errors import DataValidationError, MappingError

MAPPING = """
[targets.readmitted_30d]
positive = ["Y"]
negative = ["N"]

[targets.total_cost]

[columns]
patient_age = "age"
gender = "sex"
readmit = "readmitted_30d"
cost_eur = "total_cost"

[values.sex]
F = "female"
M = "male"

[features]
numeric = ["bmi"]

[nodes.pharmacy-north]
role = "pharma"
file = "pharmacy.csv"
"""

GOOD_ROW = {
    "patient_age": "70",
    "gender": "F",
    "region": "north",
    "diagnosis_group": "copd",
    "comorbidity_index": "3",
    "payer": "medicare",
    "num_medications": "8",
    "medication_adherence": "0.8",
    "bmi": "27.5",
    "readmit": "N",
    "cost_eur": "5400.50",
}


def write_case(folder: Path, rows: list[dict] | None, mapping: str = MAPPING) -> DataMapping:
    (folder / "mapping.toml").write_text(mapping)
    if rows is not None:
        pd.DataFrame(rows).to_csv(folder / "pharmacy.csv", index=False)
    return DataMapping.load(folder / "mapping.toml")


def rows_with(**changes: str) -> list[dict]:
    """Three good rows, the third one changed: errors must name data row 3."""
    return [dict(GOOD_ROW), dict(GOOD_ROW), {**GOOD_ROW, **changes}]


def without(column: str) -> list[dict]:
    return [{k: v for k, v in GOOD_ROW.items() if k != column}] * 3


BAD_DATA = {
    "non-numeric age": (rows_with(patient_age="seventy"), 3, "patient_age", "not a number"),
    "age above the schema maximum": (rows_with(patient_age="150"), 3, "patient_age", "above the maximum"),
    "fractional comorbidity count": (rows_with(comorbidity_index="2.5"), 3, "comorbidity_index", "whole number"),
    "unknown category": (rows_with(diagnosis_group="flu"), 3, "diagnosis_group", "not one of"),
    "target outside its two values": (rows_with(readmit="maybe"), 3, "readmit", "neither positive"),
    "negative cost": (rows_with(cost_eur="-20"), 3, "cost_eur", "below the minimum 0"),
    "empty cost": (rows_with(cost_eur=""), 3, "cost_eur", "empty"),
    "missing required column": (
        without("medication_adherence"),
        None,
        "medication_adherence",
        "missing required column",
    ),
    "missing target column": (without("cost_eur"), None, "cost_eur", "missing required column"),
    "missing extra feature": (without("bmi"), None, "bmi", "missing required column"),
}


@pytest.mark.parametrize("case", BAD_DATA, ids=list(BAD_DATA))
def test_bad_data_is_refused_naming_file_row_and_column(tmp_path: Path, case: str) -> None:
    rows, row, column, words = BAD_DATA[case]
    mapping = write_case(tmp_path, rows)
    with pytest.raises(DataValidationError) as caught:
        load_node(mapping, "pharmacy-north", split_seed=1)
    error = caught.value
    assert error.path.endswith("pharmacy.csv")
    assert error.row == row
    assert error.column == column
    assert words in str(error)
    assert "pharmacy.csv" in str(error) and column in str(error)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    mapping = write_case(tmp_path, None)
    (tmp_path / "pharmacy.csv").write_text("")
    with pytest.raises(DataValidationError, match="empty"):
        load_node(mapping, "pharmacy-north", split_seed=1)


def test_header_without_rows_is_refused(tmp_path: Path) -> None:
    mapping = write_case(tmp_path, None)
    (tmp_path / "pharmacy.csv").write_text(",".join(GOOD_ROW) + "\n")
    with pytest.raises(DataValidationError, match="no rows"):
        load_node(mapping, "pharmacy-north", split_seed=1)


def test_node_of_one_row_is_refused_naming_its_file(tmp_path: Path) -> None:
    """A site of one row cannot be split (it would train or hold out nothing): a clear
    message naming the node and its file, not a bug report from the split."""
    mapping = write_case(tmp_path, [GOOD_ROW])
    with pytest.raises(DataValidationError, match="pharmacy-north has one row") as caught:
        load_node(mapping, "pharmacy-north", split_seed=1)
    assert caught.value.path.endswith("pharmacy.csv")
    assert load_node(write_case(tmp_path, [GOOD_ROW] * 2), "pharmacy-north", split_seed=1).test.shape[0] == 1


def test_node_file_that_is_not_there_is_refused(tmp_path: Path) -> None:
    mapping = write_case(tmp_path, None)
    with pytest.raises(DataValidationError, match="file not found") as caught:
        load_node(mapping, "pharmacy-north", split_seed=1)
    assert caught.value.path.endswith("pharmacy.csv")


BAD_MAPPINGS = {
    "unknown field": (MAPPING.replace('gender = "sex"', 'gender = "gender_code"'), "columns.gender", "unknown field"),
    "unknown role": (
        MAPPING.replace('role = "pharma"', 'role = "pharmacy"'),
        "nodes.pharmacy-north.role",
        "role must be one of",
    ),
    "no target": (
        '[nodes.pharmacy-north]\nrole = "pharma"\nfile = "pharmacy.csv"\n',
        "targets",
        "declare at least one outcome",
    ),
    "outcome of no kind": (
        MAPPING.replace("[targets.total_cost]", "[targets.mortality]"),
        "targets.mortality.kind",
        "what kind of outcome",
    ),
    "outcome of an unknown kind": (
        MAPPING.replace("[targets.total_cost]", '[targets.stay]\nkind = "count"'),
        "targets.stay.kind",
        "kind must be",
    ),
    "two binary outcomes": (
        MAPPING.replace("[targets.total_cost]", '[targets.died]\nkind = "binary"'),
        "targets",
        "both binary outcomes",
    ),
    "the schema's outcome of another kind": (
        MAPPING.replace("[targets.total_cost]", '[targets.total_cost]\nkind = "binary"'),
        "targets.total_cost.kind",
        "non-negative outcome",
    ),
    "tokens for a non-negative outcome": (
        MAPPING.replace("[targets.total_cost]", '[targets.total_cost]\npositive = ["1"]'),
        "targets.total_cost.positive",
        "unknown option",
    ),
    "a level listed twice": (
        MAPPING.replace('numeric = ["bmi"]', 'numeric = ["bmi"]\ncategorical = { ward = ["a", "b", "A"] }'),
        "features.categorical.ward",
        "listed twice",
    ),
    "an outcome also a feature": (
        MAPPING.replace('numeric = ["bmi"]', 'numeric = ["bmi", "total_cost"]'),
        "features",
        "is an outcome",
    ),
    "a feature under an outcome slot's name": (
        MAPPING.replace("[targets.total_cost]", '[targets.stay]\nkind = "non-negative"')
        .replace('cost_eur = "total_cost"', 'cost_eur = "stay"')
        .replace('numeric = ["bmi"]', 'numeric = ["bmi", "total_cost"]'),
        "features",
        "the name fedcost gives its outcomes",
    ),
    "recoding to an unknown level": (MAPPING.replace('M = "male"', 'M = "man"'), "values.sex.M", "not one of"),
    "lacks a field the role does not hold": (
        MAPPING.replace('file = "pharmacy.csv"', 'file = "pharmacy.csv"\nlacks = ["icu_stay"]'),
        "nodes.pharmacy-north.lacks",
        "list fields",
    ),
    "invalid TOML": ("[nodes\n", None, "not valid TOML"),
}


@pytest.mark.parametrize("case", BAD_MAPPINGS, ids=list(BAD_MAPPINGS))
def test_bad_mapping_is_refused_naming_the_field(tmp_path: Path, case: str) -> None:
    text, field_name, words = BAD_MAPPINGS[case]
    (tmp_path / "mapping.toml").write_text(text)
    with pytest.raises(MappingError) as caught:
        DataMapping.load(tmp_path / "mapping.toml")
    assert caught.value.field == field_name
    assert words in str(caught.value)
    assert "mapping.toml" in str(caught.value)


def test_good_file_is_mapped_into_the_schema(tmp_path: Path) -> None:
    rows = [dict(GOOD_ROW, readmit="Y" if i % 3 == 0 else "N", patient_age=str(40 + i)) for i in range(10)]
    rows[4]["num_medications"] = ""
    mapping = write_case(tmp_path, rows)
    node = load_node(mapping, "pharmacy-north", split_seed=3, test_fraction=0.3)
    both = pd.concat([node.train, node.test])
    assert len(node.test) == 3 and len(node.train) == 7
    assert sorted(both["age"]) == list(range(40, 50))
    assert set(both["sex"]) == {"female"}
    assert both["readmitted_30d"].sum() == 4
    assert both["num_medications"].isna().sum() == 1, "an empty cell is missing (imputed and flagged later), not zero"
    assert both["length_of_stay"].isna().all(), "a column the pharma role lacks is missing by design"
    assert both["bmi"].eq(27.5).all()


def test_own_test_file_replaces_the_split(tmp_path: Path) -> None:
    mapping_text = MAPPING.replace('file = "pharmacy.csv"', 'file = "pharmacy.csv"\ntest_file = "held_out.csv"')
    mapping = write_case(tmp_path, [GOOD_ROW] * 5, mapping_text)
    pd.DataFrame([GOOD_ROW] * 2).to_csv(tmp_path / "held_out.csv", index=False)
    node = load_node(mapping, "pharmacy-north", split_seed=1)
    assert (len(node.train), len(node.test)) == (5, 2)


def test_split_is_reproducible_and_seed_dependent(tmp_path: Path) -> None:
    rows = [dict(GOOD_ROW, patient_age=str(20 + i)) for i in range(40)]
    mapping = write_case(tmp_path, rows)
    first = load_node(mapping, "pharmacy-north", split_seed=5).test["age"].tolist()
    again = load_node(mapping, "pharmacy-north", split_seed=5).test["age"].tolist()
    other = load_node(mapping, "pharmacy-north", split_seed=6).test["age"].tolist()
    assert first == again
    assert first != other


SITE_MAPPING = """
[targets.died]
kind = "binary"
positive = ["yes"]
negative = ["no"]

[targets.length_of_stay]
kind = "non-negative"

[features]
numeric = ["age", "creatinine"]
categorical = { ward = ["surgical", "medical"] }

[nodes.ward-a]
file = "ward-a.csv"
"""


def write_site(folder: Path, rows: list[dict], mapping: str = SITE_MAPPING) -> DataMapping:
    (folder / "mapping.toml").write_text(mapping)
    pd.DataFrame(rows).to_csv(folder / "ward-a.csv", index=False)
    return DataMapping.load(folder / "mapping.toml")


SITE_ROW = {
    "age": "-1.25",
    "creatinine": "0.3",
    "ward": "surgical",
    "died": "no",
    "length_of_stay": "4.5",
    "sex": "banana",
    "region": "moon",
}


def test_role_less_node_reads_its_own_outcomes_and_features(tmp_path: Path) -> None:
    rows = [dict(SITE_ROW, died="yes" if i % 4 == 0 else "no", age=str(-2 + i / 5)) for i in range(20)]
    mapping = write_site(tmp_path, rows)
    assert mapping.node("ward-a").role == "site"
    assert mapping.tasks == ("readmission", "cost")
    assert mapping.outcome_columns == {"readmission": "died", "cost": "length_of_stay"}
    columns = {c.name: c for c in mapping.feature_columns}
    assert "length_of_stay" not in columns, "an outcome's name hides the schema feature it shares"
    assert columns["age"].minimum is None, "a declared 'age' is a plain feature, without the schema's bounds"
    assert mapping.extra_categorical["ward"] == ("surgical", "medical"), (
        "levels as declared: the first is the reference"
    )
    node = load_node(mapping, "ward-a", split_seed=1)
    both = pd.concat([node.train, node.test])
    assert both["readmitted_30d"].sum() == 5 and both["total_cost"].eq(4.5).all()
    assert both["age"].min() == pytest.approx(-2.0), "standardised values are kept as they are"
    assert set(both["ward"]) == {"surgical"}
    assert both["sex"].isna().all() and both["region"].isna().all(), (
        "a role-less node's schema fields come only from the mapping, never from a column that happens to share a name"
    )


@pytest.mark.parametrize(
    ("change", "column", "words"),
    [
        ({"died": "maybe"}, "died", "[targets.died] positive and negative"),
        ({"length_of_stay": "-1"}, "length_of_stay", "below the minimum 0 for length_of_stay"),
        ({"length_of_stay": ""}, "length_of_stay", "length_of_stay is empty"),
    ],
)
def test_role_less_node_refuses_bad_outcomes_under_their_own_names(
    tmp_path: Path, change: dict, column: str, words: str
) -> None:
    mapping = write_site(tmp_path, [SITE_ROW, SITE_ROW, {**SITE_ROW, **change}])
    with pytest.raises(DataValidationError) as caught:
        load_node(mapping, "ward-a", split_seed=1)
    assert (caught.value.row, caught.value.column) == (3, column)
    assert words in str(caught.value)


def test_outcome_column_is_never_read_as_a_feature(tmp_path: Path) -> None:
    """A hospital's file with a ``length_of_stay`` column that is the outcome: the schema
    feature of that name must not pick it up (that would put the outcome among the features)."""
    mapping_text = SITE_MAPPING.replace(
        "[nodes.ward-a]\n",
        '[nodes.ward-a]\nrole = "hospital"\nlacks = '
        '["age", "sex", "region", "diagnosis_group", "comorbidity_index", "payer", '
        '"admission_type", "prior_admissions_12m", "ed_visits_12m", '
        '"discharge_disposition", "num_medications", "num_procedures", "icu_stay", '
        '"abnormal_labs"]\n',
    )
    rows = [
        {k: v for k, v in SITE_ROW.items() if k not in ("sex", "region")} | {"length_of_stay": str(3 + i)}
        for i in range(6)
    ]
    mapping = write_site(tmp_path, rows, mapping_text)
    node = load_node(mapping, "ward-a", split_seed=1)
    assert "length_of_stay" not in node.train.columns
    assert sorted(pd.concat([node.train, node.test])["total_cost"]) == [3, 4, 5, 6, 7, 8]


PAID_MAPPING = MAPPING.replace('cost_eur = "total_cost"', 'cost_eur = "total_cost"\npaid_eur = "payment"')
BAD_PAYMENTS = {
    "negative payment": (rows_with(paid_eur="-120.50"), 3, "below the minimum 0 for payment"),
    "payment that is not a number": (rows_with(paid_eur="4k"), 3, "not a number"),
    "payment column mapped but absent": (without("paid_eur"), None, "missing required column"),
}


@pytest.mark.parametrize("case", BAD_PAYMENTS, ids=list(BAD_PAYMENTS))
def test_bad_payment_is_refused_naming_file_row_and_column(tmp_path: Path, case: str) -> None:
    rows, row, words = BAD_PAYMENTS[case]
    if case != "payment column mapped but absent":
        rows = [{**r, "paid_eur": r.get("paid_eur", "4000")} for r in rows]
    mapping = write_case(tmp_path, rows, PAID_MAPPING)
    with pytest.raises(DataValidationError) as caught:
        load_node(mapping, "pharmacy-north", split_seed=1)
    error = caught.value
    assert error.path.endswith("pharmacy.csv") and error.row == row and error.column == "paid_eur"
    assert words in str(error)


def test_payment_is_read_but_never_a_feature(tmp_path: Path) -> None:
    """A mapped payment is read and validated; a node without one has it missing; it is no
    feature column (a payment set per group would leak cost into the cost model)."""
    rows = [dict(GOOD_ROW, paid_eur=str(1000 + i)) for i in range(5)]
    mapping = write_case(tmp_path, rows, PAID_MAPPING)
    node = load_node(mapping, "pharmacy-north", split_seed=1)
    assert sorted(pd.concat([node.train, node.test])["payment"]) == [1000.0 + i for i in range(5)]
    assert "payment" not in {column.name for column in mapping.feature_columns}
    unpaid = load_node(write_case(tmp_path, [dict(GOOD_ROW)] * 5), "pharmacy-north", split_seed=1)
    assert unpaid.train["payment"].isna().all()


def test_payment_cannot_be_declared_a_feature(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="accounting column"):
        write_case(tmp_path, None, MAPPING.replace('numeric = ["bmi"]', 'numeric = ["bmi", "payment"]'))


def test_every_mistake_of_a_mapping_is_reported_together(tmp_path: Path) -> None:
    """One read names them all, each node on its own, so a user fixes the file in one go."""
    text = (
        MAPPING.replace('gender = "sex"', 'gender = "gender_code"')
        .replace('M = "male"', 'M = "man"')
        .replace('role = "pharma"', 'role = "pharmacy"')
        + '\n[nodes.st-mary]\nfile = "h.csv"\ncolour = "red"\n[nodes.st-john]\n'
    )
    (tmp_path / "mapping.toml").write_text(text)
    with pytest.raises(MappingError) as caught:
        DataMapping.load(tmp_path / "mapping.toml")
    assert [error.field for error in caught.value.errors] == [
        "columns.gender",
        "nodes.pharmacy-north.role",
        "nodes.st-mary.colour",
        "nodes.st-john",
        "values.sex.M",
    ]
    assert all(str(error) in str(caught.value) for error in caught.value.errors)
