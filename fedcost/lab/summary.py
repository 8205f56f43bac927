"""A simulation's ``summary.json``: the run's header, the scores of every model overall and
per site, and the privacy each site spent."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fedcost import schema
from fedcost.client.budget import privacy_report
from fedcost.config import SimulationConfig
from fedcost.data.features import FeatureSpec
from fedcost.data.loader import NodeData
from fedcost.data.mapping import DataMapping
from fedcost.identity import PublicIdentity
from fedcost.models.metrics import calibration_bins, cost_metrics, readmission_metrics
from fedcost.privacy import SitePolicy
from fedcost.privacy.ledger import SUFFIX as LEDGER_SUFFIX
from fedcost.privacy.ledger import recorded_spending
from fedcost.run_folder import RunFolder

if TYPE_CHECKING:
    from fedcost.lab.simulation import Task


def privacy_summary(config: SimulationConfig, folder: RunFolder, nodes: list[NodeData], run_id: str) -> dict:
    """ε spent per site, from its release ledger under its policy, and the noise of its DP-SGD
    rounds in run ``run_id``; a site without DP reports ``dp: false``."""
    summary = {}
    for node in nodes:
        source = config.simulation.policies.get(node.name) or config.simulation.default_policy
        privacy = SitePolicy.load(source).privacy if source else None
        identity = PublicIdentity.load(folder.identities / f"{node.name}.pub.json")
        spends = recorded_spending(folder.ledgers / f"{node.name}{LEDGER_SUFFIX}", identity) if privacy else ()
        summary[node.name] = privacy_report(spends, privacy, run_id)
    return summary


def _scores(rows: pd.DataFrame, predictions: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    scores = {}
    if "readmission" in predictions:
        scores["readmission"] = readmission_metrics(rows[schema.READMISSION].to_numpy(), predictions["readmission"])
    if "cost" in predictions:
        metrics = cost_metrics(rows[schema.COST].to_numpy(), predictions["cost"])
        scores["cost"] = {k: metrics[k] for k in ("mae", "rmse", "r2")}
    return scores


def run_header(run_id: str, config: SimulationConfig, mapping: DataMapping, nodes: list[NodeData], task: Task) -> dict:
    """What every run's summary opens with: the run, its outcomes, its protection and its sites."""
    families = {"readmission": "logistic", "cost": f"{config.model.cost_family}, log link"}
    return {
        "run_id": run_id,
        "task": task,
        "outcomes": {
            task_name: {
                "column": column,
                "kind": "binary" if task_name == "readmission" else "non-negative",
                **({"family": families[task_name]} if config.model.exact else {}),
            }
            for task_name, column in mapping.outcome_columns.items()
        },
        "secure_aggregation": config.secure_aggregation.enabled,
        "min_cohort": config.run.min_cohort,
        "currency": config.analytics.currency,
        "nodes": [
            {"name": n.name, "role": n.role, "train_rows": len(n.train), "test_rows": len(n.test)} for n in nodes
        ],
    }


def trained_summary(
    run_id: str,
    config: SimulationConfig,
    mapping: DataMapping,
    nodes: list[NodeData],
    predictions: dict[str, list[dict]],
    features: FeatureSpec,
    rounds: list[dict],
) -> dict:
    all_test = pd.concat([node.test for node in nodes], ignore_index=True)
    summary = run_header(run_id, config, mapping, nodes, "train")
    summary |= {
        "rounds": config.run.rounds,
        "strategy": config.strategy.name,
        "dropouts": {r["round"]: r["dropouts"] for r in rounds if r.get("dropouts")},
        "model": config.model.kind,
        "tasks": list(config.model.tasks),
        "test_rows": len(all_test),
        **features.coverage(),
        "adaptation_epochs": config.run.adaptation_epochs,
        "federated_evaluation": rounds[-1] if rounds else {},
    }
    for task in config.model.tasks:
        summary[task] = {}
    calibration = {}
    for model_name in predictions:
        pooled = {k: np.concatenate([p[k] for p in predictions[model_name]]) for k in predictions[model_name][0]}
        for task, scores in _scores(all_test, pooled).items():
            summary[task][model_name] = scores
        if "readmission" in pooled:
            calibration[model_name] = calibration_bins(all_test[schema.READMISSION].to_numpy(), pooled["readmission"])
    summary["calibration"] = calibration
    site_scores = [{m: _scores(node.test, predictions[m][i]) for m in predictions} for i, node in enumerate(nodes)]
    summary["per_site"] = {
        node.name: {
            "role": node.role,
            **{task: {m: s[task] for m, s in scores.items() if task in s} for task in config.model.tasks},
        }
        for node, scores in zip(nodes, site_scores)
    }
    return summary
