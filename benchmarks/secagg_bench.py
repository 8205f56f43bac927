"""Secure aggregation in Flower's Simulation Engine: plaintext sum vs fedcost SecAgg+ vs Flower's SecAgg+.

Run: ``.venv/bin/python benchmarks/secagg_bench.py [--nodes 10,50,100] [--dims 10000,100000,1000000]
[--systems plain,fedcost,flower] [--rounds 3] [--out results.md]``.

Systems, on the same no-training workload (each node sends a fixed random float32 vector
of D entries with weight 1; see ``_secagg_workload`` for what is measured and how):

* ``plain``: fedcost's ``SharedSums`` with ``SecureAggregationSection(enabled=False)``;
* ``fedcost``: ``SharedSums`` with secure aggregation on (the section's defaults); both
  fedcost systems poll for replies through ``shared_sum.PollingGrid``;
* ``flower``: Flower's ``SecAggPlusWorkflow`` (legacy ``DefaultWorkflow`` + ``FedAvg``,
  ``secaggplus_mod`` on a ``NumPyClient``), neighbourhood and threshold matched to fedcost's.

Each (system, N, D) cell runs in a fresh subprocess (``--cell``) so Ray state never leaks
between cells and a crash or a timeout loses one cell only. A cell whose round time,
extrapolated from a smaller measured cell of the same system, would not fit its time limit
runs with one measured round, or is skipped with the estimate. The default grid adds
N = 1,000 at D = 10k for fedcost alone, and the primitives (mask expansion, Shamir) from
``secagg_primitives_bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _secagg_workload import SYSTEMS, dump_json, print_profile, run_cell  # noqa: E402

DEFAULT_NODES = (10, 50, 100)
DEFAULT_DIMS = (10_000, 100_000, 1_000_000)
EXTRA_CELLS = (("fedcost", 1000, 10_000),)  # beyond the grid, in the default run only
STARTUP_SECONDS = 60.0  # Ray start, node registration, hello: a generous allowance


@dataclass(frozen=True)
class Cell:
    system: str
    nodes: int
    dim: int


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=_ints, default=None, help="comma-separated N (default 10,50,100)")
    parser.add_argument("--dims", type=_ints, default=None, help="comma-separated D (default 10000,100000,1000000)")
    parser.add_argument("--systems", type=lambda s: s.split(","), default=list(SYSTEMS))
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per cell, after one warm-up round")
    parser.add_argument("--cell-timeout", type=float, default=420.0, help="seconds one cell subprocess may run")
    parser.add_argument(
        "--extra",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add fedcost at N=1000, D=10k (default: only when --nodes/--dims are not given)",
    )
    parser.add_argument("--primitives", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=None, help="write the tables, machine and command here")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # "system,N,D": run one cell, print JSON
    parser.add_argument("--profile", default=None, help="with --cell: cProfile the ServerApp thread to this file")
    args = parser.parse_args(argv)
    if args.extra is None:
        args.extra = args.nodes is None and args.dims is None
    args.nodes = args.nodes or list(DEFAULT_NODES)
    args.dims = args.dims or list(DEFAULT_DIMS)
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    return args


def _ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",")]


def grid_cells(args: argparse.Namespace) -> list[Cell]:
    """Small cells first so that larger ones can be extrapolated from them."""
    cells = [Cell(s, n, d) for n in sorted(args.nodes) for d in sorted(args.dims) for s in SYSTEMS if s in args.systems]
    if args.extra:
        cells += [Cell(s, n, d) for s, n, d in EXTRA_CELLS if s in args.systems]
    return cells


# --------------------------------------------------------------------------- running cells


def estimate_round(cell: Cell, done: dict[Cell, dict]) -> tuple[float, bool] | None:
    """Round seconds extrapolated from measured cells of the same system, and whether the
    estimate is firm enough to skip a cell on.

    With two smaller-D cells at the same N: a line a + b*D through the two largest (both
    SecAgg+ implementations pay a per-neighbour cost independent of D plus per-entry work);
    firm. Otherwise linear in N*D from the largest smaller cell: a loose upper bound (Flower's
    round at N = 50 barely grows from D = 10k to 100k, this bound says 10x), never a reason
    to skip.
    """
    same_n = sorted(
        (c for c in done if c.system == cell.system and c.nodes == cell.nodes and c.dim < cell.dim), key=lambda c: c.dim
    )
    if len(same_n) >= 2:
        (d0, t0), (d1, t1) = [(c.dim, done[c]["wall"]) for c in same_n[-2:]]
        slope = max((t1 - t0) / (d1 - d0), 0.0)
        return t1 + slope * (cell.dim - d1), True
    smaller = [c for c in done if c.system == cell.system and c.nodes <= cell.nodes and c.dim <= cell.dim and c != cell]
    if not smaller:
        return None
    base = max(smaller, key=lambda c: c.nodes * c.dim)
    return done[base]["wall"] * (cell.nodes * cell.dim) / (base.nodes * base.dim), False


def plan_rounds(cell: Cell, rounds: int, timeout: float, done: dict[Cell, dict]) -> tuple[int, float | None]:
    """Measured rounds for ``cell`` (0: skip) and the round estimate behind the choice.

    A cell whose estimate does not fit runs one measured round; it is skipped only when
    a firm estimate says even that would not fit.
    """
    found = estimate_round(cell, done)
    if found is None:
        return rounds, None
    estimate, firm = found
    for measured in (rounds, 1):
        if STARTUP_SECONDS + (measured + 1) * estimate <= timeout:
            return measured, estimate
    return (0 if firm else 1), estimate


def run_subprocess(cell: Cell, rounds: int, timeout: float) -> dict[str, Any]:
    """One cell in a fresh interpreter; its last stdout line is the JSON result."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--cell",
        f"{cell.system},{cell.nodes},{cell.dim}",
        "--rounds",
        str(rounds),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"error": f"exit {done.returncode}: {tail[-300:]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["subprocess"] = time.perf_counter() - started
    return result


