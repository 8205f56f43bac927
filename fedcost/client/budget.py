"""The node's differential-privacy budget: a ledger file next to its audit log, paid before training.

The ledger (``fedcost.privacy.accounting.PrivacyLedger``) lives in
``<audit_dir>/<name>.privacy.json``. A round is priced and written to that file
atomically before its training starts, so a round that crashes is still paid for and
no restart can train twice on one payment.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedcost.files import replace_atomically
from fedcost.models.training import TrainConfig
from fedcost.privacy.accounting import PrivacyLedger
from fedcost.privacy.dp import DPConfig, dp_config_for, dp_sampling
from fedcost.privacy.policy import PrivacySettings

LEDGER_SUFFIX = ".privacy.json"


def ledger_path(audit_dir: Path, name: str) -> Path:
    return audit_dir / f"{name}{LEDGER_SUFFIX}"


def load_ledger(path: Path, privacy: PrivacySettings) -> PrivacyLedger:
    """The site's ledger under its current budget; a changed budget keeps the spent history."""
    assert privacy.delta is not None  # required by PrivacySettings when DP is on
    history = PrivacyLedger.from_dict(json.loads(path.read_text())).history if path.exists() else ()
    return PrivacyLedger(privacy.epsilon, privacy.delta, history=history)


def save_ledger(path: Path, ledger: PrivacyLedger) -> None:
    """Write the ledger atomically: never a half-written spend."""
    replace_atomically(path, json.dumps(ledger.to_dict()).encode())


def pay_for_round(
    path: Path, privacy: PrivacySettings, *, examples: int, training: TrainConfig, rounds_left: int
) -> tuple[DPConfig, float]:
    """Price one DP-SGD round, record it in the ledger file, and return its settings and ε spent.

    ``PrivacyBudgetExhausted`` (nothing recorded) when the round does not fit the budget left.
    """
    ledger = load_ledger(path, privacy)
    sample_rate, steps = dp_sampling(examples, training)
    dp = dp_config_for(privacy, ledger, sample_rate=sample_rate, steps=steps, rounds_left=rounds_left)
    spent = ledger.spend(noise_multiplier=dp.noise_multiplier, sample_rate=sample_rate, steps=steps)
    save_ledger(path, ledger)
    return dp, spent
