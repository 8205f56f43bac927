"""OMOP CDM input: a small extract built in code, with known stays, readmissions at 29
and 31 days, censoring and costs, gives exactly the expected schema rows; a mapping node
with ``omop = "folder"`` reads it through the loader; the shipped example runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcost import schema
from fedcost.data.files import write_node_files
from fedcost.data.loader import load_node, load_omop_rows, load_rows
from fedcost.data.mapping import DataMapping
from fedcost.data.omop import read_omop
from fedcost.errors import ConfigError, DataValidationError, MappingError
from simulations import fedcost

IP, ED, OP, ER_IP = 9201, 9203, 9202, 262
PAYERS = {1001: "medicare", 1002: "commercial"}


def _tables() -> dict[str, pd.DataFrame]:
    person = pd.DataFrame(
        {
            "person_id": [1, 2, 3, 4],
            "gender_concept_id": [8507, 8532, 0, 8507],
            "year_of_birth": [1950, 1940, 1960, 1970],
        }
    )
    visits = [
        # id, person, concept, start, end, discharged_to, admitted_from
        (101, 1, IP, "2021-01-01", "2021-01-05", 8536, 8870),  # index; ER admission
        (104, 1, OP, "2021-01-08", "2021-01-08", None, None),  # follow-up 3 days after discharge
        (102, 1, ED, "2021-01-20", "2021-01-20", None, None),  # ED visit in the window
        (103, 1, IP, "2021-02-03", "2021-02-06", 8536, None),  # 29 days after discharge: readmission
        (202, 2, ED, "2020-01-15", "2020-01-15", None, None),  # more than 12 months before
        (201, 2, ED, "2020-06-01", "2020-06-01", None, None),
        (203, 2, IP, "2021-03-01", "2021-03-04", 8863, None),  # index, not readmitted
        (204, 2, IP, "2021-04-04", "2021-04-10", 4021968, None),  # 31 days after discharge: its own index stay
        (205, 2, OP, "2021-05-01", "2021-05-01", None, None),  # in 204's window, not a 7-day follow-up
        (303, 3, ER_IP, "2021-06-01", "2021-06-03", None, None),  # index via the ER
        (301, 3, ER_IP, "2021-12-10", "2021-12-20", 8536, None),  # window runs past the data's end
        (302, 3, OP, "2021-12-31", "2021-12-31", None, None),  # the data's last day
        (401, 4, IP, "2021-05-01", "2021-05-02", 8536, None),  # no cost row
        (402, 4, ED, "2021-08-01", "2021-08-01", None, None),  # ED visit ending on the day of admission
        (403, 4, IP, "2021-08-01", "2021-08-01", 8536, None),  # same-day stay
    ]
    visit_occurrence = pd.DataFrame(
        visits,
        columns=[
            "visit_occurrence_id",
            "person_id",
            "visit_concept_id",
            "visit_start_date",
            "visit_end_date",
            "discharged_to_concept_id",
            "admitted_from_concept_id",
        ],
    ).astype({"discharged_to_concept_id": "Int64", "admitted_from_concept_id": "Int64"})
    cost = pd.DataFrame(
        [
            (1, 101, "Visit", 10000.0),
            (2, 104, "Visit", 150.0),
            (3, 102, "Visit", 800.0),
            (4, 103, "Visit", 5000.0),
            (5, 103, "Visit", 250.0),
            (6, 103, "Drug", 999.0),  # not a visit cost: ignored
            (7, 201, "Visit", 300.0),
            (8, 203, "Visit", 7000.0),
            (9, 204, "Visit", 9000.0),
            (10, 205, "Visit", 100.0),
            (11, 303, "Visit", 4000.0),
            (12, 301, "Visit", 20000.0),
            (13, 302, "Visit", 50.0),
            (14, 403, "Visit", 3000.0),
            (15, 402, "Visit", None),  # no amount recorded
        ],
        columns=["cost_id", "cost_event_id", "cost_domain_id", "total_cost"],
    )
    condition_occurrence = pd.DataFrame(
        [
            (1, 1, 201826, 101, None),  # diabetes, listed first but not principal
            (2, 1, 316139, 101, 32902),  # heart failure, the primary diagnosis
            (3, 2, 255573, 203, None),  # COPD, the stay's only condition
            (4, 2, 999999, 204, None),  # unmapped concept: other
            (5, 4, 132797, 403, None),
        ],
        columns=[
            "condition_occurrence_id",
            "person_id",
            "condition_concept_id",
            "visit_occurrence_id",
            "condition_status_concept_id",
        ],
    ).astype({"condition_status_concept_id": "Int64"})
    drug_exposure = pd.DataFrame(
        [(1, 1, 11, "2021-01-02"), (2, 1, 12, "2021-01-03"), (3, 1, 11, "2021-01-04"), (4, 1, 13, "2021-01-10")],
        columns=["drug_exposure_id", "person_id", "drug_concept_id", "drug_exposure_start_date"],
    )
    payer_plan_period = pd.DataFrame(
        [
            (1, 1, "2020-01-01", "2021-12-31", 1001),
            (2, 4, "2021-01-01", "2021-12-31", 1002),
            (3, 4, "2021-07-01", "2021-12-31", 1001),
        ],
        columns=[
            "payer_plan_period_id",
            "person_id",
            "payer_plan_period_start_date",
            "payer_plan_period_end_date",
            "payer_concept_id",
        ],
    )
    return {
        "person": person,
        "visit_occurrence": visit_occurrence,
        "cost": cost,
        "condition_occurrence": condition_occurrence,
        "drug_exposure": drug_exposure,
        "payer_plan_period": payer_plan_period,
    }


def _write(folder: Path, tables: dict[str, pd.DataFrame], parquet: tuple[str, ...] = ("cost", "drug_exposure")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        if name in parquet:
            frame.to_parquet(folder / f"{name}.parquet", index=False)
        else:
            frame.to_csv(folder / f"{name}.csv", index=False)
    return folder


@pytest.fixture()
def extract_folder(tmp_path: Path) -> Path:
    return _write(tmp_path / "omop", _tables())


def test_index_stays_readmissions_and_episode_costs(extract_folder: Path) -> None:
    extract = read_omop(extract_folder, payer_concepts=PAYERS)
    rows = extract.rows.set_index(pd.Index(extract.visit_occurrence_ids, name="stay"))
    assert list(rows.index) == [101, 203, 204, 303, 403]
    assert (extract.readmission_stays, extract.censored, extract.uncosted) == (1, 1, 1)
    assert extract.data_end == pd.Timestamp("2021-12-31")
    assert rows[schema.READMISSION].to_dict() == {101: 1.0, 203: 0.0, 204: 0.0, 303: 0.0, 403: 0.0}
    assert rows[schema.COST].to_dict() == {
        101: 10000 + 150 + 800 + 5000 + 250,  # index + follow-up + ED + readmission (the Drug row is not added)
        203: 7000.0,  # the 31-day stay belongs to its own episode
        204: 9000 + 100,
        303: 4000.0,
        403: 3000.0,  # the ED visit before admission is not in the episode
    }
    assert list(rows.columns) == [c.name for c in schema.FEATURES] + [schema.READMISSION, schema.COST]


def test_features_derived_from_the_tables(extract_folder: Path) -> None:
    extract = read_omop(extract_folder, payer_concepts=PAYERS)
    rows = extract.rows.set_index(pd.Index(extract.visit_occurrence_ids, name="stay"))
    assert rows["age"].to_dict() == {101: 71, 203: 81, 204: 81, 303: 61, 403: 51}
    assert rows["sex"].to_dict() == {101: "male", 203: "female", 204: "female", 303: None, 403: "male"}
    assert rows["length_of_stay"].to_dict() == {101: 4, 203: 3, 204: 6, 303: 2, 403: 0}
    assert rows["prior_admissions_12m"].to_dict() == {101: 0, 203: 0, 204: 1, 303: 0, 403: 1}
    assert rows["ed_visits_12m"].to_dict() == {101: 0, 203: 1, 204: 1, 303: 0, 403: 0}
    assert rows["admission_type"].to_dict() == {
        101: "emergency",
        203: None,
        204: None,
        303: "emergency",
        403: "emergency",
    }
    assert rows["discharge_disposition"].to_dict() == {
        101: "home",
        203: "skilled_nursing",
        204: "against_advice",
        303: None,
        403: "home",
    }
    assert rows["diagnosis_group"].to_dict() == {
        101: "heart_failure",
        203: "copd",
        204: "other",
        303: None,
        403: "sepsis",
    }
    assert rows["num_medications"].to_dict() == {101: 2, 203: 0, 204: 0, 303: 0, 403: 0}
    assert rows["follow_up_7d"].to_dict() == {101: 1, 203: 0, 204: 0, 303: 0, 403: 0}
    assert rows["payer"].to_dict() == {101: "medicare", 203: None, 204: None, 303: None, 403: "medicare"}
    for missing in (
        "region",
        "comorbidity_index",
        "icu_stay",
        "num_procedures",
        "abnormal_labs",
        "medication_adherence",
    ):
        assert rows[missing].isna().all(), f"{missing} is not in the tables, so it stays missing"


def test_optional_tables_leave_their_columns_missing(tmp_path: Path) -> None:
    tables = {name: frame for name, frame in _tables().items() if name in ("person", "visit_occurrence", "cost")}
    extract = read_omop(_write(tmp_path / "minimal", tables), payer_concepts=PAYERS)
    assert len(extract.rows) == 5
    for column in ("diagnosis_group", "num_medications", "payer"):
        assert extract.rows[column].isna().all()


def _fault(tmp_path: Path, table: str, row: int, column: str, value: object) -> DataValidationError:
    tables = _tables()
    tables[table] = tables[table].astype(object)
    tables[table].loc[row - 1, column] = value
    with pytest.raises(DataValidationError) as caught:
        read_omop(_write(tmp_path / "bad", tables, parquet=()))
    return caught.value


@pytest.mark.parametrize(
    ("table", "row", "column", "value", "message"),
    [
        ("visit_occurrence", 4, "visit_end_date", "2021-01-01", "ends before it starts"),
        ("visit_occurrence", 2, "visit_start_date", "next tuesday", "not a date"),
        ("visit_occurrence", 3, "person_id", "abc", "not a whole number"),
        ("visit_occurrence", 5, "person_id", 99, "not in the person table"),
        ("person", 2, "year_of_birth", 1850, "age of 171"),
        ("cost", 3, "total_cost", -5, "not a non-negative amount"),
        ("visit_occurrence", 7, "visit_occurrence_id", 101, "appears more than once"),
    ],
)
def test_bad_cells_are_refused_naming_file_row_and_column(
    tmp_path: Path, table: str, row: int, column: str, value: object, message: str
) -> None:
    error = _fault(tmp_path, table, row, column, value)
    assert Path(error.path).name == f"{table}.csv"
    assert (error.row, error.column) == (row, column)
    assert message in str(error)


def test_missing_tables_and_columns_are_named(tmp_path: Path) -> None:
    tables = _tables()
    del tables["cost"]
    with pytest.raises(DataValidationError, match="the OMOP cost table is required"):
        read_omop(_write(tmp_path / "no_cost", tables))
    tables = _tables()
    tables["visit_occurrence"] = tables["visit_occurrence"].drop(columns="visit_end_date")
    with pytest.raises(DataValidationError, match="missing column 'visit_end_date'") as caught:
        read_omop(_write(tmp_path / "no_end", tables))
    assert caught.value.column == "visit_end_date"
    with pytest.raises(ConfigError, match="cost_column"):
        read_omop(tmp_path / "no_end", cost_column="charges")
    with pytest.raises(ConfigError, match="not one of"):
        read_omop(tmp_path / "no_end", payer_concepts={1: "private"})


def test_rows_pass_the_schema_bounds(extract_folder: Path) -> None:
    rows = read_omop(extract_folder, payer_concepts=PAYERS).rows
    for column in schema.FEATURES + schema.TARGETS:
        values = rows[column.name]
        present = values.dropna()
        if column.kind == "categorical":
            assert present.isin(column.levels).all(), column.name
        else:
            assert (present >= column.minimum).all() and (
                column.maximum is None or (present <= column.maximum).all()
            ), column.name
            assert values.dtype == np.float64, column.name


def test_rows_load_through_the_node_loader(extract_folder: Path, tmp_path: Path) -> None:
    rows = read_omop(extract_folder, payer_concepts=PAYERS).rows
    mapping = DataMapping.load(write_node_files([("hospital-omop", "hospital", rows)], tmp_path / "node"))
    loaded = load_rows(mapping, mapping.node("hospital-omop"), mapping.node("hospital-omop").file)
    same = loaded[rows.columns].astype(object).where(loaded[rows.columns].notna(), None)
    pd.testing.assert_frame_equal(same, rows.astype(object).where(rows.notna(), None))


# --- an OMOP node in the mapping file ---------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "omop"
OMOP_MAPPING = """
[targets.readmitted_30d]
[targets.total_cost]

