"""How many epochs of site adaptation: the development study behind ``[run] adaptation_epochs``.

Runs ``fedcost simulate`` on both shipped configs with seeds 1-5 (never the configs' own
seeds, which the acceptance figures use), then re-scores each run's final federated and
pooled models with 0, 3, 5 and 10 epochs of site fine-tuning on offer at every site
(``models.site_steps``: each step kept only where the site's validation rows show it
helps, as the summary scores ``federated_at_sites``). Prints per run the three smallest
sites against local-only and the overall figures.

    .venv/bin/python benchmarks/adaptation_study.py [--seeds 1,2,3,4,5] [--keep DIR]

About 25 minutes on the 2-core development VM.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedcost.config import SimulationConfig
from fedcost.data.features import FeatureSpec
from fedcost.data.mapping import DataMapping
from fedcost.lab import baselines, simulation
from fedcost.models.metrics import cost_metrics, readmission_metrics
from fedcost.models.nets import build_model
from fedcost.run_folder import RunFolder

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = (0, 3, 5, 10)


def simulate(config: Path, seed: int, out: Path) -> Path:
    """A run of ``config`` with another seed, in ``out``."""
    text = re.sub(r"(?m)^seed = \d+", f"seed = {seed}", config.read_text())
    seeded = out.with_suffix(".toml")
    seeded.write_text(text)
    subprocess.run(
        [sys.executable, "-c", "from fedcost.cli import app; app()", "simulate", str(seeded), "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    return out


def scores(run: Path) -> dict[str, dict[str, float]]:
    """Per variant: overall AUROC and cost R², and the three smallest sites' mean AUROC, R², MAE."""
    config = SimulationConfig.load(run / "config.toml")
    mapping = DataMapping.load(run / "data" / "mapping.toml")
    config = replace(config, model=replace(config.model, tasks=mapping.tasks))
    nodes = simulation._load_nodes(mapping, config)
    features = FeatureSpec.from_dict(json.loads((run / "model.json").read_text())["features"])
    federated = build_model(config.model, features.n_features, seed=config.run.seed)
    federated.load_state_dict(torch.load(run / "model.pt"))
    pooled_rows = pd.concat([node.train for node in nodes], ignore_index=True)
    pooled = baselines.train_baseline(
        config, features, pooled_rows, config.run.rounds * config.training.epochs, "pooled"
    )
    predictions = {"local": baselines.local_only_predictions(config, features, nodes)}
    sites = RunFolder(run / "study")  # the study's site steps, apart from the run's own
    sites.path.mkdir(exist_ok=True)
    for epochs in EPOCHS:
        adapted = replace(config, run=replace(config.run, adaptation_epochs=epochs))
        predictions[f"federated/{epochs}"] = [
            baselines.site_steps(adapted, federated, features, n, sites)[1] for n in nodes
        ]
        predictions[f"pooled/{epochs}"] = [baselines.site_steps(adapted, pooled, features, n, sites)[1] for n in nodes]
    smallest = sorted(range(len(nodes)), key=lambda i: len(nodes[i].train) + len(nodes[i].test))[:3]
    return {name: _figures(nodes, site_predictions, smallest) for name, site_predictions in predictions.items()}


def _figures(nodes: list, predictions: list[dict], smallest: list[int]) -> dict[str, float]:
    readmitted = [n.test["readmitted_30d"].to_numpy() for n in nodes]
    costs = [n.test["total_cost"].to_numpy() for n in nodes]
    site_cost = [cost_metrics(costs[i], predictions[i]["cost"]) for i in smallest]
    return {
        "auroc": readmission_metrics(
            np.concatenate(readmitted), np.concatenate([p["readmission"] for p in predictions])
        )["auroc"],
        "r2": cost_metrics(np.concatenate(costs), np.concatenate([p["cost"] for p in predictions]))["r2"],
        "small_auroc": float(
            np.mean([readmission_metrics(readmitted[i], predictions[i]["readmission"])["auroc"] for i in smallest])
        ),
        "small_r2": float(np.mean([m["r2"] for m in site_cost])),
        "small_mae": float(np.mean([m["mae"] for m in site_cost])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--keep", type=Path, help="keep the run folders here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        wins = {epochs: 0 for epochs in EPOCHS}
        for name in ("default", "heterogeneous"):
            for seed in map(int, args.seeds.split(",")):
                run = simulate(ROOT / "configs" / f"{name}.toml", seed, folder / f"{name}-{seed}")
                result = scores(run)
                local = result["local"]
                print(
                    f"{name} seed {seed}: local-only 3 smallest AUROC {local['small_auroc']:.4f} "
                    f"R² {local['small_r2']:.4f} MAE {local['small_mae']:,.0f}; overall R² {local['r2']:.4f}"
                )
                for epochs in EPOCHS:
                    fed, pooled = result[f"federated/{epochs}"], result[f"pooled/{epochs}"]
                    beats = (
                        fed["small_auroc"] > local["small_auroc"],
                        fed["small_r2"] > local["small_r2"],
                        fed["small_mae"] < local["small_mae"],
                    )
                    wins[epochs] += all(beats)
                    print(
                        f"  adapted {epochs:2d} epochs: 3 smallest AUROC {fed['small_auroc']:.4f} R² {fed['small_r2']:.4f} "
                        f"MAE {fed['small_mae']:,.0f} ({''.join('✓' if b else '✗' for b in beats)}); overall AUROC "
                        f"{fed['auroc']:.4f} (pooled {pooled['auroc']:.4f}), R² {fed['r2']:.4f} (pooled {pooled['r2']:.4f})",
                        flush=True,
                    )
        runs = 2 * len(args.seeds.split(","))
        print(
            "runs where federated beats local-only on all three (3 smallest sites): "
            + ", ".join(f"{epochs} epochs {wins[epochs]}/{runs}" for epochs in EPOCHS)
        )


if __name__ == "__main__":
    main()
