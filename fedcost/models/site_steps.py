"""What a site does to the shared model before it uses it: each step kept only where it helps.

Two steps can suit a site better than the federation's model as it is: its own cost level
(``models.calibration``: multiply expected costs by the site's observed-over-expected
ratio) and a few epochs of fine-tuning on its own rows (``models.adaptation``). Either
can also hurt: on real data the fine-tuning that helped the synthetic ecosystem lowered
small sites' AUROC. So a site decides on evidence it holds: it splits its training rows,
fits each step on four fifths, scores it on the remaining fifth against the shared model
(log loss for readmission, squared error for cost) and keeps a step only where it wins by
at least ``MIN_GAIN``;
then fits the kept steps on all its training rows. A site with fewer validation rows
than ``min_rows`` keeps the shared model: a handful of rows decides nothing.

Everything here happens at the site and stays there; the run reports the shared model as
it is (``federated``) and, apart, the model as each site would use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcost.models.adaptation import adapted_to_site
from fedcost.models.calibration import CostCalibration
from fedcost.models.nets import FedcostNet
from fedcost.models.training import TaskData, TrainConfig, predict

VALIDATION_SHARE = 0.2
# A step must lower the validation loss by this share to be kept: a factor fitted on four
# fifths of the rows that wins on the last fifth by less is noise, not a site's difference.
MIN_GAIN = 0.01


@dataclass(frozen=True)
class SiteSteps:
    """The steps a site keeps: the tasks it scores with its fine-tuned model, and its cost
    level (None: costs as the model predicts them)."""

    adapted: tuple[str, ...] = ()
    calibration: float | None = None

    def predict(self, shared: FedcostNet, adapted: FedcostNet | None, features: np.ndarray) -> dict[str, np.ndarray]:
        """Predictions per task, in the model's units (costs in cost-scale units)."""
        out = predict(shared, features)
        if adapted is not None and self.adapted:
            fine = predict(adapted, features)
            out.update({task: fine[task] for task in self.adapted})
        if self.calibration is not None and "cost" in out:
            out["cost"] = out["cost"] * self.calibration
        return out

    def to_dict(self) -> dict:
        return {"adapted": list(self.adapted), "calibration": self.calibration}

    @classmethod
    def from_dict(cls, data: dict) -> SiteSteps:
        if set(data) != {"adapted", "calibration"}:
            raise ValueError(f"site steps hold adapted and calibration; got {sorted(data)}")
        calibration = data["calibration"]
        if calibration is not None and not (isinstance(calibration, (int, float)) and calibration > 0):
            raise ValueError(f"a calibration is a positive factor, not {calibration!r}")
        return cls(tuple(str(task) for task in data["adapted"]), None if calibration is None else float(calibration))


def decide_site_steps(
    shared: FedcostNet, train: TaskData, training: TrainConfig, *, epochs: int, seed: int, min_rows: int
) -> tuple[SiteSteps, FedcostNet | None]:
    """The steps that beat the shared model on this site's validation rows, fitted on all its
    training rows; with them, the fine-tuned model if any task keeps it."""
    n = len(train.features)
    order = np.random.default_rng(seed).permutation(n)
    held = order[: int(round(n * VALIDATION_SHARE))]
    if held.size < min_rows:
        return SiteSteps(), None
    fit, valid = _subset(train, order[held.size :]), _subset(train, held)
    candidate = adapted_to_site(shared, fit, training, epochs=epochs, seed=seed) if epochs else None
    adapted, calibrate = [], False
    if train.readmitted is not None and candidate is not None:
        if _log_loss(candidate, valid) < (1 - MIN_GAIN) * _log_loss(shared, valid):
            adapted.append("readmission")
    if train.cost is not None:
        options = {(False, False): shared, (False, True): shared}
        if candidate is not None:
            options |= {(True, False): candidate, (True, True): candidate}
        errors = {key: _cost_error(model, fit, valid, calibrated=key[1]) for key, model in options.items()}
        best = min(errors, key=errors.get)  # type: ignore[arg-type]
        use_adapted, calibrate = best if errors[best] < (1 - MIN_GAIN) * errors[(False, False)] else (False, False)
        if use_adapted:
            adapted.append("cost")
    final = adapted_to_site(shared, train, training, epochs=epochs, seed=seed) if adapted else None
    level = None
    if calibrate:
        base = final if final is not None and "cost" in adapted else shared
        level = CostCalibration.fit(train.cost, predict(base, train.features)["cost"]).observed_over_expected
    return SiteSteps(tuple(adapted), level), final


def _subset(data: TaskData, rows: np.ndarray) -> TaskData:
    return TaskData(
        features=data.features[rows],
        readmitted=None if data.readmitted is None else data.readmitted[rows],
        cost=None if data.cost is None else data.cost[rows],
    )


def _log_loss(model: FedcostNet, data: TaskData) -> float:
    p = np.clip(predict(model, data.features)["readmission"], 1e-7, 1 - 1e-7)
    y = np.asarray(data.readmitted, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _cost_error(model: FedcostNet, fit: TaskData, valid: TaskData, *, calibrated: bool) -> float:
    expected = predict(model, valid.features)["cost"]
    if calibrated:
        expected = CostCalibration.fit(fit.cost, predict(model, fit.features)["cost"]).apply(expected)
    return float(np.mean(np.square(expected - np.asarray(valid.cost, dtype=np.float64))))
