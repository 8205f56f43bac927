"""The coordinator's side of a federation run, on Flower's deployment engine.

``fedcost run`` creates the run folder (``<federation>/runs/<run-id>/job.toml``) and
submits fedcost's Flower app with two run-config values: the federation folder and the
run id. The coordinator process claims the run from its in-process SuperLink
(``fedcost.federation.link``) and calls ``serve`` in a thread of its own (a plain Flower
SuperLink would load ``app`` in a ServerApp process instead). This module turns those
values into a ``CoordinatorPlan`` — the roster is every
admitted node's CA-signed certificate, sent with the hello — and runs the same
``Coordinator`` as a simulation, checkpointing after each round and resuming from the
run's checkpoint when one exists. Its outputs land in the run folder: ``metrics.jsonl``,
``summary.json`` and ``report.html`` as a simulation writes them (the federated model
only: no party holds the rows a pooled or local-only baseline needs; the sites' own
reports are added by ``fedcost federation collect``), and ``progress.json``, the stage
under way, which ``fedcost run`` shows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedcost.atomic import replace_atomically
from fedcost.audit import AuditLog
from fedcost.errors import FedcostError, FederationError
from fedcost.federation import checkpoint, roster
from fedcost.federation.job import FederationJob
from fedcost.federation.provision import Federation
from fedcost.federation.submission import FEDERATION_DIR, run_folder
from fedcost.identity.federation_ca import certificate_to_pem, party_identity, utc_now
from fedcost.linkage.episodes import EpisodePlan
from fedcost.models.nets import build_model
from fedcost.privacy.distributed import NewtonNoise
from fedcost.report import write_report
from fedcost.report.progress import ProgressRecorder, federation_summary
from fedcost.run_folder import RunFolder
from fedcost.server.app import Coordinator, CoordinatorPlan, ResumePoint
from fedcost.server.shared_sum import MIN_SECURE_NODES
from fedcost.wire import COORDINATOR
from fedcost.wire import records as rec
from fedcost.wire.events import Event

# Replies are polled for every 5 ms at first, backing off to 20 ms (a poll is a lookup in
# the coordinator's own memory): Flower's grids poll every 0.1 s (in memory) or 3 s (over
# HTTP), and a secure sum is six exchanges.
POLL_FIRST, POLL_MAX, POLL_GROWTH = 0.005, 0.02, 1.5
# How long a round waits for enough of the run's nodes to be connected before the run
# stops with the reason (a node lost mid-run may come back within it).
NODE_PATIENCE_SECONDS = 60.0

logger = logging.getLogger("fedcost.coordinator")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The run on a plain Flower SuperLink, whose SuperExec loads the FAB's ServerApp (fedcost's
    coordinator hosts its SuperLink and calls ``serve`` itself)."""
    federation = Federation.load(Path(str(context.run_config[FEDERATION_DIR])))
    serve(grid, federation, run_folder(federation, context.run_config))


