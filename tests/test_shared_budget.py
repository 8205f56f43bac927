"""Runs that share a site's DP budget: an open run's planned rounds are held for it.

A site that derives its noise from the budget left used to price each run's round as if
that budget were the run's alone; with two runs open, the one that ended last trained its
last rounds at many times the noise, silently. Every figure here comes from the real
ledger (signed, on disk) and the real accountant.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcost.client import budget
from fedcost.errors import PrivacyBudgetExhausted
from fedcost.identity import Identity
from fedcost.models.spec import TrainConfig
from fedcost.privacy import ledger as ledger_module
from fedcost.privacy.distributed import SkellamRelease
from fedcost.privacy.dp import dp_sampling
from fedcost.privacy.ledger import ReleaseLedger
from fedcost.privacy.policy import PrivacySettings

DERIVED = PrivacySettings(epsilon=4.0, delta=1e-5, max_grad_norm=1.0)
TRAINING = TrainConfig(epochs=1, batch_size=64)
EXAMPLES = 800
ROUNDS = 4


@pytest.fixture
def ledger(tmp_path: Path) -> ReleaseLedger:
    return ReleaseLedger.open(tmp_path / "site.ledger", Identity.generate("site", "hospital"))


def pay(ledger: ReleaseLedger, run: str, round_: int, privacy: PrivacySettings = DERIVED) -> float:
    """One DP-SGD round of a ``ROUNDS``-round run; its noise multiplier."""
    dp, _, _ = budget.pay_for_round(
        ledger,
        privacy,
        examples=EXAMPLES,
        training=TRAINING,
        rounds_left=ROUNDS - round_ + 1,
        run_id=run,
        round=round_,
    )
    return dp.noise_multiplier


def spent(ledger: ReleaseLedger) -> float:
    return budget.accountant(ledger.spending, DERIVED).epsilon


def test_two_open_runs_each_train_every_round_at_the_noise_of_their_first(ledger: ReleaseLedger) -> None:
    """Interleaved round by round, a later run gets what the first leaves and keeps it to
    its last round; the first is never squeezed; together they exactly fit the budget."""
    first, second = [], []
    first.append(pay(ledger, "a", 1))
    second.append(pay(ledger, "b", 1))
    for round_ in range(2, ROUNDS + 1):
        first.append(pay(ledger, "a", round_))
        second.append(pay(ledger, "b", round_))
    assert max(first) == pytest.approx(min(first), rel=1e-3), first
    assert max(second) == pytest.approx(min(second), rel=1e-3), second
    assert second[0] > first[0]  # it started with less budget left, so it pays with more noise
    assert spent(ledger) == pytest.approx(DERIVED.epsilon, rel=1e-3)
    assert spent(ledger) <= DERIVED.epsilon


def test_a_run_that_starts_once_the_budget_is_held_is_refused_naming_the_open_run(ledger: ReleaseLedger) -> None:
    pay(ledger, "a", 1)
    before = ledger.spending
    with pytest.raises(PrivacyBudgetExhausted, match=r"open run\(s\).*a \(3 round\(s\)\).*close-run") as refused:
        pay(ledger, "b", 1, PrivacySettings(epsilon=4.0, delta=1e-5, max_grad_norm=1.0, noise_multiplier=0.8))
    assert "Traceback" not in str(refused.value)
    assert ledger.spending == before  # nothing recorded for the refused round


def test_closing_a_run_frees_what_it_held(ledger: ReleaseLedger) -> None:
    pay(ledger, "a", 1)
    assert set(ledger.held(besides="b")) == {"a"}
    ledger.end_run("a", reason="its coordinator was retired")
    assert ledger.held(besides="b") == {}
    sigma_b = pay(ledger, "b", 1)
    assert sigma_b < pay(ledger, "c", 1)  # c now prices after b's four held rounds


def test_the_last_round_holds_nothing_and_a_run_holds_nothing_for_itself(ledger: ReleaseLedger) -> None:
    for round_ in range(1, ROUNDS + 1):
        pay(ledger, "a", round_)
        assert ledger.held(besides="a") == {}
        held = ledger.held(besides="b")
        assert {run: rounds for run, (_, rounds) in held.items()} == ({"a": ROUNDS - round_} if round_ < ROUNDS else {})


def test_what_is_held_survives_the_node_reopening_its_ledger(tmp_path: Path) -> None:
    """A node reopens its ledger for every message, and a restarted node reads it from disk."""
    identity = Identity.generate("site", "hospital")
    with ReleaseLedger.open(tmp_path / "site.ledger", identity) as ledger:
        pay(ledger, "a", 1)
    ledger_module._CACHE.clear()
    with ReleaseLedger.open(tmp_path / "site.ledger", identity) as reopened:
        assert {run: rounds for run, (_, rounds) in reopened.held(besides="b").items()} == {"a": ROUNDS - 1}


def test_a_noisy_newton_sum_holds_its_runs_later_rounds(ledger: ReleaseLedger) -> None:
    """The exact GLM's noisy sums repeat every round too: a run's later ones are held, and a
    DP-SGD run started beside it prices its rounds after them."""
    release = SkellamRelease(variance=400.0, l1=3.0, l2=3.0)
    budget.pay_for_noisy_sum(ledger, DERIVED, release, run_id="glm", round=1, owed=ROUNDS - 1)
    held_release, rounds = ledger.held(besides="b")["glm"]
    assert rounds == ROUNDS - 1 and held_release == release.to_dict()
    one_off = SkellamRelease(variance=400.0, l1=1.0, l2=1.0)
    budget.pay_for_noisy_sum(ledger, DERIVED, one_off, run_id="stats", round=0)
    assert "stats" not in ledger.held(besides="b")
    sample_rate, steps = dp_sampling(EXAMPLES, TRAINING)
    alone = budget.accountant(ledger.spending, DERIVED).noise_multiplier_for(
        sample_rate=sample_rate, steps=steps * ROUNDS
    )
    assert pay(ledger, "b", 1) > alone
