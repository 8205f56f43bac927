"""Small cells: nothing that leaves a node may describe 1 to ``min_cohort - 1`` of its rows.

The small-cell rule (CMS and most registries: counts of 1 to 10 are never published)
guards more than the cells a node withholds. Two channels defeat a per-cell check, and
this module closes both; it is pure numpy, with no layouts, schema or Flower.

Histograms. A histogram is a table of cells too: with fine bins, each bin holds a row or
two, so a histogram lists its rows' values (a crafted model whose score is a function of
age turns an AUROC histogram into a list of ages). ``coarsen_histogram`` merges adjacent
bins into groups of at least ``min_cohort`` rows and spreads each group's counts evenly
over its bins, so every bin describes 0 or at least ``min_cohort`` rows while the vector
keeps its fixed layout and still adds up across nodes.

Differencing. A coordinator that asks for overlapping tables (by diagnosis group, and by
diagnosis group and sex) can subtract released cells from each other and from the grand
total, which other releases give away, and rebuild a withheld cell exactly.
``complementary_suppression`` decides which cells a plan of tables may release so that
no combination of released cells isolates 1 to ``min_cohort - 1`` rows: every linear
combination of released cells is constant on *atoms*, the rows that fall in the same
released cells of every table, so it is enough that every atom holds 0 or at least
``min_cohort`` rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ROWS = "rows"


def coarsen_histogram(counts: np.ndarray, min_cohort: int) -> np.ndarray:
    """``counts`` with every bin describing 0 or at least ``min_cohort`` rows.

    ``counts`` is ``(bins,)`` or ``(classes, bins)`` of whole counts; classes share the
    groups, which are formed on the rows of all classes together. The sweep starts at
    bin 0 and closes a group at the first bin where it holds at least ``min_cohort``
    rows; a last group of fewer rows joins the one before. Each group's counts, per
    class, are spread evenly over its bins (float64): totals per group and class are
    kept, positions inside a group are lost. The two end groups reach to the ends of the
    range in principle, which would put a skewed cost's top rows at the last bin (a p90
    off by a factor of ten); each is spread instead over as many bins as its neighbour
    group spans, from its inner edge. Fewer than ``min_cohort`` rows in all give zeros.

    What the groups reveal. The end groups are placed by their inner edges alone,
    whatever the data beyond them, so neither the smallest nor the largest value shows:
    those are single records. A later group starts right after the bin where the one before closed,
    not at its own smallest row's bin, so a start says nothing the previous end did not.
    Every end but the last is where a group closed: the bin in which the node's running
    count reached about ``k * min_cohort`` rows, that is the bin of an order statistic at
    rank about ``k * min_cohort``. That is a quantile at the bins' precision, the kind of
    figure grouped statistics release anyway (a median is an order statistic too), and
    each group's counts describe at least ``min_cohort`` rows; a class count inside a
    group is a rate whose denominator is the group.

    Raises:
        ValueError: ``counts`` is not a vector or matrix of whole non-negative numbers,
            or ``min_cohort`` is below 1.
    """
    counts = np.asarray(counts, dtype="float64")
    if counts.ndim not in (1, 2) or counts.shape[-1] == 0:
        raise ValueError(f"expected (bins,) or (classes, bins) counts, got shape {counts.shape}")
    if min_cohort < 1:
        raise ValueError(f"min_cohort must be at least 1, not {min_cohort}")
    if not (np.isfinite(counts).all() and (counts >= 0).all() and (counts == np.rint(counts)).all()):
        raise ValueError("a histogram holds whole non-negative counts")
    coarse = np.zeros_like(counts)
    for held, spread in histogram_groups(counts, min_cohort):
        coarse[..., spread] = counts[..., held].sum(axis=-1, keepdims=True) / (spread.stop - spread.start)
    return coarse


def histogram_groups(counts: np.ndarray, min_cohort: int) -> list[tuple[slice, slice]]:
    """The groups ``coarsen_histogram`` forms: per group, the bins whose rows it holds and the
    bins it is spread over (empty when all rows together are fewer than ``min_cohort``)."""
    per_bin = np.asarray(counts, dtype="float64").reshape(-1, np.shape(counts)[-1]).sum(axis=0)
    cumulative = np.cumsum(per_bin)
    ends, closed = [], 0.0
    while cumulative[-1] - closed >= min_cohort:
        end = int(np.searchsorted(cumulative, closed + min_cohort))
        ends.append(end)
        closed = cumulative[end]
    if not ends:
        return []
    ends[-1] = len(per_bin) - 1
    held = list(zip([0, *(end + 1 for end in ends[:-1])], ends))
    return [(slice(start, end + 1), slice(*_spread(held, i))) for i, (start, end) in enumerate(held)]


def _spread(groups: list[tuple[int, int]], i: int) -> tuple[int, int]:
    """The bins group ``i`` is spread over (as a half-open range): its own, or for an end
    group as many as its neighbour spans, from its inner edge."""
    start, end = groups[i]
    if len(groups) > 1 and i == 0:
        width = groups[1][1] - groups[1][0] + 1
        return max(start, end + 1 - width), end + 1
    if len(groups) > 1 and i == len(groups) - 1:
        width = groups[-2][1] - groups[-2][0] + 1
        return start, min(end, start + width - 1) + 1
    return start, end + 1


@dataclass(frozen=True)
class CellTable:
    """One table as suppression sees it: each row's cell and the quantities it releases.

    ``codes``: each row's cell, in ``[0, n_cells)``. ``quantities``: what a cell holds
    besides its row count (measures, counted over the rows where they are present).
    """

    codes: np.ndarray
    n_cells: int
    quantities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        codes = np.asarray(self.codes)
        if codes.ndim != 1 or (codes.size and (codes.min() < 0 or codes.max() >= self.n_cells)):
            raise ValueError(f"cell codes must be a vector of cells in [0, {self.n_cells})")
        if ROWS in self.quantities:
            raise ValueError(f"'{ROWS}' is every table's own quantity; do not list it")


@dataclass(frozen=True)
class _Check:
    """One family of atoms: the rows of ``population`` keyed by their cells in ``components``.

    A component is ``(table, quantity)``: a row's code there is its cell where it counts
    towards a released cell of that quantity, else -1.
    """

    population: np.ndarray
    components: tuple[tuple[int, str], ...]


class _Plan:
    """The greedy's state: every table's released flags, and the rows in compressed form
    (rows with the same cells everywhere and the same quantities present are
    interchangeable, so each kind of row is kept once with its count)."""

    def __init__(
        self,
        tables: list[CellTable],
        released: list[dict[str, np.ndarray]],
        n_fixed: int,
        presence: Mapping[str, np.ndarray],
    ):
        self.tables, self.released, self.n_fixed = tables, released, n_fixed
        names = sorted({q for table in tables for q in table.quantities})
        columns = [np.asarray(t.codes, dtype=np.int64) for t in tables] + [presence[q].astype(np.int64) for q in names]
        kinds, self.weight = np.unique(np.stack(columns, axis=1), axis=0, return_counts=True)
        self.codes = [kinds[:, t] for t in range(len(tables))]
        self.present = {ROWS: np.ones(len(kinds), dtype=bool)}
        self.present |= {q: kinds[:, len(tables) + i].astype(bool) for i, q in enumerate(names)}
        self.rows_in_cell = {
            (t, q): np.bincount(self.codes[t][mask], weights=self.weight[mask], minlength=table.n_cells)
            for t, table in enumerate(tables)
            for q, mask in self.present.items()
            if q == ROWS or q in table.quantities
        }
        self.checks = [self._check(ROWS, ROWS)]
        for q in names:
            self.checks += [self._check(q, q), self._check(ROWS, ROWS, q)]

    def _check(self, population: str, *quantities: str) -> _Check:
        components = tuple(
            (t, q) for q in quantities for t, table in enumerate(self.tables) if q == ROWS or q in table.quantities
        )
        return _Check(self.present[population], components)

    def code(self, component: tuple[int, str]) -> np.ndarray:
        """Each kind of row's released cell in ``component``, or -1."""
        t, quantity = component
        cells = self.codes[t]
        counted = self.present[quantity] & self.released[t][quantity][cells]
        return np.where(counted, cells, -1)

    def cost(self, cells: set[tuple[tuple[int, str], int]]) -> tuple[int, int]:
        """Rows that withholding ``cells`` takes out of the release, and how many cells."""
        whole = {(t, cell) for (t, q), cell in cells if q == ROWS}
        kept = [((t, q), cell) for (t, q), cell in cells if q == ROWS or (t, cell) not in whole]
        return int(sum(self.rows_in_cell[c][cell] for c, cell in kept)), len(kept)

    def withhold(self, component: tuple[int, str], cell: int) -> None:
        """Withhold one quantity of one cell; withholding its rows withholds everything in it."""
        t, quantity = component
        for name, flags in self.released[t].items():
            if name == quantity or quantity == ROWS:
                flags[cell] = False


