"""Simulation configs: TOML in, validated frozen dataclasses out.

Every unknown key, wrong type or out-of-range value is refused with the file and the
dotted field named, before anything runs. ``resolved()`` gives back the full config with
defaults filled in; it is what a run folder records.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedcost import schema
from fedcost.analytics import GroupedStatisticsLayout
from fedcost.data.synthetic import EcosystemSpec
from fedcost.errors import ConfigError
from fedcost.linkage import EpisodeWindow
from fedcost.models.spec import ModelSpec, TrainConfig
from fedcost.privacy import MIN_COHORT, SitePolicy
from fedcost.tomlfile import Mistakes, example, read_table, read_toml, unknown_keys

StrategyName = Literal["fedavg", "fedprox", "fedadam"]
# Rounds when a config sets none: FedAvg runs them all; an exact GLM's Newton iteration stops
# once it converges (well-posed data: 5-10 rounds), and this is its most.
FEDAVG_ROUNDS, EXACT_GLM_ROUNDS = 10, 20
# With DP noise on its Newton sums every round costs budget, and a step within the noise is
# as far as the iteration gets: 5 rounds from the start at the mean reach it on such data.
NOISY_GLM_ROUNDS = 5
CURRENCY_CODE = re.compile(r"[A-Z]{3}")
PEER_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,39}")
_RAY_ADDRESS = re.compile(r"(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([1-9][0-9]{0,4})")


@dataclass(frozen=True)
class RunSection:
    """What the whole run shares: the seed, the rounds, the held-out share, the smallest
    cohort any shared statistic may describe (the hello states it; a site whose policy
    asks for more refuses the job), and the epochs each site adapts the final model to its
    own rows before it is scored (``fedcost.models.adaptation``; 0: scored as shared)."""

    seed: int = 7
    rounds: int | None = None  # the model's own default: see SimulationConfig
    test_fraction: float = 0.2
    min_cohort: int = MIN_COHORT
    adaptation_epochs: int = 5

    def __post_init__(self) -> None:
        if self.rounds is not None and self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, not {self.rounds}")
        if self.adaptation_epochs < 0:
            raise ValueError(f"adaptation_epochs must be 0 (none) or more, not {self.adaptation_epochs}")
        if self.min_cohort < 2:
            raise ValueError(f"min_cohort must be at least 2, not {self.min_cohort}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), not {self.test_fraction}")


@dataclass(frozen=True)
class EcosystemSection:
    """The synthetic ecosystem: node sizes per role and how heterogeneous sites are."""

    sizes: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {"hospital": (24000, 9000, 2500, 400), "insurer": (18000, 5000), "pharma": (6000, 700)}
    )
    quality_effect_sd: float = 0.35
    price_level_sd: float = 0.15
    case_mix_shift: float = 0.5

    def __post_init__(self) -> None:
        self.spec()

    def spec(self) -> EcosystemSpec:
        """The generator's spec; raises ``ValueError`` for unknown roles or bad sizes."""
        return EcosystemSpec.from_sizes(
            self.sizes,
            quality_effect_sd=self.quality_effect_sd,
            price_level_sd=self.price_level_sd,
            case_mix_shift=self.case_mix_shift,
        )


@dataclass(frozen=True)
class StrategySection:
    """The coordinator's strategy, from Flower: FedAvg, FedProx or FedAdam."""

    name: StrategyName = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01

    def __post_init__(self) -> None:
        if self.proximal_mu < 0:
            raise ValueError(f"proximal_mu must be non-negative, not {self.proximal_mu}")
        if self.server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate must be positive, not {self.server_learning_rate}")


@dataclass(frozen=True)
class SecureAggregationSection:
    """SecAgg+ for every shared sum: on unless a config says ``enabled = false``.

    Updates are clipped to ±``update_clip`` per entry and quantised in steps of
    ``update_clip / update_levels``; ``max_examples`` bounds a node's weight (its
    example count). ``dropout_tolerance`` is the share of a node's neighbours that may
    drop out with the sum still exact; below the threshold a round aborts and is retried
    ``retries`` times (``on_abort = "retry"``) or the run stops (``"stop"``).
    """

    enabled: bool = True
    dropout_tolerance: float = 1 / 3
    update_clip: float = 8.0
    update_levels: int = 2**20
    max_examples: int = 2**20
    on_abort: Literal["retry", "stop"] = "retry"
    retries: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.dropout_tolerance < 0.5:
            raise ValueError(f"dropout_tolerance must lie in [0, 0.5), not {self.dropout_tolerance}")
        if self.update_clip <= 0 or self.update_levels < 1 or self.max_examples < 1 or self.retries < 0:
            raise ValueError("update_clip, update_levels and max_examples must be positive, retries non-negative")


