"""The node's differential-privacy budget, paid in its release ledger before training.

The ledger (``fedcost.privacy.ledger``) is the budget's only record. A round is priced
and written to it, signed and fsynced, before its training starts, so a round that
crashes is still paid for and no restart can train twice on one payment; the audit
log's ``dp_round`` entry anchors the payment's place in the ledger, so a ledger that is
later deleted, cut short or rewritten fails closed.

Runs at one site share its budget. A run's per-round spend states how many more rounds it
has planned, and the ledger holds those for it until it closes, so every price here is
taken on what is spent *and held by other open runs*: a run that starts while another is
open gets what is left after the other's rounds (or a clear refusal), never budget the
other will need for its last rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from fedcost.errors import PrivacyBudgetExhausted
from fedcost.models.training import TrainConfig
from fedcost.privacy.accounting import DpSgdSteps, PrivacyLedger, release_from_dict
from fedcost.privacy.distributed import SkellamRelease
from fedcost.privacy.dp import DPConfig, dp_config_for, dp_sampling
from fedcost.privacy.ledger import ReleaseLedger
from fedcost.privacy.policy import PrivacySettings


def privacy_report(spends: Iterable[Mapping[str, Any]], privacy: PrivacySettings | None, run_id: str) -> dict:
    """What a site reports of its budget after run ``run_id``: ε spent over all its jobs
    (``spends``: its ledger's, as ``recorded_spending`` reads them), and the noise multiplier
    of this run's own DP-SGD rounds, so that a run priced on what other runs left says so."""
    if privacy is None or not privacy.enabled:
        return {"dp": False}
    spends = list(spends)
    ledger = accountant([spend["release"] for spend in spends], privacy)
    ours = [release_from_dict(spend["release"]) for spend in spends if spend["run_id"] == run_id]
    noise = [release.noise_multiplier for release in ours if isinstance(release, DpSgdSteps)]
    return {
        "dp": True,
        "epsilon_budget": ledger.epsilon_budget,
        "epsilon_spent": ledger.epsilon,
        "delta": ledger.delta,
        "rounds_trained": sum(isinstance(release, DpSgdSteps) for release in ledger.history),
        "noisy_sums": sum(isinstance(release, SkellamRelease) for release in ledger.history),
        "noise_multiplier": max(noise) if noise else None,
    }


def accountant(spending: Iterable[Mapping[str, Any]], privacy: PrivacySettings) -> PrivacyLedger:
    """Every spend a release ledger recorded (DP-SGD rounds and noisy sums alike), under the
    site's current budget."""
    assert privacy.delta is not None  # required by PrivacySettings when DP is on
    return PrivacyLedger(privacy.epsilon, privacy.delta, history=[release_from_dict(spend) for spend in spending])


T = TypeVar("T")


def committed(ledger: ReleaseLedger, privacy: PrivacySettings, run_id: str) -> PrivacyLedger:
    """The budget as run ``run_id`` must see it: every spend so far, and every round the
    site's other open runs have planned and not yet paid."""
    held = [release for release, rounds in ledger.held(besides=run_id).values() for _ in range(rounds)]
    return accountant([*ledger.spending, *held], privacy)


def fitting(ledger: ReleaseLedger, run_id: str, price: Callable[[], T]) -> T:
    """``price()``, with a refusal that names the open runs whose held rounds it counted."""
    try:
        return price()
    except PrivacyBudgetExhausted as error:
        held = ledger.held(besides=run_id)
        if not held:
            raise
        runs = ", ".join(f"{run} ({rounds} round(s))" for run, (_, rounds) in sorted(held.items()))
        raise PrivacyBudgetExhausted(
            f"{error}; what is spent counts the rounds that open run(s) at this site still have to pay: {runs}. "
            "Run DP jobs at this site one after another, or, for a run that will not come back, close it here "
            "(`fedcost node close-run KIT RUN_ID --reason TEXT`, with the node stopped)"
        ) from None


def pay_for_round(
    ledger: ReleaseLedger,
    privacy: PrivacySettings,
    *,
    examples: int,
    training: TrainConfig,
    rounds_left: int,
    run_id: str,
    round: int,
) -> tuple[DPConfig, float, tuple[int, str]]:
    """Price one DP-SGD round and record it in the ledger, with this run's ``rounds_left - 1``
    later rounds held for it; returns its settings, the ε spent after it, and the ledger
    anchor for the audit log.

    ``PrivacyBudgetExhausted`` (nothing recorded) when the round does not fit the budget
    left after what other open runs hold.
    """
    sample_rate, steps = dp_sampling(examples, training)

    def price() -> DPConfig:
        budget = committed(ledger, privacy, run_id)
        dp = dp_config_for(privacy, budget, sample_rate=sample_rate, steps=steps, rounds_left=rounds_left)
        budget.spend(noise_multiplier=dp.noise_multiplier, sample_rate=sample_rate, steps=steps)
        return dp

    dp = fitting(ledger, run_id, price)
    spent = accountant(ledger.spending, privacy).spend(
        noise_multiplier=dp.noise_multiplier, sample_rate=sample_rate, steps=steps
    )
    release = DpSgdSteps(dp.noise_multiplier, sample_rate, steps)
    anchor = ledger.spend(release.to_dict(), run_id=run_id, round=round, owed=rounds_left - 1)
    return dp, spent, anchor


def pay_for_noisy_sum(
    ledger: ReleaseLedger,
    privacy: PrivacySettings,
    release: SkellamRelease,
    *,
    run_id: str,
    round: int,
    owed: int | None = None,
) -> tuple[float | None, tuple[int, str]]:
    """Record a noisy sum's spend in the ledger, after checking it fits the site's budget
    left after what other open runs hold; returns the ε spent after it (None for a site
    without a budget, which still records the spend) and the ledger anchor for the audit log.
    ``owed``: for a sum the run repeats every round, its rounds after this one (held for it).

    ``PrivacyBudgetExhausted`` (nothing recorded) when it does not fit.
    """
    spent = None
    if privacy.enabled:
        noisy = {"variance": release.variance, "l1": release.l1, "l2": release.l2}
        fitting(ledger, run_id, lambda: committed(ledger, privacy, run_id).spend_skellam(**noisy))
        spent = accountant(ledger.spending, privacy).spend_skellam(**noisy)
    return spent, ledger.spend(release.to_dict(), run_id=run_id, round=round, owed=owed)