def _atoms(plan: _Plan, check: _Check) -> tuple[np.ndarray, np.ndarray]:
    """The atoms of one check: their patterns (one row per atom) and row counts."""
    if not check.population.any():
        return np.zeros((0, len(check.components)), dtype=np.int64), np.zeros(0, dtype=np.int64)
    matrix = np.stack([plan.code(c)[check.population] for c in check.components], axis=1)
    patterns, inverse = np.unique(matrix, axis=0, return_inverse=True)
    sizes = np.bincount(inverse.reshape(-1), weights=plan.weight[check.population], minlength=len(patterns))
    return patterns, np.rint(sizes).astype(np.int64)


def _fix(plan: _Plan, check: _Check, patterns: np.ndarray, sizes: np.ndarray, atom: int) -> bool:
    """Withhold the cheapest set of plan cells that merges ``atom`` into another atom of
    its class over the earlier tables, or that withholds it in every plan table. False
    where the atom is its whole class: the earlier tables give it away already, and no
    plan can change it."""
    fixed = np.array([t < plan.n_fixed for t, _ in check.components], dtype=bool)
    own = patterns[atom]
    same_class = np.flatnonzero((patterns[:, fixed] == own[fixed]).all(axis=1))
    if len(same_class) == 1:
        return False
    options = [{(c, int(own[i])) for i, c in enumerate(check.components) if not fixed[i] and own[i] >= 0}]
    for other in same_class[same_class != atom]:
        theirs = patterns[other]
        differ = np.flatnonzero(~fixed & (own != theirs))
        options.append({(check.components[i], int(code)) for i in differ for code in (own[i], theirs[i]) if code >= 0})
    for component, cell in sorted(min((o for o in options if o), key=plan.cost)):
        plan.withhold(component, cell)
    return True


