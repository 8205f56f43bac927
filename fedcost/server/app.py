"""The coordinator's Flower ServerApp: federated statistics, then training rounds.

The round loop is fedcost's own so it can record every round, but the aggregation steps
are Flower's strategies (FedAvg, FedProx, FedAdam). Replies are ordered by node name
before aggregation so a run is reproducible whatever order they arrive in. The
coordinator only ever handles sums, weights and counts; it never receives rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from fedcost import job as keys
from fedcost.config import StrategySection
from fedcost.data.features import FeatureSpec, StatisticsLayout
from fedcost.errors import FederationError
from fedcost.job import TrainingJob
from fedcost.models import evaluation
from fedcost.models.nets import ModelSpec, build_model
from fedcost.models.training import TrainConfig

NODE_WAIT_SECONDS = 120.0


@dataclass(frozen=True)
class CoordinatorPlan:
    """Everything the coordinator needs to run a training job over ``nodes`` nodes."""

    nodes: int
    rounds: int
    seed: int
    layout: StatisticsLayout
    model: ModelSpec
    training: TrainConfig
    strategy: StrategySection


class RunObserver(Protocol):
    """Receives the coordinator's progress: the simulation writes it to the run folder."""

    def on_features(self, features: FeatureSpec, sites: list[str]) -> None: ...

    def on_round(self, record: dict) -> None: ...

    def on_model(self, weights: dict[str, np.ndarray]) -> None: ...


def make_server_app(plan: CoordinatorPlan, observer: RunObserver) -> ServerApp:
    """A ServerApp that runs ``plan`` and reports to ``observer``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        Coordinator(plan, grid, observer).run()

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
    """One run: statistics stage, model initialisation, ``rounds`` train/evaluate rounds."""

    def __init__(self, plan: CoordinatorPlan, grid: Grid, observer: RunObserver):
        self.plan = plan
        self.grid = grid
        self.observer = observer
        self.strategy = make_strategy(plan.strategy, plan.nodes)
        proximal_mu = plan.strategy.proximal_mu if plan.strategy.name == "fedprox" else 0.0
        self.training = replace(plan.training, proximal_mu=proximal_mu)

    def run(self) -> None:
        node_ids = self._wait_for_nodes()
        features = self._federated_features(node_ids)
        job = TrainingJob(self.plan.model, self.training, features, self.plan.seed)
        model = build_model(self.plan.model, features.n_features, seed=self.plan.seed, readmission_rate=features.initial_readmission_rate)
        arrays = ArrayRecord({k: Array(v.detach().numpy()) for k, v in model.state_dict().items()})
        for server_round in range(1, self.plan.rounds + 1):
            started = time.perf_counter()
            arrays, train_loss = self._train_round(server_round, arrays, job)
            record = {"round": server_round, "train_loss": train_loss}
            record.update(self._evaluate_round(server_round, arrays, job))
            record["seconds"] = round(time.perf_counter() - started, 3)
            self.observer.on_round(record)
        self.observer.on_model({k: a.numpy().astype("float32") for k, a in arrays.items()})

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        while len(node_ids := sorted(self.grid.get_node_ids())) < self.plan.nodes:
            if time.monotonic() > deadline:
                raise FederationError(
                    f"only {len(node_ids)} of {self.plan.nodes} nodes connected within {NODE_WAIT_SECONDS:.0f} s"
                )
            time.sleep(0.2)
        return node_ids

    def _federated_features(self, node_ids: list[int]) -> FeatureSpec:
        """Sum every node's statistics vector; the totals give the shared encoding."""
        messages = [
            Message(RecordDict({keys.CONFIG: ConfigRecord({keys.STAGE: keys.STATISTICS})}), dst_node_id=node_id, message_type=MessageType.QUERY)
            for node_id in node_ids
        ]
        replies = self._exchange(messages, "statistics")
        totals = sum(reply.content[keys.STATISTICS][keys.STATISTICS].numpy() for reply in replies)
        features = self.plan.layout.feature_spec(np.asarray(totals))
        self.observer.on_features(features, [_site(reply) for reply in replies])
        return features

    def _train_round(self, server_round: int, arrays: ArrayRecord, job: TrainingJob) -> tuple[ArrayRecord, float]:
        config = ConfigRecord({keys.JOB: job.to_json()})
        messages = self.strategy.configure_train(server_round, arrays, config, self.grid)
        replies = self._exchange(messages, f"round {server_round} training")
        aggregated, metrics = self.strategy.aggregate_train(server_round, replies)
        if aggregated is None or metrics is None:
            raise FederationError(f"round {server_round}: the strategy could not aggregate the nodes' updates")
        return aggregated, float(metrics["train-loss"])

    def _evaluate_round(self, server_round: int, arrays: ArrayRecord, job: TrainingJob) -> dict[str, float]:
        """Federated metrics on every node's held-out rows, from summed evaluation sums."""
        config = ConfigRecord({keys.JOB: job.to_json()})
        messages = self.strategy.configure_evaluate(server_round, arrays, config, self.grid)
        replies = self._exchange(messages, f"round {server_round} evaluation")
        record: dict[str, float] = {}
        for task, from_sums in (("readmission", evaluation.readmission_from_sums), ("cost", evaluation.cost_from_sums)):
            parts = [reply.content[keys.ARRAYS][task].numpy() for reply in replies if task in reply.content[keys.ARRAYS]]
            if parts:
                record.update({f"{task}_{k}": v for k, v in from_sums(np.sum(parts, axis=0)).items()})
        return record

    def _exchange(self, messages: Iterable[Message], stage: str) -> list[Message]:
        """Send, wait for every reply, refuse the stage if any node failed, order by name."""
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages))
        failures = [reply for reply in replies if reply.has_error()]
        if failures or len(replies) < len(messages):
            reasons = "; ".join(f"node {r.metadata.src_node_id}: {r.error.reason}" for r in failures)
            raise FederationError(
                f"{stage}: {len(replies) - len(failures)} of {len(messages)} nodes replied"
                + (f" ({reasons})" if reasons else "")
            )
        return sorted(replies, key=_site)


def _site(reply: Message) -> str:
    return str(reply.content[keys.NODE]["name"])
