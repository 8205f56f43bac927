"""Behaviour of fedcost.models: shapes, validation, determinism, learning, FedProx, weights, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, brier_score_loss, r2_score, roc_auc_score

from fedcost.models.adaptation import adapted_to_site
from fedcost.models.calibration import CostCalibration
from fedcost.models.metrics import calibration_bins, cost_metrics, readmission_metrics
from fedcost.models.nets import ModelSpec, build_model
from fedcost.models.site_steps import SiteSteps, decide_site_steps
from fedcost.models.spec import TASKS
from fedcost.models.training import TaskData, TrainConfig, get_weights, predict, set_weights, train_local

D = 8


pytestmark = pytest.mark.usefixtures("single_thread")


def logistic_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, 0/1 outcomes and the true probabilities of a logistic model with AUROC ~0.75."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    p = 1.0 / (1.0 + np.exp(-(x @ np.linspace(-0.5, 0.5, D) - 1.2)))
    return x, (rng.random(n) < p).astype(np.float32), p


def cost_data(n: int, seed: int, tail: str, zero_share: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Features and skewed costs with exact zeros, mean ~1 (cost-scale units)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    mu = np.exp(x @ np.linspace(-0.4, 0.4, D))
    positive = rng.gamma(2.0, mu / 2.0) if tail == "gamma" else mu * rng.lognormal(-0.5, 1.0, n)
    cost = np.where(rng.random(n) < zero_share, 0.0, positive)
    return x, (cost / cost.mean()).astype(np.float32)


def full_data(n: int, seed: int) -> TaskData:
    x, y, _ = logistic_data(n, seed)
    return TaskData(x, y, cost_data(n, seed, "gamma")[1])


def distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(((u - v) ** 2).sum() for u, v in zip(a, b))))


# --- nets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["glm", "mlp", "multitask"])
@pytest.mark.parametrize("tasks", [("readmission",), ("cost",), TASKS])
def test_forward_returns_one_vector_per_task_and_only_float32_params(kind, tasks):
    model = build_model(ModelSpec(kind=kind, tasks=tasks, hidden=(16, 8), dropout=0.1), D, seed=0)
    out = model(torch.zeros(5, D))
    assert list(out) == list(tasks)
    assert all(v.shape == (5,) for v in out.values())
    state = model.state_dict()
    assert len(state) == len(list(model.parameters()))  # no buffers to average
    assert all(t.dtype == torch.float32 for t in state.values())


def test_tasks_are_stored_in_canonical_order_so_weight_lists_line_up():
    a = build_model(ModelSpec(tasks=("cost", "readmission")), D, seed=0)
    b = build_model(ModelSpec(tasks=TASKS), D, seed=0)
    assert a.spec.tasks == TASKS
    assert list(a.state_dict()) == list(b.state_dict())


def test_initial_model_predicts_base_rate_and_mean_cost():
    model = build_model(ModelSpec(kind="multitask"), D, seed=3, readmission_rate=0.15)
    out = predict(model, np.random.default_rng(0).normal(size=(20, D)))
    np.testing.assert_allclose(out["readmission"], 0.15, rtol=1e-6)
    np.testing.assert_allclose(out["cost"], 1.0)


def test_building_and_training_leave_the_global_rng_alone():
    before = torch.get_rng_state()
    model = build_model(ModelSpec(kind="mlp", dropout=0.2), D, seed=0)
    train_local(model, full_data(200, 0), TrainConfig(batch_size=32), seed=0)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", "gbm"),
        ("hidden", ()),
        ("hidden", (16, 0)),
        ("dropout", 1.0),
        ("tasks", ()),
        ("tasks", ("length_of_stay",)),
        ("tasks", ("cost", "cost")),
        ("tweedie_power", 2.0),
        ("tweedie_power", 1.0),
    ],
)
def test_model_spec_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelSpec(**{field: value})


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_features"):
        build_model(ModelSpec(), 0, seed=0)
    with pytest.raises(ValueError, match="readmission_rate"):
        build_model(ModelSpec(), D, seed=0, readmission_rate=1.0)


# --- training -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("optimizer", "rmsprop"),
        ("learning_rate", 0.0),
        ("weight_decay", -1.0),
        ("momentum", 1.0),
        ("proximal_mu", float("nan")),
        ("cost_weight", 0.0),
    ],
)
def test_train_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_task_data_rejects_inconsistent_arrays():
    x = np.zeros((4, D), np.float32)
    with pytest.raises(ValueError, match="readmitted"):
        TaskData(x, np.zeros(3, np.float32), None)
    with pytest.raises(ValueError, match="readmitted"):
        TaskData(x, np.full(4, 2, np.float32), None)
    with pytest.raises(ValueError, match="cost"):
        TaskData(x, None, np.full(4, -1, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        TaskData(np.full((4, D), np.nan, np.float32), None, None)


def test_training_is_bit_identical_for_a_seed_and_differs_across_seeds():
    spec = ModelSpec(kind="multitask", hidden=(16, 8), dropout=0.2)
    data, config = full_data(300, 1), TrainConfig(epochs=2, batch_size=32)

    def trained(build_seed: int, train_seed: int) -> list[np.ndarray]:
        model = build_model(spec, D, seed=build_seed)
        train_local(model, data, config, seed=train_seed)
        return get_weights(model)

    first, again = trained(0, 7), trained(0, 7)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert distance(first, trained(0, 8)) > 0
    assert distance(get_weights(build_model(spec, D, seed=0)), get_weights(build_model(spec, D, seed=1))) > 0


@pytest.mark.parametrize("kind", ["glm", "mlp"])
def test_readmission_training_reaches_the_oracle_auroc(kind):
    x, y, _ = logistic_data(4000, seed=10)
    x_test, y_test, p_test = logistic_data(4000, seed=11)
    model = build_model(
        ModelSpec(kind=kind, tasks=("readmission",), hidden=(16,)), D, seed=0, readmission_rate=float(y.mean())
    )
    result = train_local(model, TaskData(x, y, None), TrainConfig(epochs=8, learning_rate=0.01), seed=0)
    auroc = readmission_metrics(y_test, predict(model, x_test)["readmission"])["auroc"]
    oracle = readmission_metrics(y_test, p_test)["auroc"]
    print(f"{kind}: auroc {auroc:.4f}, oracle {oracle:.4f}, train loss {result.loss:.4f}")
    assert result.examples == 4000 and result.steps == 8 * 32
    assert auroc > oracle - 0.02


@pytest.mark.parametrize(("kind", "tail"), [("glm", "gamma"), ("glm", "lognormal"), ("mlp", "lognormal")])
def test_tweedie_training_beats_the_mean_and_predicts_no_negative_cost(kind, tail):
    x, cost = cost_data(4000, 20, tail)
    x_test, cost_test = cost_data(4000, 21, tail)
    model = build_model(ModelSpec(kind=kind, tasks=("cost",), hidden=(16,)), D, seed=0)
    train_local(model, TaskData(x, None, cost), TrainConfig(epochs=8, learning_rate=0.01), seed=0)
    predicted = predict(model, x_test)["cost"]
    scores = cost_metrics(cost_test, predicted)
    print(f"{kind}/{tail}: r2 {scores['r2']:.3f}, r2_log {scores['r2_log']:.3f}")
    assert scores["r2"] > 0.05
    assert (predicted >= 0).all()


@pytest.mark.parametrize("zero_share", [0.98, 1.0])
def test_cost_head_stays_finite_on_zero_heavy_costs(zero_share):
    x, cost = (
        cost_data(1000, 30, "lognormal", zero_share=zero_share)
        if zero_share < 1
        else (
            np.random.default_rng(30).normal(size=(1000, D)).astype(np.float32),
            np.zeros(1000, np.float32),
        )
    )
    model = build_model(ModelSpec(kind="multitask", tasks=("cost",), hidden=(16,)), D, seed=0)
    result = train_local(model, TaskData(x, None, cost), TrainConfig(epochs=20, learning_rate=0.05), seed=0)
    predicted = predict(model, x)["cost"]
    assert np.isfinite(result.loss)
    assert all(np.isfinite(w).all() for w in get_weights(model))
    assert np.isfinite(predicted).all() and (predicted >= 0).all()


def test_fedprox_with_a_large_mu_stays_near_the_global_weights():
    data, spec = full_data(500, 40), ModelSpec(kind="mlp", hidden=(16,))
    global_params = get_weights(build_model(spec, D, seed=0))

    def drift(mu: float) -> float:
        model = build_model(spec, D, seed=0)
        train_local(
            model, data, TrainConfig(epochs=5, learning_rate=0.01, proximal_mu=mu), seed=0, global_params=global_params
        )
        return distance(get_weights(model), global_params)

    free, anchored = drift(0.0), drift(100.0)
    assert anchored < 0.1 * free


def test_weights_round_trip_and_mismatches_name_the_key():
    source = build_model(ModelSpec(kind="multitask"), D, seed=0)
    train_local(source, full_data(200, 50), TrainConfig(), seed=0)
    target = build_model(ModelSpec(kind="multitask"), D, seed=1)
    weights = get_weights(source)
    assert all(w.dtype == np.float32 for w in weights)
    set_weights(target, weights)
    x = np.random.default_rng(0).normal(size=(10, D))
    for task, values in predict(source, x).items():
        np.testing.assert_array_equal(values, predict(target, x)[task])
    weights[0] += 1.0  # a copy: the model must not change
    assert not np.array_equal(weights[0], get_weights(source)[0])

    key = list(source.state_dict())[1]
    bad = get_weights(source)
    bad[1] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        set_weights(target, bad)
    with pytest.raises(ValueError, match="weight arrays"):
        set_weights(target, bad[:-1])


def test_readmission_only_data_trains_only_the_readmission_head():
    model = build_model(ModelSpec(kind="multitask"), D, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y, _ = logistic_data(300, 60)
    config = TrainConfig(optimizer="adamw", weight_decay=0.1, learning_rate=0.01)
    train_local(model, TaskData(x, y, None), config, seed=0)
    after = model.state_dict()
    for key in before:
        unchanged = torch.equal(before[key], after[key])
        assert unchanged == key.startswith("heads.cost."), key


def test_training_rejects_empty_or_non_overlapping_data():
    readmission_only = build_model(ModelSpec(tasks=("readmission",)), D, seed=0)
    x, cost = cost_data(50, 70, "gamma")
    with pytest.raises(ValueError, match="overlap"):
        train_local(readmission_only, TaskData(x, None, cost), TrainConfig(), seed=0)
    with pytest.raises(ValueError, match="empty"):
        train_local(
            readmission_only,
            TaskData(np.zeros((0, D), np.float32), np.zeros(0, np.float32), None),
            TrainConfig(),
            seed=0,
        )


def test_diverging_training_raises_floating_point_error():
    x, cost = cost_data(500, 80, "lognormal")
    model = build_model(ModelSpec(kind="glm", tasks=("cost",)), D, seed=0)
    with pytest.raises(FloatingPointError, match="learning rate"):
        train_local(
            model,
            TaskData(x * 100, None, cost * 1e4),
            TrainConfig(optimizer="sgd", learning_rate=10.0, epochs=3),
            seed=0,
        )


def test_predict_is_deterministic_with_dropout():
    model = build_model(ModelSpec(kind="mlp", dropout=0.5), D, seed=0)
    model.train()
    x = np.random.default_rng(0).normal(size=(50, D))
    first = predict(model, x, batch_size=7)
    np.testing.assert_array_equal(first["readmission"], predict(model, x)["readmission"])
    assert model.training  # mode restored


# --- metrics ------------------------------------------------------------------------------


def test_readmission_metrics_match_sklearn_and_are_nan_for_one_class():
    y = np.array([0, 0, 1, 1, 0, 1, 0, 0])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.7, 0.5, 0.05])
    scores = readmission_metrics(y, p)
    assert scores == pytest.approx(
        {"auroc": roc_auc_score(y, p), "auprc": average_precision_score(y, p), "brier": brier_score_loss(y, p)}
    )
    assert all(type(v) is float for v in scores.values())
    one_class = readmission_metrics(np.zeros(4), np.full(4, 0.2))
    assert np.isnan(one_class["auroc"]) and np.isnan(one_class["auprc"])
    assert one_class["brier"] == pytest.approx(0.04)


def test_cost_metrics_match_sklearn_and_definitions():
    y = np.array([0.0, 100.0, 250.0, 4000.0, 30.0])
    pred = np.array([10.0, 120.0, 200.0, 2500.0, 0.0])
    scores = cost_metrics(y, pred)
    assert scores["mae"] == pytest.approx(np.mean(np.abs(y - pred)))
    assert scores["rmse"] == pytest.approx(np.sqrt(np.mean((y - pred) ** 2)))
    assert scores["r2"] == pytest.approx(r2_score(y, pred))
    assert scores["r2_log"] == pytest.approx(r2_score(np.log1p(y), np.log1p(pred)))
    assert np.isnan(cost_metrics(np.ones(3), np.array([1.0, 2.0, 3.0]))["r2"])


def test_calibration_bins_count_every_row_and_match_sklearn():
    rng = np.random.default_rng(90)
    p = rng.random(1003)
    y = (rng.random(1003) < p).astype(float)
    bins = calibration_bins(y, p, n_bins=10)
    assert sum(bins["count"]) == 1003
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="quantile")
    np.testing.assert_allclose(bins["observed_rate"], observed)
    np.testing.assert_allclose(bins["mean_predicted"], predicted)
    tied = calibration_bins(np.array([0, 1, 0, 1]), np.full(4, 0.5))  # empty bins are dropped
    assert tied == {"mean_predicted": [0.5], "observed_rate": [0.5], "count": [4.0]}


# --- site calibration of costs ------------------------------------------------------------


def priced_site(n: int, price_level: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A site's skewed observed costs at ``price_level`` times a model's expected costs."""
    rng = np.random.default_rng(seed)
    expected = np.exp(rng.normal(0.0, 0.8, n))
    observed = price_level * expected * rng.lognormal(-0.5, 1.0, n)  # lognormal(-σ²/2, σ) has mean 1
    return observed, expected


