"""The mapping file: how a federation's source files map into the schema.

One TOML file describes every node of a data set (see the README, "Bring your own
data"). A real node reads the same file format for its own data alone. Parsing is
strict: every problem names the mapping file and the TOML field at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcost import schema
from fedcost.errors import MappingError
from fedcost.identity.party import check_party_name
from fedcost.tomlfile import read_toml

DEFAULT_POSITIVE = ("1",)
DEFAULT_NEGATIVE = ("0",)


@dataclass(frozen=True)
class TargetReading:
    """How to read a target column: the tokens that mean positive and negative (0/1 only)."""

    positive: frozenset[str] = frozenset(DEFAULT_POSITIVE)
    negative: frozenset[str] = frozenset(DEFAULT_NEGATIVE)


@dataclass(frozen=True)
class NodeSource:
    """One node's rows: its role, its file(s) and the source-to-schema column names."""

    name: str
    role: str
    file: Path
    test_file: Path | None
    columns: dict[str, str]
    lacks: tuple[str, ...] = ()

    def source_of(self, field_name: str) -> str | None:
        """The source column mapped to ``field_name`` (or None when unmapped)."""
        for source, target in self.columns.items():
            if target == field_name:
                return source
        return None


@dataclass(frozen=True)
class DataMapping:
    """A validated mapping file: targets, extra features, value recodings and nodes."""

    path: Path
    nodes: tuple[NodeSource, ...]
    targets: dict[str, TargetReading]
    extra_numeric: tuple[str, ...] = ()
    extra_categorical: dict[str, tuple[str, ...]] = field(default_factory=dict)
    values: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def feature_columns(self) -> tuple[schema.Column, ...]:
        """Schema features followed by the data set's declared extra features."""
        extras = tuple(
            schema.Column(name, "numeric", "extra numeric feature", minimum=None)
            for name in self.extra_numeric
        ) + tuple(
            schema.Column(name, "categorical", "extra categorical feature", levels=levels)
            for name, levels in self.extra_categorical.items()
        )
        return schema.FEATURES + extras

    @property
    def tasks(self) -> tuple[str, ...]:
        """Model tasks this data set supports, in schema order."""
        names = {schema.READMISSION: "readmission", schema.COST: "cost"}
        return tuple(names[t.name] for t in schema.TARGETS if t.name in self.targets)

    def node(self, name: str) -> NodeSource:
        for node in self.nodes:
            if node.name == name:
                return node
        raise MappingError(
            f"no node named '{name}'; nodes: {', '.join(n.name for n in self.nodes)}",
            path=str(self.path),
        )

    @classmethod
    def load(cls, path: Path | str) -> "DataMapping":
        """Read and validate a mapping file; relative data paths are taken from its folder."""
        path = Path(path)
        return _MappingParser(path, read_toml(path, "mapping file", MappingError)).parse()


