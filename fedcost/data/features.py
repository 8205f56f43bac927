"""Federated preprocessing: features that mean the same thing at every site.

Before training, every node computes *sums* over its training rows — per numeric
feature the count of present values, their sum and sum of squares; per categorical
feature the count of each level and of rows lacking a level (``missing``); the row
count, the readmissions and the cost total — laid out as one flat vector
(``StatisticsLayout``). The coordinator only adds those vectors, so the step runs under
secure aggregation unchanged. From the federation-wide totals come the vocabularies,
means and scales (``FeatureSpec``); no site's own distribution is needed and no rows are
pooled.

Values a node lacks (a column its role does not hold, or an empty cell) are imputed with
the federation-wide mean (numeric) or no level (categorical) and flagged in an extra
``<column>__missing`` feature, never silently zero.

Small cells. A level's count is a cell of the training rows, so a node withholds every
level (and missing) count of 1 to ``min_cohort - 1`` rows; and because the row count is
released, the withheld counts of a column add up to ``rows`` minus the released ones, so
while that union is 1 to ``min_cohort - 1`` rows the node also withholds the column's
smallest released count (complementary suppression). A numeric column's (count, sum,
sum of squares) leave only where at least ``min_cohort`` rows hold the value; otherwise
zeros. Withheld counts make vocabularies and flags follow the counts that were released.

Levels no site can release. Where sites are small, a level may be a small cell at every
site yet common in the federation (a performance status in 113 of 227 patients at 18
institutions of 2 to 36), and a level no site could release left the model, which then
missed the pooled fit. So in a secure sum a node also says, per level, whether it holds at
least ``LEVEL_SHARE`` training rows of it: a bit, not a count. The coordinator sees only
their sum over the sites, the number of sites holding that many, and takes a level in when
it proves ``min_cohort`` rows: at least ``SITES_PER_LEVEL`` such sites and
``LEVEL_SHARE`` rows times their number at least ``min_cohort``. ``LEVEL_SHARE`` is fixed,
whatever a job asks, so no two jobs' bits set the same level's count between two
thresholds. In the clear (no secure aggregation) and in a noisy release a node sends no
bits (0): the first would show its own small cells, the second releases counts whole.
What the bits add: that a site's withheld level holds ``LEVEL_SHARE`` to ``min_cohort - 1``
rows, summed over at least ``min_nodes`` sites.

A few rows lacking a value (1 to ``min_cohort - 1``) are a small cell too, but withholding
the column for them lost it: real extracts lack a lab value or a category in a handful of
rows at every site, and a column every site withheld was dropped from the model. So where
only the lacking rows are few, the node releases the column as if those rows were like the
present ones: the present rows' sums scaled to all rows (count = rows, sum and sum of
squares times rows / present; level counts times rows / present, the missing count 0).
What leaves describes the present rows (at least ``min_cohort`` of them) and says nothing
of how many lack the value; those rows are imputed and, unless other sites flag the
column, unflagged. Scaled sums are rounded to what sums of whole rows can be: level
counts to whole rows (largest remainders, so they still add up to ``rows``), a numeric
column's sums to the grid its values lie on (whole numbers for ages, counts and 0/1 flags,
tenths, 1/90 for days covered of 90). A count times rows / present is a whole number again for the true present
count only, so unrounded digits gave away how many rows lack the value.

Magnitudes. A shared sum carries each entry in fixed point, within ±2**30 in steps of
2**-10 (``fedcost.server.shared_sum``): an income of 10**7 has a square of 10**14, and a
column of values near 10**-6 sums to less than one step. So a numeric column's sum and sum
of squares, and the cost total, travel as signed digits at fixed powers of two
(``split_sum``, ``LIMB_EXPONENTS``): whole numbers below 2**20 at 2**-40 to 2**60, below
2**29 at 2**80, and at 2**-60 the fraction left. Whole digits come back exactly (rounded:
each node's entry is off by a grid step at most), so the total is the pooled sum to 2**-70
per node, at any magnitude a measurement has (the loader refuses values beyond
``loader.MAX_MAGNITUDE``). A noisy release clips values to the column's bounds (or
``schema.UNBOUNDED_VALUE_CLIP``) instead, and carries each sum in its digit at 2**0 (the
others are 0, and ignored).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fedcost import schema
from fedcost.data.loader import MAX_MAGNITUDE
from fedcost.models.training import TaskData
from fedcost.privacy.policy import MIN_COHORT

_MISSING = "__missing"
# A level no site can release enters the vocabulary when at least SITES_PER_LEVEL sites
# (the secure sum's own floor) each hold LEVEL_SHARE of its training rows, as many sites as
# make min_cohort rows (module doc): 3 sites of 4 rows for the usual 11.
SITES_PER_LEVEL, LEVEL_SHARE = 3, 4
# Without noise a summed count is a whole number of rows give or take the secure sum's
# rounding: a node's fixed-point entry may be one grid step high (2**-10 of a row in the
# statistics stage), so a count every node sent as 0 can decode as a thousandth. Read as
# rows, that made a level and a missing flag out of nothing (`sex=female` in a real-data
# run whose nodes have no `sex`). Under half a row is none.
ROUNDING = 0.5


def model_scale(column: schema.Column, values: np.ndarray) -> np.ndarray:
    """Values as models see them before standardising: log1p for skewed counts."""
    return np.log1p(values) if column.log_scale else values


def _shared_rows(sites: float, min_cohort: int) -> float:
    """The rows a level's summed bits prove: ``min_cohort`` where enough sites hold
    ``LEVEL_SHARE`` rows of it (at least ``SITES_PER_LEVEL``, and as many as make
    ``min_cohort``), else none."""
    enough = max(SITES_PER_LEVEL, math.ceil(min_cohort / LEVEL_SHARE))
    return float(min_cohort) if sites > enough - ROUNDING else 0.0


def _declared(column: schema.Column) -> bool:
    """A data set's own feature (``[features]`` of its mapping), not a schema field."""
    return column not in schema.FEATURES


