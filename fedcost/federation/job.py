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
from fedcost.errors import FieldError
from fedcost.tomlfile import Mistakes, read_table, read_toml, read_with

SIMULATION_ONLY = ("ecosystem", "simulation")


def _targets(raw: Any) -> dict[str, str]:
    """``[data] targets``: a table of outcome name → kind, or a list of the schema's own outcomes."""
    if isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        raw = dict.fromkeys(raw)
    if not isinstance(raw, dict) or not raw:
        raise FieldError(
            "",
            'must name the outcomes and their kinds, e.g. targets = { died = "binary", length_of_stay = '
            '"non-negative" } (or a list of readmitted_30d and total_cost)',
        )
    targets: dict[str, str] = {}
    for name, kind in raw.items():
        try:
            targets[name] = TargetReading.named(name, kind).kind
        except ValueError as error:
            raise FieldError(name, str(error)) from None
    return targets


@dataclass(frozen=True)
class DataSection:
    """The columns every site's data set provides: outcomes (name → kind) and extra features."""

    targets: dict[str, str] = field(
        default_factory=lambda: {schema.READMISSION: "binary", schema.COST: "non-negative"},
        metadata=read_with(_targets),
    )
    extra_numeric: tuple[str, ...] = ()
    extra_categorical: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, levels in self.extra_categorical.items():
            if not levels:
                raise FieldError(f"extra_categorical.{name}", "must list the column's levels")
        try:
            self.layout()
        except ValueError as error:
            raise FieldError("targets", str(error)) from None

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
        mistakes = Mistakes(source)
        for section in SIMULATION_ONLY:
            if section in raw:
                mistakes.add(
                    section,
                    f"[{section}] is for `fedcost simulate`; a federation's sites bring their own data and processes",
                )
        if isinstance(raw.get("run"), dict) and "test_fraction" in raw["run"]:
            mistakes.add("run.test_fraction", "each site holds out its own rows (`fedcost node start --test-fraction`)")
        with mistakes.kept():
            data = read_table(DataSection, raw.get("data", {}), source=source, where="data")
        with mistakes.kept():
            config = SimulationConfig.from_dict(
                {k: v for k, v in raw.items() if k not in (*SIMULATION_ONLY, "data")}, source=source
            )
        mistakes.raise_any()
        return cls(replace(config, model=replace(config.model, tasks=data.tasks())), data)

    def to_dict(self) -> dict[str, Any]:
        resolved = self.config.resolved()
        for section in SIMULATION_ONLY:
            resolved.pop(section)
        resolved["run"].pop("test_fraction")
        return {**resolved, "data": self.data.to_dict()}

    def to_toml(self) -> bytes:
        return tomli_w.dumps(self.to_dict()).encode()