[omop]
payer_concepts = { 1001 = "medicare", 1002 = "commercial" }

[nodes.st-omop]
omop = "omop"
"""


def _mapping(folder: Path, text: str = OMOP_MAPPING) -> DataMapping:
    path = folder / "mapping.toml"
    path.write_text(text)
    return DataMapping.load(path)


def _none_for_missing(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype(object).where(frame.notna(), None)


def test_an_omop_node_in_the_mapping_loads_the_rows_read_omop_gives(extract_folder: Path) -> None:
    mapping = _mapping(extract_folder.parent)
    node = mapping.node("st-omop")
    assert node.role == "hospital" and node.file is None and node.omop is not None
    assert node.omop.payer_concepts == PAYERS and node.omop.cost_column == "total_cost"
    expected = read_omop(extract_folder, payer_concepts=PAYERS).rows
    loaded = load_node(mapping, "st-omop", split_seed=3, test_fraction=0.4)
    both = pd.concat([loaded.train, loaded.test])
    assert len(loaded.test) == 2 and len(both) == len(expected)
    key = ["age", "length_of_stay"]
    got = _none_for_missing(both[expected.columns].sort_values(key).reset_index(drop=True))
    pd.testing.assert_frame_equal(got, _none_for_missing(expected.sort_values(key).reset_index(drop=True)))


def test_a_node_may_choose_its_own_cost_column_and_role(extract_folder: Path) -> None:
    tables = _tables()
    tables["cost"]["total_paid"] = tables["cost"]["total_cost"] / 2
    _write(extract_folder, tables)
    text = OMOP_MAPPING + 'cost_column = "total_paid"\nrole = "insurer"\n'
    mapping = _mapping(extract_folder.parent, text)
    assert mapping.node("st-omop").role == "insurer"
    rows = load_omop_rows(mapping, mapping.node("st-omop"), mapping.node("st-omop").omop)[0]
    assert rows[schema.COST].tolist() == (read_omop(extract_folder).rows[schema.COST] / 2).tolist()


def test_a_bad_omop_cell_is_refused_naming_the_table_file_row_and_column(tmp_path: Path) -> None:
    tables = _tables()
    tables["cost"] = tables["cost"].astype(object)
    tables["cost"].loc[3, "total_cost"] = "lots"
    extract_folder = _write(tmp_path / "omop", tables, parquet=())
    mapping = _mapping(tmp_path)
    with pytest.raises(DataValidationError) as caught:
        load_node(mapping, "st-omop", split_seed=3)
    assert Path(caught.value.path) == extract_folder / "cost.csv"
    assert (caught.value.row, caught.value.column) == (4, "total_cost")


def test_a_derived_value_out_of_bounds_is_named_at_its_stays_visit_row(extract_folder: Path) -> None:
    tables = _tables()
    many = pd.DataFrame(
        {
            "drug_exposure_id": range(100, 201),
            "person_id": 2,
            "drug_concept_id": range(5000, 5101),
            "drug_exposure_start_date": "2021-03-02",
        }
    )
    tables["drug_exposure"] = pd.concat([tables["drug_exposure"], many])
    _write(extract_folder, tables)
    mapping = _mapping(extract_folder.parent)
    with pytest.raises(DataValidationError, match="index stay 203, num_medications") as caught:
        load_node(mapping, "st-omop", split_seed=3)
    assert Path(caught.value.path) == extract_folder / "visit_occurrence.csv"
    assert (caught.value.row, caught.value.column) == (7, "num_medications")  # stay 203 is the 7th visit row
    assert "above the maximum 100" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        (OMOP_MAPPING + 'file = "a.csv"\n', "nodes.st-omop", "one of the two"),
        (OMOP_MAPPING.replace('omop = "omop"', 'role = "hospital"'), "nodes.st-omop", "one of the two"),
        (OMOP_MAPPING + 'cost_column = "charges"\n', "nodes.st-omop.cost_column", "total_cost, total_charge"),
        (OMOP_MAPPING.replace('"commercial"', '"private"'), "omop.payer_concepts.1002", "not one of"),
        (OMOP_MAPPING.replace("1001 =", "medicare ="), "omop.payer_concepts.medicare", "whole number"),
        (OMOP_MAPPING + 'test_file = "t.csv"\n', "nodes.st-omop.test_file", "leave test_file out"),
        (OMOP_MAPPING + 'columns = { age_years = "age" }\n', "nodes.st-omop.columns", "leave [columns] out"),
        (
            OMOP_MAPPING.replace("[targets.readmitted_30d]", '[targets.died]\nkind = "binary"'),
            "nodes.st-omop.omop",
            "not 'died'",
        ),
        (
            OMOP_MAPPING.replace('omop = "omop"', 'file = "a.csv"\ncost_column = "total_paid"'),
            "nodes.st-omop.cost_column",
            "option of an OMOP node",
        ),
        (OMOP_MAPPING + '[features]\nnumeric = ["lactate"]\n', "nodes.st-omop.lacks", "'lactate'"),
        (
            OMOP_MAPPING.replace("[omop]", "[omop]\ndata_end = 2021-12-31"),
            "omop.data_end",
            "unknown key; allowed: cost_column",
        ),
    ],
)
def test_mapping_mistakes_about_an_omop_node_name_the_field(
    tmp_path: Path, text: str, field: str, message: str
) -> None:
    with pytest.raises(MappingError) as caught:
        _mapping(tmp_path, text)
    assert caught.value.field == field
    assert message in str(caught.value)


def test_the_shipped_omop_example_loads_enough_stays_at_every_site() -> None:
    mapping = DataMapping.load(EXAMPLE / "mapping.toml")
    assert [node.name for node in mapping.nodes] == ["riverside", "hillcrest", "lakeside"]
    for node in mapping.nodes:
        data = load_node(mapping, node.name, split_seed=7)
        assert node.role == "hospital" and len(data.test) >= 11, node.name
        assert set(data.train["payer"].dropna()) <= set(schema.COLUMNS["payer"].levels)
        assert data.train[schema.READMISSION].sum() >= 11, "enough readmissions for a min_cohort of 11"
    assert mapping.node("lakeside").omop.cost_column == "total_paid"


@pytest.mark.slow
def test_simulate_runs_a_federation_on_the_shipped_omop_example(tmp_path: Path) -> None:
    result = fedcost("simulate", "--data-dir", str(EXAMPLE), "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [(node["name"], node["role"]) for node in summary["nodes"]] == [
        ("riverside", "hospital"),
        ("hillcrest", "hospital"),
        ("lakeside", "hospital"),
    ]
    assert summary["min_cohort"] == 11
    for task, metric in (("readmission", "auroc"), ("cost", "r2")):
        assert summary[task]["federated"][metric] == pytest.approx(summary[task]["pooled"][metric], abs=1e-9)
