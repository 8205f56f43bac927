"""What distributed DP on an exact GLM's Newton sums costs: ε against AUROC, cost R² and coefficients.

On the default synthetic ecosystem (seed 7) and on ``examples/byo``, with fedcost's defaults
(logistic readmission, Tweedie 1.5 cost, ridge 1, [glm_privacy] feature_clip 1 and
response_clip 10, 5 rounds, δ = 1e-6): every node computes its normalised, clipped sums
(``glm.noisy_site_sums``) at the coordinator's coefficients, encodes them on the plan's grid
and adds its share of the plan's Skellam noise (``with_noise_share``, as a node does), the
shares are added as secure aggregation adds them, and the coordinator decodes the sum and
takes its step (``glm.noisy_newton_step``) — the protocol's arithmetic without Flower, the
noise calibrated as ``CoordinatorPlan.newton_noise`` calibrates it. "exact" is the noiseless
federated fit (the pooled fit, ``glm.fit_pooled``); "clip only" the noisy iteration with
negligible noise (what the clipping alone changes, in the same rounds). Against the exact
fit: |Δβ|, the median absolute coefficient difference (log-odds or log cost ratio per
standard deviation or level), and Δη, the root mean square difference of the linear
predictor over the held-out rows (what the difference does to predictions; a weakly
identified coefficient, e.g. of a rare level, moves a lot and matters little). Held-out
rows: each node's seeded 20 %. Medians over seeds, the worst seed in brackets.

    .venv/bin/python benchmarks/dp_newton_bench.py [--seeds 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcost import schema
from fedcost.config import GlmPrivacySection, SimulationConfig
from fedcost.data.features import FeatureSpec, StatisticsLayout
from fedcost.data.files import MAPPING_FILE, write_node_files
from fedcost.data.loader import NodeData, load_node
from fedcost.data.mapping import DataMapping
from fedcost.data.synthetic import generate_ecosystem
from fedcost.models import glm
from fedcost.models.metrics import cost_metrics, readmission_metrics
from fedcost.models.spec import ModelSpec
from fedcost.models.training_job import glm_families, newton_blocks, newton_bounds
from fedcost.privacy import MIN_SECURE_SITES
from fedcost.privacy.distributed import NewtonNoise, calibrate_newton_noise, with_noise_share
from fedcost.secagg import Quantizer
from fedcost.server.app import max_features

BYO = Path(__file__).resolve().parent.parent / "examples" / "byo"  # whatever the working folder

EPSILONS = (1.0, 3.0, 10.0)
ROUNDS, DELTA, SEED = 5, 1e-6, 7
SECTION = GlmPrivacySection(epsilon=1.0, delta=DELTA)


@dataclass(frozen=True)
class Federation:
    name: str
    nodes: list[NodeData]
    features: FeatureSpec
    layout: StatisticsLayout
    model: ModelSpec


def synthetic(folder: Path) -> Federation:
    config = SimulationConfig()
    ecosystem = generate_ecosystem(config.ecosystem.spec(), SEED)
    mapping = DataMapping.load(write_node_files(((n.name, n.role, n.frame) for n in ecosystem.nodes), folder))
    return federation("default synthetic", mapping)


def federation(name: str, mapping: DataMapping) -> Federation:
    nodes = [load_node(mapping, node.name, split_seed=SEED, test_fraction=0.2) for node in mapping.nodes]
    layout = StatisticsLayout(mapping.feature_columns, tuple(mapping.targets))
    features = layout.feature_spec(sum(layout.local_statistics(node.train) for node in nodes))
    return Federation(name, nodes, features, layout, ModelSpec(kind="glm", tasks=mapping.tasks))


def target(task: str, rows, features: FeatureSpec) -> np.ndarray:
    if task == "readmission":
        return rows[schema.READMISSION].to_numpy("float64")
    return rows[schema.COST].to_numpy("float64") / features.cost_scale


def noisy_fit(fed: Federation, noise: NewtonNoise, rounds: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The coordinator's ``rounds`` noisy Newton rounds over the nodes' shares."""
    features, spec = fed.features, fed.model
    p = len(features.design_names) + 1
    bounds = newton_bounds(spec, p - 1, noise)
    clip = noise.quantizer_clip(features.rows)
    quantizer = Quantizer(clip, int(clip) * noise.grid, len(fed.nodes))
    designs = [features.design(node.train) for node in fed.nodes]
    fitted = {}
    for task, family in glm_families(spec).items():
        targets = [target(task, node.train, features) for node in fed.nodes]
        mean = float(np.concatenate(targets).mean())
        beta, info = glm.start_coefficients(p, family=family, mean=mean), None
        while info is None or not info.done:
            total = np.zeros(bounds[task].size(p) + 1, dtype=np.uint64)
            for x, y in zip(designs, targets, strict=True):
                sums = glm.noisy_site_sums(x, y, beta, family=family, bounds=bounds[task])
                encoded = quantizer.encode([sums], seed=rng.bytes(32), weight=1)
                shared = with_noise_share(encoded, noise.share(), quantizer.bits, rng=rng).astype(np.uint64)
                total = (total + shared) & np.uint64(2**quantizer.bits - 1)
            (summed,), _ = quantizer.decode(total.astype(encoded.dtype), [(bounds[task].size(p),)])
            beta, info = glm.noisy_newton_step(
                summed, beta, family=family, bounds=bounds[task], noise_sd=noise.sd, rows=features.rows,
                penalty=spec.penalty, previous=info, max_iterations=rounds,
            )  # fmt: skip
        fitted[task] = info.estimate
    return fitted


