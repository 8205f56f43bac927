"""The coordinator's checkpoint of a run: the global model and round state, one file.

Written after every completed round to ``<run>/checkpoint.npz`` through a temporary file
that is flushed and renamed into place, so a coordinator killed at any moment leaves
either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from fedcost.atomic import replace_atomically
from fedcost.data.features import FeatureSpec
from fedcost.errors import ConfigError
from fedcost.run_folder import RunFolder
from fedcost.server.app import ResumePoint

_META, _MODEL, _STRATEGY = "meta", "model/", "strategy/"


def save(folder: Path, point: ResumePoint) -> None:
    arrays = {f"{_MODEL}{k}": v for k, v in point.arrays.items()}
    for name, state in point.strategy_state.items():
        arrays.update({f"{_STRATEGY}{name}/{k}": v for k, v in state.items()})
    meta = json.dumps({"round": point.round, "features": point.features.to_dict()}).encode()
    archive = io.BytesIO()
    np.savez(archive, **arrays, **{_META: np.frombuffer(meta, dtype=np.uint8)})
    replace_atomically(RunFolder(folder).checkpoint, archive.getvalue())


def load(folder: Path) -> ResumePoint | None:
    """The last completed round of the run in ``folder``, or None before the first one."""
    path = RunFolder(folder).checkpoint
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data[_META].tobytes())
            model = {k.removeprefix(_MODEL): data[k] for k in data.files if k.startswith(_MODEL)}
            strategy: dict[str, dict[str, np.ndarray]] = {}
            for key in (k for k in data.files if k.startswith(_STRATEGY)):
                name, array = key.removeprefix(_STRATEGY).split("/", 1)
                strategy.setdefault(name, {})[array] = data[key]
        return ResumePoint(int(meta["round"]), model, FeatureSpec.from_dict(meta["features"]), strategy)
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(
            f"not a readable checkpoint ({error}); move it away to restart the run from round 1", path=str(path)
        ) from None
