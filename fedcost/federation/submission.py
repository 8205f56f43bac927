"""A deployed run's folder as a submission names it: the run-config values ``fedcost run``
submits, and the check that they name one of this federation's runs (the folder's layout
is ``fedcost.run_folder``).

Imports neither torch nor Flower: ``fedcost run`` needs only these names, and starting it
is part of the time to a run's first round.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedcost.errors import FederationError
from fedcost.run_folder import RunFolder

if TYPE_CHECKING:
    from fedcost.federation.provision import Federation

FEDERATION_DIR, RUN_ID = "federation-dir", "run-id"  # the run-config keys fedcost's Flower app declares


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
    if not run_id or Path(run_id).name != run_id or not RunFolder(folder).job.is_file():
        raise FederationError(
            f"the run names run {run_id!r}, which has no job.toml in {federation.runs_dir}; "
            "submit it with `fedcost run`"
        )
    return folder
