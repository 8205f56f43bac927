"""An exact GLM under distributed DP: the noisy Newton sums, their noise and the fit on them.

The privacy claim rests on three things tested here: one row moves each block of a node's
normalised sums by at most 1 in L2 (whatever the row and the coefficients), the noise the
nodes' shares add up to has the standard deviation the plan priced, and the plan spends no
more than its epsilon. The fit on noisy sums must stay finite and, where the noise is
negligible, be the pooled fit of the clipped features.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcost.client.exchanges import SHAPES
from fedcost.client.node import Ask, Node, NodeSetup
from fedcost.config import NOISY_GLM_ROUNDS, SimulationConfig
from fedcost.data.files import write_node_files
from fedcost.data.synthetic import EcosystemSpec, generate_ecosystem
from fedcost.errors import ConfigError, PolicyViolationError, PrivacyBudgetExhausted
from fedcost.models import glm
from fedcost.models.spec import ModelSpec, TrainConfig
from fedcost.models.training_job import TrainingJob
from fedcost.privacy.distributed import (
    MAX_POISSON_MEAN,
    NewtonNoise,
    calibrate_newton_noise,
    plan_newton_epsilon,
    with_noise_share,
)
from fedcost.secagg import Quantizer
from simulations import simulate

FAMILIES = {
    "binomial": glm.BINOMIAL,
    "gamma": glm.GAMMA,
    "tweedie": glm.tweedie(1.5),
    "poisson": glm.POISSON,
}


def _rows(family: glm.Family, n: int, features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features))
    eta = 0.3 * x[:, 0] - 0.5 * x[:, 1] + (-1.0 if family.name == "binomial" else 0.0)
    mu = family.mean(eta)
    if family.name == "binomial":
        y = rng.binomial(1, mu).astype(float)
    elif family.name == "poisson":
        y = rng.poisson(mu).astype(float)
    else:
        y = rng.gamma(2.0, mu / 2.0) * (rng.random(n) < (1.0 if family.name == "gamma" else 0.7))
    return x, y


def _blocks(vector: np.ndarray, parameters: int, dispersion: bool) -> list[np.ndarray]:
    half = parameters * (parameters + 1) // 2
    parts = [vector[:parameters], vector[parameters : parameters + half]]
    return parts + ([vector[-1:]] if dispersion else [])


@settings(max_examples=60, deadline=None)
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    scale=st.floats(0.1, 50.0),
    target=st.floats(0.0, 1e6),
    shift=st.floats(-30.0, 30.0),
    seed=st.integers(0, 10**6),
)
def test_one_row_moves_each_block_by_at_most_one(
    family: str, scale: float, target: float, shift: float, seed: int
) -> None:
    chosen = FAMILIES[family]
    x, y = _rows(chosen, 40, 4, seed)
    bounds = glm.NoisyBounds.of(chosen, 4, feature_clip=1.0, response_clip=10.0)
    rng = np.random.default_rng(seed)
    row = rng.normal(size=(1, 4)) * scale  # possibly far beyond the features' clip
    extra = float(round(target) % 2) if family == "binomial" else (target if family != "gamma" else target + 1e-3)
    beta = np.concatenate([[shift], rng.normal(size=4)])
    before = glm.noisy_site_sums(x, y, beta, family=chosen, bounds=bounds)
    after = glm.noisy_site_sums(np.vstack([x, row]), np.append(y, extra), beta, family=chosen, bounds=bounds)
    assert np.isfinite(after).all()
    for part_before, part_after in zip(_blocks(before, 5, bounds.dispersion), _blocks(after, 5, bounds.dispersion)):
        assert np.linalg.norm(part_after - part_before) <= 1 + 1e-9


def test_without_clipping_the_noisy_sums_are_the_exact_score_and_information() -> None:
    x, y = _rows(glm.BINOMIAL, 300, 3, 1)
    beta = np.array([-1.0, 0.2, 0.1, -0.3])
    bounds = glm.NoisyBounds.of(glm.BINOMIAL, 3, feature_clip=100.0, response_clip=10.0)
    noisy = glm.noisy_site_sums(x, y, beta, family=glm.BINOMIAL, bounds=bounds) * bounds.scale(4)
    exact = glm.SumsLayout(4).unpack(glm.site_sums(x, y, beta, family=glm.BINOMIAL))
    np.testing.assert_allclose(noisy[:4], exact.score, rtol=1e-12)
    np.testing.assert_allclose(noisy[4:], exact.information[np.triu_indices(4)], rtol=1e-12)


def _noisy_fit(
    family: glm.Family, x: np.ndarray, y: np.ndarray, bounds: glm.NoisyBounds, sd: float, rounds: int, seed: int
) -> glm.FittedGlm:
    """The coordinator's loop on noisy sums: Gaussian noise of ``sd`` normalised units per slot."""
    rng = np.random.default_rng(seed)
    beta, info = glm.start_coefficients(x.shape[1] + 1, family=family, mean=float(y.mean())), None
    while info is None or not info.done:
        total = glm.noisy_site_sums(x, y, beta, family=family, bounds=bounds)
        total = total + rng.normal(0.0, sd, total.size)
        beta, info = glm.noisy_newton_step(
            total, beta, family=family, bounds=bounds, noise_sd=sd, rows=len(y), penalty=1.0,
            previous=info, max_iterations=rounds,
        )  # fmt: skip
    return glm.FittedGlm.from_step(info, family=family)


