"""Exact shared sums: integers far beyond 2**53 survive limb splitting, secure-aggregation
quantisation and summation over nodes without losing a unit."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcost.analytics import exact
from fedcost.secagg import Quantizer
from fedcost.secagg.prg import word
from fedcost.server.shared_sum import SUMS_CLIP, SUMS_LEVELS

LIMBS = 3
values = st.integers(0, 2 ** (exact.LIMB_BITS * LIMBS) - 1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(values, min_size=4, max_size=4), min_size=1, max_size=12))
def test_summed_limbs_join_to_the_exact_sum(nodes: list[list[int]]) -> None:
    summed = np.sum([exact.split(node, LIMBS) for node in nodes], axis=0)
    assert exact.join(summed, LIMBS) == [sum(column) for column in zip(*nodes)]


@settings(max_examples=20, deadline=None)
@given(st.lists(st.lists(values, min_size=3, max_size=3), min_size=3, max_size=8))
def test_limbs_pass_the_shared_sum_quantiser_exactly(nodes: list[list[int]]) -> None:
    quantizer = Quantizer(SUMS_CLIP, SUMS_LEVELS, len(nodes))
    shapes = [(3 * LIMBS,)]
    encoded = [quantizer.encode([exact.split(node, LIMBS)], seed=secrets.token_bytes(32)) for node in nodes]
    total = np.sum(encoded, axis=0, dtype=word(quantizer.bits)) % word(quantizer.bits).type(2**quantizer.bits)
    (decoded,), _ = quantizer.decode(total, shapes)
    assert exact.join(decoded, LIMBS) == [sum(column) for column in zip(*nodes)]


def test_values_that_do_not_fit_or_digits_that_are_not_whole_are_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        exact.split([2 ** (exact.LIMB_BITS * LIMBS)], LIMBS)
    with pytest.raises(ValueError, match="does not fit"):
        exact.split([-1], LIMBS)
    with pytest.raises(ValueError, match="whole numbers"):
        exact.join(np.array([0.5, 0.0, 0.0]), LIMBS)
