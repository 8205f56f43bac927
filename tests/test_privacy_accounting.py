"""The accountant: ε pinned against Opacus and known values, the ledger, the noise search."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp

from fedcost.errors import PrivacyBudgetExhausted
from fedcost.privacy.accounting import (
    NOISE_TOLERANCE,
    ORDERS,
    DpSgdSteps,
    PrivacyLedger,
    SkellamRelease,
    epsilon_spent,
    noise_multiplier_for,
)
from fedcost.privacy.distributed import VARIANCE_TOLERANCE, epsilon_from_rdp, skellam_rdp
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
    assert ledger.history == (DpSgdSteps(1.1, 0.01, 1000),)  # the refused round is not recorded
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


# --- DP-SGD and Skellam releases in one budget -----------------------------------------------

TRAINING = [(1.1, 0.01, 300), (0.9, 0.02, 200)]  # (noise multiplier, sample rate, steps)
# Two DP-SGD rounds and a count released with Skellam noise of variance 50, at delta = 1e-5; checked
# below against Opacus's RDP of the rounds plus distributed.skellam_rdp, composed and converted.
MIXED_EPSILON = 3.0653497660768636


def test_ledger_composes_dp_sgd_rounds_and_skellam_releases():
    ledger = PrivacyLedger(10.0, 1e-5)
    ledger.spend(noise_multiplier=1.1, sample_rate=0.01, steps=300)
    ledger.spend_skellam(variance=50.0, l1=1, l2=1)
    ledger.spend(noise_multiplier=0.9, sample_rate=0.02, steps=200)
    assert ledger.history == (DpSgdSteps(1.1, 0.01, 300), SkellamRelease(50.0, 1.0, 1.0), DpSgdSteps(0.9, 0.02, 200))
    training = sum(compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=ORDERS) for sigma, q, n in TRAINING)
    count = skellam_rdp(variance=50.0, l1=1, l2=1)
    assert ledger.epsilon == pytest.approx(epsilon_from_rdp(rdp=training + count, delta=1e-5), rel=1e-12)
    assert ledger.epsilon == pytest.approx(MIXED_EPSILON, rel=1e-9)
    # composed in RDP: dearer than either part, cheaper than adding their epsilons
    alone = opacus_epsilon(TRAINING, 1e-5), epsilon_from_rdp(rdp=count, delta=1e-5)
    assert max(alone) < ledger.epsilon < sum(alone)


def test_ledger_refuses_a_skellam_release_over_budget_without_recording_it():
    ledger = PrivacyLedger(2.2, 1e-5)
    ledger.spend(noise_multiplier=1.1, sample_rate=0.01, steps=1000)  # costs 1.71
    spent = ledger.epsilon
    with pytest.raises(PrivacyBudgetExhausted) as caught:
        ledger.spend_skellam(variance=5.0, l1=1, l2=1)  # would bring it to 2.81
    message = str(caught.value)
    assert "epsilon=2.2 at delta=1e-05" in message and "1.712 is spent" in message
    assert "this release (Skellam noise of variance 5, L1 sensitivity 1, L2 sensitivity 1) would bring" in message
    assert ledger.history == (DpSgdSteps(1.1, 0.01, 1000),) and ledger.epsilon == spent


def test_the_skellam_variance_found_fills_the_budget_left():
    ledger = PrivacyLedger(3.0, 1e-5)
    ledger.spend(noise_multiplier=1.1, sample_rate=0.01, steps=1000)
    variance = ledger.skellam_variance_for(l1=1, l2=1)
    with pytest.raises(PrivacyBudgetExhausted):
        ledger.spend_skellam(variance=variance * (1 - 2 * VARIANCE_TOLERANCE), l1=1, l2=1)
    assert 0.99 * 3.0 < ledger.spend_skellam(variance=variance, l1=1, l2=1) <= 3.0
    with pytest.raises(PrivacyBudgetExhausted, match="inf is already spent"):
        PrivacyLedger(1.0, 1e-5, [DpSgdSteps(0.0, 0.1, 1)]).skellam_variance_for(l1=1, l2=1)


def test_ledger_dict_form_holds_both_kinds_of_release():
    ledger = PrivacyLedger(4.0, 1e-5)
    ledger.spend(noise_multiplier=1.1, sample_rate=0.01, steps=500)
    ledger.spend_skellam(variance=400.0, l1=2, l2=1.5)
    assert ledger.to_dict() == {
        "accountant": "rdp",
        "epsilon_budget": 4.0,
        "delta": 1e-5,
        "history": [
            {"mechanism": "dp-sgd", "noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 500},
            {"mechanism": "skellam", "variance": 400.0, "l1": 2.0, "l2": 1.5},
        ],
    }
    restored = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert restored.history == ledger.history and restored.epsilon == ledger.epsilon


GOOD_LEDGER = {
    "accountant": "rdp",
    "epsilon_budget": 4.0,
    "delta": 1e-5,
    "history": [
        {"mechanism": "dp-sgd", "noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 500},
        {"mechanism": "skellam", "variance": 400.0, "l1": 2.0, "l2": 1.5},
    ],
}
SGD, SKELLAM = GOOD_LEDGER["history"]


def with_release(release: dict) -> dict:
    return {**GOOD_LEDGER, "history": [SGD, release]}


MALFORMED_LEDGERS = {
    "unknown key": {**GOOD_LEDGER, "spent": 0.0},
    "missing key": {k: v for k, v in GOOD_LEDGER.items() if k != "delta"},
    "other accountant": {**GOOD_LEDGER, "accountant": "prv"},
    "budget as a string": {**GOOD_LEDGER, "epsilon_budget": "4"},
    "delta as a bool": {**GOOD_LEDGER, "delta": True},
    "history not a list": {**GOOD_LEDGER, "history": {"0": SGD}},
    "old list entry": {**GOOD_LEDGER, "history": [[1.1, 0.01, 500]]},
    "unknown mechanism": with_release({**SKELLAM, "mechanism": "laplace"}),
    "mechanism not a string": with_release({**SKELLAM, "mechanism": ["skellam"]}),
    "no mechanism": with_release({k: v for k, v in SKELLAM.items() if k != "mechanism"}),
    "extra key in a release": with_release({**SKELLAM, "epsilon": 0.1}),
    "missing key in a release": with_release({k: v for k, v in SKELLAM.items() if k != "l2"}),
    "the other mechanism's keys": with_release({**SGD, "mechanism": "skellam"}),
    "negative variance": with_release({**SKELLAM, "variance": -1.0}),
    "variance as a string": with_release({**SKELLAM, "variance": "400"}),
    "nan sensitivity": with_release({**SKELLAM, "l1": math.nan}),
    "steps as a float": with_release({**SGD, "steps": 500.0}),
    "steps as a bool": with_release({**SGD, "steps": True}),
    "sample rate as a string": with_release({**SGD, "sample_rate": "0.01"}),
}


def test_the_good_ledger_loads():
    assert PrivacyLedger.from_dict(GOOD_LEDGER).to_dict() == GOOD_LEDGER


@pytest.mark.parametrize("data", MALFORMED_LEDGERS.values(), ids=MALFORMED_LEDGERS)
def test_a_malformed_ledger_is_refused(data):
    with pytest.raises(ValueError):
        PrivacyLedger.from_dict(data)


def test_a_bare_triple_in_a_history_is_dp_sgd_and_nothing_else_is_guessed():
    """The ledger's first form, which callers still pass; a Skellam release is always a SkellamRelease."""
    assert PrivacyLedger(4.0, 1e-5, [(1.1, 0.01, 500)]).history == (DpSgdSteps(1.1, 0.01, 500),)
    for entry in [(400.0, 2.0), {"variance": 400.0, "l1": 2.0, "l2": 1.5}, [1.1, 0.01, 500]]:
        with pytest.raises(TypeError, match="DpSgdSteps and SkellamRelease"):
            PrivacyLedger(4.0, 1e-5, [entry])


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
    ledger = PrivacyLedger(1.0, 1e-5, [DpSgdSteps(0.0, 0.1, 1)])
    assert ledger.epsilon == math.inf
    with pytest.raises(PrivacyBudgetExhausted, match="no noise multiplier"):
        ledger.noise_multiplier_for(sample_rate=0.02, steps=100)


def test_orders_are_opacus_own():
    assert ORDERS == tuple(RDPAccountant.DEFAULT_ALPHAS)


def test_loading_the_node_imports_neither_opacus_nor_matplotlib():
    """A deployed node imports its ClientApp once per message: opacus (torch.distributed) and
    matplotlib cost seconds there, and only DP accounting and the coordinator's report use them."""
    probe = (
        "import sys, fedcost.client.app; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'opacus', 'matplotlib'}))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