def withhold_small_counts(counts: list[int], min_cohort: int) -> list[float]:
    """``counts`` of one column's slots (which partition the rows) with every count of 1 to
    ``min_cohort - 1`` zeroed, then the smallest released counts too while the withheld
    ones add up to 1 to ``min_cohort - 1`` rows (the released total would give it away)."""
    released = [n if n >= min_cohort else 0 for n in counts]
    while 0 < sum(counts) - sum(released) < min_cohort and any(released):
        smallest = min((n, i) for i, n in enumerate(released) if n > 0)[1]
        released[smallest] = 0
    return [float(n) for n in released]


def _as_if_present(rows: int, present: int, min_cohort: int) -> float:
    """rows / present where only a few rows (1 to ``min_cohort - 1``) lack a value among at
    least ``min_cohort`` that hold it: the factor that releases the present rows' sums for
    all rows (see the module's doc); 1.0 otherwise."""
    lacking = rows - present
    return rows / present if 0 < lacking < min_cohort and present >= min_cohort else 1.0


def _whole_rows(counts: list[float], rows: int) -> list[float]:
    """``counts`` (a column's released level counts, then the rows it withheld) scaled to ``rows``
    in whole rows: each scaled count rounded down, the rows left over going to the largest
    remainders, so they add up to ``rows`` and carry no trace of the scale."""
    scaled = [n * rows / sum(counts) for n in counts]
    whole = [math.floor(n) for n in scaled]
    by_remainder = sorted(range(len(counts)), key=lambda i: (whole[i] - scaled[i], i))
    for i in by_remainder[: rows - sum(whole)]:
        whole[i] += 1
    return [float(n) for n in whole]


# The grids 1 / q a numeric column's values may lie on: whole numbers, decimals to 10**-6, and
# fractions such as days covered of 90 (a proportion of days covered).
_GRIDS = sorted({*range(1, 401), *(10**k for k in range(7))})