def complementary_suppression(
    plan: Sequence[CellTable],
    presence: Mapping[str, np.ndarray],
    *,
    min_cohort: int,
    earlier: Sequence[tuple[CellTable, Mapping[str, np.ndarray]]] = (),
) -> list[dict[str, np.ndarray]]:
    """Which cells of each plan table may be released, decided over the plan as a whole.

    Args:
        plan: the tables to decide, over the same rows.
        presence: per quantity (measure), which rows hold it; every table's quantities
            must be here.
        min_cohort: the smallest number of rows anything released may describe.
        earlier: tables already released over the same rows, with their released flags
            per quantity (``ROWS`` included); they are taken as they are.

    Returns:
        Per plan table, per quantity (``ROWS`` first, then the table's quantities), a
        boolean per cell: released or withheld. A withheld row count withholds every
        quantity of the cell.

    The rule. For each quantity, a row's *pattern* is the tuple of released cells it
    counts towards in every table (earlier and plan; -1 where withheld or, for a
    measure, where the row lacks it); rows with equal patterns form an *atom*. Any sum
    of released cells, with any coefficients, is constant on atoms, so whatever can be
    derived counts whole atoms. Checked: the atoms of the row counts; per measure, the
    atoms of the rows holding it; and per measure the atoms of (row pattern, measure
    pattern) over all rows, since a cell's rows minus its measure count is the rows
    lacking the measure. Every atom must hold 0 or at least ``min_cohort`` rows, the atom
    of rows withheld everywhere included: the grand total is derivable from other
    releases (feature statistics plus evaluation sums), so it is treated as released.

    The greedy. Start from the basic rule (cells, and measures in a cell, of 1 to
    ``min_cohort - 1`` rows withheld). While an atom offends, take the smallest; of the
    ways to merge it with an atom that has its pattern over the earlier tables (withhold
    the plan cells where the two patterns differ) or to withhold every plan cell it is
    released in, take the one that withholds the fewest rows. Each step withholds at
    least one released cell, so it ends; withholding every plan cell would satisfy the
    rule. An atom that is a whole class of the earlier tables' patterns is already
    derivable from them alone; no plan can change it, and it is left as it is.

    Conservative: tables that cut across each other (by payer, and by diagnosis group)
    make atoms of their intersections, which their margins alone rarely isolate, so the
    rule withholds more there than differencing strictly needs; nested tables (by
    diagnosis group, and by diagnosis group and sex) lose little.
    """
    if min_cohort < 1:
        raise ValueError(f"min_cohort must be at least 1, not {min_cohort}")
    if not plan:
        return []
    tables = [table for table, _ in earlier] + list(plan)
    n_rows = {len(table.codes) for table in tables} | {len(mask) for mask in presence.values()}
    if len(n_rows) > 1:
        raise ValueError(f"every table and presence mask must cover the same rows, got lengths {sorted(n_rows)}")
    for table in tables:
        unknown = set(table.quantities) - set(presence)
        if unknown:
            raise ValueError(f"no presence mask for {', '.join(sorted(unknown))}")
    released = [_fixed_flags(table, flags) for table, flags in earlier]
    released += [_basic_rule(table, presence, min_cohort) for table in plan]
    state = _Plan(tables, released, len(earlier), {q: np.asarray(m, dtype=bool) for q, m in presence.items()})
    while _step(state, min_cohort):
        pass
    return released[len(earlier) :]