def run_grid(args: argparse.Namespace) -> dict[Cell, dict]:
    results: dict[Cell, dict] = {}
    measured: dict[Cell, dict] = {}
    for cell in grid_cells(args):
        rounds, estimate = plan_rounds(cell, args.rounds, args.cell_timeout, measured)
        if rounds == 0:
            results[cell] = {"skipped": f"skipped (est. {estimate:,.0f} s/round > budget)"}
        else:
            results[cell] = run_subprocess(cell, rounds, args.cell_timeout)
            if rounds < args.rounds:
                results[cell]["note"] = f"1 measured round (est. {estimate:,.0f} s/round)"
            if "wall" in results[cell]:
                measured[cell] = results[cell]
        print(
            f"  {cell.system:8s} N={cell.nodes:<5d} D={cell.dim:<8d} {_summary(results[cell])}",
            file=sys.stderr,
            flush=True,
        )
    return results


def _summary(result: dict) -> str:
    if "wall" in result:
        return f"round {result['wall']:.2f} s ({result['rounds']} measured, cell {result.get('subprocess', 0):.0f} s)"
    return result.get("skipped") or result.get("error", "?")


# --------------------------------------------------------------------------- tables


def _seconds(result: dict | None) -> str:
    if result is None:
        return "–"
    if "wall" not in result:
        return result.get("skipped") or f"failed ({result.get('error', '?')})"
    return f"{result['wall']:.3f}" + ("†" if result.get("note") else "")


def _ratio(top: dict | None, bottom: dict | None) -> str:
    if top and bottom and "wall" in top and "wall" in bottom and bottom["wall"] > 0:
        return f"{top['wall'] / bottom['wall']:.2f}×"
    return "–"


