"""Foundation and secure-aggregation acceptance figures from real `fedcost simulate` runs.

For each config: wall time of the whole command, federated against pooled (AUROC within
0.01, cost R² within 0.02), federated against local-only on the mean of the three
smallest sites (the shared model as it is, and as each site would use it after the
validated site steps of ``models.site_steps``);
and for the default config, the same run with secure aggregation off
(AUROC within 0.002, cost R² within 0.005 of the secure run).

    .venv/bin/python benchmarks/simulation_bench.py [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("configs/default.toml", "configs/heterogeneous.toml")
# The shared model as each site would use it: its cost level and fine-tuning, kept where they help.
AT_SITES = "federated_at_sites"


def run(config: Path, out: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "from fedcost.cli import app; app()", "simulate", str(config), "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    return time.perf_counter() - started, json.loads((out / "summary.json").read_text())


def smallest_sites(summary: dict, task: str, metric: str, model: str) -> float:
    sites = sorted(summary["nodes"], key=lambda n: n["train_rows"])[:3]
    return statistics.mean(summary["per_site"][s["name"]][task][model][metric] for s in sites)


def comparison_rows(name: str, seconds: float, summary: dict) -> list[str]:
    auroc = {m: summary["readmission"][m]["auroc"] for m in ("federated", "pooled", "local_only")}
    r2 = {m: summary["cost"][m]["r2"] for m in ("federated", "pooled", "local_only")}
    small = {
        (task, metric, model): smallest_sites(summary, task, metric, model)
        for task, metric in (("readmission", "auroc"), ("cost", "mae"), ("cost", "r2"))
        for model in ("federated", "local_only")
    }
    small |= {("cost", metric, AT_SITES): smallest_sites(summary, "cost", metric, AT_SITES) for metric in ("mae", "r2")}
    return [
        f"| {name} | {seconds:.0f} s | {auroc['federated']:.4f} / {auroc['pooled']:.4f} / {auroc['local_only']:.4f} "
        f"| {auroc['pooled'] - auroc['federated']:+.4f} | {r2['federated']:.4f} / {r2['pooled']:.4f} / {r2['local_only']:.4f} "
        f"| {r2['pooled'] - r2['federated']:+.4f} "
        f"| {small['readmission', 'auroc', 'federated']:.4f} vs {small['readmission', 'auroc', 'local_only']:.4f} "
        f"| {small['cost', 'mae', 'federated']:,.0f} vs {small['cost', 'mae', 'local_only']:,.0f} "
        f"| {small['cost', 'r2', 'federated']:.4f} vs {small['cost', 'r2', 'local_only']:.4f} "
        f"| {summary['cost'][AT_SITES]['r2']:.4f}; {small['cost', 'mae', AT_SITES]:,.0f}, {small['cost', 'r2', AT_SITES]:.4f} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="append the table to this markdown file")
    args = parser.parse_args()
    lines = [
        f"Machine: {platform.platform()}, {platform.processor() or 'cpu'}, command "
        f"`.venv/bin/python benchmarks/simulation_bench.py`",
        "",
        "| config | wall | AUROC fed / pooled / local | pooled − fed | cost R² fed / pooled / local | pooled − fed "
        "| 3 smallest: AUROC fed vs local | MAE fed vs local | R² fed vs local "
        "| fed at sites (validated steps): R²; 3 smallest MAE, R² |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        summaries = {}
        for config in CONFIGS:
            seconds, summaries[config] = run(ROOT / config, Path(scratch) / Path(config).stem)
            lines += comparison_rows(config, seconds, summaries[config])
            print(lines[-1], flush=True)
        plain_config = Path(scratch) / "plain.toml"
        plain_config.write_text((ROOT / CONFIGS[0]).read_text().replace("enabled = true", "enabled = false"))
        seconds, plain = run(plain_config, Path(scratch) / "plain")
        lines += comparison_rows("default, secure aggregation off", seconds, plain)
    secure = summaries[CONFIGS[0]]
    lines += [
        "",
        "Secure aggregation against plaintext, default config: "
        f"AUROC {secure['readmission']['federated']['auroc']:.5f} vs {plain['readmission']['federated']['auroc']:.5f} "
        f"(|Δ| {abs(secure['readmission']['federated']['auroc'] - plain['readmission']['federated']['auroc']):.5f}), "
        f"cost R² {secure['cost']['federated']['r2']:.5f} vs {plain['cost']['federated']['r2']:.5f} "
        f"(|Δ| {abs(secure['cost']['federated']['r2'] - plain['cost']['federated']['r2']):.5f}).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with args.out.open("a") as out:
            out.write(text)


if __name__ == "__main__":
    main()
