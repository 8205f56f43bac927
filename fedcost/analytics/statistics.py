"""Federated statistics by group: counts, means, variances and cost quantiles per cell,
with small cells suppressed before anything leaves a node.

Cells are the cartesian product of the group-by fields' public levels (schema levels,
age bands, roles, each with a ``missing`` level for rows that lack the value), so every
node lays its rows out the same way. A node sends ONE additive float64 vector
(``GroupedStatisticsLayout.local_vector``): per cell the row count, per measure the count
of present values and the exact integer sum and sum of squares of its values in the
measure's unit (``measure_unit``: cents for cost, whole numbers for counts and 0/1
outcomes), each as 30-bit limbs (``fedcost.analytics.exact``), and a histogram of cost
over fixed public bins; after the cells, one slot per cell that is 1 where this node
withheld the cell. Every entry is a whole number below 2**30, so the coordinator's sum,
plain or under secure aggregation, is exact, and ``GroupedStatistics.from_totals``
reads counts and sums that equal the pooled computation exactly.

Small cells. A node zeroes every cell it holds 1..min_cohort-1 rows of before the vector
leaves it; summed, the suppression slots say at how many nodes each cell was withheld
(those cells' figures leave those nodes' rows out). The coordinator withholds every
aggregated cell with 1..min_cohort-1 rows. Both show in the result: ``suppressed``,
``nodes_suppressed`` per cell and a note. A measure present in only 1..min_cohort-1 rows
of a cell (a column most rows lack) is withheld the same way, at the node and in the
result. Event counts (readmissions) are not suppressed on their own: the cohort a rate
describes is its denominator.

Quantiles. Cost bins: one for exactly 0, one for (0, 1), geometric bins
[r^k, r^(k+1)) from 1 up to ``max_cost``, and [``max_cost``, inf). The p-quantile is the
ceil(p n)-th smallest cost (the inverted CDF; ``numpy.quantile(method="inverted_cdf")``).
It lies in the bin where the cumulative count first reaches ceil(p n); the estimate
interpolates linearly within that bin (the j-th of the bin's h costs is put at
lo + (j - 1/2)/h (hi - lo)), and the bin's edges are reported with it. Exact value and
estimate both lie in [lo, hi), so the error is below hi - lo = (r - 1) lo <= (r - 1) x:
a relative error below r - 1 (1% at the default r = 1.01) for costs of at least 1, and
below 1 currency unit under that. The price is the vector's length: about 1,620 bins
per cell at the defaults.

Caveat for bindings: the summed histogram of a cell with a few dozen rows nearly lists
their costs; the released result holds only quantiles, but the coordinator sees the sum
(secure aggregation hides the nodes, not the sum). Add noise or coarser bins where that
matters.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from itertools import product

import numpy as np
import pandas as pd

from fedcost import schema
from fedcost.analytics import exact
from fedcost.errors import ConfigError
from fedcost.privacy.policy import MIN_COHORT

AGE_BANDS = ("<45", "45-64", "65-74", "75-84", "85+")
_AGE_BAND_STARTS = np.array([45.0, 65.0, 75.0, 85.0])
MISSING = "missing"
ROLE = "role"
AGE_BAND = "age_band"
QUANTILES = {"median": 0.5, "p90": 0.9}
# Limbs of a measure's sum and sum of squares: 90 bits hold a million rows' squared
# costs of up to 10 million in cents.
LIMBS = 3
_MEASURE_SLOTS = ("n",) + tuple(f"{total}.limb{j}" for total in ("sum", "sumsq") for j in range(LIMBS))


def measure_unit(measure: str) -> float:
    """The unit a measure is summed in, exactly: cents for cost, 1 for whole numbers,
    10**-4 for any other numeric column."""
    if measure == schema.COST:
        return 0.01
    return 1.0 if schema.COLUMNS[measure].integer else 1e-4


def group_levels(field: str) -> tuple[str, ...]:
    """The public levels of a group-by field; every node uses the same ones."""
    if field == ROLE:
        return tuple(schema.ROLES)
    if field == AGE_BAND:
        return AGE_BANDS + (MISSING,)
    column = schema.COLUMNS.get(field)
    if column is None or column.kind != "categorical":
        known = [c.name for c in schema.FEATURES if c.kind == "categorical"] + [AGE_BAND, ROLE]
        raise ConfigError(f"cannot group by '{field}'; group-by fields: {', '.join(known)}", field="group_by")
    return column.levels + (MISSING,)


def histogram_quantile(counts: np.ndarray, lower: np.ndarray, upper: np.ndarray, p: float) -> tuple[float, float, float]:
    """The p-quantile (inverted CDF) of the values a histogram counts, and its bin's edges.

    Returns (estimate, lo, hi); the exact quantile lies in [lo, hi].
    """
    total = int(counts.sum())
    if total == 0:
        return math.nan, math.nan, math.nan
    rank = max(math.ceil(p * total), 1)
    cumulative = np.cumsum(counts)
    b = int(np.searchsorted(cumulative, rank))
    lo, hi = float(lower[b]), float(upper[b])
    if not math.isfinite(hi) or hi == lo:
        return lo, lo, hi
    within = rank - (cumulative[b] - counts[b])
    return lo + (hi - lo) * (within - 0.5) / counts[b], lo, hi


@dataclass(frozen=True)
class GroupedStatisticsLayout:
    """Where each sum sits in a node's grouped-statistics vector; the same at every node.

    ``group_by``: categorical schema columns, ``age_band`` (from age) and ``role``
    (node-level). ``measures``: numeric schema columns, targets included. The cost
    histogram is always of ``total_cost``; ``bin_ratio`` sets its precision.
    """

    group_by: tuple[str, ...]
    measures: tuple[str, ...] = (schema.COST, schema.READMISSION)
    bin_ratio: float = 1.01
    max_cost: float = 1e7

    def __post_init__(self) -> None:
        for field in self.group_by:
            group_levels(field)
        if len(set(self.group_by)) != len(self.group_by):
            raise ConfigError("a field appears twice", field="group_by")
        for measure in self.measures:
            column = schema.COLUMNS.get(measure)
            if column is None or column.kind != "numeric" or column.minimum is None or column.minimum < 0:
                numeric = [c.name for c in schema.COLUMNS.values() if c.kind == "numeric"]
                raise ConfigError(f"'{measure}' is not a numeric schema column ({', '.join(numeric)})", field="measures")
        if not 1 < self.bin_ratio <= 1.1:
            raise ConfigError(f"bin_ratio must lie in (1, 1.1], not {self.bin_ratio}", field="bin_ratio")
        if not self.max_cost > 1:
            raise ConfigError(f"max_cost must exceed 1, not {self.max_cost}", field="max_cost")

    def to_json(self) -> str:
        """The layout as a request states it to the nodes."""
        return json.dumps({"group_by": list(self.group_by), "measures": list(self.measures)})

    @classmethod
    def from_json(cls, text: str) -> GroupedStatisticsLayout:
        """The layout a request states: group-by fields and measures, nothing else."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or set(data) != {"group_by", "measures"}:
            raise ConfigError("a statistics request must state exactly group_by and measures", field="layout")
        for key, names in data.items():
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise ConfigError("must be a list of field names", field=key)
        return cls(tuple(data["group_by"]), tuple(data["measures"]))

    @cached_property
    def dims(self) -> tuple[int, ...]:
        return tuple(len(group_levels(field)) for field in self.group_by)

    @cached_property
    def cells(self) -> list[tuple[str, ...]]:
        """Every cell's levels, in vector order (row-major over ``group_by``)."""
        return list(product(*(group_levels(field) for field in self.group_by)))

    @property
    def n_cells(self) -> int:
        return math.prod(self.dims)

    @cached_property
    def cost_edges(self) -> np.ndarray:
        """0, then 1, r, r^2, ... up to the first edge at or beyond ``max_cost``."""
        steps = math.ceil(math.log(self.max_cost) / math.log(self.bin_ratio))
        return np.concatenate([[0.0], self.bin_ratio ** np.arange(steps + 1)])

    @cached_property
    def bin_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper edge of every histogram bin; bin 0 holds exact zeros."""
        edges = self.cost_edges
        return np.concatenate([[0.0], edges]), np.concatenate([[0.0], edges[1:], [np.inf]])

    @property
    def n_bins(self) -> int:
        return len(self.cost_edges) + 1

    @cached_property
    def quantile_relative_error(self) -> float:
        """Bound on |estimate - exact| / exact for cost quantiles of at least 1: the
        widest finite bin's hi / lo - 1 (``bin_ratio`` - 1 up to rounding)."""
        edges = self.cost_edges[1:]
        return float(np.max(edges[1:] / edges[:-1]) - 1)

    @property
    def width(self) -> int:
        """Slots per cell: rows, (n, sum limbs, sumsq limbs) per measure, cost histogram."""
        return 1 + len(_MEASURE_SLOTS) * len(self.measures) + self.n_bins

    def measure_slots(self, i: int) -> slice:
        """Where measure ``i``'s count and limbs sit inside a cell's slots."""
        start = 1 + len(_MEASURE_SLOTS) * i
        return slice(start, start + len(_MEASURE_SLOTS))

    @property
    def size(self) -> int:
        """Length of a node's vector: the cells, then one suppression slot per cell."""
        return self.n_cells * (self.width + 1)

    def slots(self) -> list[str]:
        """Every slot's name, in vector order (for audit logs and egress checks)."""
        inner = ["rows"] + [f"{m}.{s}" for m in self.measures for s in _MEASURE_SLOTS]
        inner += [f"{schema.COST}.bin[{k}]" for k in range(self.n_bins)]
        names = [f"{self._label(cell)}:{slot}" for cell in self.cells for slot in inner]
        return names + [f"{self._label(cell)}:suppressed_at_node" for cell in self.cells]

    def _label(self, cell: tuple[str, ...]) -> str:
        return ",".join(f"{field}={level}" for field, level in zip(self.group_by, cell))

    def cost_bins(self, costs: np.ndarray) -> np.ndarray:
        """The histogram bin of each (non-negative) cost."""
        return np.where(costs == 0, 0, np.searchsorted(self.cost_edges, costs, side="right"))

    def _cell_codes(self, rows: pd.DataFrame, role: str | None) -> np.ndarray:
        codes = []
        for field in self.group_by:
            levels = group_levels(field)
            if field == ROLE:
                if role not in levels:
                    raise ValueError(f"grouping by role needs the node's role ({', '.join(levels)}), not {role!r}")
                codes.append(np.full(len(rows), levels.index(role)))
            elif field == AGE_BAND:
                age = rows["age"].to_numpy(dtype="float64")
                band = np.searchsorted(_AGE_BAND_STARTS, age, side="right")
                codes.append(np.where(np.isnan(age), len(AGE_BANDS), band))
            else:
                index = {level: i for i, level in enumerate(levels)}
                cells = rows[field].astype(object).where(rows[field].notna(), MISSING)
                unknown = ~cells.isin(levels)
                if unknown.any():
                    raise ValueError(f"column {field} holds {cells[unknown].iloc[0]!r}, not one of {', '.join(levels)}")
                codes.append(cells.map(index).to_numpy(dtype=np.int64))
        return np.ravel_multi_index(codes, self.dims) if codes else np.zeros(len(rows), dtype=np.int64)

    def local_vector(self, rows: pd.DataFrame, *, role: str | None = None, min_cohort: int = MIN_COHORT) -> np.ndarray:
        """This node's sums over ``rows``, small cells zeroed, as one float64 vector."""
        if min_cohort < 1:
            raise ValueError(f"min_cohort must be at least 1, not {min_cohort}")
        cell = self._cell_codes(rows, role)
        n_cells = self.n_cells
        block = np.zeros((n_cells, self.width))
        block[:, 0] = np.bincount(cell, minlength=n_cells)
        for i, measure in enumerate(self.measures):
            block[:, self.measure_slots(i)] = self._measure_block(rows, measure, cell, min_cohort)
        costs = rows[schema.COST].to_numpy(dtype="float64")
        present = ~np.isnan(costs)
        if (costs[present] < 0).any():
            raise ValueError(f"{schema.COST} must not be negative")
        flat = cell[present] * self.n_bins + self.cost_bins(costs[present])
        block[:, -self.n_bins :] = np.bincount(flat, minlength=n_cells * self.n_bins).reshape(n_cells, self.n_bins)
        small = (block[:, 0] > 0) & (block[:, 0] < min_cohort)
        block[small] = 0.0
        return np.concatenate([block.ravel(), small.astype("float64")])

    def _measure_block(self, rows: pd.DataFrame, measure: str, cell: np.ndarray, min_cohort: int) -> np.ndarray:
        """Per cell: the count of present values, then the limbs of their exact integer sum
        and sum of squares in ``measure_unit``; zero where 1..min_cohort-1 values are present."""
        values = rows[measure].to_numpy(dtype="float64")
        present = ~np.isnan(values)
        if (values[present] < 0).any():
            raise ValueError(f"{measure} must not be negative")
        units = np.rint(values[present] / measure_unit(measure)).astype(np.int64)
        where = cell[present]
        order = np.argsort(where, kind="stable")
        bounds = np.searchsorted(where[order], np.arange(self.n_cells + 1))
        sorted_units = units[order].tolist()
        block = np.zeros((self.n_cells, len(_MEASURE_SLOTS)))
        for c in range(self.n_cells):
            chunk = sorted_units[bounds[c] : bounds[c + 1]]
            if min_cohort <= len(chunk):
                totals = [sum(chunk), sum(v * v for v in chunk)]
                block[c] = np.concatenate([[len(chunk)], exact.split(totals, LIMBS)])
        return block