@dataclass(frozen=True)
class StatisticsPrivacySection:
    """Distributed DP for every sum of the job but its training updates: feature statistics,
    statistics tables, evaluation and benchmark totals (``fedcost.privacy.distributed``).

    ``epsilon = inf`` (the default) adds none. With a finite ``epsilon``, every node adds its
    share of Skellam noise to each such sum before masking, calibrated so that all of them
    together spend at most (``epsilon``, ``delta``) at every site; each row's cost counts at
    most ``cost_clip`` currency units in them. It needs secure aggregation.
    """

    epsilon: float = field(default=math.inf, metadata=example("epsilon = 3.0"))
    delta: float = 1e-6
    cost_clip: float = 100_000.0

    def __post_init__(self) -> None:
        if math.isnan(self.epsilon) or self.epsilon <= 0:
            raise ValueError(f"epsilon must be positive (inf for none), not {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must lie in (0, 1), not {self.delta}")
        if not (math.isfinite(self.cost_clip) and self.cost_clip > 0):
            raise ValueError(f"cost_clip must be a positive number, not {self.cost_clip}")

    @property
    def enabled(self) -> bool:
        return math.isfinite(self.epsilon)


@dataclass(frozen=True)
class GlmPrivacySection:
    """Distributed DP for an exact GLM's Newton sums (``fedcost.privacy.distributed.NewtonNoise``).

    ``epsilon = inf`` (the default) adds none, and a site whose policy sets a DP budget
    ([privacy] epsilon) refuses the job. With a finite ``epsilon``, every node adds its share
    of Skellam noise to each round's sums before masking, calibrated so that the job's
    rounds together spend at most (``epsilon``, ``delta``) at every site: set it to what
    the strictest site allows (each site refuses a plan its remaining budget cannot pay
    for, saying how much it has left). ``feature_clip``: a row's standardised features are
    scaled to an L2 norm of at most this x √(number of features); ``response_clip``: a log
    link's per-row score factor and weight are clipped at this (costs in cost-scale units,
    mean 1). Each round costs budget: plan few (``[run] rounds``, default 5 with noise).
    """

    epsilon: float = field(default=math.inf, metadata=example("epsilon = 3.0"))
    delta: float = 1e-6
    feature_clip: float = 1.0
    response_clip: float = 10.0

    def __post_init__(self) -> None:
        if math.isnan(self.epsilon) or self.epsilon <= 0:
            raise ValueError(f"epsilon must be positive (inf for none), not {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must lie in (0, 1), not {self.delta}")
        for name in ("feature_clip", "response_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, not {value}")

    @property
    def enabled(self) -> bool:
        return math.isfinite(self.epsilon)


