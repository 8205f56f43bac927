"""What to build and how to train it: plain settings, no torch, so that reading and checking
a config (``fedcost.config``, a job, the CLI) stays fast."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

TASKS = ("readmission", "cost")
KINDS = ("glm", "mlp", "multitask")
FITS = ("auto", "newton", "fedavg")
COST_FAMILIES = ("tweedie", "gamma", "poisson")


@dataclass(frozen=True)
class ModelSpec:
    """What to build; the same spec on every node gives weight lists that line up.

    ``tasks`` is stored in ``TASKS`` order whatever order it is given in, because FedAvg pairs
    weights by position. ``hidden`` and ``dropout`` are ignored by ``glm``.

    ``fit``: how a ``glm`` is fitted. ``newton`` (what ``auto`` means for a glm): exactly, by
    distributed Newton–Raphson on shared sums (``fedcost.models.glm``), the pooled penalised
    maximum-likelihood fit with standard errors; ``fedavg``: by local training and FedAvg,
    which a site that trains under DP-SGD needs. ``cost_family`` is the exact GLM's cost
    model (log link), ``penalty`` its ridge λ on every coefficient but the intercept (in
    units of one row's log-likelihood: 0.1 keeps constant or collinear features and separated
    classes from making the fit singular or infinite, and moves a well-posed fit of a few
    hundred rows by far less than its standard errors; 1.0 cost real data sets of 150–600
    rows up to 0.03 AUROC against the unpenalised fit, benchmarks/RESULTS.md). The neural
    models and ``fedavg`` fit Tweedie costs (``tweedie_power``).
    """

    kind: Literal["glm", "mlp", "multitask"] = "multitask"
    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.0
    tasks: tuple[str, ...] = TASKS
    tweedie_power: float = 1.5
    fit: Literal["auto", "newton", "fedavg"] = "auto"
    cost_family: Literal["tweedie", "gamma", "poisson"] = "tweedie"
    penalty: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ModelSpec.kind={self.kind!r}: expected one of {KINDS}")
        hidden = tuple(self.hidden)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden) or (
            self.kind != "glm" and not hidden
        ):
            raise ValueError(f"ModelSpec.hidden={self.hidden!r}: expected a non-empty tuple of positive layer widths")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelSpec.dropout={self.dropout!r}: expected 0 <= dropout < 1")
        tasks = tuple(self.tasks)
        if not tasks or len(set(tasks)) != len(tasks) or any(t not in TASKS for t in tasks):
            raise ValueError(f"ModelSpec.tasks={self.tasks!r}: expected a non-empty subset of {TASKS} without repeats")
        if not 1.0 < self.tweedie_power < 2.0:
            raise ValueError(f"ModelSpec.tweedie_power={self.tweedie_power!r}: expected 1 < power < 2")
        if self.fit not in FITS or (self.fit == "newton" and self.kind != "glm"):
            raise ValueError(f"ModelSpec.fit={self.fit!r}: expected auto or fedavg, or newton for kind = glm")
        if self.cost_family not in COST_FAMILIES or (self.cost_family != "tweedie" and not self.exact):
            raise ValueError(
                f"ModelSpec.cost_family={self.cost_family!r}: expected tweedie, or gamma or poisson for an exact glm"
            )
        if isinstance(self.penalty, bool) or not (math.isfinite(self.penalty) and self.penalty >= 0):
            raise ValueError(f"ModelSpec.penalty={self.penalty!r}: expected a ridge penalty >= 0")
        object.__setattr__(self, "hidden", hidden)
        object.__setattr__(self, "tasks", tuple(t for t in TASKS if t in tasks))

    @property
    def exact(self) -> bool:
        """Whether the model is an exact GLM, fitted by distributed Newton–Raphson."""
        return self.kind == "glm" and self.fit in ("auto", "newton")


OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """One round of local training. ``momentum`` is used by sgd only; ``proximal_mu`` > 0 is FedProx."""

    epochs: int = 1
    batch_size: int = 128
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    proximal_mu: float = 0.0
    cost_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name}={value!r}: expected a positive integer")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer={self.optimizer!r}: expected one of {OPTIMIZERS}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"TrainConfig.learning_rate={self.learning_rate!r}: expected a positive number")
        for name in ("weight_decay", "proximal_mu"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"TrainConfig.{name}={value!r}: expected a number >= 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"TrainConfig.momentum={self.momentum!r}: expected 0 <= momentum < 1")
        if not (math.isfinite(self.cost_weight) and self.cost_weight > 0):
            raise ValueError(f"TrainConfig.cost_weight={self.cost_weight!r}: expected a positive number")
