"""Benchmark of fedcost's SecAgg+ core: primitives and full in-memory rounds (no Flower).

Run: ``.venv/bin/python benchmarks/secagg_primitives_bench.py [--rounds 10x10000,50x10000]``
(the full rounds to run, N x D; default the grid below and its dropout round). Prints markdown tables.
A round runs every node and the coordinator in this one process, one after the other,
so "nodes, total" is the sum over all nodes; in a federation they run in parallel and a
node's own cost is "per node".
"""

from __future__ import annotations

import argparse
import platform
import secrets
import statistics
import time
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedcost.secagg import (
    Coordinator,
    Node,
    Quantizer,
    RoundConfig,
    Stage,
    choose_degree,
    choose_threshold,
    crypto,
    shamir,
)
from fedcost.secagg.prg import MaskSum, expand, word

ROUNDS = [
    (10, 10_000),
    (10, 100_000),
    (50, 10_000),
    (50, 100_000),
    (100, 10_000),
    (100, 100_000),
    (1000, 10_000),
]
DROPOUT_ROUNDS = [(100, 100_000, 0.1)]  # a tenth of the nodes drop after share keys


def _median_ms(call: Callable[[], object], repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _mask_sum(bits: int, keys: list[bytes]) -> np.ndarray:
    total = MaskSum(np.zeros(1_000_000, word(bits)), bits)
    for key in keys:
        total.add(key)
    return total.reduced()


def _key_checks(degree: int) -> None:
    """A node's public-key work in one round: verify each neighbour's signed advertisement,
    and agree a share key and a mask seed with each."""
    identity = Ed25519PrivateKey.generate()
    advertisement = secrets.token_bytes(96)
    signature = crypto.sign(identity, advertisement)
    own = crypto.generate_agreement_key()
    peers = [crypto.public_bytes(crypto.generate_agreement_key()) for _ in range(degree)]
    for peer in peers:
        crypto.verify(identity.public_key(), signature, advertisement)
        crypto.agree(own, peer)
        crypto.agree(own, peer)


def _keystream_ms(algorithm: algorithms.AES | algorithms.ChaCha20) -> float:
    """One 4 MB keystream (1M 32-bit words) of ``algorithm``: what each mask costs a node,
    so a cheaper cipher's saving on the masking can be read off."""
    mode = modes.CTR(bytes(16)) if isinstance(algorithm, algorithms.AES) else None
    encryptor = Cipher(algorithm, mode).encryptor()
    zeros, out = bytearray(4_000_000), bytearray(4_000_000 + 16)
    return _median_ms(lambda: encryptor.update_into(zeros, out))


def bench_primitives() -> None:
    key = secrets.token_bytes(32)
    quantizer = Quantizer(clip=1.0, levels=2**15, max_nodes=1000)
    update = [np.linspace(-2, 2, 1_000_000)]
    degree = choose_degree(100)
    keys = [secrets.token_bytes(32) for _ in range(degree + 1)]
    quantise_ms = _median_ms(lambda: quantizer.encode(update, seed=key))
    print("| primitive | time (ms, median of 7) |\n| --- | ---: |")
    for bits in (32, 48):  # 32-bit words (a scaled training sum) and 64-bit words
        expand_ms = _median_ms(lambda bits=bits: expand(key, 1_000_000, bits))
        masking_ms = _median_ms(lambda bits=bits: _mask_sum(bits, keys))
        words = f"{word(bits).itemsize * 8}-bit words"
        print(f"| mask expansion, 1M entries mod 2^{bits}, {words} (AES-256-CTR) | {expand_ms:.1f} |")
        print(
            f"| one node's masking at N=100, {words}: self mask + {degree} pair masks, 1M entries (MaskSum) | {masking_ms:.1f} |"
        )
    print(f"| quantise 1M floats (clip + stochastic rounding) | {quantise_ms:.1f} |")
    ciphers = {
        "AES-256-CTR (fedcost's)": algorithms.AES(secrets.token_bytes(32)),
        "AES-128-CTR": algorithms.AES(secrets.token_bytes(16)),
        "ChaCha20": algorithms.ChaCha20(secrets.token_bytes(32), bytes(16)),
    }
    keystreams = " / ".join(f"{_keystream_ms(algorithm):.2f}" for algorithm in ciphers.values())
    print(f"| one 4 MB keystream: {' / '.join(ciphers)} | {keystreams} |")
    checks_ms = _median_ms(lambda: _key_checks(degree))
    checks = f"{degree} Ed25519 verifications + {2 * degree} X25519 agreements"
    print(f"| one node's key checks at N=100: {checks} | {checks_ms:.1f} |")
    for nodes in (10, 50, 100, 1000):  # a node shares among its k neighbours, t of them recover
        k = choose_degree(nodes)
        t = choose_threshold(k)
        shares = shamir.share(key, t, k)
        share_ms = _median_ms(lambda k=k, t=t: shamir.share(key, t, k))
        combine_ms = _median_ms(lambda shares=shares, t=t: shamir.combine(shares, t))
        print(
            f"| Shamir 32-byte secret, N={nodes}: k={k} shares, t={t}: share / combine | {share_ms:.2f} / {combine_ms:.2f} |"
        )


def run_round(n: int, dim: int, dropout: float = 0.0) -> dict[str, float]:
    """One timed round; the loop is ``simulate_round``'s, with clocks around each side.

    Messages go to nodes as objects, without ``simulate_round``'s dict round trip, so
    the clocks time the protocol alone; the consistency stage is timed with the rest.
    """
    quantizer = Quantizer(clip=1.0, levels=2**12, max_nodes=n)
    ids = list(range(1, n + 1))
    inputs = {u: quantizer.encode([np.full(dim - 1, 0.01 * (u % 7))], seed=secrets.token_bytes(32)) for u in ids}
    config = RoundConfig.create(run_id="bench", round=0, node_ids=ids, dim=dim, bits=quantizer.bits)
    keys = {u: Ed25519PrivateKey.generate() for u in ids}
    identities = {u: key.public_key() for u, key in keys.items()}
    dropped = set(ids[: int(dropout * n)])
    node_seconds = dict.fromkeys(ids, 0.0)
    coordinator_seconds = 0.0
    wall = time.perf_counter()
    nodes = {u: Node(u, keys[u], identities) for u in ids}
    coordinator = Coordinator(config, identities)
    requests = coordinator.start()
    while not coordinator.done:
        replies = []
        for u, request in requests.items():
            start = time.perf_counter()
            reply = nodes[u].handle(request, vector=inputs[u] if request.stage is Stage.MASKED_INPUT else None)
            node_seconds[u] += time.perf_counter() - start
            if not (u in dropped and reply.stage is Stage.MASKED_INPUT):
                replies.append(reply)
        start = time.perf_counter()
        requests = coordinator.handle(replies)
        coordinator_seconds += time.perf_counter() - start
    wall = time.perf_counter() - wall
    included = [inputs[u] for u in coordinator.result.included]
    assert np.array_equal(coordinator.result.total, sum(included[1:], included[0].copy()))
    plain_ms = _median_ms(lambda: sum(included[1:], included[0].copy()))
    return {
        "degree": config.degree,
        "threshold": config.threshold,
        "wall": wall,
        "coordinator": coordinator_seconds,
        "nodes": sum(node_seconds.values()),
        "per_node": statistics.mean(node_seconds.values()),
        "plain_ms": plain_ms,
    }


def _cells(text: str) -> list[tuple[int, int, float]]:
    """``10x10000,50x10000``: full rounds of N nodes and D entries, none dropping."""
    return [(int(n), int(dim), 0.0) for n, dim in (cell.split("x") for cell in text.split(","))]


def bench_rounds(cells: list[tuple[int, int, float]]) -> None:
    print(
        "| N | D | dropped | k | t | round wall (s) | coordinator (s) | nodes, total (s) | per node (s) "
        "| plaintext sum (ms) | wall / plaintext |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, dim, dropout in cells:
        r = run_round(n, dim, dropout)
        print(
            f"| {n} | {dim:,} | {int(dropout * n)} | {r['degree']} | {r['threshold']} | {r['wall']:.2f} "
            f"| {r['coordinator']:.2f} | {r['nodes']:.2f} | {r['per_node']:.3f} | {r['plain_ms']:.2f} "
            f"| {1000 * r['wall'] / r['plain_ms']:,.0f}x |",
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=_cells, default=[(n, dim, 0.0) for n, dim in ROUNDS] + DROPOUT_ROUNDS)
    args = parser.parse_args()
    python, machine = platform.python_version(), platform.machine()
    print(f"fedcost SecAgg+ benchmark: Python {python}, numpy {np.__version__}, {machine}\n")
    bench_primitives()
    print()
    bench_rounds(args.rounds)