@pytest.mark.parametrize("family", ["binomial", "gamma"])
def test_with_negligible_noise_the_fit_is_the_pooled_fit_of_the_clipped_features(family: str) -> None:
    chosen = FAMILIES[family]
    x, y = _rows(chosen, 2000, 3, 2)
    bounds = glm.NoisyBounds.of(chosen, 3, feature_clip=1.0, response_clip=1e3)
    norms = np.linalg.norm(x, axis=1)
    clipped = x * np.minimum(1.0, bounds.feature_norm / norms)[:, None]
    assert (norms > bounds.feature_norm).mean() > 0.1, "the clip is at work"
    fitted = _noisy_fit(chosen, x, y, bounds, 1e-9, 25, 0)
    pooled = glm.fit_pooled(clipped, y, family=chosen, penalty=1.0)
    np.testing.assert_allclose(fitted.coefficients, pooled.coefficients, atol=1e-6)
    assert fitted.converged and math.isnan(fitted.deviance)


def test_under_heavy_noise_the_fit_stays_finite_and_its_errors_include_the_noise() -> None:
    x, y = _rows(glm.BINOMIAL, 500, 3, 3)
    bounds = glm.NoisyBounds.of(glm.BINOMIAL, 3, feature_clip=1.0, response_clip=10.0)
    quiet, loud = (_noisy_fit(glm.BINOMIAL, x, y, bounds, sd, 5, 4) for sd in (1e-6, 200.0))
    assert np.isfinite(loud.coefficients).all() and np.isfinite(loud.standard_errors()).all()
    assert loud.score_noise == pytest.approx(200.0 * bounds.score * bounds.row_norm)
    assert (np.linalg.eigvalsh(loud.information) > 0).all(), "the floored information is positive definite"
    without = glm.FittedGlm.from_dict({**loud.to_dict(), "score_noise": 0.0})
    assert (loud.standard_errors() > without.standard_errors()).all()
    assert (loud.standard_errors() > 3 * quiet.standard_errors()).all()
    restored = glm.FittedGlm.from_dict(loud.to_dict())
    assert restored.score_noise == loud.score_noise and math.isnan(restored.deviance)


