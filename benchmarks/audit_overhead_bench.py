"""What audit logging costs a simulation, by replaying a real run's logging work.

Runs `fedcost simulate` on a config (default: the default config), then, for every
party, replays exactly the logging its run did — the same events in the same order with
payloads of the logged sizes, and for nodes one reopen per message received, resumed
from the recorded end as the node binding does — and times it. The replay time over the federated
rounds' wall time is the overhead; node work runs in parallel workers, so the critical
path is about the coordinator's time plus the node time over the worker count.

    .venv/bin/python benchmarks/audit_overhead_bench.py [CONFIG]
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedcost.audit import AuditLog, read_log
from fedcost.identity import Identity

ROOT = Path(__file__).resolve().parent.parent
WORKERS = os.cpu_count() or 1


def replay(entries: list, identity: Identity, path: Path, reopen_per_message: bool) -> float:
    """Time the logging calls that produced ``entries``; returns seconds."""
    started = time.perf_counter()
    log = AuditLog(path, identity)
    for entry in entries:
        details = {k: v for k, v in entry.details.items() if k not in ("sender", "recipient", "kind", "bytes")}
        if entry.event == "message_received":
            if reopen_per_message:
                position = log.position
                log.detach()
                log = AuditLog(path, identity, resume=position)
            log.message_received(
                os.urandom(entry.details["bytes"]),
                sender=entry.details["sender"],
                kind=entry.details["kind"],
                round=entry.round,
                details=details,
            )
        elif entry.event == "message_sent":
            log.message_sent(
                os.urandom(entry.details["bytes"]),
                recipient=entry.details["recipient"],
                kind=entry.details["kind"],
                round=entry.round,
                details=details,
            )
        elif entry.event == "checkpoint":
            log.checkpoint(round=entry.round)
        elif entry.event == "run_closed":
            log.close()
        else:
            log.append(entry.event, round=entry.round, details=entry.details, digest=entry.digest)
    return time.perf_counter() - started


def main() -> None:
    config = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "configs" / "default.toml"
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        subprocess.run(
            [sys.executable, "-c", "from fedcost.cli import app; app()", "simulate", str(config), "--out", str(run)],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        federated = sum(r["seconds"] for r in rounds)
        times: dict[str, float] = {}
        for log_path in sorted((run / "audit").glob("*.jsonl")):
            party = log_path.stem
            entries, _ = read_log(log_path)
            role = (
                "coordinator"
                if party == "coordinator"
                else json.loads((run / "identities" / f"{party}.pub.json").read_text())["role"]
            )
            times[party] = replay(
                entries,
                Identity.generate(party, role),
                Path(scratch) / f"{party}.jsonl",
                reopen_per_message=party != "coordinator",
            )
    coordinator = times.pop("coordinator")
    nodes = sum(times.values())
    critical = coordinator + nodes / WORKERS
    print(
        f"Machine: {platform.platform()}, {WORKERS} cores; command: "
        f"`.venv/bin/python benchmarks/audit_overhead_bench.py {config.relative_to(ROOT) if config.is_relative_to(ROOT) else config}`\n"
    )
    print(
        "| federated rounds (wall) | coordinator logging | node logging (all nodes) | critical-path estimate | overhead |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| {federated:.1f} s | {coordinator:.2f} s | {nodes:.2f} s | {critical:.2f} s | {critical / federated:.1%} |"
    )


if __name__ == "__main__":
    main()
