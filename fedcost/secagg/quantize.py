"""Quantisation of float updates into integers mod 2**bits, and back.

A node clips every entry to [-clip, clip] and rounds it stochastically onto the grid
-clip, -clip + step, ..., clip with ``step = clip / levels``: grid index q in 0..2*levels,
unbiased (E[q * step - clip] = x). The uniforms come from the PRG keyed with a
caller-supplied 256-bit seed, never from ``numpy.random``.

Weighting (FedAvg by example count): the node multiplies its grid indices by its integer
weight w (1..max_weight) and appends w itself as one last entry; the protocol sums both
in the same round. Everything stays an exact integer, and the coordinator recovers
``sum(w_i * x_i) = step * (sum(w_i * q_i) - levels * sum(w_i))``: the offset shift of the
survivors is taken from the summed weights (the survivor count when every w is 1), so
the decoder never needs to know who dropped out. The weighted mean is that over sum(w_i).

Modulus: the largest possible sum is ``max_nodes * max_weight * 2 * levels``; ``bits`` is
its bit length, so max_nodes inputs at +clip never wrap mod 2**bits. It must be at most
62 so that every sum also fits an int64 while decoding.

Error: each entry of each node is off by less than one step, so a decoded weighted sum
is within ``step * sum(w_i)`` of the clipped float sum (n * clip / levels unweighted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcost.secagg.crypto import KEY_SIZE
from fedcost.secagg.prg import expand

MAX_BITS = 62
_UNIFORM_BITS = 53  # a float64 holds 53-bit integers exactly


@dataclass(frozen=True)
class Quantizer:
    """Clip, stochastically round and weight updates; decode their sum.

    Parameters
    ----------
    clip:
        Entries are clipped to [-clip, clip].
    levels:
        Grid steps per ``clip``; ``step = clip / levels``.
    max_nodes:
        Most nodes whose inputs are summed in one round.
    max_weight:
        Largest per-node weight (example count); 1 for an unweighted sum.
    """

    clip: float
    levels: int
    max_nodes: int
    max_weight: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {self.clip!r}")
        for name in ("levels", "max_nodes", "max_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.bits > MAX_BITS:
            raise ValueError(
                f"max_nodes * max_weight * 2 * levels needs {self.bits} bits, more than "
                f"{MAX_BITS}; lower levels or max_weight"
            )

    @property
    def step(self) -> float:
        """Grid spacing: the most one entry of one node can be off by."""
        return self.clip / self.levels

    @property
    def bits(self) -> int:
        """Modulus exponent m: 2**m exceeds the largest possible sum."""
        return (self.max_nodes * self.max_weight * 2 * self.levels).bit_length()

    def length(self, shapes: Sequence[tuple[int, ...]]) -> int:
        """Entries of one encoded input: every array, flattened, plus the weight."""
        return sum(math.prod(shape) for shape in shapes) + 1

    def encode(self, arrays: Sequence[np.ndarray], *, seed: bytes, weight: int = 1) -> np.ndarray:
        """Clip, round and weight ``arrays`` into one uint64 vector ending with ``weight``.

        ``seed`` must be 32 fresh secret bytes (``secrets.token_bytes(32)``) used for
        nothing else: it drives the stochastic rounding.
        """
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= self.max_weight:
            raise ValueError(f"weight must be an integer in 1..{self.max_weight}, got {weight!r}")
        if not isinstance(seed, bytes) or len(seed) != KEY_SIZE:
            raise ValueError(f"seed must be {KEY_SIZE} bytes")
        # One float64 buffer and one uint64 buffer, updated in place: a 1M-entry update
        # makes no other full-size temporaries.
        flat = [np.asarray(a).ravel() for a in arrays]
        scaled = np.concatenate(flat, out=np.empty(sum(a.size for a in flat)), casting="unsafe")
        np.clip(scaled, -self.clip, self.clip, out=scaled)
        if math.isnan(scaled.sum()):  # clipping keeps infinities finite and NaN NaN
            raise ValueError("update contains NaN")
        scaled += self.clip
        scaled /= self.step
        uniforms = expand(seed, scaled.size, _UNIFORM_BITS)
        scaled += np.multiply(uniforms, 2.0**-_UNIFORM_BITS, out=uniforms.view(np.float64), casting="unsafe")
        np.floor(scaled, out=scaled)
        np.minimum(scaled, 2 * self.levels, out=scaled)
        encoded = np.empty(scaled.size + 1, dtype=np.uint64)
        np.copyto(encoded[:-1], scaled, casting="unsafe")
        encoded[:-1] *= np.uint64(weight)
        encoded[-1] = weight
        return encoded

    def decode(self, total: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> tuple[list[np.ndarray], int]:
        """The weighted sums of the arrays (float64, in ``shapes``) and the summed weight."""
        if total.dtype != np.uint64 or total.shape != (self.length(shapes),):
            raise ValueError(
                f"expected a uint64 vector of {self.length(shapes)} entries, got {total.dtype} {total.shape}"
            )
        if (total >> np.uint64(self.bits)).any():
            raise ValueError(f"sum has entries of {self.bits} bits or more; it wrapped")
        summed_weight = int(total[-1])
        centred = total[:-1].astype(np.int64) - np.int64(self.levels * summed_weight)
        flat = centred * self.step
        sums, start = [], 0
        for shape in shapes:
            size = math.prod(shape)
            sums.append(flat[start : start + size].reshape(shape))
            start += size
        return sums, summed_weight
