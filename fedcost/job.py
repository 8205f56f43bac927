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

from fedcost.data.features import FeatureSpec
from fedcost.models.nets import ModelSpec
from fedcost.models.training import TrainConfig


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
    def from_json(cls, text: str) -> "TrainingJob":
        data: dict[str, Any] = json.loads(text)
        model = data["model"]
        model = {**model, "hidden": tuple(model["hidden"]), "tasks": tuple(model["tasks"])}
        return cls(
            model=ModelSpec(**model),
            training=TrainConfig(**data["training"]),
            features=FeatureSpec.from_dict(data["features"]),
            seed=int(data["seed"]),
        )
