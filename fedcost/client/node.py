"""A node's local work, without Flower: statistics, training and evaluation on its rows.

Only sums, model weights and counts come out of here; rows stay inside ``NodeData``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedcost import schema
from fedcost.analytics import GroupedStatisticsLayout, site_totals
from fedcost.analytics.benchmarking import shared_vector, without_site_level
from fedcost.analytics.statistics import TableRelease
from fedcost.data.features import FeatureSpec, StatisticsLayout
from fedcost.data.loader import NodeData, load_node
from fedcost.data.mapping import DataMapping
from fedcost.errors import PolicyViolationError
from fedcost.models import evaluation, glm
from fedcost.models.nets import ModelSpec, build_model
from fedcost.models.training import TrainResult, predict, train_local
from fedcost.models.training_job import TrainingJob, newton_blocks, newton_bounds
from fedcost.privacy import MIN_COHORT
from fedcost.privacy.distributed import NewtonNoise, StatisticsNoise
from fedcost.privacy.dp import DPConfig, train_local_dp
from fedcost.privacy.ledger import SUFFIX as LEDGER_SUFFIX
from fedcost.seeding import derive_seed
from fedcost.wire.purposes import PURPOSES


@dataclass(frozen=True)
class NodeSetup:
    """What a node brings: its rows (mapping, name, split) and its identity.

    ``identity_key`` is the node's raw Ed25519 private key; ``roster`` pairs every
    federation member's name with its raw public key, as the federation's certificates
    say — the node trusts these, never keys relayed by the coordinator. ``policy`` is
    the site's policy file (``fedcost.privacy.SitePolicy``); without one the node runs
    under the permissive default of ``fedcost.client.site.site_policy``. ``ledger`` is
    the site's release ledger (default: beside its audit log); ``audit_root`` the folder
    under which all its audit logs lie (default: ``audit_dir``).
    """

    mapping: Path
    name: str
    split_seed: int
    test_fraction: float = 0.2
    identity_key: bytes = b""
    roster: tuple[tuple[str, bytes], ...] = ()
    drop_rounds: tuple[int, ...] = ()
    drop_stage: str = "masked-input"
    audit_dir: Path = Path("audit")
    policy: Path | None = None
    ledger: Path | None = None
    audit_root: Path | None = None

    @property
    def ledger_path(self) -> Path:
        """The site's release ledger (``fedcost.privacy.ledger``): kept across jobs."""
        return self.ledger or self.audit_dir / f"{self.name}{LEDGER_SUFFIX}"

    def audit_logs(self) -> list[Path]:
        """Every audit log of this site's, of every run: they anchor its ledger."""
        return sorted((self.audit_root or self.audit_dir).rglob(f"{self.name}.jsonl"))


@dataclass(frozen=True)
class Ask:
    """What an accepted request asks of the node's rows.

    ``job`` and ``weights``: the training job and the global model, for the purposes
    that carry a model; ``layout`` and ``release``: the statistics table and the cells
    the plan withholds (analytics); ``slot`` and ``sites``: the site's block and the
    roster's size (benchmark); ``noise``: the job's distributed DP noise, under which a
    sum other than a training update is released whole with its values clipped instead
    of with small cells withheld; ``newton_noise``: the job's noise on an exact GLM's Newton
    sums, which then leave normalised (``glm.noisy_site_sums``); ``secure``: the
    contribution leaves masked, so feature statistics may carry what only a sum over sites
    may show (``fedcost.data.features``, levels no site can release).
    """

    purpose: str
    round: int
    min_cohort: int
    job: TrainingJob | None = None
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    layout: GroupedStatisticsLayout | None = None
    release: TableRelease | None = None
    slot: int = 0
    sites: int = 0
    noise: StatisticsNoise | None = None
    limit: float = math.inf  # the most any entry of an exact GLM's sums may be (the quantiser's clip)
    newton_noise: NewtonNoise | None = None
    secure: bool = False  # the contribution leaves masked (SecAgg+), only its sum over sites seen

    @property
    def cost_clip(self) -> float | None:
        """The most one row's cost counts in a noisy sum; None for a sum without noise."""
        return self.noise.cost_clip if self.noise is not None and not PURPOSES[self.purpose].trains else None


@dataclass(frozen=True)
class Contribution:
    """What a node adds to one shared sum: float arrays and its integer weight."""

    arrays: list[np.ndarray]
    weight: int


@lru_cache(maxsize=8)
def _load(setup: NodeSetup) -> tuple[DataMapping, NodeData, str]:
    mapping = DataMapping.load(setup.mapping)
    data = load_node(mapping, setup.name, split_seed=setup.split_seed, test_fraction=setup.test_fraction)
    return mapping, data, _rows_digest(data)


def _rows_digest(data: NodeData) -> str:
    """SHA-256 of the site's checked rows and their split: what fixed-data releases describe."""
    digest = hashlib.sha256()
    for part in (data.train, data.test):
        digest.update(json.dumps(list(part.columns)).encode())
        digest.update(pd.util.hash_pandas_object(part, index=False).to_numpy().tobytes())
    return digest.hexdigest()


