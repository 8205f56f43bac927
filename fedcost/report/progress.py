"""The run folder as a run fills it: the coordinator's progress, as a simulation and a
deployment both record it."""

from __future__ import annotations

import json
from pathlib import Path

from fedcost.analytics import Benchmark, GroupedStatistics
from fedcost.data.features import FeatureSpec
from fedcost.report.analytics import save_benchmark, save_statistics

FEATURES_FILE, METRICS_FILE = "features.json", "metrics.jsonl"


class ProgressRecorder:
    """Writes the feature spec, one line per round and the analytics into ``folder`` as
    they arrive, so that a run stopped at any point shows how far it got. What to do
    with the final model is the subclass's."""

    def __init__(self, folder: Path, rounds: list[dict] | None = None):
        self.folder = folder
        self.features: FeatureSpec | None = None
        self.rounds: list[dict] = rounds or []
        self.analytics: dict = {}

    def on_features(self, features: FeatureSpec, sites: list[str]) -> None:
        self.features = features
        (self.folder / FEATURES_FILE).write_text(json.dumps(features.to_dict(), indent=2))

    def on_round(self, record: dict) -> None:
        self.rounds.append(record)
        with (self.folder / METRICS_FILE).open("a") as out:
            out.write(json.dumps(record) + "\n")

    def on_statistics(self, statistics: GroupedStatistics, sites: list[str]) -> None:
        self.analytics["statistics"] = save_statistics(self.folder, statistics, sites)

    def on_benchmark(self, result: Benchmark, sites: list[str]) -> None:
        self.analytics["benchmark"] = save_benchmark(self.folder, result, sites)
