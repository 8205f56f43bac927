"""The SecAgg+ neighbour graph: who shares keys and masks with whom.

Rule (after Bell et al., CCS 2020, who show a random graph of degree O(log n) keeps
SecAgg's guarantees with high probability):

* degree ``k = 2 * ceil(3 * log2 n)``, or the complete graph ``k = n - 1`` when that is
  not smaller (n <= 30). n = 100 gives k = 40, n = 1000 gives k = 60.
* threshold ``t = k - floor(dropout_tolerance * k)``, but at least ``k // 2 + 1``: a node's
  secrets survive while at most that fraction of its k neighbours drops out, and t is a
  strict majority of the neighbourhood, so the honest neighbours of one node can never
  hand out t seed shares and t key shares of it together. Hence a tolerance below 1/2.
* the graph is a Harary graph (each node linked to the k/2 next and k/2 previous nodes on
  a ring: exactly k-regular and k-connected) over a pseudo-random order of the nodes:
  SHA-256(public seed || node id). The coordinator announces the seed, so every node
  computes the same graph without trusting the coordinator to send it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

DEFAULT_DROPOUT_TOLERANCE = 1 / 3


def choose_degree(n: int) -> int:
    """Neighbours per node for n nodes: O(log n), the complete graph for small n."""
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 nodes, got {n}")
    degree = 2 * math.ceil(3 * math.log2(n))
    return n - 1 if degree >= n - 1 else degree


def choose_threshold(degree: int, dropout_tolerance: float = DEFAULT_DROPOUT_TOLERANCE) -> int:
    """Shares needed to recover a node's secrets, given the neighbour dropout to survive."""
    if not 0 <= dropout_tolerance < 0.5:
        raise ValueError(
            f"dropout tolerance must be in [0, 0.5), got {dropout_tolerance}: from one half on, "
            "a node's neighbours could hand out both its seed and its key"
        )
    tolerated = math.floor(dropout_tolerance * degree + 1e-9)  # 1/3 * 3 is 1, not 0.999..
    return max(degree - tolerated, degree // 2 + 1)


def neighbours(node_ids: Sequence[int], seed: bytes, degree: int) -> dict[int, frozenset[int]]:
    """Every node's neighbours in the graph drawn from the public ``seed`` (the coordinator's view)."""
    ring = _ring(node_ids, seed, degree)
    return {node: _around(ring, i, degree) for i, node in enumerate(ring)}


def neighbours_of(node: int, node_ids: Sequence[int], seed: bytes, degree: int) -> frozenset[int]:
    """One node's neighbours in the same graph, without building everyone's (a node's view)."""
    ring = _ring(node_ids, seed, degree)
    return _around(ring, ring.index(node), degree)


def _ring(node_ids: Sequence[int], seed: bytes, degree: int) -> list[int]:
    """The nodes in the pseudo-random order that the public seed fixes."""
    n = len(node_ids)
    if degree != n - 1 and (degree % 2 or not 2 <= degree < n - 1):
        raise ValueError(f"a sparse graph of {n} nodes needs an even degree in 2..{n - 2}, got {degree}")
    return sorted(node_ids, key=lambda node: hashlib.sha256(seed + str(node).encode()).digest())


def _around(ring: list[int], i: int, degree: int) -> frozenset[int]:
    """The degree/2 nodes on either side of position i; everyone else on the complete graph."""
    n = len(ring)
    if degree == n - 1:
        return frozenset(ring[:i] + ring[i + 1 :])
    half = degree // 2
    return frozenset(ring[(i + offset) % n] for offset in range(-half, half + 1) if offset)