def test_the_planned_noise_spends_the_budget_and_no_more() -> None:
    common = dict(delta=1e-6, sites=4, parameters=46, blocks=5, feature_clip=1.0, response_clip=10.0)
    noises = {rounds: calibrate_newton_noise(epsilon=1.0, rounds=rounds, **common) for rounds in (1, 5, 20)}
    for rounds, noise in noises.items():
        spent = plan_newton_epsilon(noise, rounds=rounds, delta=1e-6)
        assert 0.98 < spent <= 1.0
    assert noises[1].sd < noises[5].sd < noises[20].sd
    tight = calibrate_newton_noise(epsilon=0.25, rounds=20, **common)
    assert tight.grid < noises[5].grid and tight.share() / 2 <= MAX_POISSON_MEAN, "a coarser grid for heavy noise"
    with pytest.raises(PrivacyBudgetExhausted, match=r"\[glm_privacy\] epsilon"):
        calibrate_newton_noise(epsilon=0.1, rounds=20, **common)  # below what RDP orders up to 63 resolve


def _noisy_round(noise: NewtonNoise, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four nodes encode their normalised sums and each adds its share as a node does; the
    decoded sum and the noiseless one."""
    bounds = glm.NoisyBounds.of(glm.BINOMIAL, 8, feature_clip=1.0, response_clip=10.0)
    rng = np.random.default_rng(seed)
    clip = noise.quantizer_clip(4 * 400)
    quantizer = Quantizer(clip, int(clip) * noise.grid, 4)
    beta = np.concatenate([[-1.0], rng.normal(0.0, 0.2, 8)])
    exact, total = np.zeros(bounds.size(9)), np.zeros(bounds.size(9) + 1, dtype=np.uint64)
    for node in range(4):
        x, y = _rows(glm.BINOMIAL, 400, 8, 10 * seed + node)
        sums = glm.noisy_site_sums(x, y, beta, family=glm.BINOMIAL, bounds=bounds)
        exact += sums
        encoded = quantizer.encode([sums], seed=rng.bytes(32), weight=1)
        shared = with_noise_share(encoded, noise.share(), quantizer.bits, rng=rng).astype(np.uint64)
        total = (total + shared) & np.uint64(2**quantizer.bits - 1)
    (decoded,), _ = quantizer.decode(total.astype(encoded.dtype), [(bounds.size(9),)])
    return decoded, exact


def test_the_summed_shares_carry_the_planned_noise() -> None:
    """Over 8 rounds of 54 slots, the released sum differs from the noiseless one by about the
    planned standard deviation (a generous bound: the estimate's own error is about 3 %)."""
    noise = NewtonNoise(sd=3.0, sites=4, grid=1024, parameters=9, blocks=2)
    errors = np.concatenate([np.subtract(*_noisy_round(noise, seed)) / noise.sd for seed in range(8)])
    assert abs(errors.mean()) < 0.2 and 0.85 < errors.std() < 1.15, (errors.mean(), errors.std())


# --- end to end ------------------------------------------------------------------------------

FEDERATION = """
[run]
seed = 5
rounds = 4

[ecosystem.sizes]
hospital = [1500, 900, 600]
insurer = [1200]
pharma = [500]

[model]
kind = "glm"

[analytics]
group_by = []
benchmark = false

[glm_privacy]
epsilon = {epsilon}

[simulation]
policies = {{ hospital-1 = "budget.toml" }}
"""


def _dp_policy(folder: Path, epsilon: float) -> None:
    policy = {
        "coordinator": "0" * 64,  # a simulation sets its own coordinator's key id
        "max_rounds": 10,
        "metrics": {"auroc": 3},
        "privacy": {"epsilon": epsilon, "delta": 1e-5, "max_grad_norm": 1.0},
    }
    (folder / "budget.toml").write_bytes(tomli_w.dumps(policy).encode())


@pytest.mark.slow
def test_a_site_with_a_budget_joins_an_exact_glm_with_noise_and_accounts_every_round(tmp_path: Path) -> None:
    _dp_policy(tmp_path, 4.0)
    result, run = simulate(tmp_path, FEDERATION.format(epsilon=2.0), "dp")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    site = summary["privacy"]["hospital-1"]
    assert site["dp"] and site["noisy_sums"] == 4 and 0 < site["epsilon_spent"] <= 2.0 * 1.05, site
    assert summary["privacy"]["hospital-2"] == {"dp": False}, "a site without a budget adds its share, pays nothing"
    planned = summary["glm_privacy"]
    assert planned["epsilon"] == 2.0 and planned["rounds_planned"] == 4 and planned["noise_sd"] > 0
    for task, inference in summary["inference"].items():
        assert inference["iterations"] == 4 and inference["dp_noise"]["score_sd"] > 0, task
        estimates = [row["estimate"] for row in inference["coefficients"]]
        errors = [row["std_error"] for row in inference["coefficients"]]
        assert all(math.isfinite(v) for v in estimates + errors), task
    assert summary["readmission"]["federated"]["auroc"] > 0.6
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(record["readmission_deviance"] is None for record in rounds), "no deviance travels"
    audit = [json.loads(line) for line in (run / "audit" / "hospital-1.jsonl").read_text().splitlines()]
    paid = [entry["details"] for entry in audit if entry["event"] == "dp_round"]
    assert [d["purpose"] for d in paid] == ["newton"] * 4, "each round paid before it left, in the audit log"
    assert paid[-1]["dp_epsilon_spent"] == pytest.approx(site["epsilon_spent"])
    assert "Newton sums carried distributed noise for (ε = 2" in (run / "report.html").read_text()


@pytest.mark.slow
def test_a_site_whose_budget_cannot_pay_stops_the_run_at_the_hello(tmp_path: Path) -> None:
    _dp_policy(tmp_path, 1.0)
    result, _ = simulate(tmp_path, FEDERATION.format(epsilon=3.0), "short")
    assert result.returncode != 0
    output = " ".join((result.stdout + result.stderr).split())
    assert "hospital-1" in output and "lower the job's [glm_privacy] epsilon below what is left" in output, output[
        -2000:
    ]


def test_a_config_puts_noise_on_newton_sums_only_under_secure_aggregation_and_for_an_exact_glm() -> None:
    noisy = {"model": {"kind": "glm"}, "glm_privacy": {"epsilon": 3.0}}
    assert SimulationConfig.from_dict(noisy).run.rounds == NOISY_GLM_ROUNDS
    with pytest.raises(ConfigError, match="secure_aggregation"):
        SimulationConfig.from_dict({**noisy, "secure_aggregation": {"enabled": False}})
    with pytest.raises(ConfigError, match='kind = "glm"'):
        SimulationConfig.from_dict({**noisy, "model": {"kind": "glm", "fit": "fedavg"}})


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Node:
    ecosystem = generate_ecosystem(EcosystemSpec.from_sizes({"hospital": [300]}), seed=3)
    folder = tmp_path_factory.mktemp("node")
    return Node(
        NodeSetup(write_node_files(((n.name, n.role, n.frame) for n in ecosystem.nodes), folder), "hospital-1", 3)
    )


def _newton_ask(node: Node, noise: NewtonNoise) -> Ask:
    features = node.layout.feature_spec(node.statistics())
    spec = ModelSpec(kind="glm", tasks=node.mapping.tasks)
    p = len(features.design_names) + 1
    weights = {task: np.zeros(p) for task in spec.tasks}
    return Ask("newton", 1, 11, TrainingJob(spec, TrainConfig(), features, 0), weights, newton_noise=noise)


def test_a_node_sends_the_blocks_the_plan_priced_and_refuses_a_larger_design(node: Node) -> None:
    priced = NewtonNoise(sd=2.0, sites=3, grid=1024, parameters=80, blocks=5)
    ask = _newton_ask(node, priced)
    contribution = node.contribution(ask)
    assert [array.shape for array in contribution.arrays] == SHAPES["newton"](ask, node)
    assert all(np.abs(array).max() <= len(node.data.train) for array in contribution.arrays), "normalised"
    with pytest.raises(PolicyViolationError, match="not those the plan's noise was priced for"):
        node.contribution(_newton_ask(node, replace(priced, parameters=5)))
    with pytest.raises(PolicyViolationError, match="not those the plan's noise was priced for"):
        node.contribution(_newton_ask(node, replace(priced, blocks=4)))
