"""OMOP CDM tables into schema rows: one row per index stay, with 30-day readmission and
episode cost.

Reads ``person``, ``visit_occurrence`` and ``cost`` (required) and
``condition_occurrence``, ``drug_exposure``, ``payer_plan_period`` (optional: without
them the columns they feed are missing, imputed and flagged by the loader) from a folder
of ``<table>.csv`` or ``<table>.parquet`` files. Bad input is refused with the table file,
row (1-based, header not counted) and column named.

Rules
-----
- **Inpatient stays** are visits with ``visit_concept_id`` 9201 (inpatient) or 262
  (emergency room and inpatient); **ED visits** are 9203 and 262.
- **Episodes.** A person's inpatient stays are taken in order of admission. A stay that
  starts 0..30 days after the discharge of the current index stay is that stay's
  **readmission** and belongs to its episode; it is not an index stay itself. Any other
  stay opens a new episode as its index stay. So every stay and every cost falls in at
  most one episode and episode costs add up (CMS's hospital-wide measure lets a
  readmission be an index stay too, which would count its cost twice). Overlapping
  stays are not merged: merge transfers upstream.
- **Censoring.** An index stay whose 30-day window runs past the data's end (the latest
  visit date, or ``data_end``) is dropped with its episode, since a readmission could
  still follow; ``OmopExtract.censored`` counts them. Deaths are not read: a patient who
  dies after discharge counts as not readmitted.
- **Episode cost** = the index stay's cost + the cost of every other visit (any kind)
  starting 0..30 days after its discharge. A visit's cost is the sum of its ``cost``
  rows with ``cost_domain_id`` 'Visit' and ``cost_event_id`` = the visit id, in the
  chosen column (``total_cost`` by default; or ``total_charge``, ``total_paid``). An
  index stay with no cost is dropped (``OmopExtract.uncosted``); a follow-up visit
  with no cost adds nothing.
- **Scoring** (``outcomes=False``, for ``fedcost predict``): every index stay is kept,
  the censored and uncosted ones too (a stay discharged last week is what a site scores),
  and the rows carry no outcome columns.
- ``readmitted_30d``: 1 if the episode holds a readmission. ``length_of_stay``: discharge
  minus admission date, in days. ``age``: admission year minus ``year_of_birth``.
  ``prior_admissions_12m`` / ``ed_visits_12m``: inpatient stays / ED visits starting in
  the 365 days before admission. ``follow_up_7d``: an outpatient (9202) or office
  (581477) visit starting 1..7 days after discharge.
- ``admission_type`` is 'emergency' for visit 262, ``admitted_from_concept_id`` 8870
  (emergency room) or an ED visit ending on the day of admission; OMOP holds no marker
  for urgent or elective, so other stays leave it missing.
- ``discharge_disposition`` from ``discharged_to_concept_id`` (v5.3:
  ``discharge_to_concept_id``) by ``DISCHARGE_CONCEPTS``; others missing.
- ``diagnosis_group`` from the stay's principal condition: the one with
  ``condition_status_concept_id`` 32902 (primary diagnosis), else the stay's first
  condition row; mapped by ``DIAGNOSIS_CONCEPTS`` (SNOMED standard concepts; an unlisted
  concept is 'other' — roll descendants up with ``concept_ancestor`` upstream, or pass
  your own mapping); a stay with no condition row leaves it missing.
- ``num_medications``: distinct ``drug_concept_id`` with an exposure starting during the
  stay.
- ``payer`` from the ``payer_plan_period`` covering the admission date (the latest-starting
  one), mapped by ``payer_concepts``. Payer concept ids differ between vocabulary
  releases and sites, so there is no default: pass ``{payer_concept_id: payer}``;
  without one the payer is missing.
- Not in these tables, so missing: ``region``, ``comorbidity_index``, ``icu_stay``,
  ``num_procedures``, ``abnormal_labs``, ``medication_adherence``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedcost import schema
from fedcost.data.files import read_frame
from fedcost.data.mapping import OMOP_COST_COLUMNS as COST_COLUMNS
from fedcost.errors import ConfigError, DataValidationError

INPATIENT = (9201, 262)
EMERGENCY = (9203, 262)
OUTPATIENT = (9202, 581477)
EMERGENCY_ROOM_PLACE = 8870
PRIMARY_DIAGNOSIS = 32902
READMISSION_WINDOW_DAYS = 30
LOOKBACK_DAYS = 365

GENDER_CONCEPTS = {8507: "male", 8532: "female"}
DISCHARGE_CONCEPTS = {
    8536: "home",  # Home
    38004519: "home_health",  # Home Health Agency
    8863: "skilled_nursing",  # Skilled Nursing Facility
    8920: "rehab",  # Comprehensive Inpatient Rehabilitation Facility
    4021968: "against_advice",  # Patient self-discharge against medical advice
}
DIAGNOSIS_CONCEPTS = {
    316139: "heart_failure",  # Heart failure
    319835: "heart_failure",  # Congestive heart failure
    255573: "copd",  # Chronic obstructive lung disease
    255848: "pneumonia",  # Pneumonia
    4329847: "acute_mi",  # Myocardial infarction
    312327: "acute_mi",  # Acute myocardial infarction
    443454: "stroke",  # Cerebral infarction
    381316: "stroke",  # Cerebrovascular accident
    201826: "diabetes",  # Type 2 diabetes mellitus
    201254: "diabetes",  # Type 1 diabetes mellitus
    132797: "sepsis",  # Sepsis
    197320: "renal_failure",  # Acute renal failure syndrome
    46271022: "renal_failure",  # Chronic kidney disease
    80180: "hip_knee_replacement",  # Osteoarthritis: an inpatient stay for it is a joint replacement
}

_FORMATS = (".csv", ".parquet")


@dataclass(frozen=True)
class OmopExtract:
    """Schema rows (features, and both targets unless read for scoring) with what was
    left out and why.

    ``visit_occurrence_ids`` names each row's index stay for local checks, and
    ``visit_rows`` its row in ``visit_table`` (1-based, as errors name rows); identifiers
    never belong in anything a node shares.
    """

    rows: pd.DataFrame
    visit_occurrence_ids: tuple[int, ...]
    visit_table: Path
    visit_rows: tuple[int, ...]
    data_end: pd.Timestamp
    readmission_stays: int
    censored: int
    uncosted: int


@dataclass(frozen=True)
class _Table:
    path: Path
    frame: pd.DataFrame

    def fault(self, message: str, column: str, row: int | None = None) -> DataValidationError:
        return DataValidationError(message, path=str(self.path), row=None if row is None else row + 1, column=column)

    def require(self, *columns: str) -> None:
        for column in columns:
            if column not in self.frame.columns:
                raise DataValidationError(
                    f"missing column '{column}' of the OMOP {self.path.stem} table", path=str(self.path), column=column
                )

    def blank(self, column: str) -> np.ndarray:
        cells = self.frame[column]
        return (cells.isna() | (cells.astype(str).str.strip() == "")).to_numpy()

    def integers(self, column: str, *, required: bool = True) -> pd.Series:
        """Whole numbers: int64 when required, else float64 with NaN for empty cells."""
        blank = self.blank(column)
        if required and blank.any():
            raise self.fault("is empty; it must hold a whole number", column, int(np.flatnonzero(blank)[0]))
        values = pd.to_numeric(self.frame[column].where(~blank), errors="coerce")
        numbers = values.to_numpy(dtype="float64")
        bad = ~blank & ~(np.isfinite(numbers) & (numbers == np.round(numbers)))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise self.fault(f"value {self.frame[column].iloc[row]!r} is not a whole number", column, row)
        return values.astype("int64") if required else values.astype("float64")

    def dates(self, column: str) -> pd.Series:
        blank = self.blank(column)
        if blank.any():
            raise self.fault("is empty; it must hold a date", column, int(np.flatnonzero(blank)[0]))
        values = pd.to_datetime(self.frame[column].astype(str).str.strip().str[:10], errors="coerce", format="%Y-%m-%d")
        bad = values.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise self.fault(f"value {self.frame[column].iloc[row]!r} is not a date (YYYY-MM-DD)", column, row)
        return values

    def amounts(self, column: str) -> pd.Series:
        """Non-negative amounts; empty cells are NaN (no amount recorded)."""
        blank = self.blank(column)
        values = pd.to_numeric(self.frame[column].where(~blank), errors="coerce").astype("float64")
        bad = ~blank & ~(np.isfinite(values.to_numpy()) & (values.to_numpy() >= 0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise self.fault(f"value {self.frame[column].iloc[row]!r} is not a non-negative amount", column, row)
        return values

    def unique(self, ids: pd.Series, column: str) -> None:
        repeated = ids.duplicated().to_numpy()
        if repeated.any():
            row = int(np.flatnonzero(repeated)[0])
            raise self.fault(f"{column} {ids.iloc[row]} appears more than once", column, row)

    def known(self, ids: pd.Series, allowed: pd.Index, column: str, what: str) -> None:
        unknown = ~ids.isin(allowed).to_numpy()
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            raise self.fault(f"{column} {ids.iloc[row]} is not in the {what} table", column, row)


def _read_table(folder: Path, name: str, *, required: bool) -> _Table | None:
    found = [folder / f"{name}{suffix}" for suffix in _FORMATS if (folder / f"{name}{suffix}").is_file()]
    if not found:
        if required:
            raise DataValidationError(
                f"the OMOP {name} table is required; add {name}.csv or {name}.parquet", path=str(folder / f"{name}.csv")
            )
        return None
    if len(found) > 1:
        raise DataValidationError(f"both {found[0].name} and {found[1].name} exist; keep one", path=str(found[0]))
    path = found[0]
    frame = read_frame(path)
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    return _Table(path, frame)


def _first_present(table: _Table, *names: str) -> str | None:
    return next((name for name in names if name in table.frame.columns), None)


def _persons(table: _Table) -> pd.DataFrame:
    table.require("person_id", "gender_concept_id", "year_of_birth")
    ids = table.integers("person_id")
    table.unique(ids, "person_id")
    return pd.DataFrame(
        {
            "gender": table.integers("gender_concept_id", required=False).to_numpy(),
            "year_of_birth": table.integers("year_of_birth").to_numpy(),
            "row": np.arange(len(ids)),
        },
        index=pd.Index(ids.to_numpy(), name="person_id"),
    )


def _visits(table: _Table, persons: pd.DataFrame) -> pd.DataFrame:
    table.require("visit_occurrence_id", "person_id", "visit_concept_id", "visit_start_date", "visit_end_date")
    ids = table.integers("visit_occurrence_id")
    table.unique(ids, "visit_occurrence_id")
    person = table.integers("person_id")
    table.known(person, persons.index, "person_id", "person")
    start, end = table.dates("visit_start_date"), table.dates("visit_end_date")
    backwards = (end < start).to_numpy()
    if backwards.any():
        raise table.fault("the visit ends before it starts", "visit_end_date", int(np.flatnonzero(backwards)[0]))
    discharged = _first_present(table, "discharged_to_concept_id", "discharge_to_concept_id")
    admitted = _first_present(table, "admitted_from_concept_id", "admitting_source_concept_id")
    nothing = pd.Series(np.nan, index=table.frame.index)
    return pd.DataFrame(
        {
            "visit_id": ids,
            "person_id": person,
            "concept": table.integers("visit_concept_id"),
            "start": start,
            "end": end,
            "discharged_to": table.integers(discharged, required=False) if discharged else nothing,
            "admitted_from": table.integers(admitted, required=False) if admitted else nothing,
            "row": np.arange(len(ids)),
        }
    )


def _visit_costs(table: _Table, cost_column: str) -> pd.Series:
    """Cost per visit id, over visits with at least one recorded amount."""
    table.require("cost_event_id", "cost_domain_id", cost_column)
    event = table.integers("cost_event_id")
    amount = table.amounts(cost_column)
    is_visit = table.frame["cost_domain_id"].astype(str).str.strip().str.lower() == "visit"
    keep = is_visit & amount.notna()
    return amount[keep].groupby(event[keep]).sum()


def _episodes(inpatient: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Which inpatient stays (sorted by person and admission) are index stays, and which
    index stays were readmitted."""
    is_index = np.zeros(len(inpatient), dtype=bool)
    readmitted = np.zeros(len(inpatient), dtype=bool)
    current, person_of, discharge = -1, None, None
    for i, (person, start, end) in enumerate(zip(inpatient["person_id"], inpatient["start"], inpatient["end"])):
        if person == person_of and 0 <= (start - discharge).days <= READMISSION_WINDOW_DAYS:
            readmitted[current] = True
        else:
            is_index[i], current, person_of, discharge = True, i, person, end
    return is_index, readmitted


