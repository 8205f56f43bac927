"""A run's folder: where a simulation, a deployed coordinator, the report, ``fedcost predict``
and an auditor find each of its files (README, "The run folder").

Imports nothing but the standard library: every layer, the cores included, names the files
of a run through ``RunFolder``, and ``fedcost run`` needs it before any heavy import.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


def new_run_id() -> str:
    """A fresh run id: its UTC start time (so run folders sort by start) and 6 random hex digits."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


@dataclass(frozen=True)
class RunFolder:
    """The layout of one run's folder; its paths exist only once the run has written them."""

    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    # What the run was asked to do.
    @property
    def config(self) -> Path:
        """A simulation's resolved config (rerun it with ``fedcost simulate``)."""
        return self.path / "config.toml"

    @property
    def job(self) -> Path:
        """A deployed run's job, as ``fedcost run`` checked and submitted it."""
        return self.path / "job.toml"

    # What the coordinator records as the run goes.
    @property
    def features(self) -> Path:
        return self.path / "features.json"

    @property
    def metrics(self) -> Path:
        """One line per round."""
        return self.path / "metrics.jsonl"

    @property
    def progress(self) -> Path:
        """A deployed run's stage under way: ``{"kind", "round", "at"}``."""
        return self.path / "progress.json"

    @property
    def checkpoint(self) -> Path:
        """A deployed run's last completed round, to resume from."""
        return self.path / "checkpoint.npz"

    @property
    def log(self) -> Path:
        """A deployed coordinator's log of the run."""
        return self.path / "coordinator.log"

    @property
    def error(self) -> Path:
        """Why a run stopped."""
        return self.path / "error.txt"

    # The results.
    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def plot(self, name: str) -> Path:
        """``plots/<name>.png``."""
        return self.plots / f"{name}.png"

    @property
    def model(self) -> Path:
        """The final model's spec and the federation's feature encoding."""
        return self.path / "model.json"

    @property
    def weights(self) -> Path:
        """The final model's weights (a torch state dict)."""
        return self.path / "model.pt"

    @property
    def glm(self) -> Path:
        """An exact GLM's fit, as ``fedcost predict`` loads it."""
        return self.path / "glm.json"

    @property
    def coefficients(self) -> Path:
        return self.path / "coefficients.csv"

    @property
    def sites(self) -> Path:
        return self.path / "sites"

    def site_steps(self, site: str) -> Path:
        """The steps ``site`` kept (``fedcost predict --site``); its fine-tuned weights, if it
        fine-tunes, are beside them with the suffix ``.pt``."""
        return self.sites / f"{site}.json"

    @property
    def statistics(self) -> Path:
        return self.path / "statistics.csv"

    @property
    def benchmark(self) -> Path:
        return self.path / "benchmark.csv"

    @property
    def group_costing(self) -> Path:
        return self.path / "group_costing.csv"

    @property
    def episodes(self) -> Path:
        return self.path / "episodes.csv"

    # What an auditor checks.
    @property
    def audit(self) -> Path:
        """Every party's signed audit log."""
        return self.path / "audit"

    @property
    def identities(self) -> Path:
        """Every party's public identity (and, deployed, its CA-signed certificate)."""
        return self.path / "identities"

    @property
    def policies(self) -> Path:
        return self.path / "policies"

    def policy(self, site: str) -> Path:
        """A simulated site's policy as its node ran it."""
        return self.policies / f"{site}.toml"

    @property
    def ledgers(self) -> Path:
        """Each simulated site's release ledger: a simulation's sites live as long as the run."""
        return self.path / "ledgers"

    # A synthetic simulation's data.
    @property
    def truth(self) -> Path:
        """The generator's truth."""
        return self.path / "truth.json"

    @property
    def data(self) -> Path:
        """The generated node files and their mapping."""
        return self.path / "data"
