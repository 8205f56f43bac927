"""The node's differential-privacy budget, paid in its release ledger before training.

The ledger (``fedcost.privacy.ledger``) is the budget's only record. A round is priced
and written to it, signed and fsynced, before its training starts, so a round that
crashes is still paid for and no restart can train twice on one payment; the audit
log's ``dp_round`` entry anchors the payment's place in the ledger, so a ledger that is
later deleted, cut short or rewritten fails closed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fedcost.models.training import TrainConfig
from fedcost.privacy.accounting import DpSgdSteps, PrivacyLedger, release_from_dict
from fedcost.privacy.distributed import SkellamRelease
from fedcost.privacy.dp import DPConfig, dp_config_for, dp_sampling
from fedcost.privacy.ledger import ReleaseLedger
from fedcost.privacy.policy import PrivacySettings


def accountant(spending: Iterable[Mapping[str, Any]], privacy: PrivacySettings) -> PrivacyLedger:
    """Every spend a release ledger recorded (DP-SGD rounds and noisy sums alike), under the
    site's current budget."""
    assert privacy.delta is not None  # required by PrivacySettings when DP is on
    return PrivacyLedger(privacy.epsilon, privacy.delta, history=[release_from_dict(spend) for spend in spending])


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
    """Price one DP-SGD round and record it in the ledger; returns its settings, the ε spent
    after it, and the ledger anchor for the audit log.

    ``PrivacyBudgetExhausted`` (nothing recorded) when the round does not fit the budget left.
    """
    spent_so_far = accountant(ledger.spending, privacy)
    sample_rate, steps = dp_sampling(examples, training)
    dp = dp_config_for(privacy, spent_so_far, sample_rate=sample_rate, steps=steps, rounds_left=rounds_left)
    spent = spent_so_far.spend(noise_multiplier=dp.noise_multiplier, sample_rate=sample_rate, steps=steps)
    release = DpSgdSteps(dp.noise_multiplier, sample_rate, steps)
    anchor = ledger.spend(release.to_dict(), run_id=run_id, round=round)
    return dp, spent, anchor


def pay_for_noisy_sum(
    ledger: ReleaseLedger, privacy: PrivacySettings, release: SkellamRelease, *, run_id: str, round: int
) -> tuple[float | None, tuple[int, str]]:
    """Record a noisy sum's spend in the ledger, after checking it fits the site's budget;
    returns the ε spent after it (None for a site without a budget, which still records the
    spend) and the ledger anchor for the audit log.

    ``PrivacyBudgetExhausted`` (nothing recorded) when it does not fit.
    """
    spent = None
    if privacy.enabled:
        spent = accountant(ledger.spending, privacy).spend_skellam(
            variance=release.variance, l1=release.l1, l2=release.l2
        )
    return spent, ledger.spend(release.to_dict(), run_id=run_id, round=round)