def test_a_sites_price_level_is_recovered_as_its_observed_over_expected_ratio():
    observed, expected = priced_site(50_000, 1.3, seed=1)
    calibration = CostCalibration.fit(observed, expected)
    assert calibration.observed_over_expected == pytest.approx(observed.sum() / expected.sum())
    assert calibration.observed_over_expected == pytest.approx(1.3, rel=0.03)
    np.testing.assert_allclose(calibration.apply(expected), expected * calibration.observed_over_expected)


def test_site_calibrated_expected_costs_add_up_to_the_observed_even_at_a_small_site():
    observed, expected = priced_site(200, 0.5, seed=2)  # a level the global model misses by 2x
    calibrated = CostCalibration.fit(observed, expected).apply(expected)
    assert calibrated.sum() == pytest.approx(observed.sum()), "the mean is fixed, not shrunk towards the model's"
    assert CostCalibration.fit(np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0])).observed_over_expected == 2.0


@pytest.mark.parametrize(
    "observed, expected",
    [
        ([], []),
        ([1.0, 2.0], [1.0]),
        ([-1.0, 2.0], [1.0, 1.0]),
        ([1.0, 2.0], [0.0, 1.0]),
        ([np.nan, 2.0], [1.0, 1.0]),
    ],
    ids=["empty", "lengths differ", "negative cost", "zero expected cost", "nan"],
)
def test_site_calibration_rejects_bad_inputs(observed, expected):
    with pytest.raises(ValueError):
        CostCalibration.fit(np.array(observed), np.array(expected))