class Node:
    """One site's rows and the three things the coordinator may ask of them."""

    def __init__(self, setup: NodeSetup):
        self.mapping, self.data, self.data_digest = _load(setup)
        self.layout = StatisticsLayout(self.mapping.feature_columns, tuple(self.mapping.targets))

    @property
    def schema_digest(self) -> str:
        """SHA-256 of the columns, levels and targets this node's rows were checked against."""
        return hashlib.sha256(json.dumps(self.layout.slots()).encode()).hexdigest()

    @property
    def name(self) -> str:
        return self.data.name

    @property
    def role(self) -> str:
        return self.data.role

    def statistics(
        self, min_cohort: int = MIN_COHORT, cost_clip: float | None = None, secure: bool = False
    ) -> np.ndarray:
        """Sums over the training rows for the federation-wide feature encoding."""
        return self.layout.local_statistics(self.data.train, min_cohort=min_cohort, cost_clip=cost_clip, secure=secure)

    def contribution(self, ask: Ask, dp: DPConfig | None = None) -> Contribution:
        """This node's part of a shared sum for ``ask``; the coordinator learns only the sum
        over nodes. ``dp``: train with record-level DP-SGD at these settings (already paid)."""
        return _CONTRIBUTIONS[ask.purpose](self, ask, dp)

    def _statistics_contribution(self, ask: Ask, dp: DPConfig | None) -> Contribution:
        return Contribution([self.statistics(ask.min_cohort, ask.cost_clip, ask.secure)], 1)

    def _analytics_contribution(self, ask: Ask, dp: DPConfig | None) -> Contribution:
        assert ask.layout is not None
        if ask.cost_clip is not None:
            vector = ask.layout.noisy_vector(self.rows, role=self.role, site=self.name, cost_clip=ask.cost_clip)
            return Contribution([vector], 1)
        return Contribution([self.grouped_statistics(ask.layout, ask.min_cohort, ask.release)], 1)

    def _train_contribution(self, ask: Ask, dp: DPConfig | None) -> Contribution:
        """The example-weighted update (new weights minus the global ones) and the training
        loss, weighted by the example count."""
        assert ask.job is not None
        new_weights, result = self.train(ask.job, ask.weights, ask.round, dp)
        update = [new_weights[k] - ask.weights[k] for k in ask.weights]
        return Contribution(update + [np.array([result.loss])], result.examples)

    def _newton_contribution(self, ask: Ask, dp: DPConfig | None) -> Contribution:
        """An exact GLM's score and information sums per task at the coordinator's coefficients,
        over the training rows; refused where those coefficients put the sums' weight on fewer
        than ``min_cohort`` rows and on less than half the site's rows (``glm.effective_rows``):
        crafted coefficients weigh one or two patients, while an honest model's weights vary
        too little to halve a site's rows, so a small site is not left out of an exact fit."""
        assert ask.job is not None
        spec, features = ask.job.model, ask.job.features
        x, sums = features.design(self.data.train), []
        floor = min(ask.min_cohort, len(x) / 2)
        noise = ask.newton_noise
        if noise is not None:
            _check_newton_noise(noise, spec, x.shape[1] + 1)
            bounds = newton_bounds(spec, x.shape[1], noise)
        for task in spec.tasks:
            family = glm.task_family(task, cost_family=spec.cost_family, tweedie_power=spec.tweedie_power)
            y = self._target(task, features)
            beta = ask.weights[task]
            if glm.effective_rows(x, y, beta, family=family) < floor:
                raise PolicyViolationError(
                    f"the site refuses this request: its {task} {glm.CONCENTRATED} {floor:g} rows (min_cohort "
                    f"{ask.min_cohort}, or half the site's rows): such sums describe a handful of patients"
                )
            if noise is None:
                sums.append(glm.site_sums(x, y, beta, family=family, limit=ask.limit))
            else:
                sums.append(glm.noisy_site_sums(x, y, beta, family=family, bounds=bounds[task]))
        return Contribution(sums, 1)

    def _target(self, task: str, features: FeatureSpec) -> np.ndarray:
        """A task's target over the training rows: readmitted (0/1), or cost in cost-scale units."""
        if task == "readmission":
            return self.data.train[schema.READMISSION].to_numpy(dtype="float64")
        return self.data.train[schema.COST].to_numpy(dtype="float64") / features.cost_scale

    def _evaluate_contribution(self, ask: Ask, dp: DPConfig | None) -> Contribution:
        """Additive evaluation sums per task, costs in cost-scale units."""
        assert ask.job is not None
        sums = self.evaluate(ask.job, ask.weights, ask.min_cohort, ask.cost_clip)
        return Contribution([sums[task] for task in ask.job.model.tasks], 1)

    def _benchmark_contribution(self, ask: Ask, dp: DPConfig | None) -> Contribution:
        """The site's totals in its own block of the federation's vector."""
        assert ask.job is not None
        totals = self.benchmark_totals(ask.job, ask.weights, ask.min_cohort, ask.cost_clip)
        noisy = ask.cost_clip is not None
        return Contribution([shared_vector(totals, ask.slot, ask.sites, noisy=noisy)], 1)

    def train(
        self, job: TrainingJob, weights: dict[str, np.ndarray], server_round: int, dp: DPConfig | None = None
    ) -> tuple[dict[str, np.ndarray], TrainResult]:
        """Local epochs from the global weights; returns the new weights, not an update.

        With ``dp``, DP-SGD (``train_local_dp``); its seed is derived from the job so a
        simulation is reproducible (a deployment would draw it from ``secrets``).
        """
        features = job.features
        model = self._model(job, weights)
        global_params = [w.copy() for w in weights.values()] if job.training.proximal_mu > 0 else None
        data = features.task_data(self.data.train)
        seed = derive_seed(job.seed, "train", self.name, server_round)
        if dp is None:
            result = train_local(model, data, job.training, seed=seed, global_params=global_params)
        else:
            result = train_local_dp(model, data, job.training, seed=seed, dp=dp, global_params=global_params)
        return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}, result

    def evaluate(
        self,
        job: TrainingJob,
        weights: dict[str, np.ndarray],
        min_cohort: int = MIN_COHORT,
        cost_clip: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Additive evaluation sums over the held-out rows (see ``models.evaluation``) of the
        shared model as it is, costs in cost-scale units: what the run reports as
        ``federated``. Score histograms leave only in groups of at least ``min_cohort`` rows;
        for a noisy release (``cost_clip`` given) whole, with costs and predictions clipped.
        """
        features = job.features
        rows = self.data.test
        model = self._model(job, weights)
        predictions = predict(model, features.encode(rows))
        sums: dict[str, np.ndarray] = {}
        if "readmission" in predictions and schema.READMISSION in rows:
            readmitted = rows[schema.READMISSION].to_numpy()
            sums["readmission"] = evaluation.readmission_sums(
                readmitted, predictions["readmission"], min_cohort=min_cohort, noisy=cost_clip is not None
            )
        if "cost" in predictions and schema.COST in rows:
            clip = None if cost_clip is None else cost_clip / features.cost_scale
            sums["cost"] = evaluation.cost_sums(
                rows[schema.COST].to_numpy() / features.cost_scale, predictions["cost"], clip=clip
            )
        return sums

    @property
    def rows(self) -> pd.DataFrame:
        """Every row of the site, training and held-out: what its analytics describe."""
        return pd.concat([self.data.train, self.data.test], ignore_index=True)

    def grouped_statistics(
        self, layout: GroupedStatisticsLayout, min_cohort: int, release: TableRelease | None = None
    ) -> np.ndarray:
        """The site's cell sums over all its rows; cells withheld as ``release`` decided over the
        job's plan (or, without one, for this table alone)."""
        return layout.local_vector(self.rows, role=self.role, site=self.name, min_cohort=min_cohort, release=release)

    def benchmark_totals(
        self, job: TrainingJob, weights: dict[str, np.ndarray], min_cohort: int, cost_clip: float | None = None
    ) -> np.ndarray:
        """Observed and expected readmissions and costs over the site's rows with both outcomes.

        Expected values come from the federated model as the federation trained it, so
        they say what the federation would expect of this site's case mix; expected
        readmissions leave out site-level columns (``analytics.benchmarking``).
        """
        rows = self.rows.dropna(subset=[schema.READMISSION, schema.COST])
        model, encoded = self._model(job, weights), job.features.encode(rows)
        risk = predict(model, without_site_level(encoded, job.features.feature_names))["readmission"]
        cost = predict(model, encoded)["cost"] * job.features.cost_scale
        observed = rows[schema.COST].to_numpy()
        if cost_clip is not None:  # a noisy release: one row's share of every total is bounded
            observed, cost = np.minimum(observed, cost_clip), np.minimum(cost, cost_clip)
        return site_totals(rows[schema.READMISSION].to_numpy(), risk, observed, cost, min_cohort=min_cohort)

    def _model(self, job: TrainingJob, weights: dict[str, np.ndarray]) -> torch.nn.Module:
        model = build_model(job.model, job.features.n_features, seed=job.seed)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
        return model


def _check_newton_noise(noise: NewtonNoise, spec: ModelSpec, parameters: int) -> None:
    """The job's Newton sums must be those the plan's noise was priced for: no more
    coefficients, the same blocks."""
    if parameters > noise.parameters or newton_blocks(spec) != noise.blocks:
        raise PolicyViolationError(
            f"the site refuses this request: its Newton sums ({parameters} coefficients, {newton_blocks(spec)} "
            f"blocks) are not those the plan's noise was priced for ({noise.parameters}, {noise.blocks})"
        )


_CONTRIBUTIONS = {
    "statistics": Node._statistics_contribution,
    "analytics": Node._analytics_contribution,
    "train": Node._train_contribution,
    "newton": Node._newton_contribution,
    "evaluate": Node._evaluate_contribution,
    "benchmark": Node._benchmark_contribution,
}
