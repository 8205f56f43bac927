"""Site control: the site policy, the egress guard's checks and differential privacy.

Pure core: no Flower, no network. The node uses it in this order:

1. ``policy.check_job(SitePolicy.load(path), JobRequest(...))`` before reading any data;
   ``PolicyViolationError`` carries the reason to show the coordinator's user.
2. per DP round: ``dp.dp_sampling`` gives (sample rate, steps); ``dp.dp_config_for`` the
   noise; ``accounting.PrivacyLedger.spend`` pays for it (``PrivacyBudgetExhausted``
   before an over-budget round); persist ``ledger.to_dict()``; then ``dp.train_local_dp``.
3. every reply: ``egress.inspect_outgoing(policy, OutgoingMessage(...))``; send the
   decision's sanitised content, or ``egress.error_reply_reason(decision)``.

``dp`` and ``accounting`` import torch and Opacus, so they are not re-exported here.
"""

from fedcost.privacy.egress import EgressDecision, OutgoingMessage, error_reply_reason, inspect_outgoing
from fedcost.privacy.policy import MIN_COHORT, MIN_SECURE_SITES, JobRequest, PrivacySettings, SitePolicy, check_job

__all__ = [
    "EgressDecision",
    "JobRequest",
    "MIN_COHORT",
    "MIN_SECURE_SITES",
    "OutgoingMessage",
    "PrivacySettings",
    "SitePolicy",
    "check_job",
    "error_reply_reason",
    "inspect_outgoing",
]
