"""Rows into the schema: read one node's CSV or Parquet file and validate every cell.

This is the loader both a simulation and a real node use. It refuses a file with the
file, row and column named, before any training sees a row. Row numbers are 1-based
data rows (the header is not counted).

The result is a frame with every feature column (schema and extra), the accounting
columns (``schema.ACCOUNTING``, NaN where the node has none) and the declared targets:
numeric columns as float64 with NaN where the node lacks the value (imputed and flagged
later, never silently zero), categorical columns as schema levels or missing
(None or NaN: pandas decides; every reader tests with ``isna``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedcost import schema
from fedcost.data.files import TABLE_SUFFIXES, read_frame
from fedcost.data.mapping import DataMapping, NodeSource, OmopReading, TargetReading, as_token
from fedcost.data.omop import read_omop
from fedcost.errors import DataValidationError
from fedcost.seeding import derive_seed

# The largest magnitude of a numeric value: the sums of a million such values and of their
# squares still fit the statistics' digits (``fedcost.data.features.split_sum``). Larger is an
# identifier or a code, not a measurement.
MAX_MAGNITUDE = 1e12


@dataclass(frozen=True)
class NodeData:
    """One node's validated rows, split into training rows and held-out test rows."""

    name: str
    role: str
    train: pd.DataFrame
    test: pd.DataFrame


def load_node(mapping: DataMapping, name: str, *, split_seed: int, test_fraction: float = 0.2) -> NodeData:
    """Load and validate a node's rows; split them unless it brings its own test file."""
    node = mapping.node(name)
    rows = load_omop_rows(mapping, node, node.omop)[0] if node.omop else load_rows(mapping, node, _file(node))
    if node.test_file is not None:
        return NodeData(node.name, node.role, rows, load_rows(mapping, node, node.test_file))
    if len(rows) < 2:
        raise DataValidationError(
            f"node {node.name} has one row: a site needs at least two, one to train on and one to hold "
            "out; leave it out of the mapping or merge its rows with another site's",
            path=str(node.omop.folder if node.omop else _file(node)),
        )
    train, test = split_rows(rows, seed=split_seed, node=node.name, test_fraction=test_fraction)
    return NodeData(node.name, node.role, train, test)


