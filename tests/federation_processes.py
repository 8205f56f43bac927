"""Real coordinator and node processes on 127.0.0.1 for the federation tests.

Every process is started in its own session and killed with its whole tree (whatever it
may have started in a session of its own): no test leaves a coordinator or a node
behind, however it ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedcost.data.files import write_node_files
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.data.synthetic_episodes import generate_linked_extracts
from fedcost.linkage import EpisodeWindow

# Two rounds of the GLM on small nodes: enough to see the model train in a few minutes.
JOB = """
[run]
seed = 11
rounds = {rounds}

[model]
kind = "glm"

[training]
epochs = 1
"""
COMMAND = [sys.executable, "-c", "from fedcost.cli import app; app()"]


def fedcost(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*COMMAND, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def ecosystem(
    folder: Path, sizes: dict[str, tuple[int, ...]], seed: int = 5, window: EpisodeWindow | None = None
) -> tuple[Path, dict[str, str]]:
    """Node files and their mapping (with ``window``, the linked episode extracts too, their
    truth in ``truth.json``); returns the mapping and each node's role."""
    made = generate_ecosystem(EcosystemSpec.from_sizes(sizes), seed)
    linked = generate_linked_extracts(made, seed, window) if window else None
    nodes = made.nodes
    mapping = write_node_files(((n.name, n.role, n.frame) for n in nodes), folder, linked.extracts if linked else None)
    if linked:
        (folder / "truth.json").write_text(json.dumps(linked.truth))
    return mapping, {n.name: n.role for n in nodes}


class Processes:
    """Long-running ``fedcost`` processes, their output in files, all killed at the end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str, cwd: Path) -> subprocess.Popen:
        out = (self.folder / f"{name}.out").open("w")
        process = subprocess.Popen(
            [*COMMAND, *args],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "COLUMNS": "200"},
        )
        self.started[name] = process
        return process

    def output(self, name: str) -> str:
        return (self.folder / f"{name}.out").read_text()

    def kill(self, name: str) -> None:
        """SIGKILL the process and every descendant, as a crash or a pulled plug would."""
        process = self.started.pop(name)
        for pid in [process.pid, *_descendants(process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=30)

    def kill_all(self) -> None:
        for name in list(self.started):
            self.kill(name)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_for(condition: Callable[[], bool], timeout: float, what: str, *, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
