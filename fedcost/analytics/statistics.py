"""Federated statistics by group: counts, means, variances and cost quantiles per cell,
with small cells suppressed, over the job's whole plan, before anything leaves a node.

Cells are the cartesian product of the group-by fields' public levels (schema levels,
age bands, roles, each with a ``missing`` level for rows that lack the value), so every
node lays its rows out the same way. A node sends ONE additive float64 vector
(``GroupedStatisticsLayout.local_vector``), ``width`` slots per cell and nothing else:
the row count, per measure the count of present values and the exact integer sum and
sum of squares of its values in the measure's unit (``measure_unit``: cents for cost,
whole numbers for counts and 0/1 outcomes), each as 30-bit limbs
(``fedcost.analytics.exact``), and a histogram of cost over fixed public bins. Counts and
limbs are whole numbers below 2**30, so the coordinator's sum, plain or under secure
aggregation, is exact, and ``GroupedStatistics.from_totals`` reads counts and sums that
equal the pooled computation over the rows released exactly. Histogram entries are
fractions (a group's rows spread over its bins, below), summed to secure aggregation's
grid (2**-10 per node), which moves a quantile by far less than a bin.

Small cells. A node decides what it releases over the job's whole plan of tables
(``plan_release``), not cell by cell: a cell withheld in one table could otherwise be
rebuilt from an overlapping table (by diagnosis group, and by diagnosis group and sex)
or from the grand total, which other releases give away. It withholds every cell, and
every measure within a cell, of 1 to min_cohort - 1 rows, then complementary cells until
no combination of released cells (of the plan, of tables it released before over the
same rows, and the grand total) isolates 1 to min_cohort - 1 rows
(``fedcost.privacy.smallcells.complementary_suppression``). The vector carries no trace
of which cells a node withheld. The coordinator withholds every summed cell of 1 to
min_cohort - 1 rows (``suppressed``), and measures the same way. Event counts
(readmissions) are not suppressed on their own: the cohort a rate describes is its
denominator.

Quantiles. Cost bins: one for exactly 0, one for (0, 1), geometric bins
[r^k, r^(k+1)) from 1 up to ``max_cost``, and [``max_cost``, inf). Fine bins would list a
small cell's costs, so each node coarsens every cell's histogram into groups of at least
min_cohort of its rows (``fedcost.privacy.smallcells.coarsen_histogram``), the first
group starting at bin 0 and the last ending at the top bin. The p-quantile is the
ceil(p n)-th smallest cost (the inverted CDF); the estimate reads it from the summed
histogram, counts spread evenly within each bin (``histogram_quantile``). It is the exact
quantile of the costs after each node moved each of its rows somewhere within its group:
within one bin (``quantile_relative_error``, 1% at the default r = 1.01) where the groups
near that rank are single bins, and no worst-case bound otherwise: a node's first group
reaches down to 0 and its last up to ``max_cost``, so a quantile near a node's extremes
moves far. Measured on the synthetic ecosystem (5 and 8 sites, seeds 0-9, by diagnosis
group and by diagnosis group and payer, min_cohort 11; against the exact quantile of the
rows released), the relative error of the median averages 0.2% (worst 0.9%) in cells of
over 3,000 rows, 0.8% (worst 4.6%) in cells of 1,000 to 3,000 rows, 2% (worst 10%) in
cells of 300 to 1,000 rows, and 7% to 45% below; of the p90, 2% (worst 6.3%) over 3,000
rows and 10% (worst 61%) for 1,000 to 3,000 rows; below 1,000 rows the p90 is
meaningless (off by a factor of 8 to 70 on average), since each node's top group of 11
to 21 rows is spread up to ``max_cost``. Means and variances stay exact.

Residual. Each cell's histogram is coarsened on its own, so the histograms of two
overlapping tables are coarsened differently: at a bin where both groupings happen to
close a group, a parent cell's histogram minus its released children's counts the
withheld rows (at least min_cohort of them) below that bin, which may be fewer than
min_cohort. Coarsening each atom's histogram instead would close it; it needs the whole
plan at ``local_vector``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import product
from types import MappingProxyType

import numpy as np
import pandas as pd

from fedcost import schema
from fedcost.analytics import exact
from fedcost.errors import ConfigError
from fedcost.privacy import smallcells
from fedcost.privacy.policy import MIN_COHORT
from fedcost.privacy.smallcells import coarsen_histogram

AGE_BANDS = ("<45", "45-64", "65-74", "75-84", "85+")
_AGE_BAND_STARTS = np.array([45.0, 65.0, 75.0, 85.0])
MISSING = "missing"
ROLE = "role"
# A node-level group-by whose levels are the sites a layout names: each node's rows fall in
# its own block, so the sum is every site's table side by side (group costing per site).
SITE = "site"
_REQUIRED = {"group_by", "measures"}
AGE_BAND = "age_band"
QUANTILES = {"median": 0.5, "p90": 0.9}
# A noisy table's cost histogram merges this many fine bins (1% apart) into one: every bin
# carries the whole noise, and a quantile reads the noise of every bin below it.
NOISY_BIN_GROUP = 16
# Limbs of a measure's sum and sum of squares: 90 bits hold a million rows' squared
# costs of up to 10 million in cents.
LIMBS = 3
_MEASURE_SLOTS = ("n",) + tuple(f"{total}.limb{j}" for total in ("sum", "sumsq") for j in range(LIMBS))


def measure_unit(measure: str) -> float:
    """The unit a measure is summed in, exactly: cents for cost, 1 for whole numbers,
    10**-4 for any other numeric column."""
    if measure in (schema.COST, schema.PAYMENT):
        return 0.01
    return 1.0 if schema.COLUMNS[measure].integer else 1e-4


def group_levels(field: str) -> tuple[str, ...]:
    """The public levels of a group-by field; every node uses the same ones (a layout's own
    sites for ``site``: ``GroupedStatisticsLayout.levels``)."""
    if field == ROLE:
        return tuple(schema.ROLES)
    if field == AGE_BAND:
        return AGE_BANDS + (MISSING,)
    column = schema.COLUMNS.get(field)
    if column is None or column.kind != "categorical":
        known = [c.name for c in schema.FEATURES if c.kind == "categorical"] + [AGE_BAND, ROLE, SITE]
        raise ConfigError(f"cannot group by '{field}'; group-by fields: {', '.join(known)}", field="group_by")
    return column.levels + (MISSING,)


def histogram_quantile(
    counts: np.ndarray, lower: np.ndarray, upper: np.ndarray, p: float
) -> tuple[float, float, float]:
    """The p-quantile (inverted CDF) of the values a histogram counts, and the edges of the
    bin the estimate lies in.

    Counts may be fractions (a coarsened histogram spreads a group's rows over its bins):
    within a bin they are taken as spread evenly, and the estimate is where that CDF
    reaches ``ceil(p n) - 1/2``, which for whole counts puts the j-th of a bin's h values
    at ``lo + (j - 1/2) / h (hi - lo)``. Returns (estimate, lo, hi); for a histogram of
    whole counts the exact quantile lies in [lo, hi] too.
    """
    counts = np.clip(np.asarray(counts, dtype="float64"), 0.0, None)
    total = round(float(counts.sum()))
    if total == 0:
        return math.nan, math.nan, math.nan
    target = max(math.ceil(p * total), 1) - 0.5
    cumulative = np.cumsum(counts)
    b = min(int(np.searchsorted(cumulative, target)), len(counts) - 1)
    lo, hi = float(lower[b]), float(upper[b])
    if not math.isfinite(hi) or hi == lo or counts[b] == 0:
        return lo, lo, hi
    within = (target - (cumulative[b] - counts[b])) / counts[b]
    return lo + (hi - lo) * min(max(within, 0.0), 1.0), lo, hi


@dataclass(frozen=True)
class GroupedStatisticsLayout:
    """Where each sum sits in a node's grouped-statistics vector; the same at every node.

    ``group_by``: categorical schema columns, ``age_band`` (from age), and the node-level
    ``role`` and ``site`` (whose levels are ``sites``, the roster's names). ``measures``:
    numeric schema columns, targets and accounting columns included. The cost histogram
    is always of ``total_cost``; ``bin_ratio`` sets its precision.
    """

    group_by: tuple[str, ...]
    measures: tuple[str, ...] = (schema.COST, schema.READMISSION)
    bin_ratio: float = 1.01
    max_cost: float = 1e7
    sites: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (SITE in self.group_by) != bool(self.sites):
            raise ConfigError("a table by site names its sites, and only a table by site does", field="group_by")
        if len(set(self.sites)) != len(self.sites) or not all(isinstance(name, str) and name for name in self.sites):
            raise ConfigError("a table's sites must be distinct names", field="sites")
        for field in self.group_by:
            self.levels(field)
        if len(set(self.group_by)) != len(self.group_by):
            raise ConfigError("a field appears twice", field="group_by")
        for measure in self.measures:
            column = schema.COLUMNS.get(measure)
            if column is None or column.kind != "numeric" or column.minimum is None or column.minimum < 0:
                numeric = [c.name for c in schema.COLUMNS.values() if c.kind == "numeric"]
                raise ConfigError(
                    f"'{measure}' is not a numeric schema column ({', '.join(numeric)})", field="measures"
                )
        if not 1 < self.bin_ratio <= 1.1:
            raise ConfigError(f"bin_ratio must lie in (1, 1.1], not {self.bin_ratio}", field="bin_ratio")
        if not self.max_cost > 1:
            raise ConfigError(f"max_cost must exceed 1, not {self.max_cost}", field="max_cost")

    def levels(self, field: str) -> tuple[str, ...]:
        """The public levels of ``field`` in this table."""
        return self.sites if field == SITE else group_levels(field)

    def to_json(self) -> str:
        """The layout as a request states it to the nodes."""
        sites = {"sites": list(self.sites)} if self.sites else {}
        return json.dumps({"group_by": list(self.group_by), "measures": list(self.measures), **sites})

    @classmethod
    def from_json(cls, text: str) -> GroupedStatisticsLayout:
        """The layout a request states: group-by fields and measures (and, by site, the
        sites), nothing else."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or not _REQUIRED <= set(data) <= {*_REQUIRED, "sites"}:
            raise ConfigError("a statistics request states exactly group_by and measures (and sites)", field="layout")
        for key, names in data.items():
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise ConfigError("must be a list of field names", field=key)
        return cls(tuple(data["group_by"]), tuple(data["measures"]), sites=tuple(data.get("sites", ())))

    @cached_property
    def dims(self) -> tuple[int, ...]:
        return tuple(len(self.levels(field)) for field in self.group_by)

    @cached_property
    def cells(self) -> list[tuple[str, ...]]:
        """Every cell's levels, in vector order (row-major over ``group_by``)."""
        return list(product(*(self.levels(field) for field in self.group_by)))

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
        """The bins' precision: the widest finite bin's hi / lo - 1 (``bin_ratio`` - 1 up to
        rounding). It bounds the relative error of a quantile (of at least 1) read from a
        histogram of whole counts; a coarsened histogram is coarser (module docstring)."""
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
        """Length of a node's vector: ``width`` slots per cell, nothing else."""
        return self.n_cells * self.width

    def slots(self) -> list[str]:
        """Every slot's name, in vector order (for audit logs and egress checks)."""
        inner = ["rows"] + [f"{m}.{s}" for m in self.measures for s in _MEASURE_SLOTS]
        inner += [f"{schema.COST}.bin[{k}]" for k in range(self.n_bins)]
        return [f"{self._label(cell)}:{slot}" for cell in self.cells for slot in inner]

    def _label(self, cell: tuple[str, ...]) -> str:
        return ",".join(f"{field}={level}" for field, level in zip(self.group_by, cell))

    def cost_bins(self, costs: np.ndarray) -> np.ndarray:
        """The histogram bin of each (non-negative) cost."""
        return np.where(costs == 0, 0, np.searchsorted(self.cost_edges, costs, side="right"))

    @property
    def released_measures(self) -> tuple[str, ...]:
        """What a release decides per cell besides its rows: the measures, and the cost
        whose histogram every cell carries (a histogram counts the rows holding a cost)."""
        return self.measures if schema.COST in self.measures else (*self.measures, schema.COST)

    def cell_codes(self, rows: pd.DataFrame, role: str | None, site: str | None = None) -> np.ndarray:
        """Each row's cell, in vector order; ``role`` and ``site`` are the node's, for grouping
        by role and by site."""
        codes = []
        for field in self.group_by:
            levels = self.levels(field)
            if field in (ROLE, SITE):
                own = role if field == ROLE else site
                if own not in levels:
                    raise ValueError(f"grouping by {field} needs the node's {field} ({', '.join(levels)}), not {own!r}")
                codes.append(np.full(len(rows), levels.index(own)))
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

    def local_vector(
        self,
        rows: pd.DataFrame,
        *,
        role: str | None = None,
        site: str | None = None,
        min_cohort: int = MIN_COHORT,
        release: TableRelease | None = None,
    ) -> np.ndarray:
        """This node's sums over ``rows`` as one float64 vector, withheld cells zeroed.

        ``release``: the cells this table may release, as ``plan_release`` decided them over
        the job's whole plan; None decides a plan of this table alone.
        """
        if min_cohort < 1:
            raise ValueError(f"min_cohort must be at least 1, not {min_cohort}")
        cell = self.cell_codes(rows, role, site)
        if release is None:
            release = plan_release([self], rows, role=role, site=site, min_cohort=min_cohort)[0]
        release.check(self)
        shown = np.array(release.rows)
        n_cells = self.n_cells
        block = np.zeros((n_cells, self.width))
        block[:, 0] = np.bincount(cell, minlength=n_cells)
        for i, measure in enumerate(self.measures):
            shown_measure = np.array(release.measures[measure])
            block[:, self.measure_slots(i)] = self._measure_block(rows, measure, cell, shown_measure)
        costs = rows[schema.COST].to_numpy(dtype="float64")
        present = ~np.isnan(costs)
        if (costs[present] < 0).any():
            raise ValueError(f"{schema.COST} must not be negative")
        flat = cell[present] * self.n_bins + self.cost_bins(costs[present])
        histograms = np.bincount(flat, minlength=n_cells * self.n_bins).reshape(n_cells, self.n_bins)
        for c in np.flatnonzero(release.measures[schema.COST]):
            block[c, -self.n_bins :] = coarsen_histogram(histograms[c], min_cohort)
        block[~shown] = 0.0
        return block.ravel()

    # A noisy table (distributed DP, ``fedcost.privacy.distributed.StatisticsNoise``): per cell
    # the rows, then per measure the count of present values and their sum with each value
    # clipped, then a cost histogram of wider bins; nothing withheld (the noise protects small
    # cells) and no sums of squares (one record could move them by its value squared).

    @property
    def noisy_n_bins(self) -> int:
        return 1 + math.ceil((self.n_bins - 1) / NOISY_BIN_GROUP)

    def noisy_cost_bins(self, costs: np.ndarray) -> np.ndarray:
        """The noisy histogram's bin of each cost: exact zeros alone, then ``NOISY_BIN_GROUP``
        fine bins to a bin."""
        fine = self.cost_bins(costs)
        return np.where(fine == 0, 0, 1 + (fine - 1) // NOISY_BIN_GROUP)

    @cached_property
    def noisy_bin_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper edge of every bin of the noisy histogram."""
        lower, upper = self.bin_bounds
        first = np.concatenate([[0], 1 + NOISY_BIN_GROUP * np.arange(self.noisy_n_bins - 1)])
        last = np.concatenate([[0], np.minimum(first[1:] + NOISY_BIN_GROUP - 1, self.n_bins - 1)])
        return lower[first], upper[last]

    @property
    def noisy_width(self) -> int:
        return 1 + 2 * len(self.measures) + self.noisy_n_bins

    @property
    def noisy_size(self) -> int:
        return self.n_cells * self.noisy_width

    def noisy_touched(self) -> int:
        """The most slots of a noisy table one row changes: its cell's rows, each measure's
        count and sum, and one histogram bin."""
        return 2 + 2 * len(self.measures)

    def noisy_bounds(self, cost_clip: float) -> np.ndarray:
        """The most one row adds to each slot of a noisy table."""
        measures = [bound for m in self.measures for bound in (1.0, _measure_bound(m, cost_clip))]
        return np.tile(np.array([1.0, *measures, *([1.0] * self.noisy_n_bins)]), self.n_cells)

    def noisy_vector(
        self, rows: pd.DataFrame, *, role: str | None, cost_clip: float, site: str | None = None
    ) -> np.ndarray:
        """This node's noisy-table sums over ``rows``, values clipped, nothing withheld."""
        cell = self.cell_codes(rows, role, site)
        block = np.zeros((self.n_cells, self.noisy_width))
        block[:, 0] = np.bincount(cell, minlength=self.n_cells)
        for i, measure in enumerate(self.measures):
            values = rows[measure].to_numpy(dtype="float64")
            present = ~np.isnan(values)
            clipped = np.minimum(values[present], _measure_bound(measure, cost_clip))
            block[:, 1 + 2 * i] = np.bincount(cell[present], minlength=self.n_cells)
            block[:, 2 + 2 * i] = np.bincount(cell[present], weights=clipped, minlength=self.n_cells)
        costs = rows[schema.COST].to_numpy(dtype="float64")
        present = ~np.isnan(costs)
        bins = self.noisy_n_bins
        flat = cell[present] * bins + self.noisy_cost_bins(costs[present])
        block[:, -bins:] = np.bincount(flat, minlength=self.n_cells * bins).reshape(self.n_cells, bins)
        return block.ravel()

    def _measure_block(self, rows: pd.DataFrame, measure: str, cell: np.ndarray, shown: np.ndarray) -> np.ndarray:
        """Per cell: the count of present values, then the limbs of their exact integer sum
        and sum of squares in ``measure_unit``; zero where the release withholds the measure."""
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
        for c in np.flatnonzero(shown):
            chunk = sorted_units[bounds[c] : bounds[c + 1]]
            totals = [sum(chunk), sum(v * v for v in chunk)]
            block[c] = np.concatenate([[len(chunk)], exact.split(totals, LIMBS)])
        return block


@dataclass(frozen=True)
class TableRelease:
    """What a node releases of one table: per cell whether its rows (and so anything of it)
    leave, and per measure in ``released_measures`` whether that measure leaves.

    A site records it in its release ledger (``to_dict``), so a later plan over the same
    rows is decided against it (``plan_release(..., earlier=...)``).
    """

    rows: tuple[bool, ...]
    measures: Mapping[str, tuple[bool, ...]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "measures", MappingProxyType(dict(self.measures)))

    def check(self, layout: GroupedStatisticsLayout) -> None:
        """Refuse a release that is not one of ``layout``'s."""
        if len(self.rows) != layout.n_cells:
            raise ValueError(f"a release of this table flags {layout.n_cells} cells, not {len(self.rows)}")
        if set(self.measures) != set(layout.released_measures):
            names = ", ".join(layout.released_measures)
            raise ValueError(f"a release of this table flags exactly {names}, not {', '.join(self.measures)}")
        for name, flags in self.measures.items():
            if len(flags) != layout.n_cells:
                raise ValueError(f"a release of this table flags {layout.n_cells} cells of {name}, not {len(flags)}")
            if any(flag and not shown for flag, shown in zip(flags, self.rows)):
                raise ValueError(f"{name} is released in a cell whose rows are withheld")

    def to_dict(self) -> dict:
        """JSON-able, for the release ledger."""
        return {"rows": list(self.rows), "measures": {name: list(flags) for name, flags in self.measures.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> TableRelease:
        """The strict inverse of ``to_dict``: unknown keys and anything but booleans are refused."""
        if not isinstance(data, Mapping) or set(data) != {"rows", "measures"}:
            raise ValueError("a table release states exactly rows and measures")
        if not isinstance(data["measures"], Mapping) or not all(isinstance(k, str) for k in data["measures"]):
            raise ValueError("a table release's measures map measure names to flags")
        for flags in (data["rows"], *data["measures"].values()):
            if not isinstance(flags, list) or not all(isinstance(flag, bool) for flag in flags):
                raise ValueError("a table release's flags must be lists of true or false")
        return cls(tuple(data["rows"]), {name: tuple(flags) for name, flags in data["measures"].items()})


def plan_release(
    layouts: Sequence[GroupedStatisticsLayout],
    rows: pd.DataFrame,
    *,
    role: str | None,
    min_cohort: int,
    earlier: Sequence[tuple[GroupedStatisticsLayout, TableRelease]] = (),
    site: str | None = None,
) -> list[TableRelease]:
    """Which cells and measures each table of a plan releases, decided over the plan as a
    whole (complementary suppression, ``fedcost.privacy.smallcells``).

    ``rows``: every row the tables describe; ``earlier``: tables this node released before
    over the same rows, taken as they are; ``role`` and ``site``: the node's, for tables by
    role or site. No combination of the released cells of these
    tables and the grand total isolates 1 to ``min_cohort - 1`` rows, or the values of a
    measure in 1 to ``min_cohort - 1`` rows.
    """

    def table(layout: GroupedStatisticsLayout) -> smallcells.CellTable:
        return smallcells.CellTable(layout.cell_codes(rows, role, site), layout.n_cells, layout.released_measures)

    measures = {m for layout in [*layouts, *(e for e, _ in earlier)] for m in layout.released_measures}
    presence = {m: rows[m].notna().to_numpy() for m in sorted(measures)}
    before = []
    for layout, release in earlier:
        release.check(layout)
        flags = {smallcells.ROWS: np.array(release.rows)} | {m: np.array(f) for m, f in release.measures.items()}
        before.append((table(layout), flags))
    tables = [table(layout) for layout in layouts]
    decided = smallcells.complementary_suppression(tables, presence, min_cohort=min_cohort, earlier=before)
    return [
        TableRelease(
            tuple(bool(flag) for flag in flags[smallcells.ROWS]),
            {m: tuple(bool(flag) for flag in flags[m]) for m in layout.released_measures},
        )
        for layout, flags in zip(layouts, decided)
    ]


def _measure_bound(measure: str, cost_clip: float) -> float:
    """The most one row's value of ``measure`` may be in a noisy table: a cost or payment
    clipped at ``cost_clip``."""
    if measure in (schema.COST, schema.PAYMENT):
        return cost_clip
    return schema.COLUMNS[measure].value_range[1]


def _measure_record(measure: str, slots: np.ndarray, *, shown: bool, min_cohort: int) -> dict:
    """A measure's count, exact sum, mean and sample variance in one cell, or withheld."""
    count = round(float(slots[0]))
    total, squares = exact.join(slots[1:], LIMBS)
    unit = measure_unit(measure)
    withheld = not shown or 0 < count < min_cohort
    shown = not withheld and count > 0
    mean = total * unit / count if shown else math.nan
    variance = (
        (count * squares - total * total) * unit * unit / (count * (count - 1)) if shown and count > 1 else math.nan
    )
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
    coordinator), per measure ``<m>_n``, ``<m>_sum`` (exact in the measure's unit),
    ``<m>_mean``, ``<m>_var`` (sample variance), ``readmission_rate``, and per cost
    quantile its estimate (``cost_median``, ``cost_p90``).
    """

    layout: GroupedStatisticsLayout
    min_cohort: int
    records: tuple[dict, ...]
    noise_sd: float | None = None

    @classmethod
    def from_totals(
        cls, layout: GroupedStatisticsLayout, totals: np.ndarray, min_cohort: int = MIN_COHORT
    ) -> GroupedStatistics:
        totals = np.asarray(totals, dtype="float64")
        if totals.shape != (layout.size,):
            raise ValueError(f"expected a vector of {layout.size} sums for this layout, got shape {totals.shape}")
        block = totals.reshape(layout.n_cells, layout.width)
        lower, upper = layout.bin_bounds
        records = []
        for levels, sums in zip(layout.cells, block):
            n = int(round(sums[0]))
            suppressed = 0 < n < min_cohort
            record: dict = dict(zip(layout.group_by, levels))
            record |= {"n": None if suppressed else n, "suppressed": suppressed}
            for i, measure in enumerate(layout.measures):
                record |= _measure_record(
                    measure, sums[layout.measure_slots(i)], shown=not suppressed, min_cohort=min_cohort
                )
            if schema.READMISSION in layout.measures:
                record["readmission_rate"] = record[f"{schema.READMISSION}_mean"]
            histogram = sums[-layout.n_bins :]
            costs = round(float(histogram.sum()))
            shown = not suppressed and not 0 < costs < min_cohort
            for name, p in QUANTILES.items():
                record[f"cost_{name}"] = histogram_quantile(histogram, lower, upper, p)[0] if shown else math.nan
            records.append(record)
        return cls(layout, min_cohort, tuple(records))

    @classmethod
    def from_noisy_totals(
        cls, layout: GroupedStatisticsLayout, totals: np.ndarray, min_cohort: int, noise_sd: float
    ) -> GroupedStatistics:
        """Per-cell results from a noisy table's sums (``noisy_vector`` plus every node's share of
        Skellam noise of standard deviation ``noise_sd`` rows per slot). Post-processing only: a
        cell whose noisy count is under ``min_cohort`` is withheld, a histogram bin within two
        standard deviations of zero reads as empty (most bins of a skewed cost are, and their
        noise would pile up in the upper quantiles); there are no variances."""
        totals = np.asarray(totals, dtype="float64")
        if totals.shape != (layout.noisy_size,):
            raise ValueError(f"expected a vector of {layout.noisy_size} noisy sums for this layout, got {totals.shape}")
        block = totals.reshape(layout.n_cells, layout.noisy_width)
        lower, upper = layout.noisy_bin_bounds
        records = []
        for levels, sums in zip(layout.cells, block):
            n = max(int(round(sums[0])), 0)
            suppressed = n < min_cohort
            record: dict = dict(zip(layout.group_by, levels))
            record |= {"n": None if suppressed else n, "suppressed": suppressed and n > 0}
            for i, measure in enumerate(layout.measures):
                count = max(int(round(sums[1 + 2 * i])), 0)
                shown = not suppressed and count >= min_cohort
                record |= {
                    f"{measure}_n": count if shown else None,
                    f"{measure}_sum": float(sums[2 + 2 * i]) if shown else math.nan,
                    f"{measure}_mean": float(sums[2 + 2 * i]) / count if shown else math.nan,
                    f"{measure}_var": math.nan,
                }
            if schema.READMISSION in layout.measures:
                record["readmission_rate"] = record[f"{schema.READMISSION}_mean"]
            histogram = sums[-layout.noisy_n_bins :]
            histogram = np.where(histogram > 2 * noise_sd, histogram, 0.0)  # mostly noise: an empty bin
            for name, p in QUANTILES.items():
                estimate = histogram_quantile(histogram, lower, upper, p)[0] if not suppressed else math.nan
                record[f"cost_{name}"] = estimate
            records.append(record)
        return cls(layout, min_cohort, tuple(records), noise_sd)

    @property
    def note(self) -> str:
        """What was withheld and how precise the quantiles are, in words for a report."""
        withheld = sum(r["suppressed"] for r in self.records)
        if self.noise_sd is not None:
            return (
                f"Distributed differential privacy: every count, sum and histogram bin carries Skellam noise of "
                f"standard deviation {self.noise_sd:.3g} rows' worth (values clipped per row); {withheld} of "
                f"{len(self.records)} cells with a noisy count under {self.min_cohort} are withheld. Means are noisy "
                "sums over noisy counts; quantiles come from noisy histograms; no variances are released."
            )
        return (
            f"{withheld} of {len(self.records)} cells suppressed at the coordinator (1 to {self.min_cohort - 1} rows). "
            f"Before anything leaves a node, the node withholds its cells and measures of 1 to {self.min_cohort - 1} "
            "rows, and complementary cells so that no difference of released figures rebuilds them: a cell's figures "
            "may leave some nodes' rows out, and the release does not say which. Counts, sums and means are exact over "
            "the rows released. Cost quantiles are estimates from histograms each node coarsened to groups of at least "
            f"{self.min_cohort} of its rows (the end groups spread as wide as their neighbours): typically a median "
            "within 2% and a p90 within 10% in cells of over 1,000 rows; a small cell's p90 is rough."
        )

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(list(self.records))
        for column in ["n"] + [f"{m}_n" for m in self.layout.measures]:
            frame[column] = frame[column].astype("Int64")
        return frame

    def to_dict(self) -> dict:
        """JSON-able: NaN becomes None."""

        def clean(value: object) -> object:
            return None if isinstance(value, float) and not math.isfinite(value) else value

        return {
            "group_by": list(self.layout.group_by),
            "measures": list(self.layout.measures),
            "min_cohort": self.min_cohort,
            "note": self.note,
            "cells": [{k: clean(v) for k, v in record.items()} for record in self.records],
        }
