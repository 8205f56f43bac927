"""What the egress guard lets through, and in what form (the refusals: test_privacy_attacks)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from fedcost.privacy import OutgoingMessage, PrivacySettings, SitePolicy, error_reply_reason, inspect_outgoing
from fedcost.secagg import Coordinator, Node, RoundConfig, Stage
from fedcost.secagg.prg import word

POLICY = SitePolicy(
    coordinator="ab" * 32,
    privacy=PrivacySettings(epsilon=8.0, delta=1e-5, max_grad_norm=1.0),
    max_rounds=20,
    metrics={"auroc": 3, "brier": 4, "mae": 0, "train-loss": 2},
)
EVALUATE = OutgoingMessage(
    kind="evaluate",
    stage=None,
    arrays={"readmission": np.linspace(0.0, 1.0, 2004), "cost": np.ones(5)},
    metrics={"num-examples": 240, "auroc": 0.734567, "brier": 0.123456789, "mae": 1234.5678, "train-loss": 7},
    configs={"name": "st-mary", "role": "hospital"},
    cohort_size=240,
    expected_arrays={"readmission": (2004,), "cost": (5,)},
)


def test_allowed_messages_pass_with_metrics_rounded_to_the_policy_precision():
    decision = inspect_outgoing(dataclasses.replace(POLICY, require_secure_aggregation=False), EVALUATE)
    assert decision.allowed, decision.detail
    rounded = {"num-examples": 240, "auroc": 0.735, "brier": 0.1235, "mae": 1235.0, "train-loss": 7.0}
    assert dict(decision.metrics) == rounded
    assert dict(decision.configs) == {"name": "st-mary", "role": "hospital"}
    assert set(decision.arrays) == {"readmission", "cost"}


def test_sanitised_arrays_are_read_only_copies():
    """What was inspected is what leaves: node code cannot change it afterwards."""
    arrays = {"readmission": np.linspace(0.0, 1.0, 2004), "cost": np.ones(5)}
    decision = inspect_outgoing(
        dataclasses.replace(POLICY, require_secure_aggregation=False), dataclasses.replace(EVALUATE, arrays=arrays)
    )
    arrays["cost"][0] = 1e9
    assert decision.arrays["cost"][0] == 1.0
    with pytest.raises(ValueError):
        decision.arrays["cost"][0] = 1e9


def test_identity_only_reply_needs_no_cohort():
    decision = inspect_outgoing(POLICY, dataclasses.replace(EVALUATE, arrays={}, metrics={}, cohort_size=0))
    assert decision.allowed


def test_every_reply_of_a_real_secure_aggregation_round_passes():
    """The protocol whitelist matches fedcost.secagg's replies, stage by stage."""
    config = RoundConfig.create(run_id="egress", round=1, node_ids=(1, 2, 3), dim=6, bits=20)
    keys = {u: Ed25519PrivateKey.generate() for u in config.node_ids}
    identities = {u: key.public_key() for u, key in keys.items()}
    nodes = {u: Node(u, keys[u], identities) for u in config.node_ids}
    coordinator = Coordinator(config, identities)
    requests = coordinator.start()
    stages = set()
    while not coordinator.done:
        replies = []
        for u, request in requests.items():
            vector = np.full(6, u, dtype=word(config.bits)) if request.stage is Stage.MASKED_INPUT else None
            reply = nodes[u].handle(request, vector=vector)
            fields = reply.to_dict()
            arrays = {k: v for k, v in fields.items() if isinstance(v, np.ndarray)}
            configs = {k: v for k, v in fields.items() if k not in arrays}
            message = OutgoingMessage(
                kind="train",
                stage=reply.stage.value,
                arrays=arrays,
                metrics={},
                configs={**configs, "name": f"node-{u}", "role": "insurer"},
                cohort_size=500,
                expected_arrays={"masked": (6,)},
            )
            decision = inspect_outgoing(POLICY, message)
            assert decision.allowed, (reply.stage, decision.detail)
            stages.add(reply.stage)
            replies.append(reply)
        requests = coordinator.handle(replies)
    assert stages == set(Stage) - {Stage.SETUP}
    assert coordinator.result.total.tolist() == [6] * 6


def test_refusal_keeps_the_detail_for_the_site_log_only():
    smuggled = dataclasses.replace(EVALUATE, metrics={"num-examples": 240, "dob_1951_03_02": 1.0})
    decision = inspect_outgoing(dataclasses.replace(POLICY, require_secure_aggregation=False), smuggled)
    assert "dob_1951_03_02" in decision.detail
    assert "dob_1951_03_02" not in error_reply_reason(decision)


def test_an_allowed_decision_has_no_refusal_to_report():
    decision = inspect_outgoing(dataclasses.replace(POLICY, require_secure_aggregation=False), EVALUATE)
    with pytest.raises(ValueError, match="allowed"):
        error_reply_reason(decision)


@given(value=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12))
def test_shared_metrics_never_carry_more_decimals_than_the_policy(value):
    message = dataclasses.replace(EVALUATE, arrays={}, metrics={"brier": value})
    shared = inspect_outgoing(POLICY, message).metrics["brier"]
    assert shared == round(shared, 4)
    assert abs(shared - value) <= 0.5e-4 * (1 + 1e-9) + abs(value) * 1e-15


@pytest.mark.parametrize(
    "change,reason",
    [
        ({}, None),
        ({"signature": bytes(63)}, "config field 'signature' whose value has the wrong form"),
        ({"signature": "ab" * 64}, "config field 'signature' whose value has the wrong form"),
        ({"survivors": [1, 2, 3]}, "config field outside the site's whitelist"),
    ],
)
def test_a_consistency_reply_carries_its_node_id_and_one_signature_only(change, reason):
    configs = {"stage": "consistency", "node_id": 3, "signature": bytes(64), "name": "node-3", "role": "insurer"}
    message = OutgoingMessage(
        kind="train",
        stage="consistency",
        arrays={},
        metrics={},
        configs={**configs, **change},
        cohort_size=500,
        expected_arrays={},
    )
    decision = inspect_outgoing(POLICY, message)
    assert decision.allowed == (reason is None), decision.detail
    if reason:
        assert reason in decision.reason