def _index_stays(
    visits: pd.DataFrame, visit_cost: pd.Series, end_of_data: pd.Timestamp, *, outcomes: bool
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The index stays kept, with their readmission flag, and how many stays were
    readmissions, censored or uncosted (dropped only when their outcomes are read)."""
    inpatient = visits[visits["concept"].isin(INPATIENT)].sort_values(["person_id", "start", "visit_id"])
    inpatient = inpatient.reset_index(drop=True)
    is_index, readmitted = _episodes(inpatient)
    stays = inpatient[is_index].assign(readmitted=readmitted[is_index]).reset_index(drop=True)
    censored = (stays["end"] + pd.Timedelta(days=READMISSION_WINDOW_DAYS) > end_of_data).to_numpy()
    uncosted = ~censored & ~stays["visit_id"].isin(visit_cost.index).to_numpy()
    counts = {
        "readmission_stays": int((~is_index).sum()),
        "censored": int(censored.sum()),
        "uncosted": int(uncosted.sum()),
    }
    if not outcomes:
        return stays, counts
    return stays[~censored & ~uncosted].reset_index(drop=True), counts


def _history(stays: pd.DataFrame, visits: pd.DataFrame, visit_cost: pd.Series) -> dict[str, np.ndarray]:
    """Per index stay, what the person's other visits say: prior use, follow-up, window cost."""
    other = visits[["visit_id", "person_id", "concept", "start", "end"]]
    other = other.rename(columns=lambda c: c if c == "person_id" else f"other_{c}")
    pairs = stays[["visit_id", "person_id", "start", "end"]].merge(other, on="person_id")
    pairs = pairs[pairs["other_visit_id"] != pairs["visit_id"]]
    days_before = (pairs["start"] - pairs["other_start"]).dt.days
    days_after = (pairs["other_start"] - pairs["end"]).dt.days
    in_year = (days_before > 0) & (days_before <= LOOKBACK_DAYS)
    in_window = (days_after >= 0) & (days_after <= READMISSION_WINDOW_DAYS)
    concept = pairs["other_concept"]

    def per_stay(values: pd.Series) -> np.ndarray:
        return stays["visit_id"].map(values.groupby(pairs["visit_id"]).sum()).fillna(0).to_numpy(dtype="float64")

    return {
        "prior_admissions_12m": per_stay(in_year & concept.isin(INPATIENT)),
        "ed_visits_12m": per_stay(in_year & concept.isin(EMERGENCY)),
        "follow_up_7d": (per_stay((days_after >= 1) & (days_after <= 7) & concept.isin(OUTPATIENT)) > 0).astype(
            "float64"
        ),
        "ed_on_admission": per_stay((concept == 9203) & (pairs["other_end"] == pairs["start"])) > 0,
        "window_cost": per_stay(pairs["other_visit_id"].map(visit_cost).fillna(0.0).where(in_window, 0.0)),
    }


def _principal_conditions(table: _Table) -> pd.Series:
    """The principal condition concept per visit id."""
    table.require("condition_concept_id", "visit_occurrence_id")
    visit = table.integers("visit_occurrence_id", required=False)
    status = _first_present(table, "condition_status_concept_id")
    frame = pd.DataFrame(
        {
            "visit": visit,
            "concept": table.integers("condition_concept_id"),
            "secondary": table.integers(status, required=False) != PRIMARY_DIAGNOSIS if status else True,
            "order": np.arange(len(visit)),
        }
    )
    frame = frame[frame["visit"].notna()].sort_values(["visit", "secondary", "order"]).drop_duplicates("visit")
    return pd.Series(frame["concept"].to_numpy(), index=frame["visit"].astype("int64").to_numpy())


def _medications(table: _Table, stays: pd.DataFrame) -> np.ndarray:
    table.require("person_id", "drug_concept_id", "drug_exposure_start_date")
    drugs = pd.DataFrame(
        {
            "person_id": table.integers("person_id"),
            "drug": table.integers("drug_concept_id"),
            "date": table.dates("drug_exposure_start_date"),
        }
    )
    pairs = stays[["visit_id", "person_id", "start", "end"]].merge(drugs, on="person_id")
    during = pairs[(pairs["date"] >= pairs["start"]) & (pairs["date"] <= pairs["end"])]
    return stays["visit_id"].map(during.groupby("visit_id")["drug"].nunique()).fillna(0).to_numpy(dtype="float64")


def _payer_concepts(table: _Table, stays: pd.DataFrame) -> pd.Series:
    """The payer concept per index stay id, from the latest-starting plan covering admission."""
    table.require("person_id", "payer_plan_period_start_date", "payer_plan_period_end_date", "payer_concept_id")
    plans = pd.DataFrame(
        {
            "person_id": table.integers("person_id"),
            "from": table.dates("payer_plan_period_start_date"),
            "to": table.dates("payer_plan_period_end_date"),
            "payer": table.integers("payer_concept_id", required=False),
        }
    )
    pairs = stays[["visit_id", "person_id", "start"]].merge(plans, on="person_id")
    covering = pairs[(pairs["from"] <= pairs["start"]) & (pairs["start"] <= pairs["to"])]
    return covering.sort_values("from").drop_duplicates("visit_id", keep="last").set_index("visit_id")["payer"]


def _levels(concepts: pd.Series | np.ndarray, mapping: Mapping[int, str], unmapped: str | None = None) -> np.ndarray:
    """Schema levels for concept ids, None where there is no concept (the loader's missing)."""
    return np.array([None if pd.isna(c) else mapping.get(int(c), unmapped) for c in concepts], dtype=object)


def read_omop(
    folder: Path,
    *,
    cost_column: str = "total_cost",
    payer_concepts: Mapping[int, str] | None = None,
    diagnosis_concepts: Mapping[int, str] = DIAGNOSIS_CONCEPTS,
    data_end: pd.Timestamp | None = None,
    outcomes: bool = True,
) -> OmopExtract:
    """Index stays from the OMOP tables in ``folder``, in schema columns (see module rules);
    ``outcomes=False`` reads them for scoring."""
    if cost_column not in COST_COLUMNS:
        raise ConfigError(f"must be one of {', '.join(COST_COLUMNS)}, not '{cost_column}'", field="cost_column")
    for mapping, field in ((payer_concepts or {}, "payer"), (diagnosis_concepts, "diagnosis_group")):
        levels = schema.COLUMNS[field].levels
        for concept, level in mapping.items():
            if level not in levels:
                raise ConfigError(
                    f"concept {concept} maps to '{level}', not one of {', '.join(levels)}", field=f"{field} concepts"
                )
    folder = Path(folder)
    person_table = _read_table(folder, "person", required=True)
    visit_table = _read_table(folder, "visit_occurrence", required=True)
    persons = _persons(person_table)
    visits = _visits(visit_table, persons)
    visit_cost = _visit_costs(_read_table(folder, "cost", required=True), cost_column)
    end_of_data = pd.Timestamp(data_end) if data_end is not None else max(visits["end"].max(), visits["start"].max())

    stays, counts = _index_stays(visits, visit_cost, end_of_data, outcomes=outcomes)
    person = persons.loc[stays["person_id"]]
    age = (stays["start"].dt.year - person["year_of_birth"].to_numpy()).to_numpy(dtype="float64")
    bad = (age < 0) | (age > schema.COLUMNS["age"].maximum)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        message = f"gives an age of {age[i]:g} at admission on {stays['start'][i]:%Y-%m-%d}"
        raise person_table.fault(message, "year_of_birth", int(person["row"].iloc[i]))
    length_of_stay = (stays["end"] - stays["start"]).dt.days.to_numpy(dtype="float64")
    bad = length_of_stay > schema.COLUMNS["length_of_stay"].maximum
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        message = f"the stay lasts {length_of_stay[i]:g} days, above the schema's maximum"
        raise visit_table.fault(message, "visit_end_date", int(stays["row"][i]))

    history = _history(stays, visits, visit_cost)
    emergency = (
        stays["concept"].eq(262).to_numpy()
        | stays["admitted_from"].eq(EMERGENCY_ROOM_PLACE).to_numpy()
        | history["ed_on_admission"]
    )
    n = len(stays)
    columns: dict[str, np.ndarray] = {
        c.name: np.full(n, np.nan) if c.kind == "numeric" else np.full(n, None, dtype=object) for c in schema.FEATURES
    }
    columns |= {
        "age": age,
        "sex": _levels(person["gender"], GENDER_CONCEPTS),
        "admission_type": np.where(emergency, "emergency", None).astype(object),
        "prior_admissions_12m": history["prior_admissions_12m"],
        "ed_visits_12m": history["ed_visits_12m"],
        "length_of_stay": length_of_stay,
        "discharge_disposition": _levels(stays["discharged_to"], DISCHARGE_CONCEPTS),
        "follow_up_7d": history["follow_up_7d"],
    }
    condition_table = _read_table(folder, "condition_occurrence", required=False)
    if condition_table is not None:
        principal = stays["visit_id"].map(_principal_conditions(condition_table))
        columns["diagnosis_group"] = _levels(principal, diagnosis_concepts, unmapped="other")
    drug_table = _read_table(folder, "drug_exposure", required=False)
    if drug_table is not None:
        columns["num_medications"] = _medications(drug_table, stays)
    plan_table = _read_table(folder, "payer_plan_period", required=False)
    if plan_table is not None and payer_concepts:
        columns["payer"] = _levels(stays["visit_id"].map(_payer_concepts(plan_table, stays)), payer_concepts)
    if outcomes:
        columns[schema.READMISSION] = stays["readmitted"].to_numpy(dtype="float64")
        columns[schema.COST] = stays["visit_id"].map(visit_cost).to_numpy(dtype="float64") + history["window_cost"]
    return OmopExtract(
        rows=pd.DataFrame(
            {name: pd.Series(values, dtype=values.dtype) for name, values in columns.items()}
        ),  # keeps None
        visit_occurrence_ids=tuple(int(v) for v in stays["visit_id"]),
        visit_table=visit_table.path,
        visit_rows=tuple(int(r) + 1 for r in stays["row"]),
        data_end=end_of_data,
        **counts,
    )
