"""A run's trained model, loaded at a site to score its own rows: what `fedcost predict` runs.

From Python::

    from fedcost.models.saved import SavedModel
    model = SavedModel.load("runs/<run-id>")
    scored = model.predict(rows)                   # the shared model, as the federation trained it
    scored = model.predict(rows, site="st-mary")   # with the steps that site kept (models.site_steps)

``rows`` are a node's checked rows in the schema's columns (``fedcost.data.loader.load_rows``
with ``targets=False`` reads them from a site's own file and mapping). The result has one row
per input row: ``readmission_risk`` and ``expected_cost`` (currency units), for the tasks the
model has. A run folder holds what loading needs: ``model.json`` (the model's spec and the
federation's feature encoding), ``model.pt`` (its weights) and, where a simulation decided
them, ``sites/<name>.json`` and ``sites/<name>.pt``. Predictions stay at the site that makes
them: nothing here sends anything anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from fedcost.data.features import FeatureSpec
from fedcost.errors import ConfigError
from fedcost.models.nets import FedcostNet, ModelSpec, build_model
from fedcost.models.site_steps import SiteSteps
from fedcost.run_folder import RunFolder

OUTPUTS = {"readmission": "readmission_risk", "cost": "expected_cost"}


@dataclass(frozen=True)
class SavedModel:
    """The shared model of a run, with the federation's feature encoding."""

    folder: Path
    spec: ModelSpec
    features: FeatureSpec
    model: FedcostNet

    @classmethod
    def load(cls, folder: str | Path) -> SavedModel:
        """The model of the run in ``folder``; a missing or unreadable file is a ``ConfigError``
        that names it."""
        folder = Path(folder)
        described = RunFolder(folder).model
        try:
            data = json.loads(described.read_text())
            spec = ModelSpec(
                **{**data["model"], "hidden": tuple(data["model"]["hidden"]), "tasks": tuple(data["model"]["tasks"])}
            )
            features = FeatureSpec.from_dict(data["features"])
        except FileNotFoundError:
            raise ConfigError(
                "no model here: give a run folder of a finished run (it holds model.json and model.pt)",
                path=str(folder),
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"not a readable model description ({error})", path=str(described)) from None
        return cls(folder, spec, features, cls._network(spec, features, RunFolder(folder).weights))

    @staticmethod
    def _network(spec: ModelSpec, features: FeatureSpec, path: Path) -> FedcostNet:
        model = build_model(spec, features.n_features, seed=0)
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
        except (OSError, RuntimeError, ValueError) as error:
            raise ConfigError(f"not this run's model weights ({error})", path=str(path)) from None
        return model

    def sites(self) -> list[str]:
        """The sites whose steps the run saved."""
        return sorted(p.stem for p in RunFolder(self.folder).sites.glob("*.json"))

    def predict(self, rows: pd.DataFrame, *, site: str | None = None) -> pd.DataFrame:
        """Each row's predictions; with ``site``, the shared model as that site uses it."""
        steps, adapted = SiteSteps(), None
        if site is not None:
            steps, adapted = self._site(site)
        predictions = steps.predict(self.model, adapted, self.features.encode(rows))
        if "cost" in predictions:
            predictions["cost"] = predictions["cost"] * self.features.cost_scale
        return pd.DataFrame({OUTPUTS[task]: values for task, values in predictions.items()}, index=rows.index)

    def _site(self, site: str) -> tuple[SiteSteps, FedcostNet | None]:
        path = RunFolder(self.folder).site_steps(site)
        if site not in self.sites():
            known = ", ".join(self.sites()) or "none"
            raise ConfigError(
                f"the run saved no steps for site {site!r} (it has: {known}); leave out --site to use the shared model",
                path=str(self.folder),
            )
        try:
            steps = SiteSteps.from_dict(json.loads(path.read_text()))
        except ValueError as error:
            raise ConfigError(f"not a site's steps ({error})", path=str(path)) from None
        weights = path.with_suffix(".pt")
        adapted = self._network(self.spec, self.features, weights) if weights.exists() else None
        return steps, adapted
