"""Shamir secret sharing of 32-byte secrets over GF(2**521 - 1).

The field is larger than any secret, so a secret is one field element and a share one
521-bit value (66 bytes); no chunking, no bias. Coefficients come from ``secrets``.
Python integers are not constant-time; shares are computed on the node's own machine
and reconstruction happens only at the coordinator, for secrets it is entitled to.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

PRIME = 2**521 - 1  # a Mersenne prime
SECRET_SIZE = 32
SHARE_SIZE = 66  # bytes of one field element

Share = tuple[int, bytes]


def share(secret: bytes, threshold: int, count: int) -> list[Share]:
    """Split ``secret`` into ``count`` shares (x = 1..count), any ``threshold`` of which recover it."""
    if not isinstance(secret, bytes) or len(secret) != SECRET_SIZE:
        raise ValueError(f"secret must be {SECRET_SIZE} bytes")
    if not 1 <= threshold <= count:
        raise ValueError(f"need 1 <= threshold <= count, got threshold {threshold}, count {count}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, count + 1):
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares.append((x, y.to_bytes(SHARE_SIZE, "big")))
    return shares


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """Recover the secret from ``threshold`` shares by Lagrange interpolation at zero.

    Raises ValueError for too few, repeated or malformed shares, and for shares that
    interpolate to no 32-byte secret (they were not made for the same secret).
    """
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(shares)}")
    (secret,) = _interpolate(_points(shares[:threshold]), [0])
    if secret >> (8 * SECRET_SIZE):
        raise ValueError("shares do not combine to a secret")
    return secret.to_bytes(SECRET_SIZE, "big")


def consistent(shares: Sequence[Share], threshold: int) -> bool:
    """Whether every share lies on the one polynomial of degree ``threshold - 1`` through the
    first ``threshold``: shares beyond the threshold check each other, so a false one among
    them is seen (a node revealing it could otherwise make the secret rebuilt a wrong one).

    Raises ValueError for too few, repeated or malformed shares, as ``combine`` does.
    """
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(shares)}")
    points = _points(shares)
    extra = points[threshold:]
    return _interpolate(points[:threshold], [x for x, _ in extra]) == [y for _, y in extra]


def _points(shares: Sequence[Share]) -> list[tuple[int, int]]:
    """Shares as field points; ValueError unless their x are distinct in 1..p-1 and values field elements."""
    if not all(len(value) == SHARE_SIZE for _, value in shares):
        raise ValueError(f"a share value must be {SHARE_SIZE} bytes")
    points = [(x, int.from_bytes(value, "big")) for x, value in shares]
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise ValueError("share x-coordinates must be distinct and in 1..p-1")
    if not all(y < PRIME for _, y in points):
        raise ValueError("a share value is not a field element")
    return points


def _interpolate(points: list[tuple[int, int]], at: list[int]) -> list[int]:
    """The values at ``at`` of the polynomial through ``points`` (Lagrange: one inversion per
    point, then, at each place, the products over the other points from prefix and suffix)."""
    weights = []
    for i, (xi, yi) in enumerate(points):
        denominator = 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                denominator = denominator * (xi - xj) % PRIME
        weights.append(yi * pow(denominator, -1, PRIME) % PRIME)
    values = []
    for x in at:
        differences = [(x - xj) % PRIME for xj, _ in points]
        suffix = [1] * (len(points) + 1)
        for i in range(len(points) - 1, -1, -1):
            suffix[i] = suffix[i + 1] * differences[i] % PRIME
        value, prefix = 0, 1
        for i, weight in enumerate(weights):
            value = (value + weight * prefix % PRIME * suffix[i + 1]) % PRIME
            prefix = prefix * differences[i] % PRIME
        values.append(value)
    return values
