"""Audit log throughput: write, then verify, a long log with a checkpoint every 1,000 entries.

Run: ``.venv/bin/python benchmarks/audit_bench.py [--entries 200000] [--every 1000]``.
Verification must stay at or above 100,000 entries/s (signatures only at checkpoints, so
it is mostly JSON parsing, the canonical-form check and SHA-256). The json.loads row is
what a plain pure-Python reader of JSON Lines pays, for comparison; CPU seconds and the
ratio between the two rows show the effect of a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fedcost.audit import AuditLog, verify_log
from fedcost.identity import Identity


def _timed(action: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - wall, time.process_time() - cpu


def _write(path: Path, identity: Identity, entries: int, every: int) -> None:
    log = AuditLog(path, identity)
    for i in range(entries - 1):
        if (i + 1) % every == 0:
            log.checkpoint(round=i // every)
        else:
            log.message_sent(os.urandom(32), recipient="coordinator", kind="masked_update", round=i // every)
    log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--every", type=int, default=1_000, help="entries per checkpoint")
    args = parser.parse_args()
    identity = Identity.generate("hospital-1", "hospital")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hospital-1.jsonl"
        rows = [("write", *_timed(lambda: _write(path, identity, args.entries, args.every)))]
        lines = path.read_bytes().splitlines()
        rows.append(("json.loads per line (floor)", *_timed(lambda: [json.loads(line) for line in lines])))
        result: list = []
        rows.append(("verify_log", *_timed(lambda: result.append(verify_log(path, identity.public())))))
        assert result[0].ok and len(result[0].entries) == args.entries
        size = path.stat().st_size
    print(
        f"{args.entries:,} entries, checkpoint every {args.every:,}, {size / 2**20:.1f} MiB "
        f"({size / args.entries:.0f} B/entry), {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    print(f"| {'step':<28} | {'wall s':>7} | {'CPU s':>7} | {'entries/s (wall)':>16} | {'entries/s (CPU)':>15} |")
    print(f"|{'-' * 30}|{'-' * 8}:|{'-' * 8}:|{'-' * 17}:|{'-' * 16}:|")
    for step, wall, cpu in rows:
        print(f"| {step:<28} | {wall:7.2f} | {cpu:7.2f} | {args.entries / wall:16,.0f} | {args.entries / cpu:15,.0f} |")
    # The ratio holds up on a busy machine far better than either figure on its own.
    (_, floor_wall, floor_cpu), (_, verify_wall, verify_cpu) = rows[1:]
    print(f"verify_log vs json.loads: {floor_wall / verify_wall:.2f}x (wall), {floor_cpu / verify_cpu:.2f}x (CPU)")


if __name__ == "__main__":
    main()