def split_rows(rows: pd.DataFrame, *, seed: int, node: str, test_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded train/test split that depends on the node's name, not its position."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), not {test_fraction}")
    if len(rows) < 2:
        raise ValueError(f"node {node} has {len(rows)} row(s); a train/test split needs at least 2")
    order = np.random.default_rng(derive_seed(seed, "split", node)).permutation(len(rows))
    n_test = min(max(1, round(len(rows) * test_fraction)), len(rows) - 1)
    test, train = order[:n_test], order[n_test:]
    return rows.iloc[np.sort(train)].reset_index(drop=True), rows.iloc[np.sort(test)].reset_index(drop=True)


def load_rows(mapping: DataMapping, node: NodeSource, path: Path, *, targets: bool = True) -> pd.DataFrame:
    """Read ``path`` for ``node`` and return schema-typed rows, or raise naming the fault.

    ``targets=False`` reads the features alone: rows to score, whose outcomes are not known.
    """
    return _schema_rows(mapping, node, _read_table(path), path, targets=targets)


def load_omop_rows(
    mapping: DataMapping, node: NodeSource, reading: OmopReading, *, targets: bool = True
) -> tuple[pd.DataFrame, tuple[int, ...]]:
    """An OMOP CDM extract's index stays (``read_omop``), checked as a file's rows are, and
    each row's ``visit_occurrence_id`` (for the site's own use: identifiers never leave it).

    ``read_omop`` names a bad cell of a table; a value it derives that the schema refuses
    (say 140 distinct drugs in a stay) is named at its index stay's visit_occurrence row.
    ``targets=False`` reads every index stay's features, to score.
    """
    extract = read_omop(
        reading.folder, cost_column=reading.cost_column, payer_concepts=reading.payer_concepts, outcomes=targets
    )
    if extract.rows.empty:
        raise DataValidationError(
            "the extract has no index stay with a cost and a full 30-day window; check visit_occurrence and cost"
            if targets
            else "the extract has no inpatient stay to score; check visit_occurrence",
            path=str(reading.folder),
        )
    try:
        rows = _schema_rows(mapping, node, extract.rows, reading.folder, targets=targets)
    except DataValidationError as error:
        if error.row is None:
            raise
        stay = error.row - 1
        raise DataValidationError(
            f"index stay {extract.visit_occurrence_ids[stay]}, {error.column} as read from the extract: "
            f"{error.message}",
            path=str(extract.visit_table),
            row=extract.visit_rows[stay],
            column=error.column,
        ) from None
    return rows, extract.visit_occurrence_ids


def _file(node: NodeSource) -> Path:
    assert node.file is not None, "a node without an OMOP extract has a file (the mapping checks it)"
    return node.file


def _schema_rows(
    mapping: DataMapping, node: NodeSource, raw: pd.DataFrame, path: Path, *, targets: bool
) -> pd.DataFrame:
    """``raw`` (read from ``path``) in the schema's columns, every cell checked."""
    out: dict[str, pd.Series] = {}
    for column in mapping.feature_columns:
        source = _source_column(mapping, node, raw, column.name)
        if source is None:
            if column.name in _required_features(mapping, node):
                raise _missing_column(path, node, column.name, header=list(raw.columns))
            out[column.name] = _absent(column, len(raw))
            continue
        _require_header(raw, path, node, source, column.name)
        cells = raw[source]
        if column.kind == "numeric":
            out[column.name] = _numeric(cells, column, path, source)
        else:
            out[column.name] = _categorical(cells, column, mapping.values.get(column.name, {}), path, source)
    for column in schema.ACCOUNTING:
        source = _source_column(mapping, node, raw, column.name)
        if source is None:
            out[column.name] = _absent(column, len(raw))
            continue
        _require_header(raw, path, node, source, column.name)
        out[column.name] = _numeric(raw[source], column, path, source)
    for slot, reading in mapping.targets.items() if targets else ():
        source = node.source_of(reading.column) or reading.column
        if source not in raw.columns:
            raise _missing_column(path, node, reading.column, source, header=list(raw.columns), outcome=True)
        cells = raw[source]
        if reading.kind == "binary":
            out[slot] = _binary_target(cells, reading, path, source)
        else:
            out[slot] = _non_negative_target(cells, reading, path, source)
    return pd.DataFrame(out)


def _source_column(mapping: DataMapping, node: NodeSource, raw: pd.DataFrame, field_name: str) -> str | None:
    """The node's column for ``field_name``: the one mapped to it, else a column of that name
    the node may carry unmapped, unless it is mapped to another field or holds an outcome."""
    source = node.source_of(field_name)
    if source is not None or field_name not in raw.columns or field_name in node.columns:
        return source
    if any((node.source_of(r.column) or r.column) == field_name for r in mapping.targets.values()):
        return None
    return field_name if field_name in _found_by_name(mapping, node) else None


def _found_by_name(mapping: DataMapping, node: NodeSource) -> set[str]:
    """Fields a node's file may carry under their own name, unmapped: every feature for a node
    of one of the ecosystem's roles, the declared ones only for a role-less node (whose
    schema fields must be mapped explicitly, so a column that merely shares a name is not read).
    An OMOP extract's rows carry schema fields under their own names, whatever the role."""
    if node.role == schema.ROLELESS and node.omop is None:
        return mapping.declared_features
    return {column.name for column in mapping.feature_columns} | set(schema.ROLES[node.role].accounting)


def _required_features(mapping: DataMapping, node: NodeSource) -> set[str]:
    return (set(schema.ROLES[node.role].features) | mapping.declared_features) - set(node.lacks)


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise DataValidationError(
            f"unsupported file type '{path.suffix}'; export it as CSV (.csv, .tsv or .txt) or Parquet", path=str(path)
        )
    if not path.is_file():
        raise DataValidationError("file not found; check the node's file in the mapping", path=str(path))
    frame = read_frame(path)
    if frame.empty:
        raise DataValidationError("file has a header but no rows", path=str(path))
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _require_header(raw: pd.DataFrame, path: Path, node: NodeSource, source: str, field_name: str) -> None:
    if source not in raw.columns:
        raise _missing_column(path, node, field_name, source, header=list(raw.columns))


def _missing_column(
    path: Path,
    node: NodeSource,
    field_name: str,
    source: str | None = None,
    *,
    header: Sequence[str] = (),
    outcome: bool = False,
) -> DataValidationError:
    source = source or node.source_of(field_name) or field_name
    hint = (
        f"map the source column to '{field_name}' under [columns] or [nodes.{node.name}.columns]"
        if outcome
        else f"map it under [nodes.{node.name}.columns] or list '{field_name}' in [nodes.{node.name}] lacks"
    )
    alike = [column for column in header if column.casefold() == source.casefold()]
    if alike:
        hint = f"the file has '{alike[0]}' (names are case-sensitive): write it so in the mapping, or {hint}"
    elif len(header) == 1:
        hint = f"the file's header is one column, {header[0]!r}: separate its columns with commas; or {hint}"
    what = "outcome" if outcome else "field"
    return DataValidationError(
        f"missing required column for {what} '{field_name}' (node {node.name}, role {node.role}); {hint}",
        path=str(path),
        column=source,
    )


def _absent(column: schema.Column, n: int) -> pd.Series:
    if column.kind == "numeric":
        return pd.Series(np.full(n, np.nan), dtype="float64")
    return pd.Series([None] * n, dtype="object")


# What statistics packages and databases write for a missing value (R and pandas NA, SQL NULL,
# Stata and SAS ".", Excel #N/A, UCI's "?"), as ``as_token`` reads it. "none" and "-" are
# not among them: a level "none" is a real answer, and "-" is zero in accounting formats.
MISSING_MARKERS = frozenset({"", "na", "n/a", "nan", "null", ".", "?", "#n/a", "<na>"})


def _missing(cells: pd.Series, tokens: pd.Series) -> np.ndarray:
    """Empty cells and cells holding a missing-value marker (``MISSING_MARKERS``); ``tokens``
    are the cells as ``as_token`` reads them."""
    return (cells.isna() | tokens.isin(MISSING_MARKERS)).to_numpy()


def _as_numbers(cells: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """The cells as float64 (true/false as 1/0) and which are missing; a cell that is neither
    a number nor missing is NaN and not missing. Only the cells that do not parse as numbers
    are read as tokens (a column of 100,000 numbers is one vectorised parse)."""
    values = pd.to_numeric(cells, errors="coerce").to_numpy(dtype="float64", copy=True)
    unread = ~np.isfinite(values)
    missing = np.zeros(len(cells), dtype=bool)
    if unread.any():
        tokens = cells[unread].map(as_token)
        missing[unread] = _missing(cells[unread], tokens)
        values[unread] = tokens.map(_TRUTH_VALUES).to_numpy(dtype="float64")
    return values, missing


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0]) + 1