@dataclass(frozen=True)
class AnalyticsSection:
    """Federated cost analytics in a run: grouped statistics and risk-adjusted benchmarking.

    ``group_by``: the fields whose cells get counts, exact sums, means, variances and
    cost quantiles (``fedcost.analytics.statistics``), before any training; empty for
    none. ``measures``: the numeric columns summarised per cell. ``benchmark``: after
    training, each site scores its own rows with the federated model and shares its
    observed and expected totals, for O/E ratios, a funnel plot and value per site.
    ``group_costing``: before training, a table by site and disease group of cost and
    payment (``fedcost.analytics.group_costing``): margins, cost weights and a case-mix
    index per site; a run on data without payments or disease groups, or with statistics
    noise, leaves it out.
    ``currency``: the ISO 4217 code of the data's costs (e.g. "EUR"), printed on every cost
    figure and axis (a label: nothing is converted); "" leaves them in unnamed currency
    units. ``peer_groups``: site name to peer group, a public fact about each site (CMS
    groups hospitals by their share of dually eligible patients), within which excess
    readmission ratios are compared against the group's median; empty: against 1. A
    simulation refuses a name that is not one of its nodes; a deployment ignores names
    not on the job's roster (a site revoked or not yet enrolled).
    ``episodes``: the episode window, e.g. ``{ before_days = 3, after_days = 30 }`` (a key
    left out takes that default; empty: no episodes): each hospital's episode cost, its
    stays plus what insurers and pharma paid within the window around them, linked by a
    private intersection-sum of the nodes' pseudonymous keys (``fedcost.linkage``).
    """

    group_by: tuple[str, ...] = ("diagnosis_group", "payer")
    measures: tuple[str, ...] = (schema.COST, schema.READMISSION, "length_of_stay")
    benchmark: bool = True
    group_costing: bool = True
    currency: str = ""
    peer_groups: dict[str, str] = field(default_factory=dict)
    episodes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layout()
        self.episode_window()
        if self.currency and not CURRENCY_CODE.fullmatch(self.currency):
            raise ValueError(
                f"currency must be an ISO 4217 code of three capital letters (e.g. EUR, USD), not {self.currency!r}"
            )
        for site, group in self.peer_groups.items():
            if not PEER_GROUP.fullmatch(group):
                raise ValueError(
                    f"peer group of {site!r} must be 1-40 letters, digits, spaces, '.', '_' or '-', not {group!r}"
                )

    def episode_window(self) -> EpisodeWindow | None:
        """The episode window, or None for a run without episodes; ``ValueError`` if invalid."""
        if not self.episodes:
            return None
        unknown = sorted(set(self.episodes) - {"before_days", "after_days"})
        if unknown:
            raise ValueError(f"episodes.{unknown[0]} is not a setting; use before_days and after_days")
        return EpisodeWindow(**self.episodes)

    def layout(self) -> GroupedStatisticsLayout:
        """The grouped statistics' layout; raises ``ValueError`` for unknown fields."""
        try:
            return GroupedStatisticsLayout(self.group_by, self.measures)
        except ConfigError as error:
            raise ValueError(str(error)) from None


@dataclass(frozen=True)
class SimulationSection:
    """How Flower's Simulation Engine places nodes on this machine, and injected faults.

    ``drop_nodes`` makes the named nodes drop out of the rounds listed, after they have
    shared their keys (``drop_stage``): a scenario knob for dropout recovery.

    ``ray_address`` says where the nodes run: "" a private Ray on this machine, for this
    run only; "auto", "HOST:PORT" (the head's GCS port) or "ray://HOST:PORT" (Ray Client)
    an existing Ray cluster. ``max_cpus`` and ``max_memory_gb`` cap what the run reserves
    there at once (``fedcost.ray_engine``): on a shared cluster, its share.

    ``policies`` maps node names to site policy files, ``default_policy`` is the file of
    every other node ("" for the permissive default: no DP, min cohort 11, secure
    aggregation held if on). Paths are relative to the config file's folder and are
    stored resolved, so a run folder's ``config.toml`` reruns with the same policies.
    """

    cpus_per_node: float = 1.0
    ray_address: str = ""
    max_cpus: float = math.inf
    max_memory_gb: float = math.inf
    drop_nodes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    drop_stage: Literal["advertise-keys", "share-keys", "masked-input", "consistency", "unmask"] = "masked-input"
    policies: dict[str, str] = field(default_factory=dict)
    default_policy: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cpus_per_node) and self.cpus_per_node > 0):
            raise ValueError(f"cpus_per_node must be a positive number, not {self.cpus_per_node}")
        address = _RAY_ADDRESS.fullmatch(self.ray_address)
        if not (self.ray_address in ("", "auto") or (address and int(address[3]) < 2**16)):
            raise ValueError(
                f'ray_address must be "" (a private Ray on this machine), "auto" (the cluster this '
                'machine joined with `ray start`), "HOST:PORT" or "ray://HOST:PORT", '
                f"not {self.ray_address!r}"
            )
        if math.isnan(self.max_cpus) or self.max_cpus < self.cpus_per_node:
            raise ValueError(
                f"max_cpus ({self.max_cpus:g}) must be at least cpus_per_node ({self.cpus_per_node:g}), "
                "or no site could run; inf for no cap"
            )
        if math.isnan(self.max_memory_gb) or self.max_memory_gb <= 0:
            raise ValueError(f"max_memory_gb must be positive (inf for no cap), not {self.max_memory_gb:g}")