def _cost_model_and_rows(level: float, rows: int = 2_000) -> tuple[torch.nn.Module, TaskData]:
    model = build_model(ModelSpec(kind="glm"), D, seed=0)
    x = np.random.default_rng(3).normal(size=(rows, D)).astype(np.float32)
    with torch.no_grad():
        model.heads["cost"].weight.copy_(torch.linspace(-0.3, 0.3, D))
    expected = predict(model, x)["cost"]
    noise = np.random.default_rng(4).gamma(4.0, 0.25, rows)  # mean 1: costs scatter around their level
    y = (np.random.default_rng(5).random(rows) < 0.2).astype(np.float32)
    return model, TaskData(x, y, (level * expected * noise).astype(np.float32))


def test_a_site_keeps_its_cost_level_where_its_validation_rows_show_it_helps():
    model, rows = _cost_model_and_rows(level=1.5)
    steps, adapted = decide_site_steps(model, rows, TrainConfig(), epochs=0, seed=1, min_rows=11)
    assert steps.calibration == pytest.approx(1.5, rel=0.05) and steps.adapted == () and adapted is None


def test_a_site_at_the_models_level_keeps_the_shared_model():
    model, rows = _cost_model_and_rows(level=1.0)
    steps, _ = decide_site_steps(model, rows, TrainConfig(), epochs=0, seed=1, min_rows=11)
    assert steps.calibration is None


