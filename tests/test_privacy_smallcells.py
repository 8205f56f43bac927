"""The small-cell primitives: histogram coarsening and complementary suppression, pure."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcost.privacy.smallcells import ROWS, CellTable, coarsen_histogram, complementary_suppression, histogram_groups


def _groups(coarse: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) bin of each run of equal per-bin values; a coarsened vector is constant on a group."""
    per_bin = coarse.reshape(-1, coarse.shape[-1])
    change = np.flatnonzero((np.diff(per_bin, axis=1) != 0).any(axis=0)) + 1
    starts = np.concatenate([[0], change])
    return list(zip(starts.tolist(), (np.concatenate([change, [coarse.shape[-1]]]) - 1).tolist()))


def test_coarsening_a_pinned_histogram() -> None:
    counts = np.array([0, 3, 0, 9, 1, 0, 0, 12, 2, 0, 0])
    coarse = coarsen_histogram(counts, 11)
    # first group: bins 0..3 (12 rows) spread over 4 bins; second: bins 4..7 (13 rows);
    # the 2 rows left join it, so it holds bins 4..10 (15 rows). As the last group it is
    # spread from its inner edge over as many bins as its neighbour spans: bins 4..7.
    np.testing.assert_allclose(coarse, [3.0] * 4 + [15 / 4] * 4 + [0.0] * 3)
    assert coarse.sum() == pytest.approx(counts.sum())


def test_classes_share_groups_formed_on_all_rows() -> None:
    positives = np.array([1, 0, 4, 0, 0, 6])
    negatives = np.array([2, 5, 0, 1, 9, 0])
    coarse = coarsen_histogram(np.stack([positives, negatives]), 10)
    # totals per bin 3, 5, 4, 1, 9, 6: the first group closes at bin 2 (12 rows), the rest (16) is the second
    np.testing.assert_allclose(coarse[0], [5 / 3] * 3 + [6 / 3] * 3)
    np.testing.assert_allclose(coarse[1], [7 / 3] * 3 + [10 / 3] * 3)


def test_fewer_rows_than_min_cohort_in_all_give_zeros() -> None:
    assert not coarsen_histogram(np.array([0, 4, 0, 6]), 11).any()
    assert not coarsen_histogram(np.zeros((2, 5)), 1).any()


@pytest.mark.parametrize(
    "counts, min_cohort, message",
    [
        (np.array([1.5, 2]), 2, "whole"),
        (np.array([-1, 2]), 2, "whole"),
        (np.zeros((2, 2, 2)), 2, "shape"),
        (np.array([1, 2]), 0, "min_cohort"),
    ],
)
def test_coarsening_refuses_what_is_not_a_histogram(counts: np.ndarray, min_cohort: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        coarsen_histogram(counts, min_cohort)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=60), st.integers(1, 20), st.integers(1, 3))
def test_every_group_tiles_the_bins_and_describes_at_least_min_cohort_rows(
    bins: list[int], min_cohort: int, classes: int
) -> None:
    rng = np.random.default_rng(len(bins) * 31 + min_cohort)
    counts = np.stack([rng.permutation(bins) for _ in range(classes)]) if classes > 1 else np.array(bins)
    coarse = coarsen_histogram(counts, min_cohort)
    total = counts.sum()
    if total < min_cohort:
        assert not coarse.any()
        return
    np.testing.assert_allclose(coarse.sum(axis=-1), counts.sum(axis=-1))
    per_bin = counts.reshape(-1, counts.shape[-1]).sum(axis=0)
    # Rebuild the groups the rule defines and check the vector against them.
    edges, held = [], 0
    for b, n in enumerate(per_bin):
        held += n
        if held >= min_cohort:
            edges.append(b)
            held = 0
    edges[-1] = len(per_bin) - 1
    groups = histogram_groups(counts, min_cohort)
    assert [(h.start, h.stop - 1) for h, _ in groups] == list(zip([0, *(e + 1 for e in edges[:-1])], edges))
    for i, (rows, spread) in enumerate(groups):
        assert per_bin[rows].sum() >= min_cohort
        assert rows.start <= spread.start < spread.stop <= rows.stop, "a group is spread inside its own bins"
        if 0 < i < len(groups) - 1:
            assert spread == rows, "an inner group is spread over exactly its bins"
        expected = counts[..., rows].sum(axis=-1, keepdims=True) / (spread.stop - spread.start)
        np.testing.assert_allclose(coarse[..., spread], np.broadcast_to(expected, coarse[..., spread].shape))
    for first, last in _groups(coarse):
        held_here = coarse.reshape(-1, coarse.shape[-1])[:, first : last + 1].sum()
        assert held_here < 1e-9 or held_here >= min_cohort - 1e-9


def _table(codes: list[int], n_cells: int, quantities: tuple[str, ...] = ()) -> CellTable:
    return CellTable(np.array(codes), n_cells, quantities)


def test_one_table_withholds_its_small_cell_and_the_smallest_complement() -> None:
    codes = [0] * 30 + [1] * 12 + [2] * 3 + [3] * 40
    (flags,) = complementary_suppression([_table(codes, 5)], {}, min_cohort=11)
    # cell 2 (3 rows) is small; 3 rows withheld in all would be the total minus the rest,
    # so the smallest released cell (1: 12 rows) goes too; cell 4 is empty and says 0.
    assert flags[ROWS].tolist() == [True, False, False, True, True]


def test_rows_lacking_a_measure_are_counted_like_a_cell() -> None:
    codes = [0] * 30 + [1] * 40
    stay = np.array([True] * 26 + [False] * 4 + [True] * 40)
    (flags,) = complementary_suppression([_table(codes, 2, ("stay",))], {"stay": stay}, min_cohort=11)
    # 30 rows minus 26 stay lengths would count the 4 rows without one
    assert flags[ROWS].tolist() == [True, True] and flags["stay"].tolist() == [False, True]


def test_earlier_tables_are_taken_as_they_are_and_nothing_they_give_away_blocks_the_plan() -> None:
    codes = [0] * 5 + [1] * 40
    earlier = (_table(codes, 2), {ROWS: np.array([True, True])})
    (flags,) = complementary_suppression([_table([0] * 45, 1)], {}, min_cohort=11, earlier=[earlier])
    assert flags[ROWS].tolist() == [True], "the 5 rows were released before; the plan cannot take them back"


def test_withholding_everything_is_the_last_resort() -> None:
    (flags,) = complementary_suppression([_table([0] * 4 + [1] * 3, 2)], {}, min_cohort=11)
    assert not flags[ROWS].any()


@pytest.mark.parametrize(
    "plan, presence, earlier, message",
    [
        ([_table([0, 1], 2)], {"stay": np.ones(3, bool)}, [], "same rows"),
        ([_table([0, 1], 2, ("stay",))], {}, [], "presence"),
        ([_table([0, 1], 2)], {}, [(_table([0, 1], 2), {ROWS: np.ones(3, bool)})], "flags"),
        ([_table([0, 1], 2)], {}, [(_table([0, 1], 2), {"cost": np.ones(2, bool)})], "exactly"),
    ],
)
def test_suppression_refuses_inconsistent_inputs(plan, presence, earlier, message) -> None:
    with pytest.raises(ValueError, match=message):
        complementary_suppression(plan, presence, min_cohort=2, earlier=earlier)


def test_cell_codes_must_lie_in_the_table() -> None:
    with pytest.raises(ValueError, match="cell codes"):
        CellTable(np.array([0, 2]), 2)
    with pytest.raises(ValueError, match="own quantity"):
        CellTable(np.array([0, 1]), 2, (ROWS,))
