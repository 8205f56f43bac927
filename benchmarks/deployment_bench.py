"""A real loopback federation against `fedcost simulate`: the same job, nodes and seed.

The three sites of ``examples/byo`` run a GLM job with secure aggregation, once in
``fedcost simulate`` and once as a real federation on 127.0.0.1 (``fedcost coordinator
start``, three ``fedcost node start``, ``fedcost run``: separate OS processes over TLS);
then, in the same federation, the job again with secure aggregation off. Reported, round
by round: each round's seconds as the coordinator measures them (its train and evaluate
sums, the same code in both), the deployed/simulated ratio per round, the time from
starting ``fedcost run`` to the first round's record, the secure/plain ratio, and the
final metrics of both (the same up to SecAgg+'s stochastic rounding).

    .venv/bin/python benchmarks/deployment_bench.py [--rounds 5] [--fit newton] [--epochs 1] [--out FILE.json] [--keep DIR]

Targets (issue 15): a deployed round at most 1.5x the simulated one and at most 10 s; the
first round at most 30 s after `fedcost run`; secure aggregation on against off at most
1.3x per round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "byo"
SITES = {
    "st-mary": ("hospital", "st-mary.csv"),
    "valley-general": ("hospital", "valley-general.csv"),
    "northcare": ("insurer", "northcare-claims.parquet"),
}
COMMAND = [sys.executable, "-c", "from fedcost.cli import app; app()"]
METRICS = ("readmission_auroc", "readmission_brier", "cost_mae", "cost_r2")
# What a federation's job states of the sites' data (a simulation reads it from the mapping).
DATA_SECTION = '\n[data]\nextra_numeric = ["bmi"]\n'


def job(rounds: int, fit: str, secure: bool, seed: int, epochs: int = 1) -> str:
    """The job both sides run; a simulation adds only where its data come from."""
    return f"""[run]
seed = {seed}
rounds = {rounds}

[model]
kind = "glm"
fit = "{fit}"

[training]
epochs = {epochs}

[secure_aggregation]
enabled = {"true" if secure else "false"}

