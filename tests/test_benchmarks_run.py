"""Every benchmark under benchmarks/ still runs and prints its figures.

Nothing else runs the benchmarks, so a refactor that breaks one (``secagg_bench`` spoke the
hello of before the site guardian for several sessions) went unseen until someone needed
its figures. Each runs here in its smallest configuration, as a subprocess from a scratch
folder (127.0.0.1 only; any file it writes goes there), with this tree first on the path.
The figures are not checked against targets: only that the run ends well and prints a
number where its figure belongs. Speed is the benchmarks' own business (RESULTS.md).

About 11 minutes on the 2-core development VM under a load of 4 to 6: most of it
``adaptation_study`` (two simulations and their rescoring, 2 min), ``simulation_bench``
(three simulations, 2 min) and the other benchmarks that run ``fedcost simulate`` once or
twice. ``secagg_primitives_bench`` runs one small full round (``--rounds 10x1000``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
NUMBER = r"-?\d[\d,]*(\.\d+)?"


@dataclass(frozen=True)
class Smoke:
    """One benchmark's smallest run: its script, its arguments (``{tmp}`` is the scratch
    folder, ``{root}`` this tree) and a pattern a line of its output matches where it
    prints its figure."""

    script: str
    args: tuple[str, ...]
    figure: str
    timeout: float = 240

    def command(self, tmp: Path) -> list[str]:
        return [
            sys.executable,
            str(BENCHMARKS / f"{self.script}.py"),
            *(a.format(tmp=tmp, root=ROOT) for a in self.args),
        ]


SMOKES = (
    Smoke(
        "secagg_bench",
        ("--nodes", "5", "--dims", "100", "--systems", "plain,fedcost,flower", "--rounds", "1", "--no-primitives"),
        rf"^\| 5 \| 100 \| {NUMBER} \| {NUMBER} \| {NUMBER} \|",
    ),
    Smoke("secagg_primitives_bench", ("--rounds", "10x1000"), rf"^\| mask expansion, 1M entries .* \| {NUMBER} \|$"),
    Smoke("audit_bench", ("--entries", "2000", "--every", "100"), rf"^verify_log vs json.loads: {NUMBER}x"),
    Smoke("episode_linkage_bench", ("--stays", "50", "--repeat", "1"), rf"^\| 50 \| .* \| {NUMBER} s \| {NUMBER}× \|$"),
    Smoke("cli_bench", ("--before", "{root}", "--repeat", "1"), rf"^\| .+ \| {NUMBER} s \| {NUMBER} s \| {NUMBER}× \|"),
    Smoke("err_bench", (), rf"^Spearman correlation .*: O/E {NUMBER}, ERR {NUMBER}$"),
    Smoke("statistics_dp_bench", (), rf"^\| inf \| — \| {NUMBER}%"),
    Smoke("dp_newton_bench", ("--seeds", "1", "--rounds", "1"), rf"^\| off \(exact\) \| 0 \| {NUMBER} \| {NUMBER} \|"),
    Smoke("many_levels_bench", (), rf"^AUROC: federated {NUMBER} \| statsmodels pooled {NUMBER}"),
    Smoke("many_sites_bench", (), rf"^\| .+ \| {NUMBER} \| {NUMBER}% \|$"),
    Smoke("simulation_bench", (), rf"^\| configs/default.toml \| {NUMBER} s \| {NUMBER} / {NUMBER} / {NUMBER} \|"),
    Smoke(
        "privacy_bench",
        ("--rounds", "1", "--epsilons", "inf", "--plot", "{tmp}/plot.png"),
        rf"^epsilon=inf: AUROC {NUMBER}, R² {NUMBER}$",
    ),
    Smoke("audit_overhead_bench", ("{root}/configs/default.toml",), rf"^\| {NUMBER} s \| {NUMBER} s \| {NUMBER} s \|"),
    Smoke("deployment_bench", ("--rounds", "1"), rf"^median after round 1: deployed {NUMBER} s, {NUMBER}x simulated"),
    Smoke("real_data_bench", ("--only", "nmes1988"), rf"statsmodels − rebuilt [+-]{NUMBER}"),
    Smoke(
        "adaptation_study",
        ("--seeds", "1", "--keep", "{tmp}/runs"),
        rf"^  adapted  0 epochs: 3 smallest AUROC {NUMBER}",
        timeout=480,
    ),
)

# Benchmarks whose smallest run is far longer than a smoke test, and why.
SKIPPED: dict[str, str] = {}


@pytest.mark.slow
@pytest.mark.parametrize("smoke", SMOKES, ids=lambda smoke: smoke.script)
def test_benchmark_runs_and_prints_its_figures(smoke: Smoke, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        smoke.command(tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=smoke.timeout
    )
    assert done.returncode == 0, f"{smoke.script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert re.search(smoke.figure, done.stdout, re.MULTILINE), (
        f"{smoke.script} printed no figure:\n{done.stdout[-3000:]}"
    )


def test_every_benchmark_is_smoke_tested_or_skipped_with_a_reason() -> None:
    scripts = {path.stem for path in BENCHMARKS.glob("*.py") if not path.stem.startswith("_")}
    listed = [smoke.script for smoke in SMOKES] + list(SKIPPED)
    assert sorted(listed) == sorted(scripts)
