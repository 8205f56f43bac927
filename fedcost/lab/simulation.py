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
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import tomli_w
import torch
from flwr.app import Context
from flwr.simulation import run_simulation

from fedcost import schema
from fedcost.analytics.statistics import AGE_BAND, ROLE
from fedcost.analytics.statistics import SITE as BY_SITE
from fedcost.audit import AuditLog, verify_folder
from fedcost.client.app import make_client_app
from fedcost.client.node import NodeSetup
from fedcost.config import AnalyticsSection, SimulationConfig
from fedcost.data.features import StatisticsLayout
from fedcost.data.files import MAPPING_FILE, write_node_files
from fedcost.data.loader import NodeData, load_node
from fedcost.data.mapping import DataMapping
from fedcost.data.synthetic import generate_ecosystem
from fedcost.data.synthetic_episodes import generate_linked_extracts
from fedcost.errors import AuditLogTamperedError, ConfigError, FederationError
from fedcost.identity import Identity
from fedcost.lab.baselines import local_only_predictions, pooled_predictions, predict_rows, site_steps
from fedcost.lab.summary import privacy_summary, run_header, trained_summary
from fedcost.linkage.episodes import EpisodePlan
from fedcost.models.nets import build_model
from fedcost.privacy import SitePolicy
from fedcost.privacy.ledger import SUFFIX as LEDGER_SUFFIX
from fedcost.ray_engine import ray_engine
from fedcost.report import write_report
from fedcost.report.progress import ProgressRecorder, glm_privacy_summary
from fedcost.run_folder import RunFolder, new_run_id
from fedcost.server.app import CoordinatorPlan, make_server_app
from fedcost.wire import COORDINATOR

Task = Literal["train", "analyze"]
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
        summary = run_header(run_id, config, mapping, nodes, task)
    else:
        summary = _trained(config, run_id, folder, mapping, nodes, recorder)
    summary["analytics"] = recorder.analytics
    if recorder.inference:
        summary["inference"] = recorder.inference
    summary["audit"] = audit
    summary["engine"] = recorder.placement
    summary["privacy"] = privacy_summary(config, folder, nodes, run_id)
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

    predictions = {"federated": [predict_rows(federated, features, node.test) for node in nodes]}
    recorder.stage("pooled baseline: every site's rows in one place")
    predictions["pooled"] = pooled_predictions(config, features, nodes)
    predictions["local_only"] = local_only_predictions(config, features, nodes, recorder.stage)
    steps = {}
    for number, node in enumerate(nodes, 1):
        recorder.stage(f"site steps at {node.name} ({number}/{len(nodes)})")
        steps[node.name] = site_steps(config, federated, features, node, folder)
    predictions[AT_SITES] = [steps[node.name][1] for node in nodes]
    summary = trained_summary(run_id, config, mapping, nodes, predictions, features, recorder.rounds)
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
    names = [node.name for node in mapping.nodes]
    _check_node_names(config, names, config.analytics.peer_groups, "peer group", "analytics.peer_groups")
    policies = _site_policies(config, folder, names, coordinator.public().key_id)
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


def _check_node_names(config: SimulationConfig, names: list[str], named: Iterable[str], what: str, field: str) -> None:
    """Every node the config's ``field`` names (peer groups, policies) is a node of the run."""
    unknown = sorted(set(named) - set(names))
    if unknown:
        raise ConfigError(
            f"{what} for unknown node {unknown[0]!r}; nodes: {', '.join(names)}",
            path=config.source,
            field=f"{field}.{unknown[0]}",
        )


def _site_policies(config: SimulationConfig, folder: RunFolder, names: list[str], coordinator: str) -> dict[str, Path]:
    """Each site's policy as the node reads it, written to ``policies/<name>.toml`` in the run.

    A simulation creates every identity afresh, so each policy's ``coordinator`` is set to
    the simulated coordinator's key id; everything else applies as the file says. Nodes
    with no policy (no entry and no ``default_policy``) run under the permissive default.
    """
    _check_node_names(config, names, config.simulation.policies, "policy", "simulation.policies")
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


def _verify_audit(folder: RunFolder) -> dict:
    """Every party's log must verify and reconcile before the run counts as finished."""
    verification = verify_folder(folder.path)
    if not verification.ok:
        problems = "; ".join(str(p) for p in verification.problems[:5])
        raise AuditLogTamperedError(f"the run's audit logs do not verify: {problems}")
    return {"verified": True, "parties": sorted(verification.parties)}
