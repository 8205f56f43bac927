"""The coordinator's ServerApp on Flower's deployment engine (a SuperLink's ServerApp process).

``fedcost run`` creates the run folder (``<federation>/runs/<run-id>/job.toml``) and
submits fedcost's Flower app with two run-config values: the federation folder and the
run id. This module turns those into a ``CoordinatorPlan`` — the roster is every
admitted node's CA-signed certificate, sent with the hello — and runs the same
``Coordinator`` as a simulation, checkpointing after each round and resuming from the
run's checkpoint when one exists. Its outputs land in the run folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcost.audit import AuditLog
from fedcost.errors import FederationError
from fedcost.federation import checkpoint, roster
from fedcost.federation.job import FederationJob
from fedcost.federation.provision import COORDINATOR, Federation
from fedcost.identity.federation_ca import certificate_to_pem, party_identity, utc_now
from fedcost.models.nets import build_model
from fedcost.report.progress import METRICS_FILE, ProgressRecorder
from fedcost.server.app import Coordinator, CoordinatorPlan, ResumePoint
from fedcost.server.shared_sum import MIN_SECURE_NODES

FEDERATION_DIR, RUN_ID = "federation-dir", "run-id"  # the run-config keys fedcost's Flower app declares
ERROR_FILE, SUMMARY_FILE = "error.txt", "summary.json"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    federation = Federation.load(Path(str(context.run_config[FEDERATION_DIR])))
    folder = federation.runs_dir / str(context.run_config[RUN_ID])
    try:
        coordinate(grid, federation, folder)
    except BaseException as error:
        (folder / ERROR_FILE).write_text(f"{type(error).__name__}: {error}\n")
        raise


def coordinate(grid: Grid, federation: Federation, folder: Path) -> None:
    """Run (or resume) the job in ``folder`` over the federation's admitted nodes."""
    job = FederationJob.load(folder / "job.toml")
    admitted = [node for node, reason in federation.admission(at=utc_now()).values() if reason is None]
    if not admitted:
        raise FederationError("no enrolled, unrevoked, unexpired node; enrol nodes with `fedcost federation add-node`")
    identities = [party_identity(node.certificate) for node in admitted]
    coordinator = federation.coordinator_identity()
    (folder / "audit").mkdir(exist_ok=True)
    (folder / "identities").mkdir(exist_ok=True)
    for identity in [coordinator.public(), *identities]:
        identity.save(folder / "identities")
    # The CA's word for every party's key, so `fedcost audit verify --ca` pins each one.
    for node, identity in zip(admitted, identities):
        (folder / "identities" / f"{identity.name}.cert.pem").write_bytes(certificate_to_pem(node.certificate))
    shutil.copyfile(federation.coordinator_dir / f"{COORDINATOR}.cert.pem", folder / "identities" / f"{COORDINATOR}.cert.pem")
    resume = checkpoint.load(folder)
    config = job.config
    plan = CoordinatorPlan(
        run_id=folder.name,
        coordinator_key_id=coordinator.public().key_id,
        roster=tuple(sorted((i.name, i.raw_key) for i in identities)),
        rounds=config.run.rounds,
        seed=config.run.seed,
        layout=job.data.layout(),
        model=config.model,
        training=config.training,
        strategy=config.strategy,
        secure_aggregation=config.secure_aggregation,
        config_digest=hashlib.sha256((folder / "job.toml").read_bytes()).hexdigest(),
        hello_records=((roster.RECORD, roster.roster_record([n.certificate for n in admitted], federation.crl())),),
        resume=resume,
        min_nodes=MIN_SECURE_NODES if config.secure_aggregation.enabled else 1,
        min_cohort=config.run.min_cohort,
        analytics=config.analytics,
    )
    recorder = RunFolderRecorder(folder, job, resume)
    log = AuditLog(folder / "audit" / f"{COORDINATOR}.jsonl", coordinator)
    Coordinator(plan, grid, recorder, log, on_checkpoint=lambda point: checkpoint.save(folder, point)).run()
    recorder.finish(sorted(i.name for i in identities))


class RunFolderRecorder(ProgressRecorder):
    """Records the coordinator's progress in the run folder and saves the final model; a
    resumed run keeps its rounds."""

    def __init__(self, folder: Path, job: FederationJob, resume: ResumePoint | None):
        rounds = _rounds(folder / METRICS_FILE, up_to=resume.round if resume else 0)
        # A round that ran past its checkpoint before a crash is run again: drop its record.
        (folder / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rounds))
        super().__init__(folder, rounds)
        self.job = job

    def on_model(self, weights: dict[str, np.ndarray]) -> None:
        assert self.features is not None
        model = build_model(self.job.config.model, self.features.n_features, seed=self.job.config.run.seed)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        torch.save(model.state_dict(), self.folder / "model.pt")
        (self.folder / "model.json").write_text(json.dumps(
            {"model": dataclasses.asdict(self.job.config.model), "features": self.features.to_dict()}, indent=2))

    def finish(self, nodes: list[str]) -> None:
        summary = {
            "run_id": self.folder.name,
            "rounds": self.job.config.run.rounds,
            "strategy": self.job.config.strategy.name,
            "secure_aggregation": self.job.config.secure_aggregation.enabled,
            "nodes": nodes,
            "dropouts": {r["round"]: r["dropouts"] for r in self.rounds if r.get("dropouts")},
            "federated_evaluation": self.rounds[-1] if self.rounds else {},
            **self.analytics,
        }
        (self.folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


def _rounds(path: Path, *, up_to: int) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["round"] <= up_to]
