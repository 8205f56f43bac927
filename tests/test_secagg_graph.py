"""The SecAgg+ neighbour graph: degree and threshold rule, and the graph itself."""

from __future__ import annotations

import math
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcost.secagg.graph import (
    MIN_GONE_FRACTION,
    SECURITY_BITS,
    choose_degree,
    choose_threshold,
    neighbours,
    neighbours_of,
)


@pytest.mark.parametrize(
    "n,degree", [(2, 1), (12, 11), (31, 30), (33, 32), (34, 32), (50, 32), (100, 34), (1000, 38), (10**6, 50)]
)
def test_degree_is_complete_for_small_and_logarithmic_for_large_federations(n, degree):
    assert choose_degree(n) == degree


def _split_bound(n: int, degree: int, gone: float) -> float:
    """log2 of C(n, 2) * gone**degree: the chance that the survivors' ring splits."""
    return math.log2(math.comb(n, 2)) + degree * math.log2(gone)


@given(n=st.integers(34, 10**7), tolerance=st.floats(0.0, 0.49))
def test_degree_is_the_smallest_even_one_that_meets_the_split_bound(n, tolerance):
    degree = choose_degree(n, tolerance)
    gone = max(tolerance, MIN_GONE_FRACTION)
    if degree == n - 1:
        return
    assert degree % 2 == 0
    assert _split_bound(n, degree, gone) <= -SECURITY_BITS < _split_bound(n, degree - 2, gone)
    assert choose_degree(n, min(tolerance + 0.05, 0.49)) >= degree


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(3, 80), seed=st.binary(min_size=32, max_size=32))
def test_survivors_stay_connected_while_fewer_than_degree_nodes_are_gone(data, n, seed):
    ids = list(range(1, n + 1))
    degree = choose_degree(n)
    graph = neighbours(ids, seed, degree)
    gone = set(data.draw(st.lists(st.sampled_from(ids), max_size=degree - 1, unique=True), label="gone"))
    left = [node for node in ids if node not in gone]
    reached, frontier = {left[0]}, [left[0]]
    while frontier:
        for near in graph[frontier.pop()] - gone - reached:
            reached.add(near)
            frontier.append(near)
    assert reached == set(left)


@pytest.mark.parametrize(
    "degree,tolerance,threshold",
    [
        (1, 1 / 3, 1),
        (2, 1 / 3, 2),
        (3, 1 / 3, 2),
        (9, 1 / 3, 6),
        (11, 0.0, 11),
        (40, 1 / 3, 27),
        (40, 0.49, 21),
    ],
)
def test_threshold_tolerates_the_asked_dropout_but_stays_a_strict_majority(degree, tolerance, threshold):
    assert choose_threshold(degree, tolerance) == threshold
    assert degree // 2 < threshold <= degree


@pytest.mark.parametrize("tolerance", [0.5, 0.9, -0.1])
def test_threshold_refuses_a_tolerance_that_would_allow_both_shares(tolerance):
    with pytest.raises(ValueError, match="tolerance"):
        choose_threshold(10, tolerance)


@given(n=st.integers(2, 200), seed=st.binary(min_size=32, max_size=32))
def test_graph_is_regular_symmetric_and_the_same_for_every_node(n, seed):
    ids = list(range(5, 5 + 3 * n, 3))
    degree = choose_degree(n)
    graph = neighbours(ids, seed, degree)
    for node, near in graph.items():
        assert len(near) == degree and node not in near
        assert all(node in graph[other] for other in near)
    assert all(neighbours_of(node, ids, seed, degree) == graph[node] for node in ids[:3])


def test_graph_follows_the_public_seed():
    ids = list(range(1, 201))
    seed = secrets.token_bytes(32)
    assert neighbours(ids, seed, 40) == neighbours(ids, seed, 40)
    assert neighbours(ids, seed, 40) != neighbours(ids, secrets.token_bytes(32), 40)


@pytest.mark.parametrize("degree", [3, 0, 10, 12])
def test_sparse_graph_refuses_odd_or_impossible_degrees(degree):
    with pytest.raises(ValueError, match="even degree"):
        neighbours(list(range(1, 11)), bytes(32), degree)


def test_fewer_than_two_nodes_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        choose_degree(1)
