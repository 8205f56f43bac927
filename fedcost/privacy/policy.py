"""A site's policy: what may leave the site, and the check of a job against it.

The policy is a TOML file that the site writes and only the site can change: the
coordinator it trusts, whether secure aggregation is required, the smallest cohort
any shared statistic may describe, the metrics the site shares (and at what precision),
its differential-privacy budget and hard limits on rounds and sizes. See
``configs/policies/*.toml`` for one commented example per role.

``check_job`` runs before the node reads any data; the egress guard
(:mod:`fedcost.privacy.egress`) checks every outgoing message against the same policy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fedcost.errors import FieldError, PolicyViolationError
from fedcost.tomlfile import example, read_table, read_toml
from fedcost.wire.purposes import EXAMPLES, PURPOSES

_refusal = PolicyViolationError.job_refused

# The smallest cohort a shared statistic may describe unless a policy or run asks for
# more: the small-cell rule (counts of 1 to 10 suppressed) that CMS and most registries
# apply to published health data.
MIN_COHORT = 11
# The fewest sites a secure sum may add up: with two, each could subtract its own input
# from the sum and read the other's.
MIN_SECURE_SITES = 3
# A key id is the SHA-256 (hex) of the coordinator's raw Ed25519 public key
# (``fedcost.identity.PublicIdentity.key_id``).
_KEY_ID = re.compile(r"[0-9a-f]{64}")
_METRIC_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
MAX_PRECISION = 12

# What each kind of job may ask for besides the site's whitelisted metrics.
_KIND_OUTPUTS = {name: tuple(dict.fromkeys((*purpose.outputs, EXAMPLES))) for name, purpose in PURPOSES.items()}
JOB_KINDS = tuple(_KIND_OUTPUTS)
# Outputs no policy can allow, with the reason shown to the user.
_NEVER = {
    "rows": "raw rows never leave a site",
    "predictions": "per-record predictions are per-record values and never leave a site",
    "identifiers": "record identifiers never leave a site",
    "gradients": "per-example gradients are per-record values and never leave a site",
}
_OUTPUT_NAMES = {output for outputs in _KIND_OUTPUTS.values() for output in outputs} | set(_NEVER)


def _at_least(where: str, value: int, minimum: int, hint: str) -> None:
    if value < minimum:
        raise FieldError(where, f"must be at least {minimum}, got {value}; write e.g. {hint}")


@dataclass(frozen=True)
class StatisticsPrivacy:
    """``[privacy.statistics]``: the site releases sums other than training updates (feature
    statistics, tables, evaluation and benchmark totals) only with distributed DP noise, and
    a job's such sums together may spend at most ``epsilon`` (at the site's delta) of its budget."""

    epsilon: float = field(metadata=example("epsilon = 1.0"))

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise FieldError("epsilon", f"must be a positive finite number, got {self.epsilon}")


@dataclass(frozen=True)
class PrivacySettings:
    """The site's record-level DP budget (Abadi et al. 2016) for all it releases.

    ``epsilon = inf`` means no differential privacy: then ``delta``, ``max_grad_norm`` and
    ``noise_multiplier`` must be absent, so a policy never looks protected when it is not.
    With a finite ``epsilon``, ``delta`` and ``max_grad_norm`` are required. Without a
    ``noise_multiplier`` the node derives one per round from the budget left and the
    rounds left (:func:`fedcost.privacy.dp.dp_config_for`), so the job's rounds exactly
    fit the budget; with one, rounds run at that noise until the budget is spent.
    ``statistics`` (needs a finite ``epsilon``): every other sum the site releases carries
    distributed DP noise, paid from the same budget (``StatisticsPrivacy``).
    """

    epsilon: float = field(metadata=example("epsilon = 8.0 (or inf for no DP)"))
    delta: float | None = field(default=None, metadata=example("delta = 1e-5"))
    max_grad_norm: float | None = field(default=None, metadata=example("max_grad_norm = 1.0"))
    noise_multiplier: float | None = field(default=None, metadata=example("noise_multiplier = 1.0"))
    statistics: StatisticsPrivacy | None = None

    def __post_init__(self) -> None:
        if math.isnan(self.epsilon) or self.epsilon <= 0:
            raise FieldError("epsilon", f"must be > 0 or inf, got {self.epsilon}; write e.g. epsilon = 8.0")
        if not self.enabled:
            for name in ("delta", "max_grad_norm", "noise_multiplier", "statistics"):
                if getattr(self, name) is not None:
                    raise FieldError(name, "epsilon = inf turns DP off; remove this field or set a finite epsilon")
            return
        if self.delta is None:
            raise FieldError("delta", "required with a finite epsilon; write e.g. delta = 1e-5 (below 1/rows)")
        if not 0 < self.delta < 1:
            raise FieldError("delta", f"must lie in (0, 1), got {self.delta}; write e.g. delta = 1e-5")
        if self.max_grad_norm is None:
            raise FieldError("max_grad_norm", "required with a finite epsilon; write e.g. max_grad_norm = 1.0")
        for name in ("max_grad_norm", "noise_multiplier"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise FieldError(name, f"must be a positive finite number, got {value}; write e.g. {name} = 1.0")

    @property
    def enabled(self) -> bool:
        """Whether the site trains with differential privacy at all."""
        return math.isfinite(self.epsilon)


@dataclass(frozen=True)
class SitePolicy:
    """What may leave a site. Limits are per job; ``metrics`` maps a metric to its decimal places;
    ``share_benchmark`` says whether the site shares its risk-adjusted totals after training;
    ``share_site_tables`` whether a statistics table may show the site's own cells beside the
    other sites' (a table by site: its group costing, cost and payment per disease group);
    ``share_episodes`` whether the site takes part in the episode linkage (a hospital
    releases its stays' totals and the sums payers paid within its episode windows; a payer
    answers hospitals' private intersection-sums): off unless the site turns it on;
    ``min_nodes`` is the fewest sites any secure sum of this site's may add up (at least 3)."""

    coordinator: str = field(metadata=example('coordinator = "<64 hex digits>"'))
    privacy: PrivacySettings = field(metadata=example("[privacy] epsilon = 8.0"))
    max_rounds: int = field(metadata=example("max_rounds = 50"))
    require_secure_aggregation: bool = True
    min_cohort: int = MIN_COHORT
    metrics: Mapping[str, int] = field(default_factory=dict, metadata=example("auroc = 3"))
    max_model_parameters: int = 1_000_000
    max_message_bytes: int = 16 * 2**20
    share_benchmark: bool = True
    share_site_tables: bool = True
    share_episodes: bool = False
    min_nodes: int = MIN_SECURE_SITES

    def __post_init__(self) -> None:
        if not isinstance(self.coordinator, str) or not _KEY_ID.fullmatch(self.coordinator):
            raise FieldError(
                "coordinator",
                "expected the coordinator's key id: 64 lower-case hex digits "
                "(the key_id in the coordinator's .pub.json)",
            )
        _at_least("min_cohort", self.min_cohort, 2, f"min_cohort = {MIN_COHORT}")
        _at_least("min_nodes", self.min_nodes, MIN_SECURE_SITES, f"min_nodes = {MIN_SECURE_SITES}")
        _at_least("max_rounds", self.max_rounds, 1, "max_rounds = 50")
        _at_least("max_model_parameters", self.max_model_parameters, 1, "max_model_parameters = 1_000_000")
        _at_least("max_message_bytes", self.max_message_bytes, 1, "max_message_bytes = 16_777_216")
        for name, places in self.metrics.items():
            if not _METRIC_NAME.fullmatch(name):
                raise FieldError(f"metrics.{name}", f"a metric name must match {_METRIC_NAME.pattern}")
            if name == EXAMPLES:
                raise FieldError(f"metrics.{name}", "the example count is always shared with an update; remove it")
            if name in _OUTPUT_NAMES:
                raise FieldError(f"metrics.{name}", f"'{name}' names a job output, not a metric; rename the metric")
            _at_least(f"metrics.{name}", places, 0, f"{name} = 3")
            if places > MAX_PRECISION:
                raise FieldError(f"metrics.{name}", f"at most {MAX_PRECISION} decimal places, got {places}")
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))

    @classmethod
    def load(cls, path: str | Path) -> SitePolicy:
        """Read and validate a policy file; any defect is a ``ConfigError`` naming file and field."""
        path = Path(path)
        return cls.from_dict(read_toml(path, "policy file"), source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> SitePolicy:
        """The strict inverse of ``to_dict``: unknown keys and wrong types are refused, every
        mistake at once."""
        return read_table(cls, data, source=source)

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults filled in, as TOML-able data (``epsilon`` may be ``inf``)."""
        privacy = {k: v for k, v in asdict(self.privacy).items() if v is not None}
        return {
            "coordinator": self.coordinator,
            "require_secure_aggregation": self.require_secure_aggregation,
            "min_cohort": self.min_cohort,
            "max_rounds": self.max_rounds,
            "max_model_parameters": self.max_model_parameters,
            "max_message_bytes": self.max_message_bytes,
            "share_benchmark": self.share_benchmark,
            "share_site_tables": self.share_site_tables,
            "share_episodes": self.share_episodes,
            "min_nodes": self.min_nodes,
            "metrics": dict(self.metrics),
            "privacy": privacy,
        }


@dataclass(frozen=True)
class JobRequest:
    """What a coordinator asks of a node, reduced to what the site policy rules on.

    ``outputs`` names everything the job wants back: ``"weights"`` (train), ``"sums"``
    (evaluation, statistics and analytics sums), ``"num-examples"`` and metric names.
    ``coordinator`` is the key id of the party that sent the job, as authenticated by
    the transport, never as claimed inside the job.
    """

    kind: str
    coordinator: str
    rounds: int
    secure_aggregation: bool
    min_cohort: int
    outputs: tuple[str, ...]
    model_parameters: int = 0


def check_job(policy: SitePolicy, job: JobRequest) -> None:
    """Refuse ``job`` unless ``policy`` allows all of it; run it before reading any data.

    Raises ``PolicyViolationError`` with a reason the coordinator can show its user.
    """
    # (1) The job comes from the coordinator this site trusts.
    if job.coordinator != policy.coordinator:
        raise _refusal(f"it comes from coordinator {job.coordinator!r}; this site trusts only {policy.coordinator}")
    # (2) The job is of a kind the site knows.
    if job.kind not in JOB_KINDS:
        raise _refusal(f"unknown job kind {job.kind!r}; a site runs {', '.join(JOB_KINDS)} jobs")
    # (2b) Risk-adjusted totals leave only a site that shares them.
    if job.kind == "benchmark" and not policy.share_benchmark:
        raise _refusal(
            "it asks for this site's risk-adjusted totals (observed and expected readmissions and costs); "
            "this site does not share them (share_benchmark = false)"
        )
    # (2c) The episode linkage only at a site that takes part in it.
    if job.kind == "episodes" and not policy.share_episodes:
        raise _refusal(
            "it asks this site to take part in the episode linkage (its stays' totals, or a payer's "
            "private intersection-sums with hospitals); this site does not (share_episodes = false)"
        )
    # (3) Updates and sums go through secure aggregation when the site requires it.
    if policy.require_secure_aggregation and job.secure_aggregation is not True:
        raise _refusal("it switches secure aggregation off; this site requires secure aggregation")
    # (4) No statistic describes fewer rows than the site's smallest cohort.
    if not _is_int(job.min_cohort) or job.min_cohort < policy.min_cohort:
        raise _refusal(f"its min_cohort {job.min_cohort!r} is below this site's min_cohort {policy.min_cohort}")
    # (5) Rounds and model size stay within the site's limits.
    if not _is_int(job.rounds) or not 1 <= job.rounds <= policy.max_rounds:
        raise _refusal(f"it asks for {job.rounds!r} rounds; this site allows 1 to {policy.max_rounds}")
    if not _is_int(job.model_parameters) or not 0 <= job.model_parameters <= policy.max_model_parameters:
        limit = policy.max_model_parameters
        raise _refusal(f"its model has {job.model_parameters!r} parameters; this site allows at most {limit}")
    # (6) Every output asked for is one this kind of job may send.
    if isinstance(job.outputs, str) or not all(isinstance(output, str) for output in job.outputs):
        raise _refusal("its outputs must be a list of output names")
    allowed = (*_KIND_OUTPUTS[job.kind], *policy.metrics)
    for output in job.outputs:
        if output in _NEVER:
            raise _refusal(f"it asks for {output!r}: {_NEVER[output]}")
        if output not in allowed:
            raise _refusal(f"it asks for {output!r}; a {job.kind} job at this site may send only {', '.join(allowed)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