def _numeric(cells: pd.Series, column: schema.Column, path: Path, source: str) -> pd.Series:
    """Numbers within the schema's bounds, true/false as 1/0; missing cells become NaN
    (imputed and flagged)."""
    return _checked_numbers(cells, *_as_numbers(cells), column, path, source)


def _checked_numbers(
    cells: pd.Series, values: np.ndarray, missing: np.ndarray, column: schema.Column, path: Path, source: str
) -> pd.Series:
    """``cells`` read as ``values`` (``_as_numbers``), refused where one is neither a number
    nor ``missing``, beyond ``MAX_MAGNITUDE``, or outside the column's bounds."""
    bad = ~missing & ~np.isfinite(values)
    if bad.any():
        row = _first_row(bad)
        raise DataValidationError(_not_a_number(cells.iloc[row - 1]), path=str(path), row=row, column=source)
    huge = ~missing & (np.abs(values) > MAX_MAGNITUDE)
    if huge.any():
        row = _first_row(huge)
        raise DataValidationError(
            f"value {values[row - 1]:g} is beyond ±{MAX_MAGNITUDE:g}: a number this large is an identifier or a "
            "code, not a measurement; declare the column categorical or leave it out (or give it in larger units)",
            path=str(path),
            row=row,
            column=source,
        )
    _check_bounds(values, column, path, source)
    return pd.Series(values, index=cells.index, dtype="float64")


