"""A node's local work, without Flower: statistics, training and evaluation on its rows.

Only sums, model weights and counts come out of here; rows stay inside ``NodeData``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedcost import schema
from fedcost.data.features import FeatureSpec, StatisticsLayout
from fedcost.data.loader import NodeData, load_node
from fedcost.data.mapping import DataMapping
from fedcost.job import TrainingJob
from fedcost.models import evaluation
from fedcost.models.nets import build_model
from fedcost.models.training import TrainResult, predict, train_local
from fedcost.seeding import derive_seed


@dataclass(frozen=True)
class NodeSetup:
    """Where a node finds its rows: the site's mapping file, its name there and its split."""

    mapping: Path
    name: str
    split_seed: int
    test_fraction: float = 0.2


@lru_cache(maxsize=8)
def _load(setup: NodeSetup) -> tuple[DataMapping, NodeData]:
    mapping = DataMapping.load(setup.mapping)
    return mapping, load_node(mapping, setup.name, split_seed=setup.split_seed, test_fraction=setup.test_fraction)


class Node:
    """One site's rows and the three things the coordinator may ask of them."""

    def __init__(self, setup: NodeSetup):
        self.mapping, self.data = _load(setup)
        self.layout = StatisticsLayout(self.mapping.feature_columns, tuple(self.mapping.targets))

    @property
    def name(self) -> str:
        return self.data.name

    @property
    def role(self) -> str:
        return self.data.role

    def statistics(self) -> np.ndarray:
        """Sums over the training rows for the federation-wide feature encoding."""
        return self.layout.local_statistics(self.data.train)

    def train(self, job: TrainingJob, weights: dict[str, np.ndarray], server_round: int) -> tuple[dict[str, np.ndarray], TrainResult]:
        """Local epochs from the global weights; returns the new weights, not an update."""
        features = _require_features(job)
        model = self._model(job, weights)
        global_params = [w.copy() for w in weights.values()] if job.training.proximal_mu > 0 else None
        result = train_local(
            model,
            features.task_data(self.data.train),
            job.training,
            seed=derive_seed(job.seed, "train", self.name, server_round),
            global_params=global_params,
        )
        return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}, result

    def evaluate(self, job: TrainingJob, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Additive evaluation sums over the held-out rows (see ``models.evaluation``)."""
        features = _require_features(job)
        rows = self.data.test
        predictions = predict(self._model(job, weights), features.encode(rows))
        sums: dict[str, np.ndarray] = {}
        if "readmission" in predictions and schema.READMISSION in rows:
            sums["readmission"] = evaluation.readmission_sums(rows[schema.READMISSION].to_numpy(), predictions["readmission"])
        if "cost" in predictions and schema.COST in rows:
            sums["cost"] = evaluation.cost_sums(rows[schema.COST].to_numpy(), predictions["cost"] * features.cost_scale)
        return sums

    def _model(self, job: TrainingJob, weights: dict[str, np.ndarray]) -> torch.nn.Module:
        features = _require_features(job)
        model = build_model(job.model, features.n_features, seed=job.seed)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
        return model


def _require_features(job: TrainingJob) -> FeatureSpec:
    if job.features is None:
        raise ValueError("the job carries no federation-wide feature spec; run the statistics stage first")
    return job.features
