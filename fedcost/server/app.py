"""The coordinator's Flower ServerApp: hello, federated statistics, then training rounds.

The round loop is fedcost's own, so every round is recorded and every exchange with the
nodes is a shared sum (``shared_sum``): secure aggregation by default. The strategy
steps are Flower's (FedAvg, FedProx, FedAdam): each round the coordinator turns the
summed, example-weighted update into the one aggregate reply Flower's ``aggregate_train``
expects, so server-side optimisers such as FedAdam work unchanged on the unmasked sum.
The coordinator only ever handles sums; it never receives rows or a single node's update.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from fedcost.analytics import (
    Benchmark,
    GroupedStatistics,
    GroupedStatisticsLayout,
    benchmark,
    benchmarking,
    group_costing,
)
from fedcost.analytics.benchmarking import calibration, shared_vector_size, standardised, totals_from_shared_vector
from fedcost.analytics.group_costing import GroupCosting
from fedcost.audit import AuditLog
from fedcost.config import (
    AnalyticsSection,
    GlmPrivacySection,
    SecureAggregationSection,
    SimulationConfig,
    StatisticsPrivacySection,
    StrategySection,
)
from fedcost.data.features import FeatureSpec, StatisticsLayout
from fedcost.errors import FederationError, SumNotRecoveredError
from fedcost.linkage import EpisodeCosts, link_episodes
from fedcost.linkage.episodes import EpisodePlan
from fedcost.models import evaluation, glm
from fedcost.models.nets import ModelSpec, build_model
from fedcost.models.training import TrainConfig
from fedcost.models.training_job import (
    TrainingJob,
    glm_coefficients,
    glm_state,
    newton_blocks,
    newton_bounds,
    noisy_releases,
)
from fedcost.privacy import MIN_COHORT, MIN_SECURE_SITES
from fedcost.privacy.distributed import NewtonNoise, StatisticsNoise, calibrate_newton_noise, calibrate_noise
from fedcost.secagg import Quantizer
from fedcost.server.audited_grid import AuditedGrid
from fedcost.server.episodes import RemoteSite
from fedcost.server.shared_sum import NextSum, PollingGrid, SharedSums, SumResult
from fedcost.wire import COORDINATOR
from fedcost.wire import records as rec
from fedcost.wire.events import Event
from fedcost.wire.hello import Hello
from fedcost.wire.purposes import PURPOSES, WITHHOLDS

NODE_WAIT_SECONDS = 120.0


@dataclass(frozen=True)
class CoordinatorPlan:
    """Everything the coordinator needs to run a training job over the roster's nodes.

    ``roster`` pairs each enrolled node's name with its Ed25519 public identity key;
    ``coordinator_key_id`` is the key id of the coordinator's own identity, which each
    site's policy names as the coordinator it trusts.
    """

    run_id: str
    coordinator_key_id: str
    roster: tuple[tuple[str, bytes], ...]
    rounds: int
    seed: int
    layout: StatisticsLayout
    model: ModelSpec
    training: TrainConfig
    strategy: StrategySection
    secure_aggregation: SecureAggregationSection
    config_digest: str
    # Extra records every hello carries: in a deployment, the roster as CA-signed
    # certificates, which each node checks against its own CA before trusting any key.
    hello_records: tuple[tuple[str, ConfigRecord], ...] = ()
    resume: ResumePoint | None = None
    # The fewest connected nodes a round waits for (0: the whole roster). A deployment
    # lowers it, so a node that died mid-run does not stall every later round.
    min_nodes: int = 0
    # The smallest cohort any shared statistic describes, as the hello states it.
    min_cohort: int = MIN_COHORT
    analytics: AnalyticsSection = AnalyticsSection()
    # "train": the training job (with the analytics the section asks for);
    # "analyze": the grouped statistics alone, no model.
    task: str = "train"
    statistics_privacy: StatisticsPrivacySection = StatisticsPrivacySection()
    # The episode linkage before anything else, if the run asks for episode costs.
    episodes: EpisodePlan | None = None
    glm_privacy: GlmPrivacySection = GlmPrivacySection()

    def __post_init__(self) -> None:
        if self.analytics.episodes and self.episodes is None:
            raise ValueError("the job asks for episodes, and the plan states no episode linkage (EpisodePlan)")

    @classmethod
    def for_job(
        cls,
        config: SimulationConfig,
        source: Path,
        *,
        run_id: str,
        coordinator_key_id: str,
        roster: tuple[tuple[str, bytes], ...],
        layout: StatisticsLayout,
        episodes: EpisodePlan | None,
        task: str = "train",
        hello_records: tuple[tuple[str, ConfigRecord], ...] = (),
        resume: ResumePoint | None = None,
        min_nodes: int = 0,
    ) -> CoordinatorPlan:
        """The plan for ``config``, whose file ``source`` the hello's digest covers: every
        section the job sets comes from the config here, so a simulation and a deployment
        cannot plan the same job differently; the rest is what only the caller knows."""
        return cls(
            run_id=run_id,
            coordinator_key_id=coordinator_key_id,
            roster=roster,
            rounds=config.run.rounds,
            seed=config.run.seed,
            layout=layout,
            model=config.model,
            training=config.training,
            strategy=config.strategy,
            secure_aggregation=config.secure_aggregation,
            config_digest=hashlib.sha256(source.read_bytes()).hexdigest(),
            hello_records=hello_records,
            resume=resume,
            min_nodes=min_nodes,
            min_cohort=config.run.min_cohort,
            analytics=config.analytics,
            task=task,
            statistics_privacy=config.statistics_privacy,
            episodes=episodes,
            glm_privacy=config.glm_privacy,
        )

    @property
    def noise_sites(self) -> int:
        """The sites a noisy sum keeps when as many drop out as secure aggregation tolerates
        (at least 3): each node adds its share of the noise for that many."""
        kept = math.ceil(len(self.roster) * (1 - self.secure_aggregation.dropout_tolerance))
        return max(MIN_SECURE_SITES, kept)

    @cached_property
    def newton_noise(self) -> NewtonNoise | None:
        """The distributed DP noise on an exact GLM's Newton sums: the least with which the
        job's rounds spend the job's [glm_privacy] (ε, δ) at every site, for the largest design
        the layout can give (the actual one, known after the statistics, is no larger)."""
        section = self.glm_privacy
        if not (section.enabled and self.model.exact and self.task == "train"):
            return None
        return calibrate_newton_noise(
            epsilon=section.epsilon,
            delta=section.delta,
            rounds=self.rounds,
            sites=self.noise_sites,
            parameters=max_features(self.layout) + 1,
            blocks=newton_blocks(self.model),
            feature_clip=section.feature_clip,
            response_clip=section.response_clip,
        )

    @cached_property
    def noise(self) -> StatisticsNoise | None:
        """The distributed DP noise on every sum but training updates: the least with which the
        plan's noisy sums spend the job's statistics (ε, δ) at every site, shared among the
        sites a sum keeps when as many drop out as secure aggregation tolerates (at least 3)."""
        section = self.statistics_privacy
        if not section.enabled:
            return None
        releases = noisy_releases(
            purposes=tuple(self.purposes()),
            rounds=self.rounds,
            statistics=self.layout,
            tables=self.tables(),
            tasks=self.model.tasks,
        )
        return calibrate_noise(
            epsilon=section.epsilon,
            delta=section.delta,
            touched=releases,
            sites=self.noise_sites,
            cost_clip=section.cost_clip,
        )

    def tables(self) -> list[GroupedStatisticsLayout]:
        """The statistics tables of the run: the grouped statistics, then group costing by site,
        which needs exact sums (a margin per case needs the cases its cost and payment cover)
        and is left out of a run with statistics noise."""
        tables = [self.analytics.layout()] if self.analytics.group_by else []
        costing = self.analytics.group_costing and not self.statistics_privacy.enabled
        return tables + ([group_costing.layout(tuple(name for name, _ in self.roster))] if costing else [])

    def purposes(self) -> list[str]:
        """The purposes this run will ask for, in order: what the hello states."""
        statistics = (["episodes"] if self.episodes else []) + (["analytics"] if self.tables() else [])
        if self.task == "analyze":
            return statistics
        training = ["statistics", *statistics, "newton" if self.model.exact else "train", "evaluate"]
        return training + (["benchmark"] if self.analytics.benchmark and len(self.model.tasks) == 2 else [])

    def hello(self) -> Hello:
        """The whole job as the nodes check it: every purpose, round and table it will ask for."""
        purposes = self.purposes()
        training = self.task == "train"
        return Hello(
            run_id=self.run_id,
            coordinator=self.coordinator_key_id,
            secure_aggregation=self.secure_aggregation.enabled,
            rounds=self.rounds if training else 1,
            min_cohort=self.min_cohort,
            model_parameters=_max_model_parameters(self) if training else 0,
            outputs={purpose: PURPOSES[purpose].outputs for purpose in purposes},
            tables=tuple(table.to_json() for table in self.tables()) if "analytics" in purposes else (),
            noise=self.noise,
            data=self.layout.data_json(),
            episodes=self.episodes.to_json() if self.episodes else "",
            newton_noise=self.newton_noise,
        )


@dataclass(frozen=True)
class ResumePoint:
    """A completed round, as a restarted coordinator picks the run up from it.

    ``arrays`` is the global model after round ``round``; ``features`` the run's shared
    encoding (the statistics stage is not repeated); ``strategy_state`` the server-side
    optimiser's moments (FedAdam), empty for stateless strategies.
    """

    round: int
    arrays: dict[str, np.ndarray]
    features: FeatureSpec
    strategy_state: dict[str, dict[str, np.ndarray]]


class RunObserver(Protocol):
    """Receives the coordinator's progress: a simulation or a deployment records it in the
    run folder (``fedcost.report.progress``)."""

    def on_features(self, features: FeatureSpec, sites: list[str]) -> None: ...

    def on_round(self, record: dict) -> None: ...

    def on_model(self, weights: dict[str, np.ndarray]) -> None: ...

    def on_statistics(self, statistics: GroupedStatistics, sites: list[str]) -> None: ...

    def on_benchmark(self, result: Benchmark, sites: list[str]) -> None: ...

    def on_group_costing(self, result: GroupCosting, sites: list[str]) -> None: ...

    def on_episodes(self, result: EpisodeCosts) -> None: ...

    def on_glm(self, fitted: dict[str, glm.FittedGlm]) -> None: ...


def make_server_app(plan: CoordinatorPlan, observer: RunObserver, log: AuditLog) -> ServerApp:
    """A ServerApp for Flower's Simulation Engine that runs ``plan``, reports to ``observer``
    and keeps ``log``; it polls for replies every few milliseconds (``PollingGrid``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        Coordinator(plan, PollingGrid(grid), observer, log).run()

    return app


def make_strategy(section: StrategySection, nodes: int) -> Strategy:
    """Flower's strategy for ``section``, waiting for all ``nodes`` every round."""
    common = dict(min_train_nodes=nodes, min_evaluate_nodes=nodes, min_available_nodes=nodes)
    if section.name == "fedprox":
        return FedProx(proximal_mu=section.proximal_mu, **common)
    if section.name == "fedadam":
        return FedAdam(eta=section.server_learning_rate, **common)
    return FedAvg(**common)


class Coordinator:
    """One run: hello, statistics, model initialisation, ``rounds`` train/evaluate rounds."""

    def __init__(
        self,
        plan: CoordinatorPlan,
        grid: Grid,
        observer: RunObserver,
        log: AuditLog,
        on_checkpoint: Callable[[ResumePoint], None] | None = None,
    ):
        self.plan = plan
        self.on_checkpoint = on_checkpoint
        self.grid = AuditedGrid(grid, log)
        self.log = log
        self.observer = observer
        self.strategy = make_strategy(plan.strategy, plan.min_nodes or len(plan.roster))
        proximal_mu = plan.strategy.proximal_mu if plan.strategy.name == "fedprox" else 0.0
        self.training = replace(plan.training, proximal_mu=proximal_mu)
        self._withheld: dict[str, dict[str, str]] = {}  # cohort -> site -> why it withholds

    def run(self) -> None:
        self.log.append(
            Event.RUN_STARTED,
            details={
                "run_id": self.plan.run_id,
                "config_digest": self.plan.config_digest,
                "secure_aggregation": self.plan.secure_aggregation.enabled,
                "strategy": self.plan.strategy.name,
                "rounds": self.plan.rounds,
                "nodes": [name for name, _ in self.plan.roster],
                "plan": self.plan.hello().digest,
                "key_ids": {
                    COORDINATOR: self.plan.coordinator_key_id,
                    **{name: hashlib.sha256(key).hexdigest() for name, key in self.plan.roster},
                },
            },
        )
        sites = self._hello(self._wait_for_nodes())
        self.sums = SharedSums(self.grid, sites, self.plan.secure_aggregation, self.plan.run_id, self.plan.roster)
        purposes = self.plan.purposes()
        if self.plan.episodes is not None and self.plan.resume is None:
            self._episodes(sites, self.plan.episodes)
        if "analytics" in purposes and self.plan.resume is None:
            statistics = self._statistics_sum() if self.plan.task == "train" else None
            self._grouped_statistics(sorted(sites), then=statistics)
        if self.plan.task == "analyze":
            self._close(sorted(sites))
            return
        resume = self.plan.resume
        if resume is None:
            features = self._federated_features(sorted(sites))
            model = build_model(
                self.plan.model,
                features.n_features,
                seed=self.plan.seed,
                readmission_rate=features.initial_readmission_rate,
            )
            arrays = ArrayRecord({k: Array(v.detach().numpy()) for k, v in model.state_dict().items()})
        else:
            features, arrays = resume.features, ArrayRecord({k: Array(v) for k, v in resume.arrays.items()})
            _restore_strategy(self.strategy, resume.strategy_state)
            self.log.append(Event.RUN_RESUMED, details={"after_round": resume.round, "digest": _digest(arrays)})
            self.observer.on_features(features, sorted(sites.values()))
        job = TrainingJob(self.plan.model, self.training, features, self.plan.seed)
        fit = (
            _NewtonFit.start(self.plan.model, features, arrays, self.plan.newton_noise)
            if self.plan.model.exact
            else None
        )
        for server_round in range((resume.round if resume else 0) + 1, self.plan.rounds + 1):
            started = time.perf_counter()
            # Each sum's setup and share-keys ride on the last stages of the sum before it in the round loop.
            evaluated = self._evaluation(server_round, job)
            if fit is None:
                arrays, trained = self._train_round(server_round, arrays, job, evaluated)
                record = {"round": server_round, "train_loss": trained.arrays[-1][0] / trained.weight}
            else:
                arrays, trained = self._newton_round(server_round, job, fit, len(sites), evaluated)
                record = {"round": server_round, **fit.progress()}
            if server_round < self.plan.rounds and not (fit is not None and fit.done):
                then = self._training(server_round + 1, arrays, job, fit, len(sites))
            else:
                then = self._benchmark_sum(job) if "benchmark" in purposes else None
            record.update(self._evaluate_round(server_round, arrays, job, features, then))
            record.update(
                nodes_included=len(trained.included),
                dropouts=trained.dropouts,
                secure_aggregation=self.plan.secure_aggregation.enabled,
                seconds=round(time.perf_counter() - started, 3),
            )
            self.log.append(Event.CHECKPOINT_MODEL, round=server_round, digest=_digest(arrays))
            self.log.checkpoint(round=server_round)
            self.observer.on_round(record)
            if self.on_checkpoint is not None:  # after the round's record: a resumed run drops records past it
                weights = {k: a.numpy() for k, a in arrays.items()}
                self.on_checkpoint(ResumePoint(server_round, weights, features, _strategy_state(self.strategy)))
            if fit is not None and fit.done:
                break
        if fit is not None and fit.done:  # not done only where a resumed run had no rounds left
            self.observer.on_glm(fit.fitted(features))
        self.observer.on_model({k: a.numpy().astype("float32") for k, a in arrays.items()})
        if "benchmark" in purposes:
            self._benchmark(sorted(sites), arrays, job)
        self._close(sorted(sites))

    def close_stopped(self, reason: str, connected: Collection[int]) -> None:
        """End a run that stopped with an error as a finished one ends: every site that said
        hello and is still ``connected`` is told it is over (each signs and closes its log)
        and the coordinator's log closes with the reason."""
        sums = getattr(self, "sums", None)  # set once the sites said hello
        self._close(sorted(n for n in (sums.sites if sums else ()) if n in connected), stopped=reason)

    def _close(self, node_ids: list[int], *, stopped: str | None = None) -> None:
        """Tell every node the run is over, so each signs and closes its log; then close ours
        (with the reason, for a run that ``stopped``)."""
        config = ConfigRecord({rec.TRANSPORT: rec.CLOSE})
        messages = [
            Message(RecordDict({rec.CONFIG: config}), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids
        ]
        if messages:
            self.grid.send_and_receive(messages)
        self.log.close(details={"stopped": stopped} if stopped else None)

    def _sum(self, purpose: str, server_round: int, shapes: list, node_ids: list[int], *args, **kwargs) -> SumResult:
        """A shared sum, with its dropouts and the digest of the aggregate in the log.

        A site that withheld a sum for too few rows withholds every later sum over the same
        rows (its cohort): it is not asked again, since each ask would cost a secure sum an
        abort and a retry, and it stays among the result's dropouts with its reason.
        """
        try:
            result = self.sums.run(
                purpose,
                server_round,
                shapes,
                self._asked(purpose, node_ids),
                *args,
                noisy=self._noisy(purpose),
                **kwargs,
            )
        except SumNotRecoveredError as failed:
            failed.dropouts = self._left_out(purpose, server_round, failed.dropouts)
            raise
        result.dropouts = self._left_out(purpose, server_round, result.dropouts)
        self.log.append(
            Event.AGGREGATE,
            round=server_round,
            digest=hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in result.arrays)).hexdigest(),
            details={"purpose": purpose, "included": result.included},
        )
        return result

    def _left_out(self, purpose: str, server_round: int, dropouts: dict[str, str]) -> dict[str, str]:
        """Log a sum's dropouts, note the sites that withheld its rows, and return every site
        the sum left out with its reason (those that withheld the same rows before included)."""
        for site, reason in dropouts.items():
            self.log.append(
                Event.DROPOUT, round=server_round, details={"party": site, "reason": reason, "purpose": purpose}
            )
        withheld = self._withheld.setdefault(PURPOSES[purpose].cohort, {})
        withheld.update({site: reason for site, reason in dropouts.items() if WITHHOLDS in reason})
        return {**withheld, **dropouts}

    def _asked(self, purpose: str, node_ids: Collection[int]) -> list[int]:
        """The nodes a sum asks: none whose site withheld a sum over the same rows (``_sum``)."""
        withheld = self._withheld.get(PURPOSES[purpose].cohort, {})
        return [n for n in node_ids if self.sums.sites[n] not in withheld]

    def _noisy(self, purpose: str) -> bool:
        """Whether the nodes add the job's statistics noise to a sum: to every sum but training's."""
        return self.plan.noise is not None and not PURPOSES[purpose].trains

    def _planned(
        self, purpose: str, server_round: int, shapes: list, job: str | None, nodes: Collection[int], **kwargs
    ) -> NextSum:
        """A sum the coordinator asks for next, over the ``nodes`` ``_sum`` will ask (less those
        that withheld the same rows), as its first stages ride on the last of the sum before it."""
        asked = tuple(self._asked(purpose, sorted(nodes)))
        return NextSum(purpose, server_round, tuple(shapes), asked, job, noisy=self._noisy(purpose), **kwargs)

    def _connected(self) -> set[int]:
        """The nodes a strategy's sums ask (``configure_train``, ``configure_evaluate``)."""
        return set(self.grid.get_node_ids()) & set(self.sums.sites)

    def _statistics_sum(self) -> NextSum:
        return self._planned("statistics", 0, self._statistics_shapes(), None, self.sums.sites)

    def _statistics_shapes(self) -> list[tuple[int, ...]]:
        return [(len(self.plan.layout.slots()),)]

    def _table_sum(self, layout: GroupedStatisticsLayout) -> NextSum:
        return self._planned("analytics", 0, self._table_shapes(layout), layout.to_json(), self.sums.sites)

    def _table_shapes(self, layout: GroupedStatisticsLayout) -> list[tuple[int, ...]]:
        return [(layout.size if self.plan.noise is None else layout.noisy_size,)]

    def _evaluation(self, server_round: int, job: TrainingJob) -> NextSum | None:
        """The round's evaluation sum, to set up ahead; None where too few sites could send one."""
        planned = self._planned(
            "evaluate", server_round, self._evaluation_shapes(job), job.to_json(), self._connected()
        )
        return planned if self._can_evaluate(planned.node_ids) else None

    def _can_evaluate(self, node_ids: Collection[int]) -> bool:
        """Whether enough of ``node_ids`` hold min_cohort held-out rows to form an evaluation sum
        (those that withheld theirs are not asked again)."""
        return len(self._asked("evaluate", node_ids)) >= self._fewest_evaluating

    @property
    def _fewest_evaluating(self) -> int:
        """The fewest sites an evaluation sum can be formed over."""
        return MIN_SECURE_SITES if self.plan.secure_aggregation.enabled else 1

    def _evaluation_shapes(self, job: TrainingJob) -> list[tuple[int, ...]]:
        return evaluation.sums_shapes(job.model.tasks, noisy=self.plan.noise is not None)

    def _benchmark_sum(self, job: TrainingJob) -> NextSum:
        shapes = self._benchmark_shapes()
        return self._planned("benchmark", self.plan.rounds, shapes, job.to_json(), self.sums.sites)

    def _benchmark_shapes(self) -> list[tuple[int, ...]]:
        return [(shared_vector_size(len(self.plan.roster), noisy=self.plan.noise is not None),)]

    def _training(
        self, server_round: int, arrays: ArrayRecord, job: TrainingJob, fit: _NewtonFit | None, nodes: int
    ) -> NextSum:
        """A round's training sum: the example-weighted updates (over the connected nodes), or an
        exact GLM's Newton sums (over every site)."""
        if fit is None:
            shapes, rows = rec.update_shapes(arrays), job.features.rows
            return self._planned("train", server_round, shapes, job.to_json(), self._connected(), total_weight=rows)
        _, quantizer, shapes = self._newton_sums(job, fit, nodes)
        return self._planned("newton", server_round, shapes, job.to_json(), self.sums.sites, quantizer=quantizer)

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        expected = len(self.plan.roster)
        while len(node_ids := sorted(self.grid.get_node_ids())) < expected:
            if time.monotonic() > deadline:
                raise FederationError(
                    f"only {len(node_ids)} of {expected} nodes connected within {NODE_WAIT_SECONDS:.0f} s"
                )
            time.sleep(0.2)
        return node_ids

    def _hello(self, node_ids: list[int]) -> dict[int, str]:
        config = self.plan.hello().to_record()
        return say_hello(
            self.grid, node_ids, config, {name for name, _ in self.plan.roster}, dict(self.plan.hello_records)
        )

    def _episodes(self, sites: dict[int, str], plan: EpisodePlan) -> None:
        """Episode cost per hospital: each site's step of every intersection-sum, relayed."""
        ids = {name: node_id for node_id, name in sites.items()}
        parties = [RemoteSite(self.grid, ids[name], name, plan.run_id) for name in (*plan.hospitals, *plan.payers)]
        roster = {name: Ed25519PublicKey.from_public_bytes(key) for name, key in self.plan.roster}
        self.observer.on_episodes(link_episodes(plan, parties, roster))

    def _federated_features(self, node_ids: list[int]) -> FeatureSpec:
        """Sum every node's statistics vector; the totals give the shared encoding."""
        result = self._sum("statistics", 0, self._statistics_shapes(), node_ids)
        lost = {site: reason for site, reason in result.dropouts.items() if WITHHOLDS not in reason}
        if lost:
            raise FederationError(f"the statistics stage needs every node that has enough rows; missing: {lost}")
        noise = self.plan.noise
        if noise is None:
            features = self.plan.layout.feature_spec(result.arrays[0], min_cohort=self.plan.min_cohort)
        else:
            totals = result.arrays[0] * self.plan.layout.noisy_bounds(noise.cost_clip)
            features = self.plan.layout.feature_spec(totals, noise_sd=noise.sd, min_cohort=self.plan.min_cohort)
        self.observer.on_features(features, result.included)
        return features

    def _grouped_statistics(self, node_ids: list[int], then: NextSum | None) -> None:
        """Every statistics table of the plan: every node's cell sums, small cells withheld at the
        node; each table's first stages ride on the sum before it, and ``then``'s on the last's."""
        noise, min_cohort = self.plan.noise, self.plan.min_cohort
        tables = self.plan.tables()
        for layout, following in zip(tables, [*map(self._table_sum, tables[1:]), then], strict=True):
            shapes = self._table_shapes(layout)
            result = self._sum("analytics", 0, shapes, node_ids, job=layout.to_json(), then=following)
            if noise is None:
                statistics = GroupedStatistics.from_totals(layout, result.arrays[0], min_cohort)
            else:
                totals = result.arrays[0] * layout.noisy_bounds(noise.cost_clip)
                statistics = GroupedStatistics.from_noisy_totals(layout, totals, min_cohort, noise.sd)
            if group_costing.is_group_costing(layout):
                self.observer.on_group_costing(group_costing.group_costing(statistics), result.included)
            else:
                self.observer.on_statistics(statistics, result.included)

    def _benchmark(self, node_ids: list[int], arrays: ArrayRecord, job: TrainingJob) -> None:
        """Each site's observed and expected totals under the final model, side by side."""
        names, noise = [name for name, _ in self.plan.roster], self.plan.noise
        result = self._sum("benchmark", self.plan.rounds, self._benchmark_shapes(), node_ids, arrays, job.to_json())
        spread = None
        if noise is None:
            totals = totals_from_shared_vector(result.arrays[0], names)
        else:
            noisy = result.arrays[0] * benchmarking.noisy_bounds(len(names), noise.cost_clip)
            totals = totals_from_shared_vector(noisy, names, noisy=True)
            spread = benchmarking.noise_spread(noise.sd, noise.cost_clip, calibration(totals))
        peers = self.plan.analytics.peer_groups or None
        compared = benchmark(standardised(totals), peer_groups=peers, calibration=calibration(totals), noise=spread)
        self.observer.on_benchmark(compared, result.included)

    def _train_round(
        self, server_round: int, arrays: ArrayRecord, job: TrainingJob, then: NextSum | None
    ) -> tuple[ArrayRecord, SumResult]:
        """Sum the example-weighted updates, then let Flower's strategy take its step."""
        messages = list(self.strategy.configure_train(server_round, arrays, ConfigRecord(), self.grid))
        shapes = rec.update_shapes(arrays)
        node_ids = [m.metadata.dst_node_id for m in messages]
        trained = self._sum(
            "train", server_round, shapes, node_ids, arrays, job.to_json(), job.features.rows, then=then
        )
        mean_update = {k: u / trained.weight for k, u in zip(arrays.keys(), trained.arrays[:-1])}
        averaged = ArrayRecord({k: Array(a.numpy() + mean_update[k]) for k, a in arrays.items()})
        aggregate = Message(
            RecordDict({rec.ARRAYS: averaged, rec.METRICS: MetricRecord({"num-examples": trained.weight})}),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        stepped, _ = self.strategy.aggregate_train(server_round, [aggregate])
        if stepped is None:
            raise FederationError(f"round {server_round}: the strategy could not take its step")
        return ArrayRecord({k: Array(a.numpy().astype("float32")) for k, a in stepped.items()}), trained

    def _newton_sums(
        self, job: TrainingJob, fit: _NewtonFit, nodes: int
    ) -> tuple[glm.SumsPrecision, Quantizer, list[tuple[int, ...]]]:
        """An exact GLM's Newton sums: their precision, fixed point and shapes (each round's the same)."""
        features = job.features
        precision = glm.sums_quantizer_settings(rows=features.rows, nodes=nodes)
        quantizer, shapes = precision.quantizer(), [(glm.SumsLayout(fit.parameters).size,)] * len(fit.betas)
        noise = self.plan.newton_noise
        if noise is not None:  # normalised sums on the noise's grid (``NewtonNoise``)
            clip = noise.quantizer_clip(features.rows)
            quantizer = Quantizer(clip, int(clip) * noise.grid, nodes)
            shapes = [(bounds.size(fit.parameters),) for bounds in fit.bounds.values()]
        return precision, quantizer, shapes

    def _newton_round(
        self, server_round: int, job: TrainingJob, fit: _NewtonFit, nodes: int, then: NextSum | None
    ) -> tuple[ArrayRecord, SumResult]:
        """One Newton–Raphson round of an exact GLM: every node's score and information sums at
        the current coefficients, summed; each task's next coefficients from the total."""
        features = job.features
        precision, quantizer, shapes = self._newton_sums(job, fit, nodes)
        coefficients = ArrayRecord({task: Array(beta) for task, beta in fit.betas.items()})
        node_ids = sorted(self.sums.sites)
        try:
            summed = self._sum(
                "newton", server_round, shapes, node_ids, coefficients, job.to_json(), quantizer=quantizer, then=then
            )
        except FederationError as error:
            fit.explain(error)
            raise
        fit.step(
            summed.arrays,
            summed.included,
            self.plan.model,
            rounds_left=self.plan.rounds - server_round,
            resolution=precision.error,
            dropouts=summed.dropouts,
            rows=features.rows,
        )
        state = glm_state(features, fit.estimates())
        return ArrayRecord({k: Array(v) for k, v in state.items()}), summed

    def _evaluate_round(
        self, server_round: int, arrays: ArrayRecord, job: TrainingJob, features: FeatureSpec, then: NextSum | None
    ) -> dict:
        """Federated metrics on every node's held-out rows, from summed evaluation sums; where
        too few sites hold enough held-out rows to send theirs, the round's figures are
        withheld, saying why (the run goes on: its model does not depend on them)."""
        messages = list(self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), self.grid))
        noise, record = self.plan.noise, {}
        shapes = self._evaluation_shapes(job)
        node_ids = [m.metadata.dst_node_id for m in messages]
        too_few = f"fewer than {self._fewest_evaluating} site(s) hold min_cohort held-out rows"
        if not self._can_evaluate(node_ids):
            return _evaluation_withheld(too_few, self._withheld.get(PURPOSES["evaluate"].cohort, {}))
        try:
            summed = self._sum("evaluate", server_round, shapes, node_ids, arrays, job.to_json(), then=then)
        except SumNotRecoveredError as failed:
            if self._can_evaluate(node_ids):
                raise  # lost sites, not too few rows: the run stops with the reason, as any sum's loss stops it
            return _evaluation_withheld(too_few, failed.dropouts)
        by_task = summed.arrays
        if noise is not None:
            bounds = [
                evaluation.readmission_bounds()
                if task == "readmission"
                else evaluation.cost_bounds(noise.cost_clip / features.cost_scale)
                for task in job.model.tasks
            ]
            by_task = [array * bound for array, bound in zip(by_task, bounds, strict=True)]
        for task, sums in zip(job.model.tasks, by_task):
            metrics = (
                evaluation.readmission_from_sums(sums)
                if task == "readmission"
                else evaluation.cost_from_sums(sums, features.cost_scale)
            )
            record.update({f"{task}_{k}": v for k, v in metrics.items()})
        # What the figures cover: the sites in the sum, their held-out rows, and every site
        # that withheld its sums (too few held-out rows, a refusal, a dropout) with its reason.
        record["evaluated_sites"] = summed.included
        record["evaluated_rows"] = int(round(float(by_task[0][0])))
        record["withheld"] = summed.dropouts
        return record


