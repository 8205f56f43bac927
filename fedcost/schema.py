"""The common data model: one row per index stay (hospital), claim episode (insurer) or
treated-patient episode (pharma).

Every node maps its rows into these columns. Roles hold different slices: a column a
role lacks is *missing by design*; features are imputed from federation-wide statistics
and flagged (``fedcost.data.features``), never silently zero. The two targets are
``readmitted_30d`` (0/1) and ``total_cost`` (non-negative, heavy-tailed).

Data of other shapes fit the same model: a node of role ``site`` carries only the fields
its mapping names, and a data set's own binary and non-negative outcomes (``died``,
``length_of_stay``) travel in the two target slots under their own names
(``fedcost.data.mapping``).

Accounting columns (``payment``: what the payer reimbursed for the episode) are read,
validated and summed by the analytics, never model features: a payment set per disease
group would hand the cost model the cost it is meant to predict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ColumnKind = Literal["numeric", "categorical"]
# The range a differentially private release clips a numeric value without schema bounds to.
UNBOUNDED_VALUE_CLIP = 1e4


@dataclass(frozen=True)
class Column:
    """A typed schema column: numeric with bounds, or categorical with fixed levels.

    ``log_scale`` marks skewed counts and durations (stay length, prior use): models see
    log1p of them, since risk and cost grow with their ratio rather than their difference.
    """

    name: str
    kind: ColumnKind
    description: str
    levels: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    integer: bool = False
    log_scale: bool = False

    def __post_init__(self) -> None:
        if (self.kind == "categorical") != bool(self.levels):
            raise ValueError(f"column {self.name}: levels are for categorical columns only")

    @property
    def value_range(self) -> tuple[float, float]:
        """The values a numeric column may take: its bounds, else ±``UNBOUNDED_VALUE_CLIP``."""
        low = self.minimum if self.minimum is not None else -UNBOUNDED_VALUE_CLIP
        high = self.maximum if self.maximum is not None else UNBOUNDED_VALUE_CLIP
        return float(low), float(high)


def _numeric(
    name: str,
    description: str,
    *,
    minimum: float,
    maximum: float | None = None,
    integer: bool = False,
    log_scale: bool = False,
) -> Column:
    return Column(name, "numeric", description, minimum=minimum, maximum=maximum, integer=integer, log_scale=log_scale)


def _categorical(name: str, description: str, levels: tuple[str, ...]) -> Column:
    return Column(name, "categorical", description, levels=levels)


DIAGNOSIS_GROUPS = (
    "heart_failure",
    "copd",
    "pneumonia",
    "acute_mi",
    "stroke",
    "diabetes",
    "sepsis",
    "renal_failure",
    "hip_knee_replacement",
    "other",
)

FEATURES: tuple[Column, ...] = (
    _numeric("age", "age in years at admission", minimum=0, maximum=120),
    _categorical("sex", "sex recorded at admission", ("female", "male")),
    _categorical("region", "region of the site; drives regional price levels", ("north", "south", "east", "west")),
    _categorical("admission_type", "acuity of the index admission", ("emergency", "urgent", "elective")),
    _categorical("diagnosis_group", "principal diagnosis group of the index stay", DIAGNOSIS_GROUPS),
    _numeric("comorbidity_index", "Charlson comorbidity index", minimum=0, maximum=37, integer=True, log_scale=True),
    _numeric(
        "prior_admissions_12m",
        "inpatient admissions in the 12 months before",
        minimum=0,
        maximum=100,
        integer=True,
        log_scale=True,
    ),
    _numeric(
        "ed_visits_12m",
        "emergency-department visits in the 12 months before",
        minimum=0,
        maximum=200,
        integer=True,
        log_scale=True,
    ),
    _numeric("length_of_stay", "length of the index stay in days", minimum=0, maximum=365, log_scale=True),
    _categorical(
        "discharge_disposition",
        "where the patient went at discharge",
        ("home", "home_health", "skilled_nursing", "rehab", "against_advice"),
    ),
    _categorical("payer", "primary payer of the episode", ("medicare", "medicaid", "commercial", "self_pay")),
    _numeric(
        "num_medications", "distinct medications at discharge", minimum=0, maximum=100, integer=True, log_scale=True
    ),
    _numeric("medication_adherence", "proportion of days covered (PDC) after discharge", minimum=0, maximum=1),
    _numeric(
        "num_procedures", "procedures during the index stay", minimum=0, maximum=100, integer=True, log_scale=True
    ),
    _numeric("icu_stay", "1 if the stay included intensive care", minimum=0, maximum=1, integer=True),
    _numeric(
        "abnormal_labs",
        "abnormal lab results in the last 48 h before discharge",
        minimum=0,
        maximum=100,
        integer=True,
        log_scale=True,
    ),
    _numeric(
        "follow_up_7d",
        "1 if an outpatient follow-up visit was claimed within 7 days",
        minimum=0,
        maximum=1,
        integer=True,
    ),
)

READMISSION = "readmitted_30d"
COST = "total_cost"
TARGETS: tuple[Column, ...] = (
    _numeric(
        READMISSION, "1 if readmitted to any hospital within 30 days of discharge", minimum=0, maximum=1, integer=True
    ),
    _numeric(COST, "total episode cost, index stay through 30 days after discharge", minimum=0),
)

PAYMENT = "payment"
ACCOUNTING: tuple[Column, ...] = (
    _numeric(PAYMENT, "what the payer reimbursed for the episode (e.g. its DRG / DIP payment)", minimum=0),
)
# The disease group that group costing (payment per group, cost weights) is by.
DISEASE_GROUP = "diagnosis_group"

COLUMNS: dict[str, Column] = {column.name: column for column in FEATURES + TARGETS + ACCOUNTING}


@dataclass(frozen=True)
class Role:
    """A kind of ecosystem member, the schema features its rows carry and the accounting
    columns its rows may carry (read by name when present)."""

    name: str
    description: str
    features: tuple[str, ...]
    accounting: tuple[str, ...] = ()


# The role of a node without a fixed one ("site" in a mapping): its features are the ones
# its mapping names. Not the group-by of the same spelling (``analytics.statistics.SITE``).
ROLELESS = "site"

_SHARED = ("age", "sex", "region", "diagnosis_group", "comorbidity_index", "payer")
# What both a hospital's record and an insurer's claim show of the stay and prior use.
_STAY = ("admission_type", "prior_admissions_12m", "ed_visits_12m", "length_of_stay", "discharge_disposition")

ROLES: dict[str, Role] = {
    role.name: role
    for role in (
        Role(
            "hospital",
            "index stays: clinical detail, facility cost, readmissions to any hospital",
            _SHARED
            + _STAY
            + (
                "num_medications",
                "num_procedures",
                "icu_stay",
                "abnormal_labs",
            ),
            (PAYMENT,),
        ),
        Role(
            "insurer",
            "claim episodes: paid amounts, follow-up use, readmissions seen across providers",
            _SHARED
            + _STAY
            + (
                "medication_adherence",
                "follow_up_7d",
            ),
            (PAYMENT,),
        ),
        Role(
            "pharma",
            "treated-patient episodes: drug exposure, adherence, real-world outcomes",
            _SHARED + ("num_medications", "medication_adherence"),
        ),
        Role(ROLELESS, "a node without a fixed role: its features are the ones its mapping names", ()),
    )
}


def feature(name: str) -> Column:
    """The schema feature called ``name``; raises ``KeyError`` listing the known ones."""
    column = COLUMNS.get(name)
    if column is None or column in TARGETS or column in ACCOUNTING:
        raise KeyError(f"unknown schema field '{name}'; known fields: {', '.join(COLUMNS)}")
    return column
