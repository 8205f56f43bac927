"""``fedcost run``: submit a job to the running coordinator, follow it, and ride out a restart.

The run folder (``runs/<run-id>/``) is the run's state, not the coordinator: the job,
the checkpoint after each round, the metrics. So when the coordinator goes away
mid-run, ``fedcost run`` waits for it; a coordinator that comes back (restarted, on a
fresh in-memory state) no longer knows the run, and ``fedcost run`` submits it again
under the same run id: the ServerApp resumes after the last checkpointed round, and no
round is counted twice. The progress bar shows the stage under way from the hello on
(``progress.json``, written by the coordinator before each exchange).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedcost.errors import CoordinatorUnreachableError, FederationError
from fedcost.federation import submission
from fedcost.federation.control import Control
from fedcost.federation.provision import Federation
from fedcost.run_folder import RunFolder

POLL_SECONDS = 1.0
# How long `fedcost run` waits for a coordinator that went away before it gives up (the
# run can still be resumed later with --resume).
RECONNECT_PATIENCE = 600.0


@dataclass
class Follower:
    """Shows a run's progress: each finished round, and the stage under way."""

    on_round: Callable[[dict], None]
    on_stage: Callable[[str], None]
    say: Callable[[str], None]
    shown: int = 0
    stage: str = ""

    def update(self, folder: Path) -> None:
        metrics = RunFolder(folder).metrics
        records = (
            [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
        )
        for record in records[self.shown :]:
            self.on_round(record)
        self.shown = max(self.shown, len(records))
        progress = RunFolder(folder).progress
        try:
            stage = stage_text(json.loads(progress.read_text())) if progress.exists() else ""
        except (OSError, ValueError):  # replaced while read: the next poll shows it
            return
        if stage != self.stage:
            self.stage = stage
            self.on_stage(stage)


def stage_text(progress: dict) -> str:
    """``{"kind": "secagg:train:masked-input", "round": 2}`` as ``round 2: train, masked-input``."""
    parts = str(progress.get("kind", "")).split(":")
    what = ", ".join(p for p in parts[1:] if p) if parts[0] in ("secagg", "plain") else parts[0]
    round_ = progress.get("round")
    if parts[0] in ("hello", "close"):
        return {"hello": "stating the job to the sites", "close": "closing the run"}[parts[0]]
    return f"round {round_}: {what}" if round_ else f"before training: {what}"


def submit_and_follow(federation: Federation, folder: Path, follower: Follower) -> None:
    """Submit the run in ``folder`` and follow it to its end; resubmit it (resuming from its
    checkpoint) if the coordinator restarts meanwhile. Raises ``FederationError`` with the
    reason if the run stops."""
    address, ca = federation.config.address, federation.ca_cert_file
    run = RunFolder(folder)
    config = {submission.FEDERATION_DIR: str(federation.root.resolve()), submission.RUN_ID: run.run_id}
    with Control(address, ca) as control:
        flower_run = control.start_run(config)
    follower.say(f"run {folder.name} submitted (Flower run {flower_run}); folder: {folder}")
    while True:
        status = _follow(federation, folder, flower_run, follower)
        if status is not None:
            break
        run.error.unlink(missing_ok=True)
        with Control(address, ca) as control:
            flower_run = control.start_run(config)
        follower.say(
            f"the coordinator restarted: run {folder.name} resumes from its last checkpoint (Flower run {flower_run})"
        )
    if status[1] != "completed" or not run.summary.exists():
        reason = run.error.read_text().strip() if run.error.exists() else f"Flower reports the run {status[1]}"
        raise FederationError(
            f"the run stopped: {reason}. Its log is {run.log}; the sites closed "
            f"it; to try again: fedcost run {run.job} -f {federation.root}"
        )


def _follow(federation: Federation, folder: Path, flower_run: int, follower: Follower) -> tuple[str, str] | None:
    """Follow one submission until Flower says it finished; None if the coordinator came
    back without it (restarted), so it must be submitted again."""
    address, ca = federation.config.address, federation.ca_cert_file
    lost_since: float | None = None
    while True:
        try:
            with Control(address, ca) as control:
                while True:
                    status = control.run_status(flower_run)
                    if lost_since is not None:
                        follower.say("the coordinator is back")
                        lost_since = None
                    follower.update(folder)
                    if status is None:
                        return None
                    if status[0] == "finished":
                        return status
                    time.sleep(POLL_SECONDS)
        except CoordinatorUnreachableError as error:
            if lost_since is None:
                lost_since = time.monotonic()
                follower.say(
                    f"lost the coordinator ({error}); waiting up to {RECONNECT_PATIENCE / 60:.0f} min "
                    "for it to come back (its run resumes from the last checkpoint)"
                )
            elif time.monotonic() - lost_since > RECONNECT_PATIENCE:
                raise FederationError(
                    f"the coordinator did not come back within {RECONNECT_PATIENCE / 60:.0f} min; "
                    f"when it does, resume with `fedcost run --resume {folder.name} "
                    f"-f {federation.root}`"
                ) from None
            time.sleep(2 * POLL_SECONDS)
