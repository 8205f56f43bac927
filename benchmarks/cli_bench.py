"""How long the command line takes to answer: `fedcost --help`, and a config with two
mistakes (`fedcost simulate bad.toml`), for two source trees in the same run.

Each measurement is a fresh process (``python -c "from fedcost.cli import app; app()"``
with the tree first on PYTHONPATH), the two trees alternating, the median of ``--repeat``
runs of its wall time and of its CPU time (user + system: what a loaded machine inflates
least); the ratio before/after is what to compare across machines.

    .venv/bin/python benchmarks/cli_bench.py --before /tmp/fedcost-before [--after .] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BAD_CONFIG = '[run]\nseeed = 3\n[model]\nkind = "forest"\n'
CASES = {"fedcost --help": ["--help"], "fedcost simulate bad.toml (2 mistakes)": ["simulate", "bad.toml"]}


def cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def seconds(tree: Path, args: list[str], folder: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one ``fedcost ARGS`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started, cpu_started = time.perf_counter(), cpu()
    done = subprocess.run(
        [sys.executable, "-c", "from fedcost.cli import app; app()", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed, cpu_elapsed = time.perf_counter() - started, cpu() - cpu_started
    if done.returncode not in (0, 2):
        raise SystemExit(f"{tree}: fedcost {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return elapsed, cpu_elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="source tree before the change")
    parser.add_argument("--after", type=Path, default=ROOT, help="source tree after the change (default: this one)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "bad.toml").write_text(BAD_CONFIG)
        print(
            f"Machine: {platform.platform()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
            f"{args.repeat} runs each, median"
        )
        print("| command | wall before | wall after | ratio | CPU before | CPU after | ratio |")
        print("|---|---|---|---|---|---|---|")
        for name, command in CASES.items():
            runs: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
            for _ in range(args.repeat):
                for label, measured in runs.items():
                    measured.append(seconds(getattr(args, label).resolve(), command, Path(folder)))
            wall = {label: statistics.median(r[0] for r in measured) for label, measured in runs.items()}
            used = {label: statistics.median(r[1] for r in measured) for label, measured in runs.items()}
            print(
                f"| {name} | {wall['before']:.2f} s | {wall['after']:.2f} s | {wall['before'] / wall['after']:.1f}× "
                f"| {used['before']:.2f} s | {used['after']:.2f} s | {used['before'] / used['after']:.1f}× |"
            )


if __name__ == "__main__":
    main()