def _measure_record(measure: str, slots: np.ndarray, *, shown: bool, min_cohort: int) -> dict:
    """A measure's count, exact sum, mean and sample variance in one cell, or withheld."""
    count = round(float(slots[0]))
    total, squares = exact.join(slots[1:], LIMBS)
    unit = measure_unit(measure)
    withheld = not shown or 0 < count < min_cohort
    shown = not withheld and count > 0
    mean = total * unit / count if shown else math.nan
    variance = (count * squares - total * total) * unit * unit / (count * (count - 1)) if shown and count > 1 else math.nan
    return {
        f"{measure}_n": None if withheld else count,
        f"{measure}_sum": total * unit if shown else math.nan,
        f"{measure}_mean": mean,
        f"{measure}_var": variance,
    }


@dataclass(frozen=True)
class GroupedStatistics:
    """Per-cell results from the federation's summed vectors; small cells withheld.

    One record per cell: the group levels, ``n``, ``suppressed`` (withheld at the
    coordinator), ``nodes_suppressed`` (nodes that withheld their rows of the cell), per
    measure ``<m>_n``, ``<m>_sum`` (exact in the measure's unit), ``<m>_mean``, ``<m>_var``
    (sample variance), ``readmission_rate``,
    and per cost quantile the estimate with its bin's ``_low`` and ``_high`` edges.
    """

    layout: GroupedStatisticsLayout
    min_cohort: int
    records: tuple[dict, ...]

    @classmethod
    def from_totals(
        cls, layout: GroupedStatisticsLayout, totals: np.ndarray, min_cohort: int = MIN_COHORT
    ) -> GroupedStatistics:
        totals = np.asarray(totals, dtype="float64")
        if totals.shape != (layout.size,):
            raise ValueError(f"expected a vector of {layout.size} sums for this layout, got shape {totals.shape}")
        block = totals[: layout.n_cells * layout.width].reshape(layout.n_cells, layout.width)
        node_suppressed = np.rint(totals[layout.n_cells * layout.width :]).astype(int)
        lower, upper = layout.bin_bounds
        records = []
        for levels, sums, nodes in zip(layout.cells, block, node_suppressed):
            n = int(round(sums[0]))
            suppressed = 0 < n < min_cohort
            record: dict = dict(zip(layout.group_by, levels))
            record |= {"n": None if suppressed else n, "suppressed": suppressed, "nodes_suppressed": int(nodes)}
            for i, measure in enumerate(layout.measures):
                record |= _measure_record(measure, sums[layout.measure_slots(i)], shown=not suppressed, min_cohort=min_cohort)
            if schema.READMISSION in layout.measures:
                record["readmission_rate"] = record[f"{schema.READMISSION}_mean"]
            histogram = np.rint(sums[-layout.n_bins :])
            for name, p in QUANTILES.items():
                estimate, lo, hi = histogram_quantile(histogram, lower, upper, p) if not suppressed else (math.nan,) * 3
                record |= {f"cost_{name}": estimate, f"cost_{name}_low": lo, f"cost_{name}_high": hi}
            records.append(record)
        return cls(layout, min_cohort, tuple(records))

    @property
    def note(self) -> str:
        """What was withheld and how precise the quantiles are, in words for a report."""
        withheld = sum(r["suppressed"] for r in self.records)
        partial = [r["nodes_suppressed"] for r in self.records if r["nodes_suppressed"]]
        return (
            f"{withheld} of {len(self.records)} cells suppressed at the coordinator (1 to {self.min_cohort - 1} rows); "
            f"{len(partial)} cells suppressed at node level ({sum(partial)} node-cells withheld: those cells' "
            f"figures leave those nodes' rows out). Cost quantiles are within "
            f"{self.layout.quantile_relative_error:.1%} of the exact pooled quantile (costs of at least 1)."
        )

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(list(self.records))
        for column in ["n", "nodes_suppressed"] + [f"{m}_n" for m in self.layout.measures]:
            frame[column] = frame[column].astype("Int64")
        return frame

    def to_dict(self) -> dict:
        """JSON-able: NaN and infinite edges become None."""
        def clean(value: object) -> object:
            return None if isinstance(value, float) and not math.isfinite(value) else value

        return {
            "group_by": list(self.layout.group_by),
            "measures": list(self.layout.measures),
            "min_cohort": self.min_cohort,
            "quantile_relative_error": self.layout.quantile_relative_error,
            "note": self.note,
            "cells": [{k: clean(v) for k, v in record.items()} for record in self.records],
        }
