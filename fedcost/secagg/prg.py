"""Mask expansion: a 256-bit key into a vector of integers mod 2**bits.

The keystream is AES-256-CTR from pyca/cryptography (AES-NI makes it several times
faster than ChaCha20 on the servers fedcost targets), written by ``update_into`` straight
into the memory of a numpy array and read as little-endian words: no Python loop
touches an entry and no intermediate bytes object is made (about 2 ms per million
64-bit entries, against about 19 ms through ``update`` and ``np.frombuffer``). Each key
is derived for exactly one expansion (see ``crypto.label``), so a fixed all-zero initial
counter block is safe. Never ``numpy.random``, never a seed folded to fewer bits
(flwrlabs/flower#7522).

Words: a modulus of at most 2**32 takes 32-bit words (``word``), a larger one 64-bit
words. The word sets the keystream bytes per entry and the bytes on the wire, so a
32-bit round expands and sends half as much. Masks are added and subtracted mod
2**(word size) and reduced mod 2**bits once at the end (``MaskSum``): 2**bits divides
the word's modulus, so this equals reducing every mask first.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedcost.secagg.crypto import KEY_SIZE

_INITIAL_COUNTER = bytes(16)
CHUNK_BYTES = 256 * 1024  # one chunk of MaskSum: inside a core's L2 cache
WORDS = (np.dtype("<u4"), np.dtype("<u8"))  # the two word sizes a masked vector travels in


def word(bits: int) -> np.dtype:
    """The unsigned little-endian integer type that holds entries mod 2**bits: 32 or 64 bits."""
    _check_bits(bits)
    return WORDS[0] if bits <= 32 else WORDS[1]


def expand(key: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` uniform integers in [0, 2**bits) as ``word(bits)``, from the keystream of ``key``."""
    if length < 0:
        raise ValueError(f"length must be non-negative, got {length}")
    out = Keystream(key).fill(np.empty(length, dtype=word(bits)))
    out &= out.dtype.type((1 << bits) - 1)
    return out


class Keystream:
    """The keystream of one key, read piece by piece: each ``fill`` continues where the
    last one stopped (CTR mode), so a long vector can be worked on in cache-sized chunks."""

    def __init__(self, key: bytes):
        self._encryptor = Cipher(algorithms.AES(_checked_key(key)), modes.CTR(_INITIAL_COUNTER)).encryptor()

    def fill(self, out: np.ndarray) -> np.ndarray:
        """Overwrite ``out`` (C-contiguous, little-endian words) with the next ``out.nbytes`` bytes."""
        self._encryptor.update_into(_zeros(out.nbytes), memoryview(out).cast("B"))
        return out


class MaskSum:
    """A vector plus and minus the expansions of many keys, mod 2**bits.

    ``add``/``subtract`` only record a key; ``reduced()`` then walks the vector in
    cache-sized chunks and, for each chunk, runs every key's keystream on (CTR mode
    continues where the previous chunk stopped) and folds it into that chunk in place.
    The chunk stays in the CPU cache across all k keys, so k masks cost k keystreams and
    k cache-resident additions instead of k passes over main memory (about a third
    faster for 35 masks of 1M entries), and no mask is ever a whole array.
    """

    def __init__(self, start: np.ndarray, bits: int):
        if start.dtype != word(bits) or start.ndim != 1:
            raise ValueError(f"a mask sum mod 2**{bits} starts from a one-dimensional {word(bits)} vector")
        self._start = start
        self._bits = bits
        self._terms: list[tuple[bytes, bool]] = []

    def add(self, key: bytes) -> None:
        """Adds the expansion of ``key``."""
        self._terms.append((_checked_key(key), True))

    def subtract(self, key: bytes) -> None:
        """Subtracts the expansion of ``key``."""
        self._terms.append((_checked_key(key), False))

    def reduced(self) -> np.ndarray:
        """The start vector plus and minus every recorded expansion, mod 2**bits (``word(bits)``)."""
        total = self._start.copy()
        streams = [(Keystream(key), plus) for key, plus in self._terms]
        entries = CHUNK_BYTES // total.itemsize
        scratch = np.empty(min(entries, total.size), dtype=total.dtype)
        for begin in range(0, total.size, entries):
            chunk = total[begin : begin + entries]
            mask = scratch[: chunk.size]
            for stream, plus in streams:
                (np.add if plus else np.subtract)(chunk, stream.fill(mask), out=chunk)
        total &= total.dtype.type((1 << self._bits) - 1)
        return total


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, got {bits}")


def _checked_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise ValueError(f"mask key must be {KEY_SIZE} bytes")
    return key


@lru_cache(maxsize=4)
def _zeros(size: int) -> bytes:
    """The all-zero plaintext that CTR mode turns into the keystream, made once per length."""
    return bytes(size)
