"""Local training, prediction and weight exchange for ``FedcostNet`` models.

Training is reproducible from a seed: shuffling and dropout draw from a private
``torch.Generator``, never the global RNG, so simulated nodes sharing a process neither
disturb nor depend on each other. Mini-batching is done by hand: per-node data are small and a
DataLoader would cost more than the steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedcost.models.nets import FedcostNet, SeededDropout
from fedcost.models.spec import TrainConfig


@dataclass(frozen=True)
class TaskData:
    """Features and targets of one data set; a target is None where the data set lacks it.

    ``cost`` is in cost-scale units (divided by the federation-wide scale).
    """

    features: np.ndarray
    readmitted: np.ndarray | None
    cost: np.ndarray | None

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise ValueError(f"TaskData.features has shape {self.features.shape}: expected (n, d)")
        if not np.isfinite(self.features).all():
            raise ValueError("TaskData.features holds NaN or infinite values: impute before training")
        n = self.features.shape[0]
        for name in ("readmitted", "cost"):
            target = getattr(self, name)
            if target is not None and target.shape != (n,):
                raise ValueError(f"TaskData.{name} has shape {target.shape}: expected ({n},) to match features")
        if self.readmitted is not None and not np.isin(self.readmitted, (0, 1)).all():
            raise ValueError("TaskData.readmitted must hold only 0 and 1")
        if self.cost is not None and not (np.isfinite(self.cost).all() and (self.cost >= 0).all()):
            raise ValueError("TaskData.cost must be finite and >= 0")

    def target(self, task: str) -> np.ndarray | None:
        """The target array of ``task`` (a name from ``TASKS``), or None."""
        return {"readmission": self.readmitted, "cost": self.cost}[task]


@dataclass(frozen=True)
class TrainResult:
    """``loss``: mean task loss of the last epoch (FedProx term excluded); ``examples``: rows trained on."""

    loss: float
    examples: int
    steps: int


def tweedie_loss(eta: torch.Tensor, y: torch.Tensor, power: float) -> torch.Tensor:
    """Mean Tweedie negative log-likelihood (log link) up to terms free of ``eta``.

    Unlike a log-target loss it takes exact zeros as they are and fits the mean, not the median,
    which is what cost totals and shared-savings contracts need.
    """
    return (-y * torch.exp((1.0 - power) * eta) / (1.0 - power) + torch.exp((2.0 - power) * eta) / (2.0 - power)).mean()


def loss_terms(
    outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], *, tweedie_power: float
) -> dict[str, torch.Tensor]:
    """The loss of each task in ``targets``: BCE on the readmission logit, Tweedie on the cost."""
    terms = {}
    for task, y in targets.items():
        if task == "readmission":
            terms[task] = torch.nn.functional.binary_cross_entropy_with_logits(outputs[task], y)
        else:
            terms[task] = tweedie_loss(outputs[task], y, tweedie_power)
    return terms


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(array, dtype=np.float32))


def _checked_state(model: FedcostNet, weights: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """``weights`` keyed like the model's state dict, after checking their count and shapes."""
    state = model.state_dict()
    if len(weights) != len(state):
        raise ValueError(f"got {len(weights)} weight arrays, the model has {len(state)}: {', '.join(state)}")
    checked = {}
    for (key, current), weight in zip(state.items(), weights):
        array = np.asarray(weight, dtype=np.float32)
        if array.shape != tuple(current.shape):
            raise ValueError(f"weight '{key}' has shape {array.shape}, the model expects {tuple(current.shape)}")
        checked[key] = torch.tensor(array)
    return checked


def _optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    lr, wd = config.learning_rate, config.weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


@dataclass
class TrainingSetup:
    """What every local trainer (plain or DP-SGD) starts from, checked once."""

    targets: dict[str, torch.Tensor]
    params: dict[str, torch.nn.Parameter]
    anchors: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    features: torch.Tensor


