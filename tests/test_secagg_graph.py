"""The SecAgg+ neighbour graph: degree and threshold rule, and the graph itself."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedcost.secagg.graph import choose_degree, choose_threshold, neighbours, neighbours_of


@pytest.mark.parametrize(
    "n,degree", [(2, 1), (12, 11), (30, 29), (31, 30), (40, 32), (100, 40), (1000, 60), (10**6, 120)]
)
def test_degree_is_complete_for_small_and_logarithmic_for_large_federations(n, degree):
    assert choose_degree(n) == degree


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