class _MappingParser:
    """Turns the raw TOML dict into a DataMapping, naming the field of every problem."""

    _TOP_LEVEL = {"targets", "columns", "values", "features", "nodes"}

    def __init__(self, path: Path, raw: dict[str, Any]):
        self.path = path
        self.raw = raw

    def fail(self, field_name: str, message: str) -> MappingError:
        return MappingError(message, path=str(self.path), field=field_name)

    def parse(self) -> DataMapping:
        unknown = set(self.raw) - self._TOP_LEVEL
        if unknown:
            raise self.fail(sorted(unknown)[0], f"unknown section; allowed: {', '.join(sorted(self._TOP_LEVEL))}")
        targets = self._targets()
        extra_numeric, extra_categorical = self._extra_features()
        known_fields = set(schema.COLUMNS) | set(extra_numeric) | set(extra_categorical)
        shared_columns = self._columns("columns", self.raw.get("columns", {}), known_fields)
        nodes = self._nodes(shared_columns, known_fields, set(extra_numeric) | set(extra_categorical))
        return DataMapping(
            path=self.path,
            nodes=nodes,
            targets=targets,
            extra_numeric=extra_numeric,
            extra_categorical=extra_categorical,
            values=self._values(extra_categorical),
        )

    def _targets(self) -> dict[str, TargetReading]:
        raw = self._table("targets", self.raw.get("targets"))
        if not raw:
            raise self.fail(
                "targets",
                f"declare at least one target, e.g. [targets.{schema.READMISSION}] or [targets.{schema.COST}]",
            )
        targets: dict[str, TargetReading] = {}
        for name, spec in raw.items():
            where = f"targets.{name}"
            if name not in (schema.READMISSION, schema.COST):
                raise self.fail(where, f"unknown target; targets are {schema.READMISSION} and {schema.COST}")
            spec = self._table(where, spec)
            if name == schema.COST:
                if spec:
                    raise self.fail(where, f"{schema.COST} takes no options")
                targets[name] = TargetReading()
                continue
            unknown = set(spec) - {"positive", "negative"}
            if unknown:
                raise self.fail(f"{where}.{sorted(unknown)[0]}", "unknown option; use positive and negative")
            positive = self._tokens(f"{where}.positive", spec.get("positive", list(DEFAULT_POSITIVE)))
            negative = self._tokens(f"{where}.negative", spec.get("negative", list(DEFAULT_NEGATIVE)))
            if positive & negative:
                raise self.fail(where, f"values {sorted(positive & negative)} are both positive and negative")
            targets[name] = TargetReading(positive, negative)
        return targets

    def _extra_features(self) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
        raw = self._table("features", self.raw.get("features", {}))
        unknown = set(raw) - {"numeric", "categorical"}
        if unknown:
            raise self.fail(f"features.{sorted(unknown)[0]}", "unknown option; use numeric and categorical")
        numeric = raw.get("numeric", [])
        if not isinstance(numeric, list) or not all(isinstance(n, str) and n for n in numeric):
            raise self.fail("features.numeric", "must be a list of column names")
        categorical_raw = self._table("features.categorical", raw.get("categorical", {}))
        categorical: dict[str, tuple[str, ...]] = {}
        for name, levels in categorical_raw.items():
            tokens = self._tokens(f"features.categorical.{name}", levels)
            categorical[name] = tuple(sorted(tokens))
        for name in list(numeric) + list(categorical):
            if name in schema.COLUMNS:
                raise self.fail("features", f"'{name}' is already a schema field; map a source column to it instead")
        if len(set(numeric) | set(categorical)) != len(numeric) + len(categorical):
            raise self.fail("features", "a feature is declared twice")
        return tuple(numeric), categorical

    def _values(self, extra_categorical: dict[str, tuple[str, ...]]) -> dict[str, dict[str, str]]:
        raw = self._table("values", self.raw.get("values", {}))
        values: dict[str, dict[str, str]] = {}
        for field_name, recoding in raw.items():
            where = f"values.{field_name}"
            column = schema.COLUMNS.get(field_name)
            levels = column.levels if column else extra_categorical.get(field_name)
            if not levels:
                raise self.fail(where, "recodings are for categorical fields only")
            recoding = self._table(where, recoding)
            for source_value, level in recoding.items():
                if level not in levels:
                    raise self.fail(f"{where}.{source_value}", f"'{level}' is not one of {', '.join(levels)}")
            values[field_name] = {str(k).strip().lower(): v for k, v in recoding.items()}
        return values

    def _columns(self, where: str, raw: Any, known_fields: set[str]) -> dict[str, str]:
        raw = self._table(where, raw)
        for source, target in raw.items():
            if not isinstance(target, str):
                raise self.fail(f"{where}.{source}", "must name a schema field as a string")
            if target not in known_fields:
                raise self.fail(
                    f"{where}.{source}",
                    f"unknown schema field '{target}'; known fields: {', '.join(sorted(known_fields))}",
                )
        return dict(raw)

    def _nodes(self, shared: dict[str, str], known_fields: set[str], extras: set[str]) -> tuple[NodeSource, ...]:
        raw = self._table("nodes", self.raw.get("nodes"))
        if not raw:
            raise self.fail("nodes", "declare at least one node, e.g. [nodes.st-mary] with role and file")
        return tuple(self._node(name, spec, shared, known_fields, extras) for name, spec in raw.items())

    def _node(
        self, name: str, raw: Any, shared: dict[str, str], known_fields: set[str], extras: set[str]
    ) -> NodeSource:
        where = f"nodes.{name}"
        check_party_name(name, path=str(self.path), field=where, error=MappingError)
        spec = self._table(where, raw)
        unknown = set(spec) - {"role", "file", "test_file", "columns", "lacks"}
        if unknown:
            raise self.fail(f"{where}.{sorted(unknown)[0]}", "unknown option; use role, file, test_file, columns, lacks")
        role = spec.get("role")
        if role is None:
            choices = " | ".join(f'"{name}"' for name in schema.ROLES)
            raise self.fail(f"{where}.role", f"missing; add role = {choices} under [{where}]")
        if role not in schema.ROLES:
            raise self.fail(f"{where}.role", f"role must be one of {', '.join(schema.ROLES)}, not {role!r}")
        if not isinstance(spec.get("file"), str):
            raise self.fail(f"{where}.file", "give the node's data file (CSV or Parquet)")
        test_file = spec.get("test_file")
        if test_file is not None and not isinstance(test_file, str):
            raise self.fail(f"{where}.test_file", "must be a file path")
        columns = {**shared, **self._columns(f"{where}.columns", spec.get("columns", {}), known_fields)}
        mapped = list(columns.values())
        duplicated = {f for f in mapped if mapped.count(f) > 1}
        if duplicated:
            field_name = sorted(duplicated)[0]
            raise self.fail(f"{where}.columns", f"several source columns map to '{field_name}'; keep one")
        lacks = spec.get("lacks", [])
        role_fields = set(schema.ROLES[role].features) | extras
        if not isinstance(lacks, list) or any(f not in role_fields for f in lacks):
            raise self.fail(f"{where}.lacks", f"list fields of role {role} the node does not have: {', '.join(sorted(role_fields))}")
        folder = self.path.parent
        return NodeSource(
            name=name,
            role=role,
            file=folder / spec["file"],
            test_file=folder / test_file if test_file else None,
            columns=columns,
            lacks=tuple(lacks),
        )

    def _table(self, where: str, raw: Any) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail(where, "must be a TOML table")
        return raw

    def _tokens(self, where: str, raw: Any) -> frozenset[str]:
        if not isinstance(raw, list) or not raw:
            raise self.fail(where, "must be a non-empty list of values")
        return frozenset(as_token(v) for v in raw)


def as_token(value: Any) -> str:
    """A cell or TOML value as a comparable token: 1, 1.0 and "1" all read as "1"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip().lower()