@dataclass(frozen=True)
class SimulationConfig:
    """A whole simulation: run, data, model, local training, strategy and engine."""

    run: RunSection = RunSection()
    ecosystem: EcosystemSection = EcosystemSection()
    model: ModelSpec = ModelSpec()
    training: TrainConfig = TrainConfig()
    strategy: StrategySection = StrategySection()
    secure_aggregation: SecureAggregationSection = SecureAggregationSection()
    analytics: AnalyticsSection = AnalyticsSection()
    statistics_privacy: StatisticsPrivacySection = StatisticsPrivacySection()
    glm_privacy: GlmPrivacySection = GlmPrivacySection()
    simulation: SimulationSection = SimulationSection()
    source: str = "<defaults>"

    def __post_init__(self) -> None:
        if self.run.rounds is None:  # an exact GLM stops when it converges; FedAvg runs every round
            rounds = FEDAVG_ROUNDS
            if self.model.exact:
                rounds = NOISY_GLM_ROUNDS if self.glm_privacy.enabled else EXACT_GLM_ROUNDS
            object.__setattr__(self, "run", dataclasses.replace(self.run, rounds=rounds))
        if self.statistics_privacy.enabled and self.analytics.episodes:
            raise ConfigError(
                "episode costs are exact sums and carry no statistics noise: leave [analytics] episodes out of "
                "a run with [statistics_privacy], or that section out",
                path=self.source,
                field="analytics.episodes",
            )
        for section in ("statistics_privacy", "glm_privacy"):
            if getattr(self, section).enabled and not self.secure_aggregation.enabled:
                raise ConfigError(
                    "noisy sums need secure aggregation: set [secure_aggregation] enabled = true, or "
                    f"[{section}] epsilon = inf",
                    path=self.source,
                    field=section,
                )
        if self.glm_privacy.enabled and not self.model.exact:
            raise ConfigError(
                '[glm_privacy] adds noise to an exact GLM\'s Newton sums: set [model] kind = "glm" (fit "auto" or '
                '"newton"), or remove [glm_privacy]',
                path=self.source,
                field="glm_privacy",
            )

    @classmethod
    def load(cls, path: Path | str) -> SimulationConfig:
        path = Path(path)
        return cls.from_dict(read_toml(path, "config file"), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "<dict>") -> SimulationConfig:
        sections = [f for f in dataclasses.fields(cls) if f.name != "source"]
        mistakes = Mistakes(source)
        unknown_keys(raw, (f.name for f in sections), "", mistakes)
        built = {}
        for section in sections:
            with mistakes.kept():
                built[section.name] = read_table(
                    typing.get_type_hints(cls)[section.name],
                    raw.get(section.name, {}),
                    source=source,
                    where=section.name,
                )
        mistakes.raise_any()
        built["simulation"] = _with_policy_paths(built["simulation"], source)
        return cls(**built, source=source)

    def resolved(self) -> dict[str, Any]:
        """Every setting with defaults filled in, as plain TOML-able data."""
        return {
            f.name: _plain(dataclasses.asdict(getattr(self, f.name)))
            for f in dataclasses.fields(self)
            if f.name != "source"
        }

    def with_overrides(self, **sections: Any) -> SimulationConfig:
        return dataclasses.replace(self, **sections)


def _with_policy_paths(section: SimulationSection, source: str) -> SimulationSection:
    """Resolve policy paths against the config file's folder and check every policy file
    now: each mistake of each one is a line naming the config's field and the policy's."""
    folder = Path(source).parent if Path(source).is_file() else Path.cwd()
    mistakes = Mistakes(source)

    def resolved(path: str, where: str) -> str:
        absolute = (folder / path).resolve()
        try:
            SitePolicy.load(absolute)
        except ConfigError as invalid:
            for error in invalid.errors:
                mistakes.add(where, f"policy file is invalid: {error}")
        return str(absolute)

    policies = {name: resolved(path, f"simulation.policies.{name}") for name, path in section.policies.items()}
    default = resolved(section.default_policy, "simulation.default_policy") if section.default_policy else ""
    mistakes.raise_any()
    return dataclasses.replace(section, policies=policies, default_policy=default)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value
