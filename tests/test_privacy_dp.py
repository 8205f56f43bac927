"""DP-SGD: per-example clipping bounds each record, no noise equals SGD, noisy training learns."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fedcost.models.nets import ModelSpec, build_model
from fedcost.models.training import TaskData, TrainConfig, get_weights, loss_terms, predict
from fedcost.privacy.accounting import epsilon_spent
from fedcost.privacy.dp import DPConfig, distributed_noise_std, dp_sampling, train_local_dp

D = 6
SGD = TrainConfig(epochs=1, batch_size=10, optimizer="sgd", learning_rate=1.0, momentum=0.0)
NO_NOISE = DPConfig(max_grad_norm=1e6, noise_multiplier=0.0)


pytestmark = pytest.mark.usefixtures("single_thread")


def logistic(n: int, seed: int) -> TaskData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    p = 1.0 / (1.0 + np.exp(-(x @ np.linspace(-1.0, 1.0, D) - 1.0)))
    cost = rng.gamma(2.0, 0.5, n).astype(np.float32)
    return TaskData(x, (rng.random(n) < p).astype(np.float32), cost)


def glm(tasks=("readmission",)):
    return build_model(ModelSpec(kind="glm", tasks=tasks), D, seed=0)


def flat(model) -> np.ndarray:
    return np.concatenate([w.ravel() for w in get_weights(model)])


def test_one_example_moves_the_model_by_at_most_the_clipping_norm():
    x = np.full((1, D), 1e3, np.float32)
    data = TaskData(x, np.zeros(1, np.float32), None)
    steps = {}
    for clip in (0.5, 1e9):
        model = glm()
        before = flat(model)
        train_local_dp(model, data, SGD, seed=0, dp=DPConfig(max_grad_norm=clip, noise_multiplier=0.0))
        steps[clip] = np.linalg.norm(flat(model) - before)
    assert steps[0.5] <= 0.5 * (1 + 1e-5)
    assert steps[1e9] > 1e3  # the example's own gradient is huge: clipping did the bounding


def test_clipping_is_per_example_not_per_batch():
    data = logistic(10, seed=1)
    data = TaskData(data.features * np.array([[100.0]] + [[1.0]] * 9, np.float32), data.readmitted, None)
    model = glm()
    reference = copy.deepcopy(model)
    train_local_dp(model, data, SGD, seed=0, dp=DPConfig(max_grad_norm=0.1, noise_multiplier=0.0))
    params = dict(reference.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for i in range(10):
        out = reference(torch.tensor(data.features[i : i + 1]))
        target = {"readmission": torch.tensor(data.readmitted[i : i + 1])}
        loss = loss_terms(out, target, tweedie_power=1.5)["readmission"]
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        for name, g in zip(params, grads):
            total[name] += g * min(1.0, 0.1 / (norm.item() + 1e-6))
    for name, p in model.named_parameters():
        assert torch.allclose(p, params[name] - total[name] / 10, atol=1e-6), name


def reference_sgd(model, data: TaskData, config: TrainConfig, seed: int) -> None:
    """Plain SGD on DP-SGD's Poisson batches: summed loss over the expected batch size.

    Draws from the generator exactly as ``train_local_dp`` does (the sample mask, then one
    noise draw per parameter), so both see the same batches.
    """
    n = len(data.features)
    sample_rate, steps = dp_sampling(n, config)
    x = torch.tensor(data.features)
    targets = {"readmission": torch.tensor(data.readmitted), "cost": torch.tensor(data.cost)}
    params = model.task_parameters(("readmission", "cost"))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.nonzero(torch.rand(n, generator=gen) < sample_rate).squeeze(1)
        terms = loss_terms(model(x[idx]), {t: y[idx] for t, y in targets.items()}, tweedie_power=1.5)
        loss = (terms["readmission"] + config.cost_weight * terms["cost"]) * len(idx) / (sample_rate * n)
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads):
                torch.randn(p.shape, generator=gen)
                p -= config.learning_rate * g


def test_zero_noise_and_huge_clip_equal_plain_sgd_on_the_same_batches():
    data = logistic(300, seed=2)
    config = TrainConfig(epochs=2, batch_size=50, optimizer="sgd", learning_rate=0.05, momentum=0.0, cost_weight=0.5)
    model = build_model(ModelSpec(kind="multitask", hidden=(8,)), D, seed=3)
    reference = copy.deepcopy(model)
    result = train_local_dp(model, data, config, seed=11, dp=NO_NOISE)
    reference_sgd(reference, data, config, seed=11)
    assert result.steps == 12 and result.examples == 300
    np.testing.assert_allclose(flat(model), flat(reference), atol=1e-5)


def test_training_with_modest_noise_still_learns():
    train, test = logistic(4000, seed=4), logistic(2000, seed=5)
    config = TrainConfig(epochs=3, batch_size=200, optimizer="sgd", learning_rate=0.5, momentum=0.0)
    dp = DPConfig(max_grad_norm=1.0, noise_multiplier=1.0)
    model = glm()
    train_local_dp(model, train, config, seed=6, dp=dp)
    sample_rate, steps = dp_sampling(4000, config)
    assert epsilon_spent(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps, delta=1e-5) < 4.0  # about 3.4
    assert roc_auc_score(test.readmitted, predict(model, test.features)["readmission"]) > 0.6


def test_noise_is_reproducible_from_a_seed_and_secret_without_one():
    data = logistic(200, seed=7)
    dp = DPConfig(max_grad_norm=1.0, noise_multiplier=1.0)
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", None), ("d", None)):
        model = glm()
        train_local_dp(model, data, SGD, seed=seed, dp=dp)
        runs[name] = flat(model)
    assert np.array_equal(runs["a"], runs["b"])
    assert not np.array_equal(runs["c"], runs["d"])


def test_fedprox_pulls_towards_the_global_model():
    data = logistic(200, seed=8)
    distances = []
    for mu in (0.0, 5.0):
        config = TrainConfig(epochs=2, batch_size=20, optimizer="sgd", learning_rate=0.1, momentum=0.0, proximal_mu=mu)
        model = glm()
        start = get_weights(model)
        train_local_dp(model, data, config, seed=1, dp=NO_NOISE, global_params=start)
        distances.append(np.linalg.norm(flat(model) - np.concatenate([w.ravel() for w in start])))
    assert distances[1] < 0.8 * distances[0]


def test_dropout_models_are_refused():
    model = build_model(ModelSpec(kind="mlp", hidden=(4,), dropout=0.1), D, seed=0)
    with pytest.raises(ValueError, match="dropout"):
        train_local_dp(model, logistic(20, seed=0), SGD, seed=0, dp=NO_NOISE)


def test_sampling_matches_the_steps_of_train_local():
    assert dp_sampling(1000, TrainConfig(epochs=2, batch_size=128)) == (0.128, 16)
    assert dp_sampling(50, TrainConfig(batch_size=128)) == (1.0, 1)


def test_distributed_noise_shares_sum_to_the_central_noise():
    share = distributed_noise_std(central_std=2.0, n_nodes=16)
    assert share == 0.5
    draws = np.random.default_rng(0).normal(0.0, share, size=(16, 100_000)).sum(axis=0)
    assert math.isclose(draws.std(), 2.0, rel_tol=0.02)
