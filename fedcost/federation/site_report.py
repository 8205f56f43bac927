"""A site's own report of a federation run: written at the site, sent only by the site.

When a run closes at a node, its worker writes ``<state>/reports/<run-id>.json``: the
site's name and role, its training and held-out rows, the privacy it has spent (ε from its
own release ledger, nothing else of the ledger) and the final federated model's figures
on its held-out rows — only the metrics its policy shares, at the policy's precision
(the permissive default shares none). Nothing of it travels over the federation: the
site hands it to the operator with its audit log, and ``fedcost federation collect``
puts it into the run's ``summary.json`` and ``report.html``. A report is the site's word,
as the simulation's per-site table is the lab bench's.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message

from fedcost import schema
from fedcost.atomic import replace_atomically
from fedcost.client.budget import privacy_report
from fedcost.client.node import Node, NodeSetup
from fedcost.errors import ConfigError, FedcostError
from fedcost.identity import PublicIdentity
from fedcost.models.metrics import cost_metrics, readmission_metrics
from fedcost.models.nets import build_model
from fedcost.models.training import predict
from fedcost.models.training_job import TrainingJob
from fedcost.privacy import SitePolicy
from fedcost.privacy.ledger import recorded_spending
from fedcost.wire import records as rec

log = logging.getLogger("fedcost.worker")

FOLDER = "reports"
# The metrics a site may report on its held-out rows, per task; its policy picks among them.
TASK_METRICS = {"readmission": ("auroc", "auprc", "brier"), "cost": ("mae", "rmse", "r2")}


class SiteReports:
    """Keeps what a run's report needs as the run goes, and writes the report when it closes."""

    def __init__(
        self,
        state: Path,
        identity: PublicIdentity,
        role: str,
        policy: Path | None,
        resolve_setup: Callable[[Context], NodeSetup],
        run_name: Callable[[Context], str | None],
    ):
        self.folder = state / FOLDER
        self.identity = identity
        self.role = role
        self.policy = SitePolicy.load(policy) if policy is not None else None
        self.resolve_setup = resolve_setup
        self.run_name = run_name
        self.final: dict[int, tuple[dict[str, np.ndarray], str]] = {}

    def observe(self, message: Message, reply: Message, context: Context) -> None:
        """Note the model of each accepted evaluation; on the run's close, write the report."""
        if reply.has_error() or not message.has_content() or rec.CONFIG not in message.content:
            return
        config = message.content[rec.CONFIG]
        if config.get(rec.PURPOSE) == "evaluate" and rec.ARRAYS in message.content and rec.JOB in config:
            arrays = message.content[rec.ARRAYS]
            self.final[context.run_id] = ({k: a.numpy() for k, a in arrays.items()}, str(config[rec.JOB]))
        if config.get(rec.TRANSPORT) == rec.CLOSE:
            name = self.run_name(context)
            try:
                if name is not None:
                    self.write(name, context)
            except (FedcostError, OSError, ValueError, KeyError):
                log.error("site %s: could not write its report of run %s", self.identity.name, name, exc_info=True)
            self.final.pop(context.run_id, None)

    def write(self, run: str, context: Context) -> Path:
        setup = self.resolve_setup(context)
        data = Node(setup).data
        report: dict[str, Any] = {
            "site": self.identity.name,
            "role": self.role,
            "run_id": run,
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "train_rows": len(data.train),
            "test_rows": len(data.test),
            "privacy": self._privacy(setup, run),
            "held_out": self._held_out(context.run_id, data.test),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{run}.json"
        replace_atomically(path, json.dumps(report, indent=2).encode())
        return path

    def _privacy(self, setup: NodeSetup, run: str) -> dict[str, Any]:
        """ε spent by this site (all its jobs) and this run's noise, from its ledger under its policy."""
        privacy = self.policy.privacy if self.policy is not None else None
        spends = recorded_spending(setup.ledger_path, self.identity) if privacy is not None else ()
        return privacy_report(spends, privacy, run)

    def _held_out(self, run_id: int, rows: Any) -> dict[str, dict[str, float]]:
        """The final model's metrics on the site's held-out rows, as far as its policy shares them."""
        shared = dict(self.policy.metrics) if self.policy is not None else {}
        if run_id not in self.final or not shared:
            return {}
        weights, job_json = self.final[run_id]
        job = TrainingJob.from_json(job_json)
        model = build_model(job.model, job.features.n_features, seed=job.seed)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
        predictions = predict(model, job.features.encode(rows))
        figures: dict[str, dict[str, float]] = {}
        if "readmission" in predictions:
            observed = rows[schema.READMISSION].to_numpy()
            figures["readmission"] = readmission_metrics(observed, predictions["readmission"])
        if "cost" in predictions:
            costs = rows[schema.COST].to_numpy()
            figures["cost"] = cost_metrics(costs, predictions["cost"] * job.features.cost_scale)
        return {
            task: {m: _rounded(values[m], shared[m]) for m in TASK_METRICS[task] if m in shared and m in values}
            for task, values in figures.items()
            if any(m in shared for m in TASK_METRICS[task])
        }


def _rounded(value: float, places: int) -> float:
    return value if math.isnan(value) else round(float(value), places)


def read_report(path: Path) -> dict[str, Any]:
    """A site report as the operator receives it; a malformed one names the file."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"not a readable site report ({error})", path=str(path)) from None
    for key, kind in (
        ("site", str),
        ("role", str),
        ("run_id", str),
        ("train_rows", int),
        ("test_rows", int),
        ("privacy", dict),
        ("held_out", dict),
    ):
        if not isinstance(report.get(key), kind):
            raise ConfigError(f"missing or not a {kind.__name__}", path=str(path), field=key)
    _check_figures(report, path)
    return report


def _check_figures(report: dict[str, Any], path: Path) -> None:
    """Refuse a report whose figures are not the numbers a site writes: they go into the
    operator's summary and report.html as numbers (a string there failed the page's writing)."""
    privacy = report["privacy"]
    names = ("epsilon_budget", "epsilon_spent") if privacy.get("dp") is True else ()
    if not isinstance(privacy.get("dp"), bool) or not all(_is_number(privacy.get(name)) for name in names):
        raise ConfigError(
            "is not a dp flag with (where true) numbers for epsilon_budget and epsilon_spent",
            path=str(path),
            field="privacy",
        )
    for task, figures in report["held_out"].items():
        metrics = TASK_METRICS.get(task)
        if (
            metrics is None
            or not isinstance(figures, dict)
            or not all(m in metrics and _is_number(v) for m, v in figures.items())
        ):
            raise ConfigError(
                f"{task!r:.40} is not a task with numbers for its metrics ({', '.join(TASK_METRICS)})",
                path=str(path),
                field="held_out",
            )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
