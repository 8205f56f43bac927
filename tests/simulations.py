"""Real `fedcost simulate` processes for the scenario tests, and the small federation
most of them run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Five nodes, three rounds: big enough for secure aggregation to tolerate one dropout.
SMALL_FEDERATION = """
[run]
seed = 5
rounds = 3

[ecosystem.sizes]
hospital = [1500, 900, 600]
insurer = [1200]
pharma = [500]

[model]
kind = "glm"
"""


def fedcost(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The `fedcost` command as a separate process, output captured as text."""
    command = [sys.executable, "-c", "from fedcost.cli import app; app()", *args]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"}
    )


def simulate(
    folder: Path, config: str, name: str, command: str = "simulate"
) -> tuple[subprocess.CompletedProcess, Path]:
    """Write ``config`` as ``<name>.toml`` in ``folder`` and run ``fedcost <command>`` on it
    into ``<name>/`` (``simulate``, or ``analyze``)."""
    (folder / f"{name}.toml").write_text(config)
    return fedcost(command, f"{name}.toml", "--out", name, cwd=folder), folder / name


def exchanges(run: Path) -> list[tuple[int | None, set[str]]]:
    """A run's exchanges as its coordinator logged them: each one's round (its first request's)
    and the kinds of its requests (those logged before the first reply)."""
    found: list[tuple[int | None, set[str]]] = []
    kinds: set[str] | None = None
    for entry in map(json.loads, (run / "audit" / "coordinator.jsonl").read_text().splitlines()):
        if entry["event"] != "message_sent":
            kinds = None
            continue
        if kinds is None:
            kinds = set()
            found.append((entry.get("round"), kinds))
        kinds.add(entry["details"]["kind"])
    return found
