"""A federation run's folder: its id, the run-config values ``fedcost run`` submits to name
it, and the files the coordinator writes in it.

Imports neither torch nor Flower: ``fedcost run`` needs only these names, and starting it
is part of the time to a run's first round.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fedcost.errors import FederationError

if TYPE_CHECKING:
    from fedcost.federation.provision import Federation

FEDERATION_DIR, RUN_ID = "federation-dir", "run-id"  # the run-config keys fedcost's Flower app declares
ERROR_FILE, SUMMARY_FILE, LOG_FILE = "error.txt", "summary.json", "coordinator.log"


def new_run_id() -> str:
    """A fresh run id: its UTC start time (so run folders sort by start) and 6 random hex digits."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def run_folder(federation: Federation, run_config: Mapping[str, object]) -> Path:
    """The run folder a submission names; refused unless it is one of this federation's runs."""
    named = Path(str(run_config.get(FEDERATION_DIR, "")))
    run_id = str(run_config.get(RUN_ID, ""))
    folder = federation.runs_dir / run_id
    if not named.is_absolute() or named.resolve() != federation.root.resolve():
        raise FederationError(
            f"the run names federation folder {str(named)!r}, not this coordinator's ({federation.root}); "
            "submit it with `fedcost run` and this federation's folder"
        )
    if not run_id or Path(run_id).name != run_id or not (folder / "job.toml").is_file():
        raise FederationError(
            f"the run names run {run_id!r}, which has no job.toml in {federation.runs_dir}; "
            "submit it with `fedcost run`"
        )
    return folder
