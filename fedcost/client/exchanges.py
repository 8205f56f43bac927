"""Per purpose, what a reply may carry and what the node releases by sending it.

Beside each row of ``fedcost.wire.purposes``: the shapes of the contribution (fixed by
the accepted request and the node's own layout, never by the reply: a reply cannot
vouch for its own shape), and the release keys under which the node's ledger governs
the sums its input may join (``fedcost.privacy.ledger``).

Release keys name what an input *is*, so that the same input under another request is
the same release. Fixed data (feature statistics, a statistics table) is one input in
every job over the same rows. A model-dependent input is keyed twice: by its place in
the job (the round), so a round's retry with a model perturbed by a rounding error is
still the same release, and by the exact model, so a later round that sends the same
model again is too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np

from fedcost.analytics import benchmarking
from fedcost.analytics.benchmarking import shared_vector_size
from fedcost.client.node import Ask, Node
from fedcost.models import evaluation, glm
from fedcost.models.training_job import newton_bounds

Shapes = list[tuple[int, ...]]


def _statistics_shapes(ask: Ask, node: Node) -> Shapes:
    return [(len(node.layout.slots()),)]


def _analytics_shapes(ask: Ask, node: Node) -> Shapes:
    assert ask.layout is not None
    return [(ask.layout.noisy_size if ask.cost_clip is not None else ask.layout.size,)]


def _train_shapes(ask: Ask, node: Node) -> Shapes:
    """Every weight array's shape, then the one-entry training-loss slot."""
    return [tuple(array.shape) for array in ask.weights.values()] + [(1,)]


def _newton_shapes(ask: Ask, node: Node) -> Shapes:
    """One vector of score and information sums per task (normalised blocks, with noise)."""
    assert ask.job is not None
    features = len(ask.job.features.design_names)
    if ask.newton_noise is not None:
        bounds = newton_bounds(ask.job.model, features, ask.newton_noise)
        return [(bounds[task].size(features + 1),) for task in ask.job.model.tasks]
    return [(glm.SumsLayout(features + 1).size,) for _ in ask.job.model.tasks]


def _evaluate_shapes(ask: Ask, node: Node) -> Shapes:
    assert ask.job is not None
    return evaluation.sums_shapes(ask.job.model.tasks, noisy=ask.cost_clip is not None)


def _benchmark_shapes(ask: Ask, node: Node) -> Shapes:
    return [(shared_vector_size(ask.sites, noisy=ask.cost_clip is not None),)]


SHAPES: dict[str, Callable[[Ask, Node], Shapes]] = {
    "statistics": _statistics_shapes,
    "analytics": _analytics_shapes,
    "train": _train_shapes,
    "newton": _newton_shapes,
    "evaluate": _evaluate_shapes,
    "benchmark": _benchmark_shapes,
}


def noisy_bounds(ask: Ask, node: Node) -> list[np.ndarray]:
    """Per contribution array, the most one row adds to each slot of a noisy sum: what the
    node divides by so that one row moves a slot by at most 1, and the coordinator multiplies
    the sum by."""
    clip = ask.cost_clip
    assert clip is not None, "only a noisy sum has bounds"
    if ask.purpose == "statistics":
        return [node.layout.noisy_bounds(clip)]
    if ask.purpose == "analytics":
        assert ask.layout is not None
        return [ask.layout.noisy_bounds(clip)]
    if ask.purpose == "benchmark":
        return [benchmarking.noisy_bounds(ask.sites, clip)]
    assert ask.job is not None
    scale = ask.job.features.cost_scale
    return [
        evaluation.readmission_bounds() if task == "readmission" else evaluation.cost_bounds(clip / scale)
        for task in ask.job.model.tasks
    ]


def noisy_touched(ask: Ask, node: Node) -> int:
    """The most slots of this noisy sum one row changes: what its noise's sensitivity is."""
    if ask.purpose == "statistics":
        return node.layout.touched()
    if ask.purpose == "analytics":
        assert ask.layout is not None
        return ask.layout.noisy_touched()
    if ask.purpose == "benchmark":
        return benchmarking.NOISY_TOUCHED
    assert ask.job is not None
    return sum(evaluation.NOISY_TOUCHED[task] for task in ask.job.model.tasks)


def release_keys(ask: Ask, node: Node, run_id: str) -> list[tuple[str, str]]:
    """The keys (and, in words, the input) under which this contribution is released."""
    data = node.data_digest[:16]
    if ask.purpose == "statistics":
        return [(f"statistics/{_digest(node.layout.slots())}/{data}", "its feature statistics")]
    if ask.purpose == "analytics":
        assert ask.layout is not None
        return [(f"analytics/{_digest(ask.layout.to_json())}/{data}", f"its table by {', '.join(ask.layout.group_by)}")]
    what = {
        "train": "training update",
        "newton": "GLM sums",
        "evaluate": "evaluation sums",
        "benchmark": "risk-adjusted totals",
    }[ask.purpose]
    model = _model_digest(ask.weights)
    return [
        (f"{ask.purpose}/{run_id}/round-{ask.round}", f"its round-{ask.round} {what}"),
        (f"{ask.purpose}/model-{model}/{data}", f"its {what} of this exact model"),
    ]


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def _model_digest(weights: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name, array in weights.items():
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]