def serve(grid: Grid, federation: Federation, folder: Path) -> None:
    """Run (or resume) the run in ``folder``: its log (this thread's records) and, if it
    stops, the reason (``error.txt``) in the folder."""
    handler = logging.FileHandler(RunFolder(folder).log, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    thread = threading.get_ident()
    handler.addFilter(lambda record: record.thread == thread)  # another run's thread logs to its own folder
    logging.getLogger("fedcost").addHandler(handler)
    logging.getLogger("fedcost").setLevel(logging.INFO)
    try:
        coordinate(grid, federation, folder)
    except BaseException as error:
        logger.error("the run stopped", exc_info=True)
        RunFolder(folder).error.write_text(f"{type(error).__name__}: {error}\n")
        raise
    finally:
        logging.getLogger("fedcost").removeHandler(handler)
        handler.close()


def coordinate(grid: Grid, federation: Federation, folder: Path) -> None:
    """Run (or resume) the job in ``folder`` over the federation's admitted nodes."""
    run = RunFolder(folder)
    job = FederationJob.load(run.job)
    admitted = [node for node, reason in federation.admission(at=utc_now()).values() if reason is None]
    if not admitted:
        raise FederationError("no enrolled, unrevoked, unexpired node; enrol nodes with `fedcost federation add-node`")
    identities = [party_identity(node.certificate) for node in admitted]
    coordinator = federation.coordinator_identity()
    run.audit.mkdir(exist_ok=True)
    run.identities.mkdir(exist_ok=True)
    for identity in [coordinator.public(), *identities]:
        identity.save(run.identities)
    # The CA's word for every party's key, so `fedcost audit verify --ca` pins each one.
    for node, identity in zip(admitted, identities):
        (run.identities / f"{identity.name}.cert.pem").write_bytes(certificate_to_pem(node.certificate))
    shutil.copyfile(federation.coordinator_dir / f"{COORDINATOR}.cert.pem", run.identities / f"{COORDINATOR}.cert.pem")
    resume = checkpoint.load(folder)
    plan = CoordinatorPlan.for_job(
        job.config,
        run.job,
        run_id=run.run_id,
        coordinator_key_id=coordinator.public().key_id,
        roster=tuple(sorted((i.name, i.raw_key) for i in identities)),
        layout=job.data.layout(),
        episodes=_episode_plan(job, run.run_id, {i.name: i.role for i in identities}),
        hello_records=((roster.RECORD, roster.roster_record([n.certificate for n in admitted], federation.crl())),),
        resume=resume,
        min_nodes=MIN_SECURE_NODES if job.config.secure_aggregation.enabled else 1,
    )
    recorder = RunFolderRecorder(folder, job, resume)
    log = AuditLog(run.audit / f"{COORDINATOR}.jsonl", coordinator)
    names = {identity.name for identity in identities}
    deployed = DeployedGrid(
        grid,
        run.progress,
        minimum=plan.min_nodes,
        names=names,
        withdrawn=lambda: _withdrawn(federation, names),
    )
    started = time.perf_counter()
    running = Coordinator(plan, deployed, recorder, log, on_checkpoint=lambda point: checkpoint.save(folder, point))
    try:
        running.run()
    except FedcostError as stopped:
        # A clean stop: every party's log of the run ends signed, with the reason at the coordinator,
        # and the sites the federation withdrew logged as dropped (their own logs cannot close).
        for name, reason in _withdrawn(federation, names).items():
            log.append(Event.DROPOUT, round=deployed.round, details={"party": name, "reason": reason})
        running.close_stopped(str(stopped), connected=deployed.connected())
        raise
    recorder.finish(
        {i.name: i.role for i in identities}, seconds=time.perf_counter() - started, newton_noise=plan.newton_noise
    )


def _episode_plan(job: FederationJob, run_id: str, roles: dict[str, str]) -> EpisodePlan | None:
    """A deployed run links every admitted hospital with every insurer and pharma site (each
    reads its extract from its own mapping, or refuses at the hello saying so)."""
    window = job.config.analytics.episode_window()
    if window is None:
        return None
    try:
        return EpisodePlan.linking(run_id, window, job.config.run.min_cohort, roles)
    except ValueError as error:
        raise FederationError(
            f"{error}, and this federation admits none of one side: leave [analytics] episodes out of the job"
        ) from None


class DeployedGrid:
    """Flower's grid as the deployed coordinator drives it.

    Replies are polled for within milliseconds (Flower's ``send_and_receive`` sleeps 3 s
    between polls); the stage under way goes to ``progress.json`` for ``fedcost run``; the
    nodes are the run's own (the coordinator registers each under its site's name: one
    admitted after the run began is not asked); and waiting for enough connected nodes
    ends: Flower's strategies wait for them forever, so a run that lost too many nodes
    (revoked, gone) stops with the reason instead.
    """

    def __init__(
        self,
        grid: Grid,
        progress: Path,
        *,
        minimum: int,
        names: set[str],
        withdrawn: Callable[[], dict[str, str]] = dict,
        patience: float = NODE_PATIENCE_SECONDS,
    ):
        self.grid = grid
        self.progress = progress
        self.minimum = minimum
        self.names = names
        self.withdrawn = withdrawn
        self.patience = patience
        self.round: int | None = None  # the round of the stage under way

    def connected(self) -> set[int]:
        """The run's nodes connected now, however few."""
        return {info.node_id for info in self.grid.get_nodes() if info.name in self.names or not info.name}

    def get_node_ids(self) -> list[int]:
        """The connected nodes, once at least ``minimum`` are; a shortfall that lasts, or
        that a revocation or expiry explains, stops the run with the reason."""
        deadline = time.monotonic() + self.patience
        while len(node_ids := sorted(self.connected())) < self.minimum:
            gone = self.withdrawn()
            if gone or time.monotonic() > deadline:
                why = "; ".join(f"node {name!r} is no longer admitted: {reason}" for name, reason in gone.items())
                raise FederationError(
                    f"{why + '; ' if why else ''}only {len(node_ids)} of the run's nodes are connected, fewer than "
                    f"the {self.minimum} this run needs (secure aggregation sums over at least {MIN_SECURE_NODES} "
                    "sites), so the run stops. Start the missing nodes (or admit others) and run the job again"
                )
            time.sleep(0.5)
        return node_ids

    def send_and_receive(self, messages: Iterable[Message]) -> list[Message]:
        """Send ``messages`` and wait, without a time limit, for every reply (the SuperLink
        answers for a node that went offline)."""
        messages = list(messages)
        kind = self._stage(messages[0]) if messages else ""
        started = time.perf_counter()
        pending = set(self.grid.push_messages(messages))
        pushed = time.perf_counter()
        replies: list[Message] = []
        wait, polls = POLL_FIRST, 0
        while pending:
            arrived = list(self.grid.pull_messages(pending))
            polls += 1
            replies += arrived
            pending -= {reply.metadata.reply_to_message_id for reply in arrived}
            if pending:
                time.sleep(wait)
                wait = min(POLL_MAX, wait * POLL_GROWTH)
        logger.info(
            "%s to %d nodes: seconds: send %.3f, replies %.3f (%d polls)",
            kind,
            len(messages),
            pushed - started,
            time.perf_counter() - pushed,
            polls,
        )
        return replies

    def _stage(self, message: Message) -> str:
        config = message.content[rec.CONFIG]
        stage = {"kind": rec.message_kind(message.content), "round": config.get(rec.ROUND), "at": time.time()}
        replace_atomically(self.progress, json.dumps(stage).encode())
        self.round = stage["round"] if isinstance(stage["round"], int) else self.round
        return str(stage["kind"])


def _withdrawn(federation: Federation, names: set[str]) -> dict[str, str]:
    """The run's nodes the federation no longer admits (revoked, expired), with the reason."""
    return {
        name: reason
        for name, (_, reason) in federation.admission(at=utc_now()).items()
        if name in names and reason is not None
    }


class RunFolderRecorder(ProgressRecorder):
    """Records the coordinator's progress in the run folder and saves the final model; a
    resumed run keeps its rounds."""

    def __init__(self, folder: Path, job: FederationJob, resume: ResumePoint | None):
        metrics = RunFolder(folder).metrics
        rounds = _rounds(metrics, up_to=resume.round if resume else 0)
        # A round that ran past its checkpoint before a crash is run again: drop its record.
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rounds))
        super().__init__(folder, rounds)
        self.job = job

    def on_model(self, weights: dict[str, np.ndarray]) -> None:
        assert self.features is not None
        model = build_model(self.job.config.model, self.features.n_features, seed=self.job.config.run.seed)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        torch.save(model.state_dict(), self.folder.weights)
        self.folder.model.write_text(
            json.dumps(
                {"model": dataclasses.asdict(self.job.config.model), "features": self.features.to_dict()}, indent=2
            )
        )

    def on_round(self, record: dict) -> None:
        # Sites that do not share their training loss add 0 to its sum: a loss of exactly 0
        # is one no site shared, not a perfect fit.
        if "train_loss" in record:
            record = {**record, "train_loss": record["train_loss"] or None}
        super().on_round(record)

    def finish(self, roles: dict[str, str], *, seconds: float, newton_noise: NewtonNoise | None) -> None:
        """``summary.json`` and ``report.html``, as a simulation's but for the federated model only."""
        summary = federation_summary(
            self.folder.run_id,
            self.job.config,
            roles,
            self.rounds,
            self.analytics,
            seconds=seconds,
            newton_noise=newton_noise,
        )
        if self.features is not None:
            summary |= self.features.coverage()
        if self.inference:
            summary["inference"] = self.inference
        replace_atomically(self.folder.summary, json.dumps(summary, indent=2).encode())
        write_report(self.folder.path, summary, self.rounds)


def _rounds(path: Path, *, up_to: int) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["round"] <= up_to]
