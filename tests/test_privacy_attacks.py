"""An adversarial coordinator against a site's policy: each test names what it tries.

The coordinator controls the jobs it sends and, through them, what node code computes.
The site refuses the job before reading data (``check_job``) and, as a second wall,
refuses the reply before it leaves (``inspect_outgoing``). Refusal reasons sent back
must never carry the data being smuggled.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fedcost.errors import PolicyViolationError
from fedcost.privacy import (
    JobRequest,
    OutgoingMessage,
    PrivacySettings,
    SitePolicy,
    check_job,
    error_reply_reason,
    inspect_outgoing,
)

KEY = "ab" * 32
POLICY = SitePolicy(
    coordinator=KEY,
    privacy=PrivacySettings(epsilon=8.0, delta=1e-5, max_grad_norm=1.0),
    max_rounds=20,
    metrics={"auroc": 3, "brier": 4},
    max_model_parameters=10_000,
)
PLAIN_POLICY = dataclasses.replace(POLICY, require_secure_aggregation=False)
JOB = JobRequest(
    kind="train",
    coordinator=KEY,
    rounds=10,
    secure_aggregation=True,
    min_cohort=11,
    outputs=("weights", "num-examples", "auroc"),
    model_parameters=5_000,
)
DIM = 100
MASKED = OutgoingMessage(
    kind="train",
    stage="masked-input",
    arrays={"masked": np.arange(DIM, dtype=np.uint64)},
    metrics={"num-examples": 500, "auroc": 0.8123456},
    configs={"stage": "masked-input", "node_id": 3, "name": "general-hospital", "role": "hospital"},
    cohort_size=500,
    expected_arrays={"masked": (DIM,)},
)
PLAIN = dataclasses.replace(
    MASKED,
    stage=None,
    arrays={
        "heads.readmission.weight": np.zeros((1, 8), np.float32),
        "heads.readmission.bias": np.zeros(1, np.float32),
    },
    configs={"name": "general-hospital", "role": "hospital"},
    expected_arrays={"heads.readmission.weight": (1, 8), "heads.readmission.bias": (1,)},
)


def refused_job(**changes) -> str:
    with pytest.raises(PolicyViolationError) as caught:
        check_job(POLICY, dataclasses.replace(JOB, **changes))
    return str(caught.value)


def refused_message(message: OutgoingMessage, policy: SitePolicy = POLICY) -> str:
    """The reason the node sends back; the content it was about to send must not be in it."""
    decision = inspect_outgoing(policy, message)
    assert not decision.allowed
    assert not decision.arrays and not decision.metrics and not decision.configs
    return error_reply_reason(decision)


def test_the_unattacked_messages_pass():
    assert inspect_outgoing(POLICY, MASKED).allowed
    assert inspect_outgoing(PLAIN_POLICY, PLAIN).allowed


def test_job_from_an_unknown_coordinator_is_refused():
    assert "this site trusts only" in refused_job(coordinator="cd" * 32)


def test_job_asking_for_raw_rows_is_refused():
    for kind in ("train", "evaluate", "statistics", "analytics"):
        assert "raw rows never leave a site" in refused_job(kind=kind, outputs=("num-examples", "rows"))


def test_job_asking_for_per_record_predictions_is_refused():
    assert "per-record predictions" in refused_job(kind="evaluate", outputs=("sums", "predictions"))


def test_job_asking_for_an_unknown_metric_is_refused():
    assert "'ssn_checksum'" in refused_job(outputs=("weights", "ssn_checksum"))


def test_min_cohort_lowered_to_1_is_refused():
    assert "below this site's min_cohort 11" in refused_job(min_cohort=1)
    assert "below" in refused_job(kind="analytics", outputs=("sums",), min_cohort=10)


def test_more_rounds_than_policy_allows_is_refused():
    assert "allows 1 to 20" in refused_job(rounds=21)


def test_secure_aggregation_switched_off_when_required_is_refused():
    assert "requires secure aggregation" in refused_job(secure_aggregation=False)
    # The second wall: the reply itself would leave unmasked.
    assert "requires secure aggregation" in refused_message(PLAIN, POLICY)


def test_metric_over_3_row_subgroup_is_refused():
    subgroup = dataclasses.replace(MASKED, arrays={}, metrics={"num-examples": 3, "auroc": 0.5}, cohort_size=3)
    reason = refused_message(subgroup)
    assert "min_cohort (11)" in reason
    assert "3" not in reason  # the refusal must not reveal the subgroup's size


def test_update_over_a_cohort_below_the_minimum_is_refused():
    small = dataclasses.replace(MASKED, metrics={"num-examples": 10}, cohort_size=10)
    assert "min_cohort" in refused_message(small)


def test_data_smuggled_in_metric_names_is_refused():
    smuggled = "patient_4711_dob_1951-03-02_dx_F32"
    reason = refused_message(dataclasses.replace(MASKED, metrics={"num-examples": 500, smuggled: 1.0}))
    assert "whitelist" in reason
    assert "4711" not in reason


def test_data_smuggled_in_the_example_count_is_refused():
    """An integer carries 64 bits; the count must be exactly the cohort's size."""
    reason = refused_message(dataclasses.replace(MASKED, metrics={"num-examples": 19510302}))
    assert "19510302" not in reason


