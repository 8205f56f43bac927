"""Quantisation of float updates into integers mod 2**bits, and back.

A node clips every entry to [-clip, clip] and maps it onto a grid of ``step = clip /
levels``: g = (x + clip) / step, in 0..2*levels. Weighting (FedAvg by example count):
with its integer weight w (1..max_weight) and the public ``scale`` s, the node sends
q = floor(w * g / s + u), u uniform in [0, 1) from the PRG keyed with a caller-supplied
256-bit seed (never ``numpy.random``): stochastic rounding, so E[q] = w * g / s exactly.
It appends w itself as one last entry, and the protocol sums both in the same round.
The coordinator recovers ``sum(w_i * x_i) = step * (s * sum(q_i) - levels * sum(w_i))``,
taking the offset from the summed weights, so the decoder never needs to know who
dropped out. The weighted mean is that over sum(w_i).

Scale and modulus: the largest possible sum is about ``2 * levels * W / s + max_nodes``,
W the public bound on the summed weight (``total_weight``, else max_nodes * max_weight),
and ``bits`` is its bit length. With s = 1 that is 2 * levels * W exactly, as many bits
as ``levels`` and W need (48 for 2**20 levels and 100 nodes of up to 2**20 examples).
When a round knows its total weight (the federation's training rows, from the
statistics stage), s is the smallest integer that brings the sum below 2**32, so every
entry is a 32-bit word (``prg.word``): half the mask keystream and half the bytes of
64-bit words. The scale is only taken while s * max_nodes <= W (see Error).

Error: each node's entry is off by at most one grid unit, ``step * s`` in units of
weight times value, so a decoded weighted sum is within ``step * s * n`` of the clipped
float sum: n * step unweighted, and at most ``step * W`` with a total weight, i.e. one
step on the weighted mean of nodes whose weights add up to W.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcost.secagg.crypto import KEY_SIZE
from fedcost.secagg.prg import CHUNK_BYTES, Keystream, word

MAX_BITS = 62
_WORD_BITS = 32  # the narrow word a scaled sum is brought into
_UNIFORM_BITS = 53  # a float64 holds 53-bit integers exactly
_CHUNK = CHUNK_BYTES // 8  # float64 entries per chunk


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
    total_weight:
        The most the weights of one round's nodes add up to, when the round knows it
        (the federation's training rows); it lets a weighted sum fit 32-bit words.
    """

    clip: float
    levels: int
    max_nodes: int
    max_weight: int = 1
    total_weight: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {self.clip!r}")
        for name in ("levels", "max_nodes", "max_weight", "total_weight"):
            value = getattr(self, name)
            if name == "total_weight" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        needed = (self._span + self.max_nodes * self.scale).bit_length()
        if needed > MAX_BITS:
            raise ValueError(
                f"2 * levels * the summed weight needs {needed} bits, more than {MAX_BITS}; lower levels or max_weight"
            )

    @property
    def step(self) -> float:
        """Grid spacing of one unit of weight: the most one entry of one node can be off by."""
        return self.clip / self.levels

    @property
    def weight_bound(self) -> int:
        """The most a round's weights add up to: ``total_weight``, else every node at max_weight."""
        return self.total_weight if self.total_weight is not None else self.max_nodes * self.max_weight

    @property
    def scale(self) -> int:
        """Units of weight per unit of a node's input: 1, or what brings the sum into 32 bits.

        Only with a known ``total_weight``, and only while scale * max_nodes stays within
        it (the error bound in the module docstring); otherwise 1 and 64-bit words.
        """
        room = 2**_WORD_BITS - 1 - self.max_nodes
        if self.total_weight is None or self._span <= room or self.total_weight > room:
            return 1
        scale = -(-self._span // room)
        return scale if scale * self.max_nodes <= self.total_weight else 1

    @property
    def bits(self) -> int:
        """Modulus exponent m: 2**m exceeds the largest possible sum, and the summed weight."""
        scale = self.scale
        largest = (self._span + self.max_nodes * (scale - 1) + scale - 1) // scale
        return max(largest, self.weight_bound).bit_length()

    @property
    def _span(self) -> int:
        """The largest weighted sum of grid indices: 2 * levels per unit of weight."""
        return 2 * self.levels * self.weight_bound

    def check_weight(self, summed_weight: float, nodes: int) -> None:
        """Refuse a summed weight that ``nodes`` honest inputs cannot add up to: each sends a
        weight in 1..max_weight (exactly 1 for an unweighted sum), and all of them at most
        ``weight_bound``. A node that claims more rows than it has can do so only within these.

        Raises ValueError saying which bound the weight breaks.
        """
        most = min(nodes * self.max_weight, self.weight_bound)
        if not nodes <= summed_weight <= most:
            raise ValueError(
                f"the summed weight {summed_weight:g} of {nodes} input(s) is outside {nodes}..{most}, "
                f"what {nodes} node(s) of weight 1..{self.max_weight} within the round's {self.weight_bound} "
                "may add up to"
            )

    def length(self, shapes: Sequence[tuple[int, ...]]) -> int:
        """Entries of one encoded input: every array, flattened, plus the weight."""
        return sum(math.prod(shape) for shape in shapes) + 1

    def encode(self, arrays: Sequence[np.ndarray], *, seed: bytes, weight: int = 1) -> np.ndarray:
        """Clip, weight and round ``arrays`` into one ``word(bits)`` vector ending with ``weight``.

        ``seed`` must be 32 fresh secret bytes (``secrets.token_bytes(32)``) used for
        nothing else: it drives the stochastic rounding.
        """
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= self.max_weight:
            raise ValueError(f"weight must be an integer in 1..{self.max_weight}, got {weight!r}")
        if weight > self.weight_bound:
            raise ValueError(
                f"weight {weight} is more than the round's total weight {self.weight_bound}: the rows "
                "changed since the statistics stage counted them; restart the run"
            )
        if not isinstance(seed, bytes) or len(seed) != KEY_SIZE:
            raise ValueError(f"seed must be {KEY_SIZE} bytes")
        flat = [np.asarray(a).ravel() for a in arrays]
        encoded = np.empty(sum(a.size for a in flat) + 1, dtype=word(self.bits))
        uniforms = Keystream(seed)
        # Chunk by chunk, so each chunk stays in the CPU cache through every step of
        # _round_piece (about twice as fast as whole-vector passes over 1M entries).
        scratch = (np.empty(_CHUNK), np.empty(_CHUNK, dtype=np.uint64))
        start = 0
        for array in flat:
            for begin in range(0, array.size, _CHUNK):
                piece = array[begin : begin + _CHUNK]
                self._round_piece(piece, weight, uniforms, encoded[start : start + piece.size], scratch)
                start += piece.size
        encoded[-1] = weight
        return encoded

    def _round_piece(
        self,
        piece: np.ndarray,
        weight: int,
        uniforms: Keystream,
        out: np.ndarray,
        scratch: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """Clip, weight and stochastically round one cache-sized piece of an update into ``out``."""
        values, uniform = scratch[0][: piece.size], scratch[1][: piece.size]
        np.copyto(values, piece, casting="unsafe")
        np.clip(values, -self.clip, self.clip, out=values)
        if math.isnan(values.sum()):  # clipping keeps infinities finite and NaN NaN
            raise ValueError("update contains NaN")
        values += self.clip
        values *= weight / (self.step * self.scale)
        uniforms.fill(uniform)
        uniform &= np.uint64(2**_UNIFORM_BITS - 1)
        values += np.multiply(uniform, 2.0**-_UNIFORM_BITS, out=uniform.view(np.float64), casting="unsafe")
        np.floor(values, out=values)
        np.minimum(values, -(-2 * self.levels * weight // self.scale), out=values)
        np.copyto(out, values, casting="unsafe")

    def decode(self, total: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> tuple[list[np.ndarray], int]:
        """The weighted sums of the arrays (float64, in ``shapes``) and the summed weight."""
        expected = word(self.bits)
        if total.dtype != expected or total.shape != (self.length(shapes),):
            raise ValueError(
                f"expected a {expected} vector of {self.length(shapes)} entries, got {total.dtype} {total.shape}"
            )
        if int(total.max()) >> self.bits:
            raise ValueError(f"sum has entries of {self.bits} bits or more; it wrapped")
        summed_weight = int(total[-1])
        centred = total[:-1].astype(np.int64) * np.int64(self.scale) - np.int64(self.levels * summed_weight)
        flat = centred * self.step
        sums, start = [], 0
        for shape in shapes:
            size = math.prod(shape)
            sums.append(flat[start : start + size].reshape(shape))
            start += size
        return sums, summed_weight