def _on_grid(sums: list[float], values: np.ndarray) -> list[float]:
    """A numeric column's scaled (count, sum, sum of squares) rounded to the coarsest grid 1 / q
    its ``values`` lie on (``_GRIDS``; squares to 1 / q**2), as sums of values on that grid are;
    left as they are for values on none. A sample of the distinct values rules most grids out."""
    distinct = np.unique(values)
    for q in _GRIDS:
        if all(np.allclose(v * q, np.round(v * q), rtol=0, atol=1e-9 * q) for v in (distinct[:64], distinct)):
            count, total, squares = sums
            return [float(round(count)), round(total * q) / q, round(squares * q * q) / (q * q)]
    return sums


# The powers of two a sum's digits stand for, lowest first (see the module's doc).
LIMB_EXPONENTS = tuple(range(-60, 81, 20))
_TOP_DIGIT_BITS = 29  # the top digit stays within the shared sum's clip of 2**30


def split_sum(total: float) -> list[float]:
    """``total`` as digits d_k, lowest first, with total = sum of d_k * 2**LIMB_EXPONENTS[k]:
    whole numbers below 2**20 in magnitude (the top one below 2**29), and the lowest holding
    the fraction. Exact: each digit takes bits of ``total`` that the others do not."""
    if not abs(total) < 2.0 ** (LIMB_EXPONENTS[-1] + _TOP_DIGIT_BITS):
        raise ValueError(f"a sum of {total:g} is beyond what the statistics carry (values within ±{MAX_MAGNITUDE:g})")
    digits, rest = [], total
    for exponent in reversed(LIMB_EXPONENTS[1:]):
        digit = math.trunc(math.ldexp(rest, -exponent))
        digits.append(float(digit))
        rest -= math.ldexp(digit, exponent)
    digits.append(math.ldexp(rest, -LIMB_EXPONENTS[0]))
    return digits[::-1]


def join_sum(digits: list[float]) -> float:
    """The total whose digits were summed over nodes: whole digits rounded (a shared sum's fixed
    point puts each node's entry at most a grid step or two of 2**-10 off), then added from
    the top."""
    low, *high = digits
    parts = [math.ldexp(round(d), e) for d, e in zip(high, LIMB_EXPONENTS[1:], strict=True)]
    return math.fsum([*parts, math.ldexp(low, LIMB_EXPONENTS[0])])


def _sum_slots(name: str) -> list[str]:
    return [f"{name}@2^{exponent}" for exponent in LIMB_EXPONENTS]


def _carried(total: float, *, noisy: bool) -> list[float]:
    """A sum's slots: its digits, or, in a noisy release, the sum itself in the digit at 2**0."""
    return _at_unit_digit(total, 0.0) if noisy else split_sum(total)


def _at_unit_digit(value: float, others: float) -> list[float]:
    return [value if exponent == 0 else others for exponent in LIMB_EXPONENTS]