def exact_fit(fed: Federation) -> dict[str, np.ndarray]:
    x = np.vstack([fed.features.design(node.train) for node in fed.nodes])
    return {
        task: glm.fit_pooled(
            x,
            np.concatenate([target(task, node.train, fed.features) for node in fed.nodes]),
            family=family,
            penalty=fed.model.penalty,
        ).coefficients
        for task, family in glm_families(fed.model).items()
    }


def scores(fed: Federation, coefficients: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> dict[str, float]:
    """Held-out AUROC and cost R² (in currency units), and each task's |Δβ| and Δη."""
    test = [node.test for node in fed.nodes]
    x = np.vstack([fed.features.design(rows) for rows in test])
    result = {}
    for task, family in glm_families(fed.model).items():
        beta, reference = coefficients[task], exact[task]
        eta = beta[0] + x @ beta[1:]
        predicted = family.mean(eta)
        y = np.concatenate([target(task, rows, fed.features) for rows in test])
        if task == "readmission":
            result["auroc"] = readmission_metrics(y, predicted)["auroc"]
        else:
            scale = fed.features.cost_scale
            result["cost_r2"] = cost_metrics(y * scale, predicted * scale)["r2"]
        result[f"{task}_beta"] = float(np.median(np.abs(beta - reference)))
        result[f"{task}_eta"] = float(np.sqrt(np.mean((eta - reference[0] - x @ reference[1:]) ** 2)))
    return result


def plan(fed: Federation, epsilon: float, rounds: int) -> NewtonNoise:
    kept = math.ceil(len(fed.nodes) * (1 - SimulationConfig().secure_aggregation.dropout_tolerance))
    return calibrate_newton_noise(
        epsilon=epsilon,
        delta=DELTA,
        rounds=rounds,
        sites=max(MIN_SECURE_SITES, kept),
        parameters=max_features(fed.layout) + 1,
        blocks=newton_blocks(fed.model),
        feature_clip=SECTION.feature_clip,
        response_clip=SECTION.response_clip,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    arguments = parser.parse_args()
    seeds, rounds = arguments.seeds, arguments.rounds
    keys = [("auroc", min), ("cost_r2", min)]
    keys += [(f"{task}_{what}", max) for task in ("readmission", "cost") for what in ("beta", "eta")]
    with tempfile.TemporaryDirectory() as folder:
        federations = [
            synthetic(Path(folder)),
            federation("examples/byo", DataMapping.load(BYO / MAPPING_FILE)),
        ]
        for fed in federations:
            exact = exact_fit(fed)
            rows = sum(len(node.train) for node in fed.nodes)
            size = f"{len(fed.nodes)} sites, {rows} training rows, {len(exact['readmission'])} coefficients"
            print(f"\n{fed.name}: {size}, {rounds} rounds")
            print("| ε | noise sd | AUROC | cost R² | readm. \\|Δβ\\| | readm. Δη | cost \\|Δβ\\| | cost Δη |")
            print("|---|---|---|---|---|---|---|---|")
            base = scores(fed, exact, exact)
            print(f"| off (exact) | 0 | {base['auroc']:.4f} | {base['cost_r2']:.4f} | 0 | 0 | 0 | 0 |")
            settings = [("clip only", NewtonNoise(1e-9, 3, 1024, 1, 1))]
            settings += [(f"{e:g}", plan(fed, e, rounds)) for e in EPSILONS]
            for label, noise in settings:
                runs = [
                    scores(fed, noisy_fit(fed, noise, rounds, np.random.default_rng(seed)), exact)
                    for seed in range(seeds)
                ]
                cells = []
                for key, worst in keys:
                    values = [run[key] for run in runs]
                    cells.append(f"{np.median(values):.4f} ({worst(values):.4f})")
                print(f"| {label} | {noise.sd:.3g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
