"""The baselines a simulation scores the federation against, outside the federation: a
**pooled** model (all rows in one place: the ceiling), **local-only** models (each site
alone: the floor), and the shared model as each site would use it (its site steps)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from fedcost import schema
from fedcost.config import SimulationConfig
from fedcost.data.features import FeatureSpec
from fedcost.data.loader import NodeData
from fedcost.errors import ModelFitError
from fedcost.models import glm
from fedcost.models.nets import FedcostNet, build_model
from fedcost.models.site_steps import SiteSteps, decide_site_steps
from fedcost.models.training import predict, train_local
from fedcost.models.training_job import glm_state
from fedcost.run_folder import RunFolder
from fedcost.seeding import derive_seed

# A site alone would train until its model settles: at least this many optimizer steps.
MIN_LOCAL_STEPS = 300


def predict_rows(model: torch.nn.Module, features: FeatureSpec, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    predictions = predict(model, features.encode(rows))
    if "cost" in predictions:
        predictions["cost"] = predictions["cost"] * features.cost_scale
    return predictions


def site_steps(
    config: SimulationConfig, model: FedcostNet, features: FeatureSpec, node: NodeData, folder: RunFolder
) -> tuple[SiteSteps, dict[str, np.ndarray]]:
    """The shared model as ``node``'s site would use it, and its predictions on the site's
    held-out rows: its cost level and ``[run] adaptation_epochs`` of fine-tuning, each kept
    only where the site's own validation rows show it helps (``models.site_steps``). The
    steps are saved in the run folder for ``fedcost predict --site``."""
    train = features.task_data(node.train)
    seed = derive_seed(config.run.seed, "adaptation", node.name)
    steps, adapted = decide_site_steps(
        model, train, config.training, epochs=config.run.adaptation_epochs, seed=seed, min_rows=config.run.min_cohort
    )
    folder.sites.mkdir(exist_ok=True)
    saved = folder.site_steps(node.name)
    saved.write_text(json.dumps(steps.to_dict(), indent=2))
    if adapted is not None:
        torch.save(adapted.state_dict(), saved.with_suffix(".pt"))
    predictions = steps.predict(model, adapted, features.encode(node.test))
    if "cost" in predictions:
        predictions["cost"] = predictions["cost"] * features.cost_scale
    return steps, predictions


def train_baseline(
    config: SimulationConfig, features: FeatureSpec, rows: pd.DataFrame, epochs: int, label: str
) -> FedcostNet:
    """The baseline model on ``rows``: an exact GLM by the federation's own estimator fitted to
    convergence (``_fit_glm``), or the network trained for ``epochs``."""
    torch.set_num_threads(1)
    model = build_model(
        config.model, features.n_features, seed=config.run.seed, readmission_rate=features.initial_readmission_rate
    )
    if config.model.exact:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in _fit_glm(config, features, rows).items()})
        return model
    data = features.task_data(rows)
    training = replace(config.training, epochs=epochs, proximal_mu=0.0)
    train_local(model, data, training, seed=derive_seed(config.run.seed, "baseline", label))
    return model


def _fit_glm(config: SimulationConfig, features: FeatureSpec, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """An exact GLM on ``rows`` alone, per task, as a torch GLM's state: the same iteration and
    penalty as the federation's (``glm.fit_pooled``). Where the rows cannot give a fit (one
    class only, at a small site), the task falls back to its mean: what such a site knows."""
    spec, x, coefficients = config.model, features.design(rows), {}
    for task in spec.tasks:
        family = glm.task_family(task, cost_family=spec.cost_family, tweedie_power=spec.tweedie_power)
        y = rows[schema.READMISSION if task == "readmission" else schema.COST].to_numpy("float64")
        y = y if task == "readmission" else y / features.cost_scale
        try:
            coefficients[task] = glm.fit_pooled(x, y, family=family, penalty=spec.penalty).coefficients
        except ModelFitError:
            mean = float(np.clip((y.sum() + 0.5) / (y.size + 1), 1e-6, None if task == "cost" else 1 - 1e-6))
            coefficients[task] = glm.start_coefficients(x.shape[1] + 1, family=family, mean=mean)
    return glm_state(features, coefficients)


def pooled_predictions(config: SimulationConfig, features: FeatureSpec, nodes: list[NodeData]) -> list[dict]:
    """All training rows in one place, fitted by the federation's own estimator (an exact GLM
    to convergence; a network for as many epochs as the federation ran) and scored as it is,
    like the shared model: the gap between them is the price of federating alone."""
    rows = pd.concat([node.train for node in nodes], ignore_index=True)
    model = train_baseline(config, features, rows, config.run.rounds * config.training.epochs, "pooled")
    return [predict_rows(model, features, node.test) for node in nodes]


def local_only_predictions(
    config: SimulationConfig,
    features: FeatureSpec,
    nodes: list[NodeData],
    stage: Callable[[str], None] = lambda text: None,
) -> list[dict]:
    """Each site alone on its own rows, scored on its own held-out rows."""
    predictions = []
    for number, node in enumerate(nodes, 1):
        stage(f"local-only baseline at {node.name} ({number}/{len(nodes)})")
        steps_per_epoch = math.ceil(len(node.train) / config.training.batch_size)
        epochs = max(config.run.rounds * config.training.epochs, math.ceil(MIN_LOCAL_STEPS / steps_per_epoch))
        model = train_baseline(config, features, node.train, epochs, f"local/{node.name}")
        predictions.append(predict_rows(model, features, node.test))
    return predictions