[analytics]
group_by = []
benchmark = false
"""


def fedcost(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [*COMMAND, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )
    if done.returncode != 0:
        raise SystemExit(f"fedcost {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done


def rounds_of(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def simulated(folder: Path, text: str) -> list[dict]:
    (folder / "sim.toml").write_text(text)
    fedcost("simulate", "sim.toml", "--data-dir", str(DATA), "--out", "simulated", cwd=folder)
    return rounds_of(folder / "simulated")


class Federation:
    """Coordinator and nodes as OS processes, each in its own session, all killed at the end."""

    def __init__(self, folder: Path, seed: int):
        self.folder, self.seed = folder, seed
        self.processes: list[subprocess.Popen] = []
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        fedcost("federation", "init", "fed", "--address", f"127.0.0.1:{port}", cwd=folder)
        for name, (role, _) in SITES.items():
            fedcost("federation", "add-node", name, "--role", role, "-f", "fed", cwd=folder)

    def start(self) -> None:
        self._spawn("coordinator", "coordinator", "start", "fed")
        self._wait("coordinator", "coordinator ready")
        for name, (_, data) in SITES.items():
            self._spawn(
                name,
                "node",
                "start",
                f"fed/kits/{name}",
                "--data",
                str(DATA / data),
                "--mapping",
                str(DATA / "mapping.toml"),
                "--state",
                f"state/{name}",
                "--split-seed",
                str(self.seed),
            )
        for name in SITES:
            self._wait(name, "waiting for jobs")

    def run(self, text: str, name: str) -> tuple[list[dict], float]:
        """Run a job to its end; its rounds, and seconds from `fedcost run` to round 1's record."""
        (self.folder / f"{name}.toml").write_text(text + DATA_SECTION)
        before = set((self.folder / "fed" / "runs").iterdir())
        started = time.perf_counter()
        submitted = self._spawn(f"run-{name}", "run", "fed", f"{name}.toml")
        first = None
        while submitted.poll() is None:
            new = set((self.folder / "fed" / "runs").iterdir()) - before
            if first is None and new and rounds_of(next(iter(new))):
                first = time.perf_counter() - started
            time.sleep(0.05)
        if submitted.returncode != 0:
            raise SystemExit((self.folder / f"run-{name}.out").read_text())
        run = next(iter(set((self.folder / "fed" / "runs").iterdir()) - before))
        return rounds_of(run), first if first is not None else time.perf_counter() - started

    def stop(self) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        out = (self.folder / f"{name}.out").open("w")
        process = subprocess.Popen(
            [*COMMAND, *args],
            cwd=self.folder,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "COLUMNS": "200"},
        )
        self.processes.append(process)
        return process

    def _wait(self, name: str, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while text not in (self.folder / f"{name}.out").read_text():
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not say {text!r}:\n{(self.folder / f'{name}.out').read_text()}")
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fit", choices=("newton", "fedavg"), default="newton")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--epochs", type=int, default=1, help="local epochs a round (with --fit fedavg): a round's own work"
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--keep", type=Path, help="work in this new folder and keep it (the processes' logs)")
    args = parser.parse_args()
    if args.keep:
        if args.keep.exists():
            parser.error(f"--keep {args.keep}: it exists; name a new folder (the run's logs go there)")
        args.keep.mkdir(parents=True)
    with (
        contextlib.nullcontext(str(args.keep))
        if args.keep
        else tempfile.TemporaryDirectory(prefix="fedcost-deploy-bench-") as tmp
    ):
        folder = Path(tmp)
        secure_job = job(args.rounds, args.fit, True, args.seed, args.epochs)
        simulation = simulated(folder, secure_job)
        federation = Federation(folder, args.seed)
        try:
            federation.start()
            deployed, first = federation.run(secure_job, "secure")
            plain, plain_first = federation.run(job(args.rounds, args.fit, False, args.seed, args.epochs), "plain")
        finally:
            federation.stop()
    report(args, simulation, deployed, first, plain, plain_first)


def report(
    args: argparse.Namespace,
    simulation: list[dict],
    deployed: list[dict],
    first: float,
    plain: list[dict],
    plain_first: float,
) -> None:
    rows = []
    for sim, dep, pln in zip(simulation, deployed, plain):
        rows.append(
            {
                "round": sim["round"],
                "simulated": sim["seconds"],
                "deployed": dep["seconds"],
                "deployed_plain": pln["seconds"],
                "ratio": dep["seconds"] / sim["seconds"],
                "secure_over_plain": dep["seconds"] / pln["seconds"],
            }
        )
    steady = rows[1:] or rows  # round 1 pays each process's first use of its code and data
    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        "job": {"rounds": args.rounds, "fit": args.fit, "epochs": args.epochs, "seed": args.seed, "sites": list(SITES)},
        "rounds": rows,
        "median_ratio_after_round_1": statistics.median(r["ratio"] for r in steady),
        "median_deployed_round_after_round_1": statistics.median(r["deployed"] for r in steady),
        "median_secure_over_plain_after_round_1": statistics.median(r["secure_over_plain"] for r in steady),
        "first_round_after_run_s": first,
        "first_round_after_run_plain_s": plain_first,
        "final": {
            "simulated": {m: simulation[-1].get(m) for m in METRICS},
            "deployed": {m: deployed[-1].get(m) for m in METRICS},
        },
    }
    print("| round | simulated s | deployed s | ratio | deployed, SecAgg off s | SecAgg on/off |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['round']} | {r['simulated']:.2f} | {r['deployed']:.2f} | {r['ratio']:.2f} | "
            f"{r['deployed_plain']:.2f} | {r['secure_over_plain']:.2f} |"
        )
    print(
        f"\nmedian after round 1: deployed {figures['median_deployed_round_after_round_1']:.2f} s, "
        f"{figures['median_ratio_after_round_1']:.2f}x simulated, SecAgg on/off "
        f"{figures['median_secure_over_plain_after_round_1']:.2f}x; first round {first:.1f} s after `fedcost run` "
        f"({plain_first:.1f} s without SecAgg)"
    )
    for side in ("simulated", "deployed"):
        print(f"{side}: " + ", ".join(f"{m} {v:.4f}" for m, v in figures["final"][side].items() if v is not None))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
