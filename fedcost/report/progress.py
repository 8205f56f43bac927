"""The run folder as a run fills it: the coordinator's progress, as a simulation and a
deployment both record it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from fedcost.analytics import Benchmark, GroupedStatistics
from fedcost.analytics.group_costing import GroupCosting
from fedcost.config import SimulationConfig
from fedcost.data.features import FeatureSpec
from fedcost.linkage import EpisodeCosts
from fedcost.models.glm import FittedGlm
from fedcost.privacy.distributed import NewtonNoise
from fedcost.report.tables import save_benchmark, save_group_costing, save_statistics
from fedcost.run_folder import RunFolder

# The federated metrics a round's evaluation sums give, per task.
SCORED = {"readmission": ("auroc", "brier", "log_loss"), "cost": ("mae", "rmse", "r2")}


def glm_inference(model: FittedGlm) -> dict:
    """A fitted GLM as a health economist reads it: per coefficient the estimate, its standard
    error, z, p, 95% interval and, for log and logit links, the ratio exp(estimate) with its
    interval; and whether the fit converged, with the fit's own word on it. A fit on noisy
    sums says so: its standard errors include the DP noise on the score (``dp_noise``)."""
    rows = []
    for coefficient in model.summary():
        row = dataclasses.asdict(coefficient)
        rows.append({k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()})
    return {
        "family": model.family.name,
        "ratio": model.family.ratio,
        "converged": model.converged,
        "iterations": model.iterations,
        "message": model.message,
        "dispersion": model.dispersion,
        "dp_noise": (
            {
                "score_sd": model.score_noise,
                "standard_errors": "include the DP noise on the score (the model-based covariance plus "
                "score_sd^2 (H + penalty)^-2) but not that on the information H (itself noisy, eigenvalues "
                "floored) nor an unfinished step: a lower bound under noise",
            }
            if model.score_noise > 0
            else None
        ),
        "coefficients": rows,
    }


class ProgressRecorder:
    """Writes the feature spec, one line per round and the analytics into ``folder`` as
    they arrive, so that a run stopped at any point shows how far it got. What to do
    with the final model is the subclass's."""

    def __init__(self, folder: Path, rounds: list[dict] | None = None):
        self.folder = RunFolder(folder)
        self.features: FeatureSpec | None = None
        self.rounds: list[dict] = rounds or []
        self.analytics: dict = {}
        self.inference: dict = {}

    def on_features(self, features: FeatureSpec, sites: list[str]) -> None:
        self.features = features
        self.folder.features.write_text(json.dumps(features.to_dict(), indent=2))

    def on_round(self, record: dict) -> None:
        self.rounds.append(record)
        with self.folder.metrics.open("a") as out:
            out.write(json.dumps(record) + "\n")

    def on_statistics(self, statistics: GroupedStatistics, sites: list[str]) -> None:
        self.analytics["statistics"] = save_statistics(self.folder.path, statistics, sites)

    def on_benchmark(self, result: Benchmark, sites: list[str]) -> None:
        self.analytics["benchmark"] = save_benchmark(self.folder.path, result, sites)

    def on_group_costing(self, result: GroupCosting, sites: list[str]) -> None:
        self.analytics["group_costing"] = save_group_costing(self.folder.path, result, sites)

    def on_episodes(self, result: EpisodeCosts) -> None:
        result.frame().to_csv(self.folder.episodes, index=False)
        self.analytics["episodes"] = result.to_json()

    def on_glm(self, fitted: dict[str, FittedGlm]) -> None:
        """An exact GLM's fit and inference: ``glm.json`` (what ``fedcost predict`` loads) and
        ``coefficients.csv`` (estimates, standard errors, intervals, odds or cost ratios)."""
        self.inference = {task: glm_inference(model) for task, model in fitted.items()}
        self.folder.glm.write_text(json.dumps({task: m.to_dict() for task, m in fitted.items()}, indent=2))
        rows = [{"task": task, **row} for task, table in self.inference.items() for row in table["coefficients"]]
        pd.DataFrame(rows).to_csv(self.folder.coefficients, index=False)


def federation_summary(
    run_id: str,
    config: SimulationConfig,
    roles: dict[str, str],
    rounds: list[dict],
    analytics: dict,
    *,
    seconds: float,
    newton_noise: NewtonNoise | None = None,
) -> dict:
    """A federation run's ``summary.json``, in a simulation's shape where the two agree.

    Only the federated model is scored (from the summed evaluation sums of the last
    round): no party of a federation holds the rows a pooled or local-only model needs.
    ``per_site``, ``privacy`` and the sites' rows come from the sites' own reports
    (``fedcost federation collect``); until then they are empty.
    """
    last = rounds[-1] if rounds else {}
    summary: dict = {
        "run_id": run_id,
        "task": "train",
        "federation": True,
        "secure_aggregation": config.secure_aggregation.enabled,
        "min_cohort": config.run.min_cohort,
        "currency": config.analytics.currency,
        "nodes": [{"name": name, "role": roles[name]} for name in sorted(roles)],
        "rounds": config.run.rounds,
        "strategy": config.strategy.name,
        "model": config.model.kind,
        "tasks": list(config.model.tasks),
        "dropouts": {r["round"]: r["dropouts"] for r in rounds if r.get("dropouts")},
        "federated_evaluation": last,
    }
    for task in config.model.tasks:
        scores = {metric: last[f"{task}_{metric}"] for metric in SCORED[task] if f"{task}_{metric}" in last}
        summary[task] = {"federated": scores}
    if newton_noise is not None:
        summary["glm_privacy"] = glm_privacy_summary(config, newton_noise)
    return summary | {
        "per_site": {},
        "privacy": {},
        "sites_reported": [],
        "analytics": analytics,
        "seconds": round(seconds, 1),
    }


def glm_privacy_summary(config: SimulationConfig, noise: NewtonNoise) -> dict:
    """The noise on the exact GLM's Newton sums, as planned before the first round."""
    section = config.glm_privacy
    return {
        "epsilon": section.epsilon,
        "delta": section.delta,
        "rounds_planned": config.run.rounds,
        "noise_sd": noise.sd,
        "noise_sites": noise.sites,
        "grid": noise.grid,
        "feature_clip": section.feature_clip,
        "response_clip": section.response_clip,
        "standard_errors": "include the DP noise on the score, not that on the information: a lower bound "
        "(see inference.*.dp_noise)",
    }