def test_a_site_with_too_few_validation_rows_decides_nothing():
    model, rows = _cost_model_and_rows(level=3.0, rows=40)
    assert decide_site_steps(model, rows, TrainConfig(), epochs=2, seed=1, min_rows=11) == (SiteSteps(), None)


def test_site_steps_round_trip_strictly():
    steps = SiteSteps(("cost",), 1.25)
    assert SiteSteps.from_dict(steps.to_dict()) == steps
    for bad in ({"adapted": []}, {"adapted": [], "calibration": -1.0}, {"adapted": [], "calibration": "x"}):
        with pytest.raises(ValueError):
            SiteSteps.from_dict(bad)


# --- site adaptation ----------------------------------------------------------------------


def test_adaptation_learns_a_sites_own_slope_from_the_shared_start_and_leaves_the_shared_model_alone():
    x, y, _ = logistic_data(20_000, seed=1)
    shared = build_model(ModelSpec(kind="glm", tasks=("readmission",)), D, seed=0)
    train_local(shared, TaskData(x, y, None), TrainConfig(epochs=3, learning_rate=0.01), seed=0)
    shared_weights = get_weights(shared)
    # A site whose rows follow the federation's model except for a much stronger first feature.
    rng = np.random.default_rng(2)
    site_x = rng.normal(size=(1_000, D)).astype(np.float32)
    slopes = np.linspace(-0.5, 0.5, D)
    slopes[0] = 1.5
    site_y = (rng.random(1_000) < 1.0 / (1.0 + np.exp(-(site_x @ slopes - 1.2)))).astype(np.float32)
    train, (test_x, test_y) = TaskData(site_x[:600], site_y[:600], None), (site_x[600:], site_y[600:])
    training = TrainConfig(learning_rate=0.01)

    site = adapted_to_site(shared, train, training, epochs=5, seed=3)

    assert distance(get_weights(shared), shared_weights) == 0.0
    assert (
        roc_auc_score(test_y, predict(site, test_x)["readmission"])
        > roc_auc_score(test_y, predict(shared, test_x)["readmission"]) + 0.02
    )
    assert distance(get_weights(adapted_to_site(shared, train, training, epochs=5, seed=3)), get_weights(site)) == 0.0


