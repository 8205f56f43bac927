"""Site policy files: strict validation (table-driven), the example policies, the job check."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest

from fedcost.errors import ConfigError, PolicyViolationError
from fedcost.privacy import JobRequest, PrivacySettings, SitePolicy, check_job

KEY = "ab" * 32
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "configs" / "policies"

VALID = {
    "coordinator": KEY,
    "max_rounds": 20,
    "metrics": {"auroc": 3, "brier": 4},
    "privacy": {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0},
}


def _with(path: str, value: object) -> dict:
    """VALID with the dotted ``path`` set to ``value`` (or removed, for ``...``)."""
    data = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    table = data
    for part in parents:
        table = table[part]
    if value is ...:
        del table[last]
    else:
        table[last] = value
    return data


# name: (dotted path to change, new value or ... to remove, field the error names, hint in the message)
INVALID = {
    "unknown top-level key": ("coordinator_id", KEY, "coordinator_id", "allowed:"),
    "unknown privacy key": ("privacy.epsilonn", 1.0, "privacy.epsilonn", "allowed:"),
    "coordinator missing": ("coordinator", ..., "coordinator", "required"),
    "coordinator not a key id": ("coordinator", "coordinator.example.org", "coordinator", "64 lower-case hex"),
    "coordinator upper-case hex": ("coordinator", "AB" * 32, "coordinator", "64 lower-case hex"),
    "max_rounds missing": ("max_rounds", ..., "max_rounds", "max_rounds = 50"),
    "max_rounds zero": ("max_rounds", 0, "max_rounds", "at least 1"),
    "min_cohort of one": ("min_cohort", 1, "min_cohort", "at least 2"),
    "min_cohort as text": ("min_cohort", "11", "min_cohort", "min_cohort = 11"),
    "min_cohort as float": ("min_cohort", 11.0, "min_cohort", "expected an integer"),
    "min_cohort as bool": ("min_cohort", True, "min_cohort", "expected an integer"),
    "secure aggregation as text": ("require_secure_aggregation", "yes", "require_secure_aggregation", "true or false"),
    "share_benchmark as text": ("share_benchmark", "no", "share_benchmark", "true or false"),
    "share_site_tables as text": ("share_site_tables", "no", "share_site_tables", "true or false"),
    "max_message_bytes negative": ("max_message_bytes", -1, "max_message_bytes", "at least 1"),
    "max_model_parameters as float": ("max_model_parameters", 1e6, "max_model_parameters", "expected an integer"),
    "metrics not a table": ("metrics", ["auroc"], "metrics", "[metrics] table"),
    "metric precision negative": ("metrics.auroc", -1, "metrics.auroc", "at least 0"),
    "metric precision float": ("metrics.auroc", 2.5, "metrics.auroc", "auroc = 3"),
    "metric precision huge": ("metrics.auroc", 40, "metrics.auroc", "at most 12"),
    "metric name with spaces": ("metrics.patient 17 age", 0, "metrics.patient 17 age", "must match"),
    "example count as a metric": ("metrics.num-examples", 0, "metrics.num-examples", "always shared"),
    "privacy missing": ("privacy", ..., "privacy", "epsilon = 8.0"),
    "privacy not a table": ("privacy", 8.0, "privacy", "[privacy] table"),
    "epsilon missing": ("privacy.epsilon", ..., "privacy.epsilon", "or inf for no DP"),
    "epsilon zero": ("privacy.epsilon", 0.0, "privacy.epsilon", "> 0 or inf"),
    "epsilon nan": ("privacy.epsilon", math.nan, "privacy.epsilon", "> 0 or inf"),
    "epsilon as text": ("privacy.epsilon", "8", "privacy.epsilon", "expected a number"),
    "delta missing with finite epsilon": ("privacy.delta", ..., "privacy.delta", "delta = 1e-5"),
    "delta of one": ("privacy.delta", 1.0, "privacy.delta", "(0, 1)"),
    "clipping norm missing": ("privacy.max_grad_norm", ..., "privacy.max_grad_norm", "max_grad_norm = 1.0"),
    "clipping norm infinite": ("privacy.max_grad_norm", math.inf, "privacy.max_grad_norm", "positive finite"),
    "noise multiplier zero": ("privacy.noise_multiplier", 0.0, "privacy.noise_multiplier", "positive finite"),
}


@pytest.mark.parametrize("case", INVALID.values(), ids=INVALID.keys())
def test_invalid_policy_is_refused_naming_the_field(case):
    path, value, field, hint = case
    with pytest.raises(ConfigError) as caught:
        SitePolicy.from_dict(_with(path, value), source="site.toml")
    assert caught.value.field == field
    assert caught.value.path == "site.toml"
    assert hint in str(caught.value)


@pytest.mark.parametrize("field", ["delta", "max_grad_norm", "noise_multiplier"])
def test_dp_fields_without_dp_are_refused(field):
    """epsilon = inf turns DP off; a leftover DP field would make the policy look protected."""
    privacy = {"epsilon": math.inf, field: 1e-5}
    with pytest.raises(ConfigError, match="epsilon = inf turns DP off") as caught:
        SitePolicy.from_dict({**VALID, "privacy": privacy})
    assert caught.value.field == f"privacy.{field}"


def test_defaults_and_round_trip():
    policy = SitePolicy.from_dict(VALID)
    assert policy.require_secure_aggregation is True
    assert policy.min_cohort == 11
    assert policy.privacy.noise_multiplier is None
    assert SitePolicy.from_dict(policy.to_dict()) == policy


def test_metrics_cannot_be_changed_after_loading():
    policy = SitePolicy.from_dict(VALID)
    with pytest.raises(TypeError):
        policy.metrics["ssn"] = 0  # type: ignore[index]


@pytest.mark.parametrize("role", ["hospital", "insurer", "pharma"])
def test_example_policies_load(role):
    policy = SitePolicy.load(EXAMPLES_DIR / f"{role}.toml")
    assert policy.require_secure_aggregation
    assert policy.min_cohort >= 11
    assert SitePolicy.from_dict(policy.to_dict()) == policy


def test_policy_file_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(f'coordinator = "{KEY}"\nmax_rounds = 5\nmin_cohort = 1\n[privacy]\nepsilon = inf\n')
    with pytest.raises(ConfigError, match=r"policy\.toml, field 'min_cohort': must be at least 2"):
        SitePolicy.load(path)
    path.write_text("coordinator = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        SitePolicy.load(path)
    with pytest.raises(ConfigError, match="policy file not found"):
        SitePolicy.load(tmp_path / "missing.toml")


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match="min_cohort"):
        SitePolicy(coordinator=KEY, privacy=PrivacySettings(epsilon=math.inf), max_rounds=3, min_cohort=0)


# --- check_job -----------------------------------------------------------------------------

POLICY = SitePolicy.from_dict(VALID)
JOB = JobRequest(
    kind="train",
    coordinator=KEY,
    rounds=10,
    secure_aggregation=True,
    min_cohort=11,
    outputs=("weights", "num-examples", "auroc"),
    model_parameters=5_000,
)


@pytest.mark.parametrize(
    "job",
    [
        JOB,
        dataclasses.replace(JOB, kind="evaluate", outputs=("sums", "num-examples", "auroc", "brier")),
        dataclasses.replace(JOB, kind="statistics", outputs=("sums",), model_parameters=0, rounds=1),
        dataclasses.replace(JOB, kind="analytics", outputs=("sums",), min_cohort=50),
        dataclasses.replace(JOB, kind="benchmark", outputs=("sums",)),
    ],
    ids=["train", "evaluate", "statistics", "analytics", "benchmark"],
)
def test_job_within_policy_is_accepted(job):
    check_job(POLICY, job)


# Each refusal names the rule, so the coordinator's user knows what to change.
REFUSED = {
    "unknown job kind": (dict(kind="export"), "unknown job kind 'export'"),
    "weights asked of an evaluate job": (dict(kind="evaluate"), "may send only sums"),
    "metric not shared by the site": (dict(outputs=("weights", "log_loss")), "'log_loss'"),
    "outputs as one string": (dict(outputs="weights"), "list of output names"),
    "zero rounds": (dict(rounds=0), "allows 1 to 20"),
}


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_job_outside_policy_is_refused_with_a_reason(case):
    changes, reason = case
    with pytest.raises(PolicyViolationError, match="the site policy refuses this job") as caught:
        check_job(POLICY, dataclasses.replace(JOB, **changes))
    assert reason in str(caught.value)


def test_a_site_that_does_not_share_benchmark_totals_refuses_a_benchmark_job():
    private = SitePolicy.from_dict({**VALID, "share_benchmark": False})
    check_job(private, JOB)
    with pytest.raises(PolicyViolationError, match="share_benchmark = false"):
        check_job(private, dataclasses.replace(JOB, kind="benchmark", outputs=("sums",)))


def test_every_mistake_of_a_policy_is_reported_together():
    data = {**_with("privacy.delta", 2.0), "min_cohort": "11", "share_benchmark": "no", "max_round": 3}
    with pytest.raises(ConfigError) as caught:
        SitePolicy.from_dict(data, source="site.toml")
    assert [error.field for error in caught.value.errors] == [
        "max_round",
        "privacy.delta",
        "min_cohort",
        "share_benchmark",
    ]
