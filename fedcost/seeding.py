"""Seeds derived from the run seed and labels, so every node and round draws its own
stream and a run is reproducible whatever order Flower delivers messages in."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *labels: str | int) -> int:
    """A 63-bit seed for ``labels`` under ``seed``; not for cryptographic use."""
    text = "/".join([str(seed), *map(str, labels)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
