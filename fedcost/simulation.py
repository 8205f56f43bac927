"""`fedcost simulate`: a whole federation on one machine, next to its two baselines.

The researcher's lab bench, not the coordinator: it holds every node's rows (synthetic,
or the researcher's own files), runs the federation on Flower's Simulation Engine — where
the coordinator sees only sums and weights — and then, outside the federation, trains a
**pooled** model (all rows in one place: the ceiling) and **local-only** models (each
site alone: the floor), and scores all three on the same held-out rows.

The run folder is built under a hidden staging name and renamed into place only when
everything succeeded, so a folder at the final path always holds a complete run; a run
that fails leaves what it wrote (the parties' audit logs above all) in ``<name>.failed``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import tomli_w
import torch
from flwr.app import Context
from flwr.simulation import run_simulation

from fedcost import schema
from fedcost.analytics.statistics import AGE_BAND, ROLE
from fedcost.analytics.statistics import SITE as BY_SITE
from fedcost.audit import AuditLog, verify_folder
from fedcost.client.app import make_client_app
from fedcost.client.budget import accountant
from fedcost.client.node import NodeSetup
from fedcost.config import AnalyticsSection, SimulationConfig
from fedcost.data.features import FeatureSpec, StatisticsLayout
from fedcost.data.files import MAPPING_FILE, write_node_files
from fedcost.data.loader import NodeData, load_node
from fedcost.data.mapping import DataMapping
from fedcost.data.synthetic import generate_ecosystem
from fedcost.data.synthetic_episodes import generate_linked_extracts
from fedcost.errors import AuditLogTamperedError, ConfigError, FederationError, ModelFitError
from fedcost.identity import Identity, PublicIdentity
from fedcost.linkage.episodes import EpisodePlan
from fedcost.models import glm
from fedcost.models.metrics import calibration_bins, cost_metrics, readmission_metrics
from fedcost.models.nets import FedcostNet, build_model
from fedcost.models.site_steps import SiteSteps, decide_site_steps
from fedcost.models.training import predict, train_local
from fedcost.models.training_job import glm_state
from fedcost.privacy import SitePolicy
from fedcost.privacy.accounting import DpSgdSteps
from fedcost.privacy.distributed import SkellamRelease
from fedcost.privacy.ledger import SUFFIX as LEDGER_SUFFIX
from fedcost.privacy.ledger import recorded_spending
from fedcost.ray_engine import ray_engine
from fedcost.report import write_report
from fedcost.report.progress import ProgressRecorder, glm_privacy_summary
from fedcost.run_folder import RunFolder, new_run_id
from fedcost.seeding import derive_seed
from fedcost.server.app import CoordinatorPlan, make_server_app
from fedcost.wire import COORDINATOR

Task = Literal["train", "analyze"]
# A site alone would train until its model settles: at least this many optimizer steps.
MIN_LOCAL_STEPS = 300
# The federated model as each site would use it: with the steps (its own cost level, fine-
# tuning) its validation rows show help, reported apart from the shared model itself.
AT_SITES = "federated_at_sites"


@dataclass(frozen=True)
class RunResult:
    """Where the run folder is and what it concluded."""

    run_dir: Path
    summary: dict


class RunRecorder(ProgressRecorder):
    """Records the coordinator's progress in the staging folder, hands each round to
    ``on_round`` and each later stage to ``stage`` (the CLI's progress) and keeps the final
    model for scoring."""

    def __init__(self, folder: Path, on_round: Callable[[dict], None], stage: Callable[[str], None]):
        super().__init__(folder)
        self.on_round_hook = on_round
        self.stage = stage
        self.weights: dict[str, np.ndarray] | None = None
        self.placement: dict[str, object] = {}  # where the sites ran (``ray_engine.Placement``)

    def on_round(self, record: dict) -> None:
        super().on_round(record)
        self.on_round_hook(record)

    def on_model(self, weights: dict[str, np.ndarray]) -> None:
        self.weights = weights


def simulate(
    config: SimulationConfig,
    *,
    out: Path | None = None,
    data_dir: Path | None = None,
    runs_root: Path = Path("runs"),
    on_start: Callable[[], None] = lambda: None,
    on_round: Callable[[dict], None] = lambda record: None,
    on_stage: Callable[[str], None] = lambda text: None,
    task: Task = "train",
) -> RunResult:
    """Run ``config`` and return the finished run folder; raises before leaving a half run.

    ``task="analyze"`` runs the federated analytics alone (grouped statistics, no model).
    """
    run_id = new_run_id()
    final = Path(out) if out else runs_root / run_id
    if final.exists() and any(final.iterdir()):
        raise ConfigError("the output folder exists and is not empty; choose another --out", path=str(final))
    mapping = DataMapping.load(data_dir / MAPPING_FILE) if data_dir else None
    nodes = _load_nodes(mapping, config) if mapping else None
    staging = final.parent / f".{final.name}.incomplete-{uuid.uuid4().hex[:6]}"
    staging.mkdir(parents=True)
    try:
        recorder = RunRecorder(staging, on_round, on_stage)
        summary = _run(config, run_id, RunFolder(staging), mapping, nodes, on_start, recorder, task)
        if final.exists():
            final.rmdir()
        staging.rename(final)
    except BaseException as error:
        _keep_failed(staging, final, error)
        raise
    return RunResult(final, summary)


def _keep_failed(staging: Path, final: Path, error: BaseException) -> None:
    """Keep what a failed run wrote (audit logs above all) under ``<name>.failed``, never
    under the final name, and say where in a note on the error."""
    if not any(staging.iterdir()):
        staging.rmdir()
        return
    failed = final.with_name(f"{final.name}.failed")
    if failed.exists():
        failed = final.with_name(f"{final.name}.failed-{uuid.uuid4().hex[:6]}")
    RunFolder(staging).error.write_text(f"{type(error).__name__}: {error}\n")
    staging.rename(failed)
    error.add_note(f"what the run wrote before it stopped (audit logs, config) is in {failed}")


def _run(
    config: SimulationConfig,
    run_id: str,
    folder: RunFolder,
    mapping: DataMapping | None,
    nodes: list[NodeData] | None,
    on_start: Callable[[], None],
    recorder: RunRecorder,
    task: Task,
) -> dict:
    started = time.perf_counter()
    window = config.analytics.episode_window()
    if mapping is None:
        ecosystem = generate_ecosystem(config.ecosystem.spec(), config.run.seed)
        linked = generate_linked_extracts(ecosystem, config.run.seed, window) if window else None
        files = write_node_files(
            ((n.name, n.role, n.frame) for n in ecosystem.nodes), folder.data, linked.extracts if linked else None
        )
        mapping = DataMapping.load(files)
        truth = ecosystem.truth | ({"episodes": linked.truth} if linked else {})
        folder.truth.write_text(json.dumps(truth, indent=2))
        nodes = _load_nodes(mapping, config)
    assert nodes is not None
    config = replace(
        config, model=replace(config.model, tasks=mapping.tasks), analytics=_analytics_for(config, mapping)
    )
    folder.config.write_bytes(tomli_w.dumps(config.resolved()).encode())

    on_start()
    plan = _federate(config, run_id, folder, mapping, recorder, task)
    recorder.stage("verifying the audit logs")
    audit = _verify_audit(folder)
    if task == "analyze":
        summary = _run_header(run_id, config, mapping, nodes, task)
    else:
        summary = _trained(config, run_id, folder, mapping, nodes, recorder)
    summary["analytics"] = recorder.analytics
    if recorder.inference:
        summary["inference"] = recorder.inference
    summary["audit"] = audit
    summary["engine"] = recorder.placement
    summary["privacy"] = _privacy_summary(config, folder, nodes)
    if plan.noise is not None:
        noise = plan.noise
        summary["statistics_privacy"] = {
            "epsilon": config.statistics_privacy.epsilon,
            "delta": config.statistics_privacy.delta,
            "noise_sd": noise.sd,
            "noise_sites": noise.sites,
            "cost_clip": noise.cost_clip,
        }
    if plan.newton_noise is not None:
        summary["glm_privacy"] = glm_privacy_summary(config, plan.newton_noise)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    folder.summary.write_text(json.dumps(summary, indent=2))
    recorder.stage("writing the report")
    write_report(folder.path, summary, recorder.rounds)
    return summary


def _trained(
    config: SimulationConfig,
    run_id: str,
    folder: RunFolder,
    mapping: DataMapping,
    nodes: list[NodeData],
    recorder: RunRecorder,
) -> dict:
    """Save the federated model and score it next to the pooled and local-only baselines."""
    if recorder.features is None or recorder.weights is None:
        raise FederationError("the federation ended without a final model; see the log above")
    features = recorder.features
    federated = build_model(config.model, features.n_features, seed=config.run.seed)
    federated.load_state_dict({k: torch.from_numpy(v) for k, v in recorder.weights.items()})
    torch.save(federated.state_dict(), folder.weights)
    folder.model.write_text(
        json.dumps({"model": dataclasses.asdict(config.model), "features": features.to_dict()}, indent=2)
    )

    predictions = {"federated": [_predict(federated, features, node.test) for node in nodes]}
    recorder.stage("pooled baseline: every site's rows in one place")
    predictions["pooled"] = _pooled_predictions(config, features, nodes)
    predictions["local_only"] = _local_only_predictions(config, features, nodes, recorder.stage)
    steps = {}
    for number, node in enumerate(nodes, 1):
        recorder.stage(f"site steps at {node.name} ({number}/{len(nodes)})")
        steps[node.name] = _site_steps(config, federated, features, node, folder)
    predictions[AT_SITES] = [steps[node.name][1] for node in nodes]
    summary = _summary(run_id, config, mapping, nodes, predictions, features, recorder.rounds)
    summary["site_steps"] = {name: decided.to_dict() for name, (decided, _) in steps.items()}
    return summary


def _analytics_for(config: SimulationConfig, mapping: DataMapping) -> AnalyticsSection:
    """The run's analytics on this data set's fields: an outcome may be named as the data set
    names it; the defaults (the ecosystem's fields) keep what the data set has; a field the
    config names that the data set lacks is refused. Group costing needs cost, disease
    groups and a node that carries payments."""
    analytics = config.analytics
    slots = {reading.column: slot for slot, reading in mapping.targets.items()}
    present = mapping.fields_present | set(mapping.targets) | {BY_SITE}
    if any(node.role != schema.ROLELESS for node in mapping.nodes):
        present.add(ROLE)
    if "age" in present and schema.COLUMNS["age"] in mapping.feature_columns:
        present.add(AGE_BAND)
    chosen = {}
    for part in ("group_by", "measures"):
        names = list(dict.fromkeys(slots.get(name, name) for name in getattr(analytics, part)))
        lacking = [name for name in names if name not in present]
        if lacking and getattr(analytics, part) != getattr(AnalyticsSection(), part):
            raise ConfigError(
                f"the data set has no field {lacking[0]!r}; its fields: {', '.join(sorted(present))}",
                path=config.source,
                field=f"analytics.{part}",
            )
        chosen[part] = tuple(name for name in names if name in present)
    paid = any(
        schema.PAYMENT in schema.ROLES[node.role].accounting or node.source_of(schema.PAYMENT) for node in mapping.nodes
    )
    costed = schema.COST in mapping.targets and schema.DISEASE_GROUP in present
    return replace(analytics, **chosen, group_costing=analytics.group_costing and paid and costed)


def _load_nodes(mapping: DataMapping, config: SimulationConfig) -> list[NodeData]:
    """Load and check every node's rows before anything runs: a bad file stops it here. A site
    with fewer training rows than min_cohort is not refused: its policy withholds every sum
    over them, and the run goes on without it and names it."""
    nodes = [
        load_node(mapping, node.name, split_seed=config.run.seed, test_fraction=config.run.test_fraction)
        for node in mapping.nodes
    ]
    return nodes


def _federate(
    config: SimulationConfig, run_id: str, folder: RunFolder, mapping: DataMapping, recorder: RunRecorder, task: Task
) -> CoordinatorPlan:
    """The federation proper, on Flower's Simulation Engine; returns the plan it ran.

    Every party gets a fresh identity; the public halves go to ``identities/`` and every
    party keeps its signed log in ``audit/``, as an auditor receives them.
    """
    coordinator = Identity.generate(COORDINATOR, "coordinator")
    identities = {node.name: Identity.generate(node.name, node.role) for node in mapping.nodes}
    folder.identities.mkdir()
    for identity in [coordinator, *identities.values()]:
        identity.public().save(folder.identities)
    folder.audit.mkdir()
    roster = tuple(sorted((name, identity.public().raw_key) for name, identity in identities.items()))
    _check_peer_groups(config, [node.name for node in mapping.nodes])
    policies = _site_policies(config, folder, [node.name for node in mapping.nodes], coordinator.public().key_id)
    setups = [
        NodeSetup(
            mapping.path.resolve(),
            node.name,
            config.run.seed,
            config.run.test_fraction,
            identity_key=identities[node.name].raw_private_key,
            roster=roster,
            drop_rounds=config.simulation.drop_nodes.get(node.name, ()),
            drop_stage=config.simulation.drop_stage,
            audit_dir=folder.audit.resolve(),
            policy=policies.get(node.name),
            ledger=(folder.ledgers / f"{node.name}{LEDGER_SUFFIX}").resolve(),
        )
        for node in mapping.nodes
    ]
    folder.ledgers.mkdir()

    def resolve_setup(context: Context) -> NodeSetup:
        return setups[int(context.node_config["partition-id"])]

    plan = CoordinatorPlan.for_job(
        config,
        folder.config,
        run_id=run_id,
        coordinator_key_id=coordinator.public().key_id,
        roster=roster,
        layout=StatisticsLayout(mapping.feature_columns, tuple(mapping.targets)),
        episodes=_episode_plan(config, run_id, mapping),
        task=task,
    )
    # Flower warns that run_simulation is deprecated in favour of `flwr run`, which needs a
    # packaged app; fedcost drives the engine from Python on purpose, so only errors show.
    logging.getLogger("flwr").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    log = AuditLog(folder.audit / f"{COORDINATOR}.jsonl", coordinator)
    with ray_engine(config.simulation, len(setups)) as placement:
        recorder.placement = placement.to_dict()
        run_simulation(
            server_app=make_server_app(plan, recorder, log),
            client_app=make_client_app(resolve_setup),
            num_supernodes=len(setups),
            backend_config={"client_resources": placement.client_resources()},
        )
    return plan


def _episode_plan(config: SimulationConfig, run_id: str, mapping: DataMapping) -> EpisodePlan | None:
    """The run's episode linkage: every hospital and payer whose mapping names an extract."""
    window = config.analytics.episode_window()
    if window is None:
        return None
    linked = {node.name: node.role for node in mapping.nodes if node.episodes is not None}
    try:
        return EpisodePlan.linking(run_id, window, config.run.min_cohort, linked)
    except ValueError as error:
        raise ConfigError(
            f'{error}: give those nodes their extracts in the mapping ([nodes.NAME] episodes = "file.csv"), '
            "or leave [analytics] episodes out",
            path=str(mapping.path),
        ) from None


def _check_peer_groups(config: SimulationConfig, names: list[str]) -> None:
    """Every site ``[analytics] peer_groups`` names is a node of the run."""
    unknown = sorted(set(config.analytics.peer_groups) - set(names))
    if unknown:
        raise ConfigError(
            f"peer group for unknown node {unknown[0]!r}; nodes: {', '.join(names)}",
            path=config.source,
            field=f"analytics.peer_groups.{unknown[0]}",
        )


def _site_policies(config: SimulationConfig, folder: RunFolder, names: list[str], coordinator: str) -> dict[str, Path]:
    """Each site's policy as the node reads it, written to ``policies/<name>.toml`` in the run.

    A simulation creates every identity afresh, so each policy's ``coordinator`` is set to
    the simulated coordinator's key id; everything else applies as the file says. Nodes
    with no policy (no entry and no ``default_policy``) run under the permissive default.
    """
    unknown = sorted(set(config.simulation.policies) - set(names))
    if unknown:
        raise ConfigError(
            f"policy for unknown node {unknown[0]!r}; nodes: {', '.join(names)}",
            path=config.source,
            field=f"simulation.policies.{unknown[0]}",
        )
    written: dict[str, Path] = {}
    for name in names:
        source = config.simulation.policies.get(name) or config.simulation.default_policy
        if not source:
            continue
        policy = {**SitePolicy.load(source).to_dict(), "coordinator": coordinator}
        folder.policies.mkdir(exist_ok=True)
        written[name] = folder.policy(name).resolve()
        written[name].write_bytes(tomli_w.dumps(policy).encode())
    return written


def _privacy_summary(config: SimulationConfig, folder: RunFolder, nodes: list[NodeData]) -> dict:
    """ε spent per site, from its release ledger under its policy; a site without DP reports
    ``dp: false``."""
    summary = {}
    for node in nodes:
        source = config.simulation.policies.get(node.name) or config.simulation.default_policy
        privacy = SitePolicy.load(source).privacy if source else None
        if privacy is None or not privacy.enabled:
            summary[node.name] = {"dp": False}
            continue
        identity = PublicIdentity.load(folder.identities / f"{node.name}.pub.json")
        spending = recorded_spending(folder.ledgers / f"{node.name}{LEDGER_SUFFIX}", identity)
        ledger = accountant(spending, privacy)
        summary[node.name] = {
            "dp": True,
            "epsilon_budget": ledger.epsilon_budget,
            "epsilon_spent": ledger.epsilon,
            "delta": ledger.delta,
            "rounds_trained": sum(isinstance(release, DpSgdSteps) for release in ledger.history),
            "noisy_sums": sum(isinstance(release, SkellamRelease) for release in ledger.history),
        }
    return summary


def _verify_audit(folder: RunFolder) -> dict:
    """Every party's log must verify and reconcile before the run counts as finished."""
    verification = verify_folder(folder.path)
    if not verification.ok:
        problems = "; ".join(str(p) for p in verification.problems[:5])
        raise AuditLogTamperedError(f"the run's audit logs do not verify: {problems}")
    return {"verified": True, "parties": sorted(verification.parties)}


def _predict(model: torch.nn.Module, features: FeatureSpec, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    predictions = predict(model, features.encode(rows))
    if "cost" in predictions:
        predictions["cost"] = predictions["cost"] * features.cost_scale
    return predictions


def _site_steps(
    config: SimulationConfig, model: FedcostNet, features: FeatureSpec, node: NodeData, folder: RunFolder
) -> tuple[SiteSteps, dict[str, np.ndarray]]:
    """The shared model as ``node``'s site would use it, and its predictions on the site's
    held-out rows: its cost level and ``[run] adaptation_epochs`` of fine-tuning, each kept
    only where the site's own validation rows show it helps (``models.site_steps``). The
    steps are saved in the run folder for ``fedcost predict --site``."""
    train = features.task_data(node.train)
    seed = derive_seed(config.run.seed, "adaptation", node.name)
    steps, adapted = decide_site_steps(
        model, train, config.training, epochs=config.run.adaptation_epochs, seed=seed, min_rows=config.run.min_cohort
    )
    folder.sites.mkdir(exist_ok=True)
    saved = folder.site_steps(node.name)
    saved.write_text(json.dumps(steps.to_dict(), indent=2))
    if adapted is not None:
        torch.save(adapted.state_dict(), saved.with_suffix(".pt"))
    predictions = steps.predict(model, adapted, features.encode(node.test))
    if "cost" in predictions:
        predictions["cost"] = predictions["cost"] * features.cost_scale
    return steps, predictions


def _train(config: SimulationConfig, features: FeatureSpec, rows: pd.DataFrame, epochs: int, label: str) -> FedcostNet:
    """The baseline model on ``rows``: an exact GLM by the federation's own estimator fitted to
    convergence (``_fit_glm``), or the network trained for ``epochs``."""
    torch.set_num_threads(1)
    model = build_model(
        config.model, features.n_features, seed=config.run.seed, readmission_rate=features.initial_readmission_rate
    )
    if config.model.exact:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in _fit_glm(config, features, rows).items()})
        return model
    data = features.task_data(rows)
    training = replace(config.training, epochs=epochs, proximal_mu=0.0)
    train_local(model, data, training, seed=derive_seed(config.run.seed, "baseline", label))
    return model


def _fit_glm(config: SimulationConfig, features: FeatureSpec, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """An exact GLM on ``rows`` alone, per task, as a torch GLM's state: the same iteration and
    penalty as the federation's (``glm.fit_pooled``). Where the rows cannot give a fit (one
    class only, at a small site), the task falls back to its mean: what such a site knows."""
    spec, x, coefficients = config.model, features.design(rows), {}
    for task in spec.tasks:
        family = glm.task_family(task, cost_family=spec.cost_family, tweedie_power=spec.tweedie_power)
        y = rows[schema.READMISSION if task == "readmission" else schema.COST].to_numpy("float64")
        y = y if task == "readmission" else y / features.cost_scale
        try:
            coefficients[task] = glm.fit_pooled(x, y, family=family, penalty=spec.penalty).coefficients
        except ModelFitError:
            mean = float(np.clip((y.sum() + 0.5) / (y.size + 1), 1e-6, None if task == "cost" else 1 - 1e-6))
            coefficients[task] = glm.start_coefficients(x.shape[1] + 1, family=family, mean=mean)
    return glm_state(features, coefficients)


def _pooled_predictions(config: SimulationConfig, features: FeatureSpec, nodes: list[NodeData]) -> list[dict]:
    """All training rows in one place, fitted by the federation's own estimator (an exact GLM
    to convergence; a network for as many epochs as the federation ran) and scored as it is,
    like the shared model: the gap between them is the price of federating alone."""
    rows = pd.concat([node.train for node in nodes], ignore_index=True)
    model = _train(config, features, rows, config.run.rounds * config.training.epochs, "pooled")
    return [_predict(model, features, node.test) for node in nodes]


def _local_only_predictions(
    config: SimulationConfig,
    features: FeatureSpec,
    nodes: list[NodeData],
    stage: Callable[[str], None] = lambda text: None,
) -> list[dict]:
    """Each site alone on its own rows, scored on its own held-out rows."""
    predictions = []
    for number, node in enumerate(nodes, 1):
        stage(f"local-only baseline at {node.name} ({number}/{len(nodes)})")
        steps_per_epoch = math.ceil(len(node.train) / config.training.batch_size)
        epochs = max(config.run.rounds * config.training.epochs, math.ceil(MIN_LOCAL_STEPS / steps_per_epoch))
        model = _train(config, features, node.train, epochs, f"local/{node.name}")
        predictions.append(_predict(model, features, node.test))
    return predictions


def _scores(rows: pd.DataFrame, predictions: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    scores = {}
    if "readmission" in predictions:
        scores["readmission"] = readmission_metrics(rows[schema.READMISSION].to_numpy(), predictions["readmission"])
    if "cost" in predictions:
        metrics = cost_metrics(rows[schema.COST].to_numpy(), predictions["cost"])
        scores["cost"] = {k: metrics[k] for k in ("mae", "rmse", "r2")}
    return scores


def _run_header(run_id: str, config: SimulationConfig, mapping: DataMapping, nodes: list[NodeData], task: Task) -> dict:
    """What every run's summary opens with: the run, its outcomes, its protection and its sites."""
    families = {"readmission": "logistic", "cost": f"{config.model.cost_family}, log link"}
    return {
        "run_id": run_id,
        "task": task,
        "outcomes": {
            task_name: {
                "column": column,
                "kind": "binary" if task_name == "readmission" else "non-negative",
                **({"family": families[task_name]} if config.model.exact else {}),
            }
            for task_name, column in mapping.outcome_columns.items()
        },
        "secure_aggregation": config.secure_aggregation.enabled,
        "min_cohort": config.run.min_cohort,
        "currency": config.analytics.currency,
        "nodes": [
            {"name": n.name, "role": n.role, "train_rows": len(n.train), "test_rows": len(n.test)} for n in nodes
        ],
    }


def _summary(
    run_id: str,
    config: SimulationConfig,
    mapping: DataMapping,
    nodes: list[NodeData],
    predictions: dict[str, list[dict]],
    features: FeatureSpec,
    rounds: list[dict],
) -> dict:
    all_test = pd.concat([node.test for node in nodes], ignore_index=True)
    summary = _run_header(run_id, config, mapping, nodes, "train")
    summary |= {
        "rounds": config.run.rounds,
        "strategy": config.strategy.name,
        "dropouts": {r["round"]: r["dropouts"] for r in rounds if r.get("dropouts")},
        "model": config.model.kind,
        "tasks": list(config.model.tasks),
        "test_rows": len(all_test),
        "missing_flagged": list(features.flagged),
        "adaptation_epochs": config.run.adaptation_epochs,
        "federated_evaluation": rounds[-1] if rounds else {},
    }
    for task in config.model.tasks:
        summary[task] = {}
    calibration = {}
    for model_name in predictions:
        pooled = {k: np.concatenate([p[k] for p in predictions[model_name]]) for k in predictions[model_name][0]}
        for task, scores in _scores(all_test, pooled).items():
            summary[task][model_name] = scores
        if "readmission" in pooled:
            calibration[model_name] = calibration_bins(all_test[schema.READMISSION].to_numpy(), pooled["readmission"])
    summary["calibration"] = calibration
    site_scores = [{m: _scores(node.test, predictions[m][i]) for m in predictions} for i, node in enumerate(nodes)]
    summary["per_site"] = {
        node.name: {
            "role": node.role,
            **{task: {m: s[task] for m, s in scores.items() if task in s} for task in config.model.tasks},
        }
        for node, scores in zip(nodes, site_scores)
    }
    return summary
