"""Exact shared sums of large non-negative integers, carried as 30-bit limbs.

A shared sum adds fixed-point numbers, and under secure aggregation each node's entry
must lie within ±2**30 (``fedcost.server.shared_sum.SUMS_CLIP``). Money is counted
here in integer cents, and a cell's sum of squared cents easily passes 2**60. So each
integer travels as ``limbs`` digits in base 2**30, least significant first: every
digit is an integer below the clip, so quantisation (steps of 2**-10) and float64
addition keep it exact, and the summed digits of fewer than 2**23 nodes stay below
2**53. ``join`` carries the digits back into exact Python integers. The federation's
sums are then exactly the pooled sums of the same values in the same units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LIMB_BITS = 30
_MASK = (1 << LIMB_BITS) - 1
# Summed digits must stay exact float64 integers (below 2**53).
_MAX_DIGIT_SUM = 2**53
_TOLERANCE = 0.25


def split(values: Sequence[int], limbs: int) -> np.ndarray:
    """``limbs`` float64 digits per non-negative integer, flattened value by value."""
    digits = np.empty((len(values), limbs))
    for i, value in enumerate(values):
        value = int(value)
        if value < 0 or value >> (LIMB_BITS * limbs):
            raise ValueError(f"{value} does not fit {limbs} limbs of {LIMB_BITS} bits")
        for j in range(limbs):
            digits[i, j] = (value >> (LIMB_BITS * j)) & _MASK
    return digits.ravel()


def join(digit_sums: np.ndarray, limbs: int) -> list[int]:
    """The exact integers whose digits were summed.

    A shared sum's fixed point may be off by up to one grid step (2**-10) per node, far
    below 1/2, so rounding each summed digit to the nearest whole number restores it
    exactly; a digit further than ``_TOLERANCE`` from whole was not a sum of limbs.
    """
    digit_sums = np.asarray(digit_sums, dtype="float64").reshape(-1, limbs)
    whole = np.rint(digit_sums)
    if (np.abs(whole - digit_sums) > _TOLERANCE).any() or (whole < 0).any() or (whole >= _MAX_DIGIT_SUM).any():
        raise ValueError("summed limbs must be non-negative whole numbers below 2**53")
    return [sum(int(d) << (LIMB_BITS * j) for j, d in enumerate(row)) for row in whole.tolist()]