@dataclass(frozen=True)
class StatisticsLayout:
    """Where each sum sits in a node's statistics vector; the same at every node."""

    columns: tuple[schema.Column, ...]
    targets: tuple[str, ...]

    def data_section(self) -> dict[str, Any]:
        """The targets and the columns beyond the schema's, as a job's ``[data]`` names them:
        what a coordinator and every site must agree on for their sums to line up."""
        extras = [column for column in self.columns if schema.COLUMNS.get(column.name) != column]
        return {
            "targets": sorted(self.targets),
            "extra_numeric": [column.name for column in extras if column.kind == "numeric"],
            "extra_categorical": {
                column.name: list(column.levels) for column in extras if column.kind == "categorical"
            },
        }

    def data_json(self) -> str:
        """``data_section`` as the hello carries it."""
        return json.dumps(self.data_section(), sort_keys=True)

    def slots(self) -> list[str]:
        """The statistics vector's entries; a sum of values is several (its digits, ``split_sum``)."""
        names = ["rows"]
        for column in self.columns:
            if column.kind == "numeric":
                names += [
                    f"{column.name}.count",
                    *_sum_slots(f"{column.name}.sum"),
                    *_sum_slots(f"{column.name}.sumsq"),
                ]
            else:
                names += [f"{column.name}={level}" for level in column.levels] + [f"{column.name}.missing"]
                names += [f"{column.name}={level}.sites" for level in column.levels]
        if schema.READMISSION in self.targets:
            names.append(f"{schema.READMISSION}.sum")
        if schema.COST in self.targets:
            names += _sum_slots(f"{schema.COST}.sum")
        return names

    def sums(self, vector: np.ndarray, *, noisy: bool = False) -> dict[str, float]:
        """A statistics vector (one node's or the summed totals) by name, each sum of values
        joined from its digits (``join_sum``), or, ``noisy``, read from its digit at 2**0."""
        slots = dict(zip(self.slots(), np.asarray(vector, dtype="float64").tolist(), strict=True))
        named: dict[str, float] = {}
        for name, value in slots.items():
            total, at, _ = name.rpartition("@2^")
            if not at:
                named[name] = value
            elif total not in named:
                digits = [slots[slot] for slot in _sum_slots(total)]
                named[total] = digits[LIMB_EXPONENTS.index(0)] if noisy else join_sum(digits)
        return named

    def local_statistics(
        self,
        rows: pd.DataFrame,
        min_cohort: int = MIN_COHORT,
        *,
        cost_clip: float | None = None,
        secure: bool = False,
    ) -> np.ndarray:
        """This node's sums over ``rows`` as one float64 vector in layout order: small counts
        withheld, or, for a noisy release (``cost_clip`` given), every value clipped to what
        ``noisy_bounds`` allows one record and nothing withheld: the noise protects small
        counts there, and a rule that withholds by count is not differentially private.
        ``secure``: the vector leaves masked, summed over sites, so it carries each level's
        bit (``LEVEL_SHARE`` rows or more; module doc)."""
        if min_cohort < 1:
            raise ValueError(f"min_cohort must be at least 1, not {min_cohort}")
        noisy = cost_clip is not None
        values: list[float] = [float(len(rows))]
        for column in self.columns:
            cells = rows[column.name]
            if column.kind == "numeric":
                raw = cells.dropna().to_numpy(dtype="float64")
                present = model_scale(column, np.clip(raw, *column.value_range) if noisy else raw)
                sums = [float(present.size), float(present.sum()), float(np.square(present).sum())]
                if not noisy and present.size < min_cohort:
                    sums = [0.0, 0.0, 0.0]
                elif not noisy and (scale := _as_if_present(len(rows), present.size, min_cohort)) != 1.0:
                    sums = _on_grid([n * scale for n in sums], present)
                count, total, squares = sums
                values += [count, *_carried(total, noisy=noisy), *_carried(squares, noisy=noisy)]
            else:
                counts = cells.value_counts()
                levels = [int(counts.get(level, 0)) for level in column.levels]
                lacking = len(rows) - sum(levels)
                if noisy:
                    values += [float(n) for n in [*levels, lacking]]
                elif _as_if_present(len(rows), sum(levels), min_cohort) != 1.0:
                    released = withhold_small_counts(levels, min_cohort)
                    values += _whole_rows([*released, sum(levels) - sum(released)], len(rows))[:-1] + [0.0]
                else:
                    values += withhold_small_counts([*levels, lacking], min_cohort)
                values += [float(secure and not noisy and n >= LEVEL_SHARE) for n in levels]
        if schema.READMISSION in self.targets:
            values.append(float(np.nansum(rows[schema.READMISSION].to_numpy(dtype="float64"))))
        if schema.COST in self.targets:
            costs = rows[schema.COST].to_numpy(dtype="float64")
            values += _carried(float(np.nansum(np.minimum(costs, cost_clip) if noisy else costs)), noisy=noisy)
        return np.asarray(values, dtype="float64")

    def noisy_bounds(self, cost_clip: float) -> np.ndarray:
        """The most one record adds to each slot of a noisy statistics vector."""
        bounds: list[float] = [1.0]
        for column in self.columns:
            if column.kind == "numeric":
                largest = max(float(np.max(np.abs(model_scale(column, np.array(column.value_range))))), 1.0)
                bounds += [1.0, *_at_unit_digit(largest, 1.0), *_at_unit_digit(largest**2, 1.0)]
            else:
                bounds += [1.0] * (2 * len(column.levels) + 1)
        bounds += [1.0] * (schema.READMISSION in self.targets)
        bounds += _at_unit_digit(cost_clip, 1.0) if schema.COST in self.targets else []
        return np.asarray(bounds)

    def touched(self) -> int:
        """The most slots of a statistics vector one record changes."""
        numeric = sum(column.kind == "numeric" for column in self.columns)
        return 1 + 3 * numeric + (len(self.columns) - numeric) + len(self.targets)

    def feature_spec(self, totals: np.ndarray, *, noise_sd: float = 0.0, min_cohort: int = MIN_COHORT) -> FeatureSpec:
        """The federation-wide encoding from the summed statistics vectors.

        ``noise_sd``: the standard deviation of the noise on each count (a noisy release);
        a level or a missing count within three of it of zero is taken as absent, so noise
        alone does not add levels or missing flags. Without noise a count is a whole number
        of rows off by the secure sum's rounding (``ROUNDING``), so under half a row is none,
        and a level no site released is in where enough sites hold ``LEVEL_SHARE`` rows of it
        to make ``min_cohort``.
        """
        slots = self.sums(totals, noisy=noise_sd > 0)
        rows = slots["rows"]
        if rows < 1:
            raise ValueError("the federation reported no training rows")
        absent = max(3 * noise_sd, ROUNDING)

        numeric: dict[str, tuple[float, float]] = {}
        log_scaled = tuple(c.name for c in self.columns if c.log_scale)
        vocabularies: dict[str, tuple[str, ...]] = {}
        flagged: list[str] = []
        left_out: list[str] = []
        for column in self.columns:
            if column.kind == "numeric":
                count = slots[f"{column.name}.count"]
                if count <= absent:
                    left_out += [column.name] if _declared(column) else []
                    continue
                mean = slots[f"{column.name}.sum"] / count
                variance = max(slots[f"{column.name}.sumsq"] / count - mean**2, 0.0)
                numeric[column.name] = (mean, math.sqrt(variance) or 1.0)
                if count < rows - absent:
                    flagged.append(column.name)
            else:
                counts = {
                    level: max(
                        slots[f"{column.name}={level}"],
                        _shared_rows(slots[f"{column.name}={level}.sites"], min_cohort) if noise_sd == 0 else 0.0,
                    )
                    for level in column.levels
                }
                if _declared(column) or any(n > absent for n in counts.values()):
                    left_out += [f"{column.name}={level}" for level, n in counts.items() if n <= absent]
                if not any(n > absent for n in counts.values()):
                    continue
                vocabularies[column.name] = tuple(level for level, n in counts.items() if n > absent)
                if slots[f"{column.name}.missing"] > absent:
                    flagged.append(column.name)
        return FeatureSpec(
            numeric=numeric,
            vocabularies=vocabularies,
            flagged=tuple(flagged),
            log_scaled=tuple(name for name in log_scaled if name in numeric),
            readmission_rate=slots[f"{schema.READMISSION}.sum"] / rows if schema.READMISSION in self.targets else None,
            cost_scale=max(slots.get(f"{schema.COST}.sum", rows) / rows, 1e-9),
            rows=int(rows),
            left_out=tuple(left_out),
        )