def prepare_training(
    model: FedcostNet, data: TaskData, config: TrainConfig, global_params: list[np.ndarray] | None
) -> TrainingSetup:
    """Check data against the model; pick the trained parameters, FedProx anchors, optimizer.

    Only the tasks both the model and the data have are trained: a head whose target the
    data lacks is left exactly as it is.
    """
    targets = {task: _tensor(y) for task in model.spec.tasks if (y := data.target(task)) is not None}
    if not targets:
        present = [task for task in ("readmission", "cost") if data.target(task) is not None]
        raise ValueError(f"the data's targets {present} and the model's tasks {list(model.spec.tasks)} do not overlap")
    n, d = data.features.shape
    if n == 0:
        raise ValueError("no training examples: the data set is empty")
    if d != model.n_features:
        raise ValueError(f"data has {d} features, the model expects {model.n_features}")
    params = model.task_parameters(tuple(targets))
    anchors = {}
    if config.proximal_mu > 0 and global_params is not None:
        state = _checked_state(model, global_params)
        anchors = {name: state[name] for name in params}
    return TrainingSetup(targets, params, anchors, _optimizer(list(params.values()), config), _tensor(data.features))


def train_local(
    model: FedcostNet,
    data: TaskData,
    config: TrainConfig,
    *,
    seed: int,
    global_params: list[np.ndarray] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` for ``config.epochs`` epochs.

    Only the tasks both the model and the data have are trained: a head whose target the data
    lacks is left exactly as it is. ``global_params`` (the round's global weights, state-dict
    order) anchor the FedProx term when ``config.proximal_mu > 0``.
    """
    setup = prepare_training(model, data, config, global_params)
    targets, params, anchors, optimizer, x = setup.targets, setup.params, setup.anchors, setup.optimizer, setup.features
    n = len(x)
    gen = torch.Generator().manual_seed(seed)
    dropouts = [m for m in model.modules() if isinstance(m, SeededDropout)]
    was_training = model.training
    model.train()
    for m in dropouts:
        m.generator = gen
    steps = 0
    try:
        for _ in range(config.epochs):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]
                terms = loss_terms(
                    model(x[idx]), {t: y[idx] for t, y in targets.items()}, tweedie_power=model.spec.tweedie_power
                )
                loss = sum(term * (config.cost_weight if task == "cost" else 1.0) for task, term in terms.items())
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss became {loss.item()} at step {steps + 1}; "
                        f"lower the learning rate (now {config.learning_rate})"
                    )
                objective = loss
                if anchors:
                    distance = sum(((params[k] - anchor) ** 2).sum() for k, anchor in anchors.items())
                    objective = loss + config.proximal_mu / 2.0 * distance
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                steps += 1
    finally:
        for m in dropouts:
            m.generator = None
        model.train(was_training)
    return TrainResult(loss=total / n, examples=n, steps=steps)


def predict(model: FedcostNet, features: np.ndarray, batch_size: int = 8192) -> dict[str, np.ndarray]:
    """Float64 predictions per task: readmission probability, expected cost in scale units.

    Each distinct feature row is scored once, so identical rows get identical predictions:
    scored in batches, float32 rounding can differ by a row's place in the batch, and on
    data of few covariate patterns that would order tied rows by chance and move the AUROC.
    Runs in eval mode without gradients; the model's mode is restored afterwards.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != model.n_features:
        raise ValueError(f"features have shape {x.shape}, the model expects (n, {model.n_features})")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
    x, rows = np.unique(x, axis=0, return_inverse=True)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            chunks = [model(torch.tensor(x[s : s + batch_size])) for s in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    predictions = {}
    for task in model.spec.tasks:
        raw = torch.cat([c[task] for c in chunks]).double() if chunks else torch.empty(0, dtype=torch.float64)
        predictions[task] = (torch.sigmoid(raw) if task == "readmission" else torch.exp(raw)).numpy()[rows.reshape(-1)]
    return predictions


def get_weights(model: FedcostNet) -> list[np.ndarray]:
    """The state dict's tensors in order, as float32 numpy copies (safe to send or average)."""
    return [t.detach().cpu().numpy().astype(np.float32, copy=True) for t in model.state_dict().values()]


def set_weights(model: FedcostNet, weights: list[np.ndarray]) -> None:
    """Load ``weights`` (state-dict order); ValueError naming the key when a shape does not match."""
    model.load_state_dict(_checked_state(model, weights))
