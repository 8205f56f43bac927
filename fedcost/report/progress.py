"""The run folder as a run fills it: the coordinator's progress, as a simulation and a
deployment both record it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from fedcost.analytics import Benchmark, GroupedStatistics
from fedcost.data.features import FeatureSpec
from fedcost.models.glm import FittedGlm
from fedcost.report.analytics import save_benchmark, save_statistics

FEATURES_FILE, METRICS_FILE = "features.json", "metrics.jsonl"
GLM_FILE, COEFFICIENTS_FILE = "glm.json", "coefficients.csv"


def glm_inference(model: FittedGlm) -> dict:
    """A fitted GLM as a health economist reads it: per coefficient the estimate, its standard
    error, z, p, 95% interval and, for log and logit links, the ratio exp(estimate) with its
    interval; and whether the fit converged."""
    rows = []
    for coefficient in model.summary():
        row = dataclasses.asdict(coefficient)
        rows.append({k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()})
    return {"family": model.family.name, "ratio": model.family.ratio, "converged": model.converged,
            "iterations": model.iterations, "dispersion": model.dispersion, "coefficients": rows}


class ProgressRecorder:
    """Writes the feature spec, one line per round and the analytics into ``folder`` as
    they arrive, so that a run stopped at any point shows how far it got. What to do
    with the final model is the subclass's."""

    def __init__(self, folder: Path, rounds: list[dict] | None = None):
        self.folder = folder
        self.features: FeatureSpec | None = None
        self.rounds: list[dict] = rounds or []
        self.analytics: dict = {}
        self.inference: dict = {}

    def on_features(self, features: FeatureSpec, sites: list[str]) -> None:
        self.features = features
        (self.folder / FEATURES_FILE).write_text(json.dumps(features.to_dict(), indent=2))

    def on_round(self, record: dict) -> None:
        self.rounds.append(record)
        with (self.folder / METRICS_FILE).open("a") as out:
            out.write(json.dumps(record) + "\n")

    def on_statistics(self, statistics: GroupedStatistics, sites: list[str]) -> None:
        self.analytics["statistics"] = save_statistics(self.folder, statistics, sites)

    def on_benchmark(self, result: Benchmark, sites: list[str]) -> None:
        self.analytics["benchmark"] = save_benchmark(self.folder, result, sites)

    def on_glm(self, fitted: dict[str, FittedGlm]) -> None:
        """An exact GLM's fit and inference: ``glm.json`` (what ``fedcost predict`` loads) and
        ``coefficients.csv`` (estimates, standard errors, intervals, odds or cost ratios)."""
        self.inference = {task: glm_inference(model) for task, model in fitted.items()}
        (self.folder / GLM_FILE).write_text(json.dumps({task: m.to_dict() for task, m in fitted.items()}, indent=2))
        rows = [{"task": task, **row} for task, table in self.inference.items() for row in table["coefficients"]]
        pd.DataFrame(rows).to_csv(self.folder / COEFFICIENTS_FILE, index=False)