def _evaluation_withheld(reason: str, withheld: dict[str, str]) -> dict:
    """A round's record where no evaluation sum could be formed: no figures, and why."""
    return {"evaluated_sites": [], "evaluated_rows": 0, "withheld": withheld, "evaluation_withheld": reason}


def say_hello(
    grid: Grid,
    node_ids: list[int],
    config: ConfigRecord,
    enrolled: set[str],
    extra: dict[str, ConfigRecord] | None = None,
) -> dict[int, str]:
    """State the job to every node; each checks it against its site policy and names itself.

    Every name must be an enrolled roster member, once. A site that refuses the job
    stops the run: a federation runs only on a job every site accepted. ``extra``
    records ride along (a deployment's roster certificates).
    """
    content = {**(extra or {}), rec.CONFIG: config}
    messages = [Message(RecordDict(content), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    sites: dict[int, str] = {}
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            raise FederationError(
                f"node {reply.metadata.src_node_id} refused or failed to start the job: "
                f"{rec.their_reason(reply.error.reason)}. "
                "The run stops: every enrolled site must accept the job; change the run's config "
                "or ask the site to change its policy"
            )
        node = reply.content.config_records.get(rec.NODE)
        name = node.get("name") if node is not None else None
        if not isinstance(name, str) or name not in enrolled:
            raise FederationError(
                f"node {reply.metadata.src_node_id} calls itself {name!r:.60}, not an enrolled, unclaimed site"
            )
        if name in sites.values():
            first = next(node_id for node_id, claimed in sites.items() if claimed == name)
            raise FederationError(
                f"nodes {first} and {reply.metadata.src_node_id} both call themselves {name!r}: one of them is "
                "not that site (a name is the node's own claim); check which node holds that site's kit"
            )
        sites[reply.metadata.src_node_id] = name
    if len(sites) < len(enrolled):
        raise FederationError(f"sites that never answered: {', '.join(sorted(enrolled - set(sites.values())))}")
    return sites


@dataclass
class _NewtonFit:
    """An exact GLM's iteration at the coordinator: per task, the coefficients the nodes are
    asked about next and what the last Newton step decided."""

    betas: dict[str, np.ndarray]
    families: dict[str, glm.Family]
    names: list[str]
    infos: dict[str, glm.StepInfo | None]
    sites: frozenset[str] = frozenset()  # whose rows the last round's sums were over
    restarts: int = 0  # rounds whose sums were over other sites than the round before's
    refused: frozenset[str] = frozenset()  # sites that refused a round: its coefficients weighed few rows
    noise: NewtonNoise | None = None  # the DP noise the sums carry, if any
    bounds: dict[str, glm.NoisyBounds] = field(default_factory=dict)  # per task, with noise

    @classmethod
    def start(
        cls, spec: ModelSpec, features: FeatureSpec, arrays: ArrayRecord, noise: NewtonNoise | None = None
    ) -> _NewtonFit:
        """From the model the run starts (or resumes) with: its biases are the base rate and
        the mean cost, its weights zero (or a checkpoint's)."""
        state = {k: a.numpy() for k, a in arrays.items()}
        families = {
            t: glm.task_family(t, cost_family=spec.cost_family, tweedie_power=spec.tweedie_power) for t in spec.tasks
        }
        betas = glm_coefficients(features, state, spec.tasks)
        names = features.design_names
        bounds = newton_bounds(spec, len(names), noise) if noise is not None else {}
        return cls(betas, families, names, {task: None for task in spec.tasks}, noise=noise, bounds=bounds)

    @property
    def parameters(self) -> int:
        return len(self.names) + 1

    @property
    def done(self) -> bool:
        return all(info is not None and info.done for info in self.infos.values())

    def step(
        self,
        totals: list[np.ndarray],
        sites: list[str],
        spec: ModelSpec,
        *,
        rounds_left: int,
        resolution: float,
        dropouts: dict[str, str] | None = None,
        rows: int = 0,
    ) -> None:
        """The next coefficients from one round's sums over ``sites``. Sums over other sites than
        the last round's (a dropout, or its return) are of other rows: their objective is not
        comparable, so the iteration goes on from the current coefficients afresh, and it is
        done only once a round over the same sites as the one before has converged, or when
        the job has no ``rounds_left`` (then reported as not converged). Noisy sums (``rows``:
        the training rows they are over, from the statistics) take ``glm.noisy_newton_step``."""
        changed = bool(self.sites) and frozenset(sites) != self.sites
        self.refused |= {site for site, reason in (dropouts or {}).items() if glm.CONCENTRATED in reason}
        self.sites, self.restarts = frozenset(sites), self.restarts + changed
        for (task, beta), total in zip(self.betas.items(), totals, strict=True):
            previous = None if changed else self.infos[task]
            if previous is not None and previous.done:
                continue
            iteration = 1 if previous is None else previous.iteration + 1
            common = dict(
                family=self.families[task],
                penalty=spec.penalty,
                previous=previous,
                feature_names=self.names,
                max_iterations=iteration + rounds_left,
            )
            if self.noise is None:
                self.betas[task], self.infos[task] = glm.newton_step(total, beta, resolution=resolution, **common)
            else:
                self.betas[task], self.infos[task] = glm.noisy_newton_step(
                    total, beta, bounds=self.bounds[task], noise_sd=self.noise.sd, rows=rows, **common
                )

    def explain(self, error: Exception) -> None:
        """A note on a round that failed after sites refused earlier ones for weighing few rows:
        coefficients that run off, as separated classes make them without a penalty."""
        if self.refused:
            error.add_note(
                f"earlier Newton rounds were refused by {', '.join(sorted(self.refused))}: the coefficients put "
                "their sums' weight on fewer than min_cohort rows, as coefficients that keep growing do when "
                "features separate the classes (or the zero costs); set [model] penalty > 0"
            )

    def estimates(self) -> dict[str, np.ndarray]:
        """Each task's coefficients as they stand: the reported estimate once a task is done."""
        return {
            task: info.estimate if info is not None and info.done else beta
            for (task, beta), info in zip(self.betas.items(), self.infos.values())
        }

    def progress(self) -> dict:
        """What a round's record says of the iteration: each task's deviance and whether it converged."""
        record: dict = {}
        for task, info in self.infos.items():
            if info is not None:
                deviance = float(info.sums.deviance)  # none travels with noisy sums
                record[f"{task}_deviance"] = deviance if math.isfinite(deviance) else None
                record[f"{task}_converged"] = bool(info.converged)
        return record

    def fitted(self, features: FeatureSpec) -> dict[str, glm.FittedGlm]:
        """The fitted models, with their inference; a task whose iteration ran out of rounds is
        reported as not converged (``FittedGlm.converged``), saying how often the sites changed."""
        fitted = {}
        for task, info in self.infos.items():
            model = glm.FittedGlm.from_step(info, family=self.families[task], feature_names=self.names)
            if not model.converged and self.restarts:
                note = (
                    f"; the sites in the sums changed {self.restarts} times (dropouts or refusals, named in "
                    "each round's record) and each change restarted the iteration"
                )
                model = replace(model, message=model.message + note)
            fitted[task] = model
        return fitted


def max_features(layout: StatisticsLayout) -> int:
    """The most features ``layout`` can give (before statistics): every numeric column and
    every category level may become a feature, and every column a missing flag."""
    columns = layout.columns
    return sum(1 if column.kind == "numeric" else len(column.levels) for column in columns) + len(columns)


def _max_model_parameters(plan: CoordinatorPlan) -> int:
    """The model's parameter count at the most features the layout can give (before statistics);
    the model the nodes later receive is never larger than this."""
    model = build_model(plan.model, max_features(plan.layout), seed=plan.seed)
    return sum(parameter.numel() for parameter in model.state_dict().values())


# The server-side optimiser's moments (Flower's FedOpt family: FedAdam); FedAvg has none.
_STRATEGY_STATE = ("m_t", "v_t")


def _strategy_state(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    return {
        name: dict(getattr(strategy, name)) for name in _STRATEGY_STATE if getattr(strategy, name, None) is not None
    }


def _restore_strategy(strategy: Strategy, state: dict[str, dict[str, np.ndarray]]) -> None:
    for name, arrays in state.items():
        setattr(strategy, name, dict(arrays))


def _digest(arrays: ArrayRecord) -> str:
    return hashlib.sha256(rec.content_bytes(RecordDict({rec.ARRAYS: arrays}))).hexdigest()
