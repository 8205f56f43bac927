"""One CoordinatorPlan for a job, as a simulation and a deployment both build it (issue 17):
a section a job sets cannot be forgotten on one path, as [glm_privacy] once was in deployment."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from pathlib import Path

from fedcost import schema
from fedcost.config import SimulationConfig
from fedcost.data.features import StatisticsLayout
from fedcost.server.app import CoordinatorPlan

# Every section a plan reads from the config, away from its default.
JOB = {
    "run": {"rounds": 3, "seed": 11, "min_cohort": 25},
    "model": {"kind": "glm"},
    "training": {"learning_rate": 0.02},
    "strategy": {"name": "fedprox", "proximal_mu": 0.1},
    "secure_aggregation": {"dropout_tolerance": 0.2},
    "analytics": {"currency": "EUR", "benchmark": False},
    "statistics_privacy": {"epsilon": 4.0},
    "glm_privacy": {"epsilon": 2.0},
}


def _plan(tmp_path: Path) -> tuple[SimulationConfig, Path, CoordinatorPlan]:
    config = SimulationConfig.from_dict(JOB)
    source = tmp_path / "job.toml"
    source.write_bytes(b"[run]\nrounds = 3\n")
    roster = tuple((f"site-{n}", bytes([n]) * 32) for n in range(4))
    layout = StatisticsLayout(tuple(schema.COLUMNS.values()), ("readmission", "cost"))
    plan = CoordinatorPlan.for_job(
        config, source, run_id="run-1", coordinator_key_id="key", roster=roster, layout=layout, episodes=None
    )
    return config, source, plan


def test_a_plan_for_a_job_takes_every_section_from_the_config(tmp_path: Path) -> None:
    config, source, plan = _plan(tmp_path)
    assert (plan.rounds, plan.seed, plan.min_cohort) == (3, 11, 25)
    assert plan.model == config.model and plan.training == config.training and plan.strategy == config.strategy
    assert plan.secure_aggregation == config.secure_aggregation and plan.analytics == config.analytics
    assert plan.statistics_privacy == config.statistics_privacy and plan.glm_privacy == config.glm_privacy
    assert plan.config_digest == hashlib.sha256(source.read_bytes()).hexdigest()
    assert plan.newton_noise is not None  # the job's [glm_privacy] reaches the plan's Newton noise


def test_no_plan_field_is_left_at_its_default_unless_the_caller_gives_it(tmp_path: Path) -> None:
    """A field added to the plan later must come from the config in ``for_job`` or be one of
    its parameters: left at its default, both paths would silently run without it."""
    _, _, plan = _plan(tmp_path)
    given = set(inspect.signature(CoordinatorPlan.for_job).parameters)
    for field in dataclasses.fields(CoordinatorPlan):
        if field.name in given or field.default is dataclasses.MISSING:
            continue
        assert getattr(plan, field.name) != field.default, f"for_job leaves {field.name} at its default"