@pytest.mark.parametrize("epochs", [0, -1, 1.5, True])
def test_adaptation_refuses_a_number_of_epochs_that_is_not_positive(epochs):
    model = build_model(ModelSpec(kind="glm"), D, seed=0)
    with pytest.raises(ValueError, match="epochs"):
        adapted_to_site(model, full_data(50, 0), TrainConfig(), epochs=epochs, seed=0)


def test_identical_rows_get_identical_predictions_wherever_they_sit_in_the_batch():
    """Scored in one batch, float32 rounding can differ by a row's place in it: on data of
    few covariate patterns that orders tied rows by chance and moves the AUROC."""
    rng = np.random.default_rng(3)
    for n_features in (4, 7, 13):
        raw = rng.integers(0, 2, (40, n_features)) - rng.random(n_features)
        patterns = np.unique((raw / rng.random(n_features)).astype(np.float32), axis=0)
        x = patterns[rng.integers(0, len(patterns), 715)]
        model = build_model(ModelSpec(kind="glm", tasks=("readmission", "cost")), n_features, seed=1)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.tensor(rng.normal(size=parameter.shape), dtype=parameter.dtype))
        predictions = predict(model, x)
        for task in ("readmission", "cost"):
            assert len(np.unique(predictions[task])) == len(patterns), (n_features, task)
            first = {row.tobytes(): value for row, value in zip(x, predictions[task])}
            assert all(first[row.tobytes()] == value for row, value in zip(x, predictions[task]))
    assert predict(model, x[:0])["readmission"].shape == (0,)
