"""Stays and claims as the set items an intersection-sum joins on.

A hospital's episode window runs from ``before_days`` before admission to ``after_days``
after discharge. The hospital lists one item (patient key, day) for every day of every
stay's window, once per patient and day however many of its stays' windows cover it, so
a payer's claim is counted at most once per hospital. A payer lists one item per
(patient key, day) it paid for, with its costs of that day summed. The episode cost a
payer adds at a hospital is then the sum of the payer's items that the hospital lists:
exactly the pooled join ``claims ⋈ windows`` on key and day.

The extracts are read cell by cell: a bad cell is refused with its file, row and column.
The pseudonymous key lives only in these extracts, never in the rows models are fitted on.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedcost import schema
from fedcost.data.files import read_frame
from fedcost.errors import DataValidationError

KEY = "patient_key"
ADMISSION = "admission_date"
DISCHARGE = "discharge_date"
SERVICE = "service_date"
CLAIM_COST = "cost"
STAY_COLUMNS = (KEY, ADMISSION, DISCHARGE, schema.COST, schema.READMISSION)
CLAIM_COLUMNS = (KEY, SERVICE, CLAIM_COST)
MAX_KEY_LENGTH = 128
MAX_WINDOW_DAYS = 365
# No single stay or claim costs this much; it keeps every sum of cents far below 2**63.
MAX_COST = 1e9
_EPOCH = dt.date(1970, 1, 1)

Item = tuple[str, int]  # (patient key, day number since 1970-01-01)


@dataclass(frozen=True)
class EpisodeWindow:
    """Days before admission and after discharge an episode covers (MSPB: 3 and 30)."""

    before_days: int = 3
    after_days: int = 30

    def __post_init__(self) -> None:
        for name in ("before_days", "after_days"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WINDOW_DAYS:
                raise ValueError(
                    f"episodes.{name} must be a whole number of days from 0 to {MAX_WINDOW_DAYS}, not {value!r}"
                )


@dataclass(frozen=True)
class Stays:
    """A hospital's stays: pseudonymous key, admission and discharge day, cost in cents, readmitted."""

    keys: tuple[str, ...]
    admission: np.ndarray
    discharge: np.ndarray
    cost_cents: np.ndarray
    readmitted: np.ndarray

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, path: Path) -> Stays:
        """The stays of an extract, each cell checked; discharge on or after admission."""
        _columns(frame, STAY_COLUMNS, path)
        admission, discharge = _days(frame, ADMISSION, path), _days(frame, DISCHARGE, path)
        early = np.flatnonzero(discharge < admission)
        if early.size:
            raise DataValidationError(
                "the discharge date is before the admission date; fix the dates of this stay",
                path=str(path),
                row=int(early[0]) + 1,
                column=DISCHARGE,
            )
        readmitted = _numbers(frame, schema.READMISSION, path, maximum=1.0)
        fractional = np.flatnonzero(readmitted != np.rint(readmitted))
        if fractional.size:
            raise DataValidationError(
                "must be 0 or 1", path=str(path), row=int(fractional[0]) + 1, column=schema.READMISSION
            )
        return cls(
            keys=_keys(frame, path),
            admission=admission,
            discharge=discharge,
            cost_cents=_cents(_numbers(frame, schema.COST, path, maximum=MAX_COST)),
            readmitted=readmitted.astype(np.int64),
        )

    def items(self, window: EpisodeWindow) -> set[Item]:
        """Every (key, day) of every stay's window, once per patient and day."""
        items: set[Item] = set()
        for key, admitted, discharged in zip(self.keys, self.admission.tolist(), self.discharge.tolist()):
            items.update((key, day) for day in range(admitted - window.before_days, discharged + window.after_days + 1))
        return items


@dataclass(frozen=True)
class Claims:
    """A payer's claims: pseudonymous key, service day and cost in cents."""

    keys: tuple[str, ...]
    days: np.ndarray
    cost_cents: np.ndarray

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, path: Path) -> Claims:
        """The claims of an extract, each cell checked."""
        _columns(frame, CLAIM_COLUMNS, path)
        return cls(
            keys=_keys(frame, path),
            days=_days(frame, SERVICE, path),
            cost_cents=_cents(_numbers(frame, CLAIM_COST, path, maximum=MAX_COST)),
        )

    def items(self) -> dict[Item, int]:
        """Cents per (key, day), the day's claims summed."""
        totals: dict[Item, int] = {}
        for key, day, cents in zip(self.keys, self.days.tolist(), self.cost_cents.tolist()):
            totals[key, day] = totals.get((key, day), 0) + cents
        return totals


def read_extract(role: str, path: Path) -> Stays | Claims:
    """A node's episode extract: a hospital's stays, an insurer's or pharma node's claims."""
    frame = read_frame(path)
    return Stays.from_frame(frame, path) if role == "hospital" else Claims.from_frame(frame, path)


def _columns(frame: pd.DataFrame, needed: tuple[str, ...], path: Path) -> None:
    missing = [name for name in needed if name not in frame.columns]
    if missing:
        raise DataValidationError(
            f"the extract has no column {missing[0]!r}; an episode extract needs {', '.join(needed)}",
            path=str(path),
            column=missing[0],
        )


def _refuse_first(bad: np.ndarray, message: str, path: Path, column: str) -> None:
    rows = np.flatnonzero(bad)
    if rows.size:
        raise DataValidationError(message, path=str(path), row=int(rows[0]) + 1, column=column)


def _keys(frame: pd.DataFrame, path: Path) -> tuple[str, ...]:
    """Pseudonymous keys: non-empty text of at most ``MAX_KEY_LENGTH`` printable characters."""
    keys = frame[KEY].tolist()
    bad = np.array(
        [
            not isinstance(key, str) or not 0 < len(key.strip()) <= MAX_KEY_LENGTH or not key.isprintable()
            for key in keys
        ],
        dtype=bool,
    )
    _refuse_first(
        bad,
        f"the patient key is missing or not a pseudonym of 1 to {MAX_KEY_LENGTH} printable characters; "
        "every party must hold the same pseudonymous key for a patient",
        path,
        KEY,
    )
    return tuple(key.strip() for key in keys)


def _days(frame: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """Dates (YYYY-MM-DD, or a date column of a Parquet file) as day numbers."""
    values = frame[column]
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
    else:
        parsed = pd.to_datetime(values.astype(str).str.strip(), format="%Y-%m-%d", errors="coerce")
    _refuse_first(parsed.isna().to_numpy(), "is not a date; write it as YYYY-MM-DD, e.g. 2024-03-15", path, column)
    return ((parsed.dt.normalize() - pd.Timestamp(_EPOCH)).dt.days).to_numpy(np.int64)


def _numbers(frame: pd.DataFrame, column: str, path: Path, *, maximum: float) -> np.ndarray:
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > maximum)
    _refuse_first(bad, f"must be a number from 0 to {maximum:g}", path, column)
    return values


def _cents(values: np.ndarray) -> np.ndarray:
    """Whole cents, so sums are exact."""
    return np.rint(values * 100).astype(np.int64)