def _step(state: _Plan, min_cohort: int) -> bool:
    """Fix the smallest offending atom that a plan cell can fix; False when none is left."""
    offending = []
    for number, check in enumerate(state.checks):
        patterns, sizes = _atoms(state, check)
        for atom in np.flatnonzero((sizes > 0) & (sizes < min_cohort)):
            offending.append((int(sizes[atom]), number, int(atom), patterns, sizes))
    for _, number, atom, patterns, sizes in sorted(offending, key=lambda o: o[:3]):
        if _fix(state, state.checks[number], patterns, sizes, atom):
            return True
    return False


def _fixed_flags(table: CellTable, flags: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    expected = {ROWS, *table.quantities}
    if set(flags) != expected:
        raise ValueError(f"an earlier table's flags must name exactly {', '.join(sorted(expected))}")
    result = {}
    for name in (ROWS, *table.quantities):
        result[name] = np.asarray(flags[name], dtype=bool).copy()
        if result[name].shape != (table.n_cells,):
            raise ValueError(f"expected {table.n_cells} flags for {name}, got shape {result[name].shape}")
    return result


def _basic_rule(table: CellTable, presence: Mapping[str, np.ndarray], min_cohort: int) -> dict[str, np.ndarray]:
    """A cell, or a measure within it, is released where it holds 0 or at least ``min_cohort`` rows."""
    codes = np.asarray(table.codes, dtype=np.int64)
    rows = np.bincount(codes, minlength=table.n_cells)
    flags = {ROWS: (rows == 0) | (rows >= min_cohort)}
    for quantity in table.quantities:
        present = np.bincount(codes[np.asarray(presence[quantity], dtype=bool)], minlength=table.n_cells)
        flags[quantity] = flags[ROWS] & ((present == 0) | (present >= min_cohort))
    return flags
