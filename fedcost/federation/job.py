"""A training job for a real federation: fedcost's config format, minus what sites own.

A job TOML takes the sections of a simulation config that describe the job —
``[run]`` (seed, rounds), ``[model]``, ``[training]``, ``[strategy]``,
``[secure_aggregation]`` — plus ``[data]``: the targets and extra features every site's
mapping declares (the coordinator has no mapping, yet must know the statistics layout).
``[ecosystem]`` and ``[simulation]`` belong to ``fedcost simulate`` and are refused, as
is ``run.test_fraction``: each site holds out its own rows (``fedcost node start``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomli_w

from fedcost import schema
from fedcost.config import SimulationConfig
from fedcost.data.features import StatisticsLayout
from fedcost.data.mapping import DataMapping, TargetReading, targets_by_slot
from fedcost.errors import ConfigError
from fedcost.tomlfile import read_toml

SIMULATION_ONLY = ("ecosystem", "simulation")
DATA_KEYS = ("targets", "extra_numeric", "extra_categorical")


@dataclass(frozen=True)
class DataSection:
    """The columns every site's data set provides: outcomes (name → kind) and extra features."""

    targets: dict[str, str] = field(default_factory=lambda: {schema.READMISSION: "binary", schema.COST: "non-negative"})
    extra_numeric: tuple[str, ...] = ()
    extra_categorical: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def layout(self) -> StatisticsLayout:
        """The statistics layout the nodes' mappings give (same columns, same targets)."""
        mapping = self._mapping()
        return StatisticsLayout(mapping.feature_columns, tuple(mapping.targets))

    def tasks(self) -> tuple[str, ...]:
        return self._mapping().tasks

    def _mapping(self) -> DataMapping:
        readings = targets_by_slot([TargetReading.named(name, kind) for name, kind in self.targets.items()])
        return DataMapping(Path("<job>"), (), readings, self.extra_numeric, self.extra_categorical)

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": dict(self.targets),
            "extra_numeric": list(self.extra_numeric),
            "extra_categorical": {k: list(v) for k, v in self.extra_categorical.items()},
        }


@dataclass(frozen=True)
class FederationJob:
    """A validated job: the config sections it sets, and its data section."""

    config: SimulationConfig
    data: DataSection

    @classmethod
    def load(cls, path: Path) -> FederationJob:
        return cls.from_dict(read_toml(path, "job file"), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str) -> FederationJob:
        raw = dict(raw)
        for section in SIMULATION_ONLY:
            if section in raw:
                raise ConfigError(
                    f"[{section}] is for `fedcost simulate`; a federation's sites bring their own data and processes",
                    path=source,
                    field=section,
                )
        if "test_fraction" in raw.get("run", {}):
            raise ConfigError(
                "each site holds out its own rows (`fedcost node start --test-fraction`)",
                path=source,
                field="run.test_fraction",
            )
        data = _data_section(raw.pop("data", {}), source)
        config = SimulationConfig.from_dict(raw, source=source)
        return cls(replace(config, model=replace(config.model, tasks=data.tasks())), data)

    def to_dict(self) -> dict[str, Any]:
        resolved = self.config.resolved()
        for section in SIMULATION_ONLY:
            resolved.pop(section)
        resolved["run"].pop("test_fraction")
        return {**resolved, "data": self.data.to_dict()}

    def to_toml(self) -> bytes:
        return tomli_w.dumps(self.to_dict()).encode()


def _data_section(raw: Any, source: str) -> DataSection:
    if not isinstance(raw, dict):
        raise ConfigError("must be a TOML table", path=source, field="data")
    unknown = sorted(set(raw) - set(DATA_KEYS))
    if unknown:
        raise ConfigError(f"unknown key; allowed: {', '.join(DATA_KEYS)}", path=source, field=f"data.{unknown[0]}")
    targets = _targets(raw.get("targets", DataSection().targets), source)
    numeric = raw.get("extra_numeric", [])
    if not isinstance(numeric, list) or not all(isinstance(n, str) for n in numeric):
        raise ConfigError("must be a list of column names", path=source, field="data.extra_numeric")
    categorical = raw.get("extra_categorical", {})
    if not isinstance(categorical, dict) or not all(
        isinstance(levels, list) and levels and all(isinstance(level, str) for level in levels)
        for levels in categorical.values()
    ):
        raise ConfigError("must map column names to lists of levels", path=source, field="data.extra_categorical")
    section = DataSection(targets, tuple(numeric), {k: tuple(v) for k, v in categorical.items()})
    try:
        section.layout()
    except ValueError as error:
        raise ConfigError(str(error), path=source, field="data.targets") from None
    return section


def _targets(raw: Any, source: str) -> dict[str, str]:
    """``[data] targets``: a table of outcome name → kind, or a list of the schema's own outcomes."""
    if isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        raw = {name: None for name in raw}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            'must name the outcomes and their kinds, e.g. targets = { died = "binary", length_of_stay = '
            '"non-negative" } (or a list of readmitted_30d and total_cost)',
            path=source,
            field="data.targets",
        )
    targets: dict[str, str] = {}
    for name, kind in raw.items():
        try:
            targets[name] = TargetReading.named(name, kind).kind
        except ValueError as error:
            raise ConfigError(str(error), path=source, field=f"data.targets.{name}") from None
    return targets