def summary_table(results: dict[Cell, dict]) -> str:
    """Round wall time per (N, D) and system, with the two ratios the targets are about."""
    lines = [
        "| N | D | plain (s) | fedcost (s) | flower (s) | fedcost / plain | flower / fedcost |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for nodes, dim in sorted({(c.nodes, c.dim) for c in results}):
        get = {s: results.get(Cell(s, nodes, dim)) for s in SYSTEMS}
        lines.append(
            f"| {nodes:,} | {dim:,} | {_seconds(get['plain'])} | {_seconds(get['fedcost'])} | {_seconds(get['flower'])} "
            f"| {_ratio(get['fedcost'], get['plain'])} | {_ratio(get['flower'], get['fedcost'])} |"
        )
    return "\n".join(lines)


def detail_table(results: dict[Cell, dict]) -> str:
    """Every measured cell: medians of wall, CPU and bytes, and the result's error."""
    lines = [
        "| system | N | D | rounds | round wall (s) | coordinator thread CPU (s) | driver process CPU (s) "
        "| machine CPU (core-s) | node CPU / node (s) | bytes sent / node | warm-up round (s) | max abs error |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for cell, r in sorted(results.items(), key=lambda kv: (kv[0].nodes, kv[0].dim, SYSTEMS.index(kv[0].system))):
        if "wall" not in r:
            lines.append(f"| {cell.system} | {cell.nodes:,} | {cell.dim:,} | 0 | {_seconds(r)} | | | | | | | |")
            continue
        lines.append(
            f"| {cell.system} | {cell.nodes:,} | {cell.dim:,} | {r['rounds']} | {r['wall']:.3f} | {r['thread_cpu']:.3f} "
            f"| {r['process_cpu']:.3f} | {r['machine_cpu']:.2f} | {r['node_cpu']:.4f} | {r['node_bytes']:,.0f} "
            f"| {r['warm_up']:.2f} | {r['max_abs_error']:.2e} |"
        )
    return "\n".join(lines)


def primitives_table() -> str:
    """``secagg_primitives_bench.bench_primitives``' table, captured rather than duplicated."""
    import secagg_primitives_bench

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        secagg_primitives_bench.bench_primitives()
    return buffer.getvalue().strip()


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip()
    return f"- `uname -a`: {uname}\n- CPU: {cpu}, {os.cpu_count()} cores\n- Python {platform.python_version()}"


NOTES = """Notes. Round wall: median over the measured rounds after one warm-up round, timed in
the ServerApp thread (Ray start-up, registration and hello excluded); † = one measured
round (the cell's estimate would not fit its time limit). Coordinator thread CPU:
`time.thread_time` of the ServerApp thread. Driver process CPU: `time.process_time` of the
driver process (ServerApp thread + Flower's simulation engine threads, which route and
pickle messages to the Ray actors, + Ray's driver threads). Machine CPU: busy core-seconds
of the whole machine over the round (`/proc/stat`: every process, Ray's daemons and object
store included; compare with wall × cores). Node CPU: `time.process_time`
deltas in the Ray actor around each message's ClientApp call, summed per round / N.
Bytes sent: per reply, ArrayRecord `Array.data` lengths + ConfigRecord/MetricRecord values
(bytes/str by length, numbers 8 bytes, lists summed), summed per round / N; framing and keys
not counted. Every system also sends the D-entry float32 global model down with the request
for the contribution. Max abs error: the system's sum against the exact sum of the vectors
(Flower: its average × N). Flower's SecAggPlusWorkflow runs with num_shares = fedcost's
degree + 1 (≤ N), reconstruction_threshold = fedcost's threshold, clipping_range 8,
quantization_range 2^22, modulus 2^32 (its defaults). Every system's ClientApp pickles by
reference (`_secagg_workload.ClientAppByRecipe`; Flower's engine pickles the app with each
message); fedcost's plain and SecAgg+ sums poll for replies through `PollingGrid`
(5 ms + 0.2 ms per pending reply, at most 0.1 s), Flower's workflow through its grid's
0.1 s. fedcost's sites run the permissive default policy with max_model_parameters = D + 2."""


def report(args: argparse.Namespace, results: dict[Cell, dict], primitives: str | None, command: str) -> str:
    parts = [
        "## Secure aggregation round in Flower's Simulation Engine",
        summary_table(results),
        "",
        detail_table(results),
        "",
        NOTES,
    ]
    if primitives:
        parts += ["", "## Primitives (fedcost.secagg, no Flower)", primitives]
    parts += ["", "## Machine", machine(), "", "## Command", f"`{command}`"]
    return "\n".join(parts) + "\n"


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.cell:
        system, nodes, dim = args.cell.split(",")
        result = run_cell(system, int(nodes), int(dim), args.rounds, args.profile)
        if args.profile:
            print_profile(args.profile)
        print(dump_json(result))
        return
    command = shlex.join([".venv/bin/python", "benchmarks/secagg_bench.py", *argv])
    primitives = primitives_table() if args.primitives else None
    results = run_grid(args)
    text = report(args, results, primitives, command)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