def test_data_smuggled_in_metric_values_is_limited_to_the_policy_precision():
    message = dataclasses.replace(MASKED, metrics={"auroc": 0.51951030247110001, "num-examples": 500})
    decision = inspect_outgoing(POLICY, message)
    assert decision.metrics["auroc"] == 0.52


@pytest.mark.parametrize(
    "configs",
    [
        {"name": "general-hospital", "role": "hospital", "note": "age=87 dx=F32"},
        {"name": "age=87;dx=F32", "role": "hospital"},
        {"name": "h" * 65, "role": "hospital"},
        {"name": "general-hospital", "role": "F32 depressive episode"},
        {"name": "general-hospital", "role": "hospital", "stage": "masked-input;age=87"},
        {"name": "general-hospital", "role": "hospital", "node_id": "age=87"},
        {"name": "general-hospital", "role": "hospital", "mask_key": b"87 F32"},  # a key of another stage
    ],
    ids=["unknown key", "odd characters in name", "long name", "role", "stage", "protocol int as text", "other stage"],
)
def test_data_smuggled_in_string_values_is_refused(configs):
    reason = refused_message(dataclasses.replace(MASKED, configs=configs))
    assert "87" not in reason and "F32" not in reason


def test_oversized_model_is_refused():
    assert "at most 10000" in refused_job(model_parameters=10_001)
    big = dataclasses.replace(
        MASKED, arrays={"masked": np.zeros(10_001, np.uint64)}, expected_arrays={"masked": (10_001,)}
    )
    assert "max_model_parameters (10000)" in refused_message(big)
    small_messages = dataclasses.replace(POLICY, max_message_bytes=700)
    assert "max_message_bytes (700)" in refused_message(MASKED, small_messages)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_model_is_refused(bad):
    weight = np.zeros((1, 8), np.float32)
    weight[0, 3] = bad
    poisoned = dataclasses.replace(PLAIN, arrays={**PLAIN.arrays, "heads.readmission.weight": weight})
    assert "NaN or infinite" in refused_message(poisoned, PLAIN_POLICY)
    assert "NaN or infinite" in refused_message(dataclasses.replace(MASKED, metrics={"auroc": bad}))


@pytest.mark.parametrize(
    "arrays",
    [
        {"masked": np.arange(DIM + 1, dtype=np.uint64)},  # the wrong size
        {"masked": np.arange(DIM, dtype=np.uint64).reshape(10, 10)},  # the wrong shape
        {"rows": np.arange(DIM, dtype=np.uint64)},  # not a vector the job produces
        {"masked": np.arange(DIM, dtype=np.uint64), "extra": np.arange(DIM, dtype=np.uint64)},
        {"masked": np.arange(DIM, dtype=np.float64)},  # not a masked vector at all
    ],
    ids=["size", "shape", "name", "extra array", "dtype"],
)
def test_per_record_values_disguised_as_an_update_are_refused(arrays):
    reason = refused_message(dataclasses.replace(MASKED, arrays=arrays))
    assert "rows" not in reason and "extra" not in reason


def test_arrays_sent_in_a_key_exchange_stage_are_refused():
    keys = dataclasses.replace(MASKED, stage="share-keys", configs={"stage": "share-keys"})
    assert "stage 'share-keys'" in refused_message(keys)


@pytest.mark.parametrize(
    "kind, stage", [("system", None), ("exfiltrate", None), ("train", "export-rows"), ("train", "setup")]
)
def test_unknown_message_type_is_refused(kind, stage):
    assert "unknown message kind or stage" in refused_message(dataclasses.replace(MASKED, kind=kind, stage=stage))
