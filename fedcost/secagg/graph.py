"""The SecAgg+ neighbour graph: who shares keys and masks with whom.

Rule (after Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020, who show a random graph of degree O(log n) keeps SecAgg's
guarantees, with statistical security parameter sigma = 40):

* the graph is a Harary graph (each node linked to the k/2 next and k/2 previous nodes on
  a ring: exactly k-regular and k-connected) over a pseudo-random order of the nodes:
  SHA-256(public seed || node id). The coordinator announces the seed, so every node
  computes the same graph without trusting the coordinator to send it.
* degree ``k``: the smallest even k for which the surviving nodes stay connected, except
  with probability at most 2**-sigma, when a fraction rho of the nodes, placed at random
  on the ring, is gone (rho = the dropout tolerance, and never below 1/3). The
  survivors split only if two separate runs of k/2 consecutive ring places are all gone;
  a union bound over the C(n, 2) pairs of run starts, each pair gone with probability at
  most rho**k (drawing without replacement), gives ``C(n, 2) * rho**k <= 2**-sigma``. A
  split would show the coordinator the partial sum of each part, so this is the bound
  Bell et al.'s connectivity argument needs. Like their semi-honest analysis it assumes
  that who drops out does not depend on the graph; colluding nodes are bounded per
  neighbourhood by the threshold below. The complete graph ``k = n - 1`` when that is
  not larger (n <= 33 at rho = 1/3). At rho = 1/3: n = 50 gives k = 32, n = 100 k = 34,
  n = 1000 k = 38, n = 10**6 k = 50 (the earlier rule, 2 * ceil(3 * log2 n), gave 34, 40,
  60 and 120: more than the bound asks, at k + 1 mask expansions per node).
* threshold ``t = k - floor(dropout_tolerance * k)``, but at least ``k // 2 + 1``: a node's
  secrets survive while at most that fraction of its k neighbours drops out, and t is a
  strict majority of the neighbourhood, so the honest neighbours of one node can never
  hand out t seed shares and t key shares of it together. Hence a tolerance below 1/2.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

DEFAULT_DROPOUT_TOLERANCE = 1 / 3
SECURITY_BITS = 40  # Bell et al.'s sigma: the survivors split with probability <= 2**-40
MIN_GONE_FRACTION = 1 / 3  # the graph is sized for at least a third of the nodes gone


def choose_degree(n: int, dropout_tolerance: float = DEFAULT_DROPOUT_TOLERANCE) -> int:
    """Neighbours per node for n nodes: O(log n), the complete graph for small n.

    The smallest even k with ``C(n, 2) * rho**k <= 2**-SECURITY_BITS``, rho the larger of
    ``dropout_tolerance`` and ``MIN_GONE_FRACTION`` (see the module docstring).
    """
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 nodes, got {n}")
    gone = max(dropout_tolerance, MIN_GONE_FRACTION)
    if not 0 < gone < 1:
        raise ValueError(f"the fraction of nodes gone must be in (0, 1), got {gone}")
    needed = (SECURITY_BITS + math.log2(math.comb(n, 2))) / -math.log2(gone)
    degree = 2 * math.ceil(needed / 2)
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
