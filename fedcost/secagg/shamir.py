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
    if not all(len(value) == SHARE_SIZE for _, value in shares[:threshold]):
        raise ValueError(f"a share value must be {SHARE_SIZE} bytes")
    points = [(x, int.from_bytes(value, "big")) for x, value in shares[:threshold]]
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise ValueError("share x-coordinates must be distinct and in 1..p-1")
    if not all(y < PRIME for _, y in points):
        raise ValueError("a share value is not a field element")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >> (8 * SECRET_SIZE):
        raise ValueError("shares do not combine to a secret")
    return secret.to_bytes(SECRET_SIZE, "big")
