"""The accountant: ε pinned against Opacus and known values, the ledger, the noise search."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from opacus.accountants import RDPAccountant

from fedcost.errors import PrivacyBudgetExhausted
from fedcost.privacy.accounting import NOISE_TOLERANCE, PrivacyLedger, epsilon_spent, noise_multiplier_for
from fedcost.privacy.dp import DPConfig, dp_config_for
from fedcost.privacy.policy import PrivacySettings

# (noise multiplier, sample rate, steps, delta) -> epsilon (RDP, Opacus 1.6 orders)
PINNED = {
    (1.1, 0.01, 1000, 1e-5): 1.7117700912203435,
    (0.8, 0.004, 2500, 1e-6): 2.774559826490835,
    (2.0, 0.05, 300, 1e-5): 2.118283247596038,
}


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """The library's own answer, through its public stateful accountant."""
    accountant = RDPAccountant()
    for noise_multiplier, sample_rate, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize("params, expected", PINNED.items(), ids=[str(k) for k in PINNED])
def test_epsilon_equals_opacus_and_the_pinned_value(params, expected):
    noise_multiplier, sample_rate, steps, delta = params
    epsilon = epsilon_spent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta)
    assert epsilon == pytest.approx(opacus_epsilon([(noise_multiplier, sample_rate, steps)], delta), rel=1e-12)
    assert epsilon == pytest.approx(expected, rel=1e-9)


def test_no_noise_is_no_privacy_and_no_steps_cost_nothing():
    assert epsilon_spent(noise_multiplier=0.0, sample_rate=0.1, steps=1, delta=1e-5) == math.inf
    assert epsilon_spent(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(noise_multiplier=-1.0, sample_rate=0.1, steps=1, delta=1e-5),
        dict(noise_multiplier=1.0, sample_rate=0.0, steps=1, delta=1e-5),
        dict(noise_multiplier=1.0, sample_rate=1.5, steps=1, delta=1e-5),
        dict(noise_multiplier=1.0, sample_rate=0.1, steps=1.5, delta=1e-5),
        dict(noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=0.0),
    ],
)
def test_out_of_range_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        epsilon_spent(**kwargs)


def test_ledger_composes_rounds_like_opacus():
    ledger = PrivacyLedger(10.0, 1e-5)
    rounds = [(1.1, 0.01, 300), (0.9, 0.02, 200)]
    for noise_multiplier, sample_rate, steps in rounds:
        ledger.spend(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    assert ledger.epsilon == pytest.approx(opacus_epsilon(rounds, 1e-5), rel=1e-12)


def test_ledger_refuses_a_round_that_would_exceed_the_budget():
    ledger = PrivacyLedger(2.2, 1e-5)
    round_ = dict(noise_multiplier=1.1, sample_rate=0.01, steps=1000)  # costs 1.71 alone
    assert ledger.spend(**round_) == pytest.approx(1.7117700912203435)
    assert not ledger.can_afford(**round_)
    with pytest.raises(PrivacyBudgetExhausted) as caught:
        ledger.spend(**round_)
    message = str(caught.value)
    assert "epsilon=2.2 at delta=1e-05" in message and "1.712 is spent" in message and "would bring it to" in message
    assert ledger.history == ((1.1, 0.01, 1000),)  # the refused round is not recorded
    assert ledger.can_afford(noise_multiplier=1.1, sample_rate=0.01, steps=100)


def test_ledger_persists_across_rounds():
    ledger = PrivacyLedger(4.0, 1e-5)
    ledger.spend(noise_multiplier=1.1, sample_rate=0.01, steps=500)
    restored = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert restored.history == ledger.history
    assert restored.epsilon == ledger.epsilon
    with pytest.raises(ValueError, match="keys"):
        PrivacyLedger.from_dict({**ledger.to_dict(), "spent": 0.0})
    with pytest.raises(ValueError, match="finite budget"):
        PrivacyLedger(math.inf, 1e-5)


@pytest.mark.parametrize("params, expected", PINNED.items(), ids=[str(k) for k in PINNED])
def test_noise_multiplier_for_inverts_epsilon_spent(params, expected):
    noise_multiplier, sample_rate, steps, delta = params
    found = noise_multiplier_for(epsilon=expected, delta=delta, sample_rate=sample_rate, steps=steps)
    assert found == pytest.approx(noise_multiplier, rel=2 * NOISE_TOLERANCE)
    assert epsilon_spent(noise_multiplier=found, sample_rate=sample_rate, steps=steps, delta=delta) <= expected


def test_derived_noise_makes_the_job_fit_the_budget_exactly():
    """Without a policy noise multiplier, σ is asked afresh each round for the rounds left."""
    privacy = PrivacySettings(epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
    ledger = PrivacyLedger(privacy.epsilon, privacy.delta)
    sigmas = []
    for rounds_left in (3, 2, 1):
        dp = dp_config_for(privacy, ledger, sample_rate=0.02, steps=100, rounds_left=rounds_left)
        ledger.spend(noise_multiplier=dp.noise_multiplier, sample_rate=0.02, steps=100)
        sigmas.append(dp.noise_multiplier)
    assert 0.99 * privacy.epsilon < ledger.epsilon <= privacy.epsilon
    assert max(sigmas) < 1.01 * min(sigmas)  # the same noise every round, as planned


def test_policy_noise_multiplier_is_used_until_the_budget_is_spent():
    privacy = PrivacySettings(epsilon=3.0, delta=1e-5, max_grad_norm=0.5, noise_multiplier=1.3)
    ledger = PrivacyLedger(privacy.epsilon, privacy.delta)
    dp = dp_config_for(privacy, ledger, sample_rate=0.02, steps=100, rounds_left=5)
    assert dp == DPConfig(max_grad_norm=0.5, noise_multiplier=1.3)
    with pytest.raises(PrivacyBudgetExhausted):
        for _ in range(100):
            ledger.spend(noise_multiplier=dp.noise_multiplier, sample_rate=0.02, steps=100)
    assert ledger.epsilon <= privacy.epsilon


def test_no_noise_fits_a_spent_budget():
    ledger = PrivacyLedger(1.0, 1e-5, [(0.0, 0.1, 1)])
    assert ledger.epsilon == math.inf
    with pytest.raises(PrivacyBudgetExhausted, match="no noise multiplier"):
        ledger.noise_multiplier_for(sample_rate=0.02, steps=100)


def test_orders_are_opacus_own():
    from fedcost.privacy.accounting import ORDERS

    assert ORDERS == tuple(RDPAccountant.DEFAULT_ALPHAS)


def test_loading_the_node_imports_neither_opacus_nor_matplotlib():
    """A deployed node imports its ClientApp once per message: opacus (torch.distributed) and
    matplotlib cost seconds there, and only DP accounting and the coordinator's report use them."""
    probe = "import sys, fedcost.client.app; print(sorted({m.split('.')[0] for m in sys.modules} & {'opacus', 'matplotlib'}))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