@dataclass(frozen=True)
class FeatureSpec:
    """Federation-wide means and scales, vocabularies and missing flags.

    ``cost_scale`` is the federation's mean cost: models learn costs in those units so a
    loss on costs of a few thousand and of a few hundred thousand stays well conditioned.
    ``left_out``: what the encoding lacks of the data set's own features and of the levels of
    any category in it, since no site released them over ``min_cohort`` training rows nor
    did enough sites hold ``LEVEL_SHARE`` each (absent everywhere, or rare everywhere: the
    two look alike, as they must), so a report can say so. (A schema column no site holds
    is not the data set's: not listed.)
    """

    numeric: dict[str, tuple[float, float]]
    vocabularies: dict[str, tuple[str, ...]]
    flagged: tuple[str, ...]
    log_scaled: tuple[str, ...]
    readmission_rate: float | None
    cost_scale: float
    rows: int
    left_out: tuple[str, ...] = ()

    @property
    def feature_names(self) -> list[str]:
        names = list(self.numeric)
        for column, levels in self.vocabularies.items():
            names += [f"{column}={level}" for level in levels]
        return names + [f"{column}{_MISSING}" for column in self.flagged]

    @property
    def initial_readmission_rate(self) -> float | None:
        """The base rate a readmission head starts from, when it is a usable probability."""
        rate = self.readmission_rate
        return rate if rate is not None and 0 < rate < 1 else None

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def encode(self, rows: pd.DataFrame) -> np.ndarray:
        """Standardised numerics, one-hot levels and missing flags, as float32."""
        blocks: list[np.ndarray] = []
        for column, (mean, scale) in self.numeric.items():
            values = rows[column].to_numpy(dtype="float64")
            if column in self.log_scaled:
                values = np.log1p(values)
            blocks.append(np.nan_to_num((values - mean) / scale, nan=0.0)[:, None])
        for column, levels in self.vocabularies.items():
            cells = rows[column].to_numpy(dtype=object)
            blocks.append(np.stack([cells == level for level in levels], axis=1))
        for column in self.flagged:
            blocks.append(rows[column].isna().to_numpy()[:, None])
        return np.concatenate(blocks, axis=1).astype("float32")

    @property
    def reference_levels(self) -> list[int]:
        """Where in ``feature_names`` each categorical column's first level sits: the reference
        a GLM's other levels are compared with (one-hot levels of every category would be
        collinear with the intercept)."""
        names = self.feature_names
        return [names.index(f"{column}={levels[0]}") for column, levels in self.vocabularies.items()]

    @property
    def design_names(self) -> list[str]:
        """A GLM's features: ``feature_names`` without the reference levels."""
        skip = set(self.reference_levels)
        return [name for i, name in enumerate(self.feature_names) if i not in skip]

    def design(self, rows: pd.DataFrame) -> np.ndarray:
        """``encode`` without the reference levels, as float64: a GLM's design matrix (its
        intercept is added by ``fedcost.models.glm``)."""
        return np.delete(self.encode(rows), self.reference_levels, axis=1).astype("float64")

    def expand(self, coefficients: np.ndarray) -> np.ndarray:
        """A GLM's coefficients over ``design_names`` as weights over every feature: 0 for the
        reference levels, so a linear model on ``encode`` predicts exactly the same."""
        full = np.zeros(self.n_features)
        keep = np.setdiff1d(np.arange(self.n_features), self.reference_levels)
        full[keep] = coefficients
        return full

    def task_data(self, rows: pd.DataFrame) -> TaskData:
        """Features and targets of ``rows``; costs in ``cost_scale`` units."""
        readmitted = rows[schema.READMISSION].to_numpy("float32") if schema.READMISSION in rows else None
        cost = (
            (rows[schema.COST].to_numpy("float64") / self.cost_scale).astype("float32") if schema.COST in rows else None
        )
        return TaskData(features=self.encode(rows), readmitted=readmitted, cost=cost)

    def coverage(self) -> dict[str, list[str]]:
        """What a run's summary says of the encoding: the columns flagged where values are
        missing, and what the job declared that the model lacks."""
        return {"missing_flagged": list(self.flagged), "features_left_out": list(self.left_out)}

    def to_dict(self) -> dict:
        return {
            "numeric": {k: list(v) for k, v in self.numeric.items()},
            "vocabularies": {k: list(v) for k, v in self.vocabularies.items()},
            "flagged": list(self.flagged),
            "log_scaled": list(self.log_scaled),
            "readmission_rate": self.readmission_rate,
            "cost_scale": self.cost_scale,
            "rows": self.rows,
            "left_out": list(self.left_out),
        }

    @classmethod
    def from_dict(cls, data: dict) -> FeatureSpec:
        return cls(
            numeric={k: (float(v[0]), float(v[1])) for k, v in data["numeric"].items()},
            vocabularies={k: tuple(v) for k, v in data["vocabularies"].items()},
            flagged=tuple(data["flagged"]),
            log_scaled=tuple(data["log_scaled"]),
            readmission_rate=None if data["readmission_rate"] is None else float(data["readmission_rate"]),
            cost_scale=float(data["cost_scale"]),
            rows=int(data["rows"]),
            left_out=tuple(data.get("left_out", ())),
        )