_TRUTH_VALUES = {"true": 1.0, "false": 0.0}


def _not_a_number(value: object) -> str:
    """Why a cell is not a number and what to write: a comma in it is a thousands separator
    or a decimal comma, which cannot be told apart ("1,500"), so neither is guessed."""
    hint = (
        "write numbers with a decimal point and no thousands separators (1234.5, not 1,234.5 or 1234,5)"
        if "," in str(value)
        else "write a plain number (1234.5: no units, currency or percent signs)"
    )
    return f"value {value!r} is not a number: {hint}, and leave a missing value empty"


def _check_bounds(values: np.ndarray, column: schema.Column, path: Path, source: str) -> None:
    present = ~np.isnan(values)
    checks = []
    if column.minimum is not None:
        checks.append((present & (values < column.minimum), f"below the minimum {column.minimum:g} for {column.name}"))
    if column.maximum is not None:
        checks.append((present & (values > column.maximum), f"above the maximum {column.maximum:g} for {column.name}"))
    if column.integer:
        checks.append((present & (values != np.round(values)), f"not a whole number, as {column.name} must be"))
    for bad, what in checks:
        if bad.any():
            row = _first_row(bad)
            raise DataValidationError(f"value {values[row - 1]:g} is {what}", path=str(path), row=row, column=source)


def _categorical(
    cells: pd.Series, column: schema.Column, recoding: dict[str, str], path: Path, source: str
) -> pd.Series:
    """Schema levels after the mapping's recoding; missing cells become None (imputed and
    flagged), unless a missing-value marker is itself one of the levels."""
    tokens = cells.map(as_token)
    levels = tokens.map(lambda t: recoding.get(t, t))
    known = levels.isin(column.levels).to_numpy()
    blank = _missing(cells, tokens) & ~known
    bad = ~blank & ~known
    if bad.any():
        row = _first_row(bad)
        raise DataValidationError(
            f"value {cells.iloc[row - 1]!r} is not one of {', '.join(column.levels)}; "
            f"recode it under [values.{column.name}] in the mapping",
            path=str(path),
            row=row,
            column=source,
        )
    return levels.where(~blank, None).astype("object")


def _binary_target(cells: pd.Series, reading: TargetReading, path: Path, source: str) -> pd.Series:
    tokens = cells.map(as_token)
    positive = tokens.isin(reading.positive).to_numpy()
    negative = tokens.isin(reading.negative).to_numpy()
    bad = ~(positive | negative)
    _refuse_missing_outcome(cells, _missing(cells, tokens), reading, path, source)
    if bad.any():
        row = _first_row(bad)
        raise DataValidationError(
            f"value {cells.iloc[row - 1]!r} is neither positive ({', '.join(sorted(reading.positive))}) "
            f"nor negative ({', '.join(sorted(reading.negative))}); the outcome must be 0/1, or set "
            f"[targets.{reading.column}] positive and negative in the mapping",
            path=str(path),
            row=row,
            column=source,
        )
    return pd.Series(positive.astype("float64"))


def _non_negative_target(cells: pd.Series, reading: TargetReading, path: Path, source: str) -> pd.Series:
    values, missing = _as_numbers(cells)
    _refuse_missing_outcome(cells, missing, reading, path, source)
    column = schema.Column(reading.column, "numeric", "non-negative outcome", minimum=0)
    return _checked_numbers(cells, values, missing, column, path, source)


def _refuse_missing_outcome(
    cells: pd.Series, missing: np.ndarray, reading: TargetReading, path: Path, source: str
) -> None:
    """Refuse a row whose outcome is ``missing``: a model learns only from rows whose outcome
    is known, and guessing one would change the data."""
    if missing.any():
        row = _first_row(missing)
        value = "empty" if as_token(cells.iloc[row - 1]) == "" else f"missing ({cells.iloc[row - 1]!r})"
        raise DataValidationError(
            f"the outcome {reading.column} is {value}; every row needs its outcome: leave rows "
            "without one out of the file",
            path=str(path),
            row=row,
            column=source,
        )
