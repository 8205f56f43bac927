"""Privacy–utility benchmark: the default ecosystem with every site at ε ∈ {0.5, 1, 2, 4, 8, ∞}.

Each ε is one ``fedcost simulate`` run of ``configs/default.toml`` in which every site
runs under the same policy: record-level DP-SGD with budget ε at δ = 1e-5 and clipping
norm 1.0 (the node derives its noise multiplier from the budget and the job's rounds),
secure aggregation required, min cohort 11; ε = ∞ is the same policy without DP.
Prints readmission AUROC and cost R² of the federated model (and the pooled and
local-only baselines, which do not use DP) against ε, and plots them to
``benchmarks/privacy_utility.png``.

    .venv/bin/python benchmarks/privacy_bench.py [--rounds 10] [--epsilons 0.5 1 2 4 8 inf]

``--rounds`` defaults to the config's 10; fewer rounds make a quicker, noisier picture.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tomli_w  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "benchmarks" / "privacy_utility.png"
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
# The simulation replaces the coordinator with the run's own key id; any valid one does here.
PLACEHOLDER_COORDINATOR = "0" * 64


def policy(epsilon: float) -> dict:
    """Every site's policy at ``epsilon``: the hospital example's limits, no plain metrics."""
    privacy = {"epsilon": epsilon} if math.isinf(epsilon) else {"epsilon": epsilon, "delta": 1e-5, "max_grad_norm": 1.0}
    return {"coordinator": PLACEHOLDER_COORDINATOR, "max_rounds": 50, "min_cohort": 11, "privacy": privacy}


def run(epsilon: float, rounds: int, folder: Path) -> dict:
    """One simulation with every site at ``epsilon``; returns its summary."""
    name = f"eps-{epsilon:g}"
    (folder / f"{name}.policy.toml").write_bytes(tomli_w.dumps(policy(epsilon)).encode())
    config = tomllib.loads((ROOT / "configs" / "default.toml").read_text())
    config["run"]["rounds"] = rounds
    config["simulation"]["default_policy"] = f"{name}.policy.toml"
    (folder / f"{name}.toml").write_bytes(tomli_w.dumps(config).encode())
    command = [sys.executable, "-c", "from fedcost.cli import app; app()", "simulate", f"{name}.toml", "--out", name]
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the run at epsilon={epsilon:g} failed:\n{result.stdout}\n{result.stderr}")
    return json.loads((folder / name / "summary.json").read_text())


def row(epsilon: float, summary: dict) -> dict:
    spent = [site.get("epsilon_spent", math.inf) for site in summary["privacy"].values()]
    return {
        "epsilon": epsilon,
        "max_spent": max(spent),
        "auroc": summary["readmission"]["federated"]["auroc"],
        "r2": summary["cost"]["federated"]["r2"],
        "pooled_auroc": summary["readmission"]["pooled"]["auroc"],
        "pooled_r2": summary["cost"]["pooled"]["r2"],
        "local_auroc": summary["readmission"]["local_only"]["auroc"],
        "local_r2": summary["cost"]["local_only"]["r2"],
        "seconds": summary["seconds"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| ε per site | max ε spent | federated AUROC | federated cost R² | seconds |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['epsilon']:g} | {r['max_spent']:.3g} | {r['auroc']:.4f} | {r['r2']:.4f} | {r['seconds']:.0f} |"
        )
    first = rows[0]
    lines.append(
        f"\nBaselines without DP: pooled AUROC {first['pooled_auroc']:.4f}, R² {first['pooled_r2']:.4f}; "
        f"local-only AUROC {first['local_auroc']:.4f}, R² {first['local_r2']:.4f}"
    )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """AUROC and R² against ε (log scale); ε = ∞ is drawn as a dashed line."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    finite = [r for r in rows if math.isfinite(r["epsilon"])]
    unlimited = [r for r in rows if math.isinf(r["epsilon"])]
    for ax, key, baseline, label in (
        (axes[0], "auroc", "pooled_auroc", "readmission AUROC"),
        (axes[1], "r2", "pooled_r2", "cost R²"),
    ):
        ax.plot([r["epsilon"] for r in finite], [r[key] for r in finite], "o-", label="federated, DP-SGD")
        if unlimited:
            ax.axhline(unlimited[0][key], color="tab:green", linestyle="--", label="federated, no DP (ε = ∞)")
        ax.axhline(rows[0][baseline], color="grey", linestyle=":", label="pooled, no DP")
        ax.set_xscale("log")
        ax.set_xticks([r["epsilon"] for r in finite], [f"{r['epsilon']:g}" for r in finite])
        ax.minorticks_off()
        ax.set_xlabel("ε per site (δ = 1e-5)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("Privacy–utility trade-off, default ecosystem")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS))
    parser.add_argument("--plot", type=Path, default=PLOT, help=f"where the plot goes (default {PLOT.name} here)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="privacy_bench_") as tmp:
        for epsilon in args.epsilons:
            rows.append(row(epsilon, run(epsilon, args.rounds, Path(tmp))))
            print(f"epsilon={epsilon:g}: AUROC {rows[-1]['auroc']:.4f}, R² {rows[-1]['r2']:.4f}", flush=True)
    print(f"\n{args.rounds} rounds, default ecosystem (8 sites)\n")
    print(table(rows))
    plot(rows, args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
