"""What a coordinator asks of a node, as plain JSON-able data.

A training job travels inside a Flower ConfigRecord as one JSON string, so node and
coordinator agree on the model, the local training and the federation-wide features
without sharing Python objects.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcost.analytics import benchmarking
from fedcost.analytics.statistics import GroupedStatisticsLayout
from fedcost.data.features import FeatureSpec, StatisticsLayout
from fedcost.models import evaluation, glm
from fedcost.models.nets import ModelSpec
from fedcost.models.training import TrainConfig
from fedcost.privacy.distributed import NewtonNoise
from fedcost.wire.purposes import PURPOSES


@dataclass(frozen=True)
class TrainingJob:
    """A round's work order: model, local training, features and the run seed."""

    model: ModelSpec
    training: TrainConfig
    features: FeatureSpec
    seed: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "model": dataclasses.asdict(self.model),
                "training": dataclasses.asdict(self.training),
                "features": self.features.to_dict(),
                "seed": self.seed,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> TrainingJob:
        data: dict[str, Any] = json.loads(text)
        model = data["model"]
        model = {**model, "hidden": tuple(model["hidden"]), "tasks": tuple(model["tasks"])}
        return cls(
            model=ModelSpec(**model),
            training=TrainConfig(**data["training"]),
            features=FeatureSpec.from_dict(data["features"]),
            seed=int(data["seed"]),
        )


def noisy_releases(
    *,
    purposes: tuple[str, ...],
    rounds: int,
    statistics: StatisticsLayout,
    tables: list[GroupedStatisticsLayout],
    tasks: tuple[str, ...],
) -> list[int]:
    """Every noisy sum a job's plan asks a site for, as the most slots one of its rows changes
    in it: what the job's noise is calibrated on (``privacy.distributed.calibrate_noise``) and
    what each site checks it against."""
    per_round = {
        "episodes": [],  # exact sums: a site that releases only noisy ones refuses the linkage
        "statistics": [statistics.touched()],
        "analytics": [table.noisy_touched() for table in tables],
        "evaluate": [sum(evaluation.NOISY_TOUCHED[task] for task in tasks)] * rounds,
        "benchmark": [benchmarking.NOISY_TOUCHED],
    }
    return [touched for purpose in purposes if not PURPOSES[purpose].trains for touched in per_round[purpose]]


def glm_families(model: ModelSpec) -> dict[str, glm.Family]:
    """Each task's family in an exact GLM."""
    return {
        task: glm.task_family(task, cost_family=model.cost_family, tweedie_power=model.tweedie_power)
        for task in model.tasks
    }


def newton_bounds(model: ModelSpec, features: int, noise: NewtonNoise) -> dict[str, glm.NoisyBounds]:
    """Per task of an exact GLM over ``features`` features, the bounds its noisy Newton sums
    are normalised by: what node and coordinator both derive from the plan's ``noise``."""
    clips = {"feature_clip": noise.feature_clip, "response_clip": noise.response_clip}
    return {task: glm.NoisyBounds.of(family, features, **clips) for task, family in glm_families(model).items()}


def newton_blocks(model: ModelSpec) -> int:
    """How many blocks one record moves in a round of noisy Newton sums (``NoisyBounds.blocks``)."""
    return sum(glm.noisy_blocks(family) for family in glm_families(model).values())


def glm_state(features: FeatureSpec, coefficients: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An exact GLM's coefficients per task (intercept first, over ``FeatureSpec.design_names``)
    as the state of the torch GLM (``build_model`` of kind ``glm``) that predicts the same: its
    head's weights over every feature, 0 for the reference levels, and its bias."""
    state = {}
    for task, beta in coefficients.items():
        state[f"heads.{task}.weight"] = features.expand(np.asarray(beta)[1:])[None, :].astype("float32")
        state[f"heads.{task}.bias"] = np.asarray(beta[:1], dtype="float32")
    return state


def glm_coefficients(
    features: FeatureSpec, state: dict[str, np.ndarray], tasks: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """The inverse of ``glm_state``: each task's coefficients from a torch GLM's state."""
    keep = np.setdiff1d(np.arange(features.n_features), features.reference_levels)
    return {
        task: np.concatenate(
            [
                np.asarray(state[f"heads.{task}.bias"], dtype="float64"),
                np.asarray(state[f"heads.{task}.weight"], dtype="float64")[0, keep],
            ]
        )
        for task in tasks
    }
