"""The mapping file: how a federation's source files map into the schema.

One TOML file describes every node of a data set (see the README, "Bring your own
data"). A real node reads the same file format for its own data alone. Parsing is
strict: every problem names the mapping file and the TOML field at fault, and one read
reports them all (``fedcost.tomlfile.Mistakes``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fedcost import schema
from fedcost.errors import FieldError, MappingError
from fedcost.identity.party import check_party_name
from fedcost.tomlfile import Mistakes, read_toml, table, unknown_keys

# A 0/1 or true/false outcome reads without a mapping; anything else is declared.
DEFAULT_POSITIVE = ("1", "true")
DEFAULT_NEGATIVE = ("0", "false")

TargetKind = Literal["binary", "non-negative"]
# The model each kind of outcome gets: a binary one the logistic (readmission) head, a
# non-negative one the log-link (cost) head. Internally the rows carry them under these names.
TARGET_SLOTS: dict[str, str] = {"binary": schema.READMISSION, "non-negative": schema.COST}
# The ecosystem's own outcomes need no kind: their names say it.
_SCHEMA_TARGET_KINDS: dict[str, TargetKind] = {schema.READMISSION: "binary", schema.COST: "non-negative"}
TASK_OF_SLOT = {schema.READMISSION: "readmission", schema.COST: "cost"}
# The OMOP cost table's amounts an episode's cost may be summed from.
OMOP_COST_COLUMNS = ("total_cost", "total_charge", "total_paid")
_OMOP_OPTIONS = {"cost_column", "payer_concepts"}


@dataclass(frozen=True)
class TargetReading:
    """A declared outcome: its column in the data set, its kind and, for a binary one, the
    tokens that mean positive and negative."""

    column: str
    kind: TargetKind
    positive: frozenset[str] = frozenset(DEFAULT_POSITIVE)
    negative: frozenset[str] = frozenset(DEFAULT_NEGATIVE)

    @property
    def slot(self) -> str:
        """The name the outcome has in the rows and the statistics layout."""
        return TARGET_SLOTS[self.kind]

    @classmethod
    def named(cls, column: str, kind: str | None = None) -> TargetReading:
        """An outcome with default tokens; ``kind`` may be left out for the schema's own targets.

        Raises ``ValueError`` naming what is missing or wrong.
        """
        kind = kind or _SCHEMA_TARGET_KINDS.get(column)
        if kind is None:
            raise ValueError(f'say what kind of outcome \'{column}\' is: kind = "binary" or "non-negative"')
        if kind not in TARGET_SLOTS:
            raise ValueError(f'kind must be "binary" or "non-negative", not {kind!r}')
        return cls(column, kind)  # type: ignore[arg-type]


def targets_by_slot(readings: list[TargetReading]) -> dict[str, TargetReading]:
    """Declared outcomes keyed by slot, in schema order; ``ValueError`` for two of one kind."""
    by_slot: dict[str, TargetReading] = {}
    for reading in readings:
        if reading.slot in by_slot:
            raise ValueError(
                f"'{by_slot[reading.slot].column}' and '{reading.column}' are both {reading.kind} outcomes; "
                "a run models one binary and one non-negative outcome: keep one of them"
            )
        by_slot[reading.slot] = reading
    return {slot: by_slot[slot] for slot in TARGET_SLOTS.values() if slot in by_slot}


@dataclass(frozen=True)
class OmopReading:
    """How to read an OMOP CDM extract: its folder, the cost table's amount column and
    which payer concept ids are which payer level (``fedcost.data.omop.read_omop``)."""

    folder: Path
    cost_column: str = "total_cost"
    payer_concepts: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeSource:
    """One node's rows: its role, its file(s) or OMOP extract, and the source-to-schema
    column names. Exactly one of ``file`` and ``omop`` is set."""

    name: str
    role: str
    file: Path | None
    test_file: Path | None
    columns: dict[str, str]
    lacks: tuple[str, ...] = ()
    omop: OmopReading | None = None
    # The node's episode extract (``fedcost.linkage.windows``): a hospital's stays, a payer's
    # claims, under the pseudonymous patient key the parties share; read only by the linkage.
    episodes: Path | None = None

    def source_of(self, field_name: str) -> str | None:
        """The source column mapped to ``field_name`` (or None when unmapped)."""
        for source, target in self.columns.items():
            if target == field_name:
                return source
        return None


@dataclass(frozen=True)
class DataMapping:
    """A validated mapping file: targets, features, value recodings and nodes.

    ``targets`` are keyed by slot (``schema.READMISSION`` for the binary outcome,
    ``schema.COST`` for the non-negative one), whatever the data set calls them.
    """

    path: Path
    nodes: tuple[NodeSource, ...]
    targets: dict[str, TargetReading]
    extra_numeric: tuple[str, ...] = ()
    extra_categorical: dict[str, tuple[str, ...]] = field(default_factory=dict)
    values: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def feature_columns(self) -> tuple[schema.Column, ...]:
        """Schema features, then the data set's declared features.

        A declared feature with a schema field's name replaces that field (a plain feature,
        without the schema's bounds); an outcome's name hides the schema field it shares.
        """
        extras = {
            name: schema.Column(name, "numeric", "declared numeric feature", minimum=None)
            for name in self.extra_numeric
        } | {
            name: schema.Column(name, "categorical", "declared categorical feature", levels=levels)
            for name, levels in self.extra_categorical.items()
        }
        outcomes = {reading.column for reading in self.targets.values()}
        kept = tuple(extras.pop(c.name, c) for c in schema.FEATURES if c.name not in outcomes)
        return kept + tuple(extras.values())

    @property
    def tasks(self) -> tuple[str, ...]:
        """Model tasks this data set supports, in schema order."""
        return tuple(TASK_OF_SLOT[slot] for slot in self.targets)

    @property
    def outcome_columns(self) -> dict[str, str]:
        """Each task's outcome as the data set names it, e.g. ``{"readmission": "died"}``."""
        return {TASK_OF_SLOT[slot]: reading.column for slot, reading in self.targets.items()}

    @property
    def declared_features(self) -> set[str]:
        return set(self.extra_numeric) | set(self.extra_categorical)

    @property
    def fields_present(self) -> set[str]:
        """Feature fields some node carries: its role's, the mapped and the declared ones."""
        present = set(self.declared_features)
        for node in self.nodes:
            present |= (set(schema.ROLES[node.role].features) - set(node.lacks)) | set(node.columns.values())
        return present & {column.name for column in self.feature_columns}

    def node(self, name: str) -> NodeSource:
        for node in self.nodes:
            if node.name == name:
                return node
        raise MappingError(
            f"no node named '{name}'; nodes: {', '.join(n.name for n in self.nodes)}",
            path=str(self.path),
        )

    @classmethod
    def load(cls, path: Path | str) -> DataMapping:
        """Read and validate a mapping file; relative data paths are taken from its folder."""
        path = Path(path)
        return _MappingParser(path, read_toml(path, "mapping file", MappingError)).parse()


class _MappingParser:
    """Turns the raw TOML dict into a DataMapping, naming the field of every problem."""

    _TOP_LEVEL = {"targets", "columns", "values", "features", "nodes", "omop"}

    def __init__(self, path: Path, raw: dict[str, Any]):
        self.path = path
        self.raw = raw
        self.mistakes = Mistakes(str(path), MappingError)

    def parse(self) -> DataMapping:
        """Every mistake of the file at once, but for those that only the targets and
        features being right could reveal: found on the next read, once those are fixed."""
        unknown_keys(self.raw, sorted(self._TOP_LEVEL), "", self.mistakes)
        targets: dict[str, TargetReading] = {}
        extra_numeric: tuple[str, ...] = ()
        extra_categorical: dict[str, tuple[str, ...]] = {}
        with self.mistakes.kept():
            targets = self._targets()
        with self.mistakes.kept():
            extra_numeric, extra_categorical = self._extra_features(targets)
        self.mistakes.raise_any()
        mapping = DataMapping(self.path, (), targets, extra_numeric, extra_categorical)
        known_fields = {c.name for c in mapping.feature_columns} | {r.column for r in targets.values()}
        known_fields |= {column.name for column in schema.ACCOUNTING}
        shared_columns: dict[str, str] = {}
        shared_omop: dict[str, Any] = {}
        with self.mistakes.kept():
            shared_columns = self._columns("columns", self.raw.get("columns", {}), known_fields)
        with self.mistakes.kept():
            shared_omop = self._omop_options("omop", table("omop", self.raw.get("omop", {})))
        nodes: list[NodeSource] = []
        with self.mistakes.kept():
            nodes = self._nodes(shared_columns, shared_omop, known_fields, mapping)
        values: dict[str, dict[str, str]] = {}
        with self.mistakes.kept():
            values = self._values(mapping.feature_columns)
        self.mistakes.raise_any()
        return replace(mapping, nodes=tuple(nodes), values=values)

    def _targets(self) -> dict[str, TargetReading]:
        raw = table("targets", self.raw.get("targets", {}))
        if not raw:
            raise FieldError(
                "targets",
                'declare at least one outcome, e.g. [targets.died] with kind = "binary", '
                'or [targets.length_of_stay] with kind = "non-negative"',
            )
        readings: list[TargetReading] = []
        for name, spec in raw.items():
            with self.mistakes.kept():
                readings.append(self._target(name, spec))
        try:
            return targets_by_slot(readings)
        except ValueError as error:
            raise FieldError("targets", str(error)) from None

    def _target(self, name: str, raw: Any) -> TargetReading:
        where = f"targets.{name}"
        spec = table(where, raw)
        reserved = {schema.READMISSION: "binary", schema.COST: "non-negative"}
        if name in reserved and spec.get("kind", reserved[name]) != reserved[name]:
            raise FieldError(f"{where}.kind", f"'{name}' is fedcost's {reserved[name]} outcome; name yours otherwise")
        try:
            reading = TargetReading.named(name, spec.get("kind"))
        except ValueError as error:
            raise FieldError(f"{where}.kind", str(error)) from None
        allowed = {"kind", "positive", "negative"} if reading.kind == "binary" else {"kind"}
        unknown = set(spec) - allowed
        if unknown:
            raise FieldError(
                f"{where}.{sorted(unknown)[0]}",
                f"unknown option for a {reading.kind} outcome; use {', '.join(sorted(allowed))}",
            )
        if reading.kind != "binary":
            return reading
        positive = self._tokens(f"{where}.positive", spec.get("positive", list(DEFAULT_POSITIVE)))
        negative = self._tokens(f"{where}.negative", spec.get("negative", list(DEFAULT_NEGATIVE)))
        if positive & negative:
            raise FieldError(where, f"values {sorted(positive & negative)} are both positive and negative")
        return replace(reading, positive=positive, negative=negative)

    def _extra_features(self, targets: dict[str, TargetReading]) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
        raw = table("features", self.raw.get("features", {}))
        unknown_keys(raw, ("numeric", "categorical"), "features", self.mistakes)
        numeric = raw.get("numeric", [])
        if not isinstance(numeric, list) or not all(isinstance(n, str) and n for n in numeric):
            raise FieldError("features.numeric", "must be a list of column names")
        categorical_raw = table("features.categorical", raw.get("categorical", {}))
        categorical: dict[str, tuple[str, ...]] = {}
        for name, levels in categorical_raw.items():
            categorical[name] = self._levels(f"features.categorical.{name}", levels)
        outcomes = {reading.column for reading in targets.values()}
        for name in list(numeric) + list(categorical):
            if name in outcomes:
                raise FieldError("features", f"'{name}' is an outcome under [targets]; a column is one or the other")
            if name in {column.name for column in schema.ACCOUNTING}:
                raise FieldError(
                    "features",
                    f"'{name}' is fedcost's accounting column (what the payer reimbursed), "
                    "never a feature; map the source column to it under [columns]",
                )
            if name in (schema.READMISSION, schema.COST):
                raise FieldError(
                    "features",
                    f"'{name}' is the name fedcost gives its outcomes; rename the feature "
                    'with [columns] (e.g. SOURCE = "prior_cost")',
                )
        if len(set(numeric) | set(categorical)) != len(numeric) + len(categorical):
            raise FieldError("features", "a feature is declared twice")
        return tuple(numeric), categorical

    def _values(self, features: tuple[schema.Column, ...]) -> dict[str, dict[str, str]]:
        raw = table("values", self.raw.get("values", {}))
        values: dict[str, dict[str, str]] = {}
        columns = {column.name: column for column in features}
        for field_name, recoding in raw.items():
            where = f"values.{field_name}"
            levels = columns[field_name].levels if field_name in columns else ()
            if not levels:
                raise FieldError(where, "recodings are for categorical fields only")
            recoding = table(where, recoding)
            for source_value, level in recoding.items():
                if level not in levels:
                    raise FieldError(f"{where}.{source_value}", f"'{level}' is not one of {', '.join(levels)}")
            values[field_name] = {as_token(k): v for k, v in recoding.items()}
        return values

    def _columns(self, where: str, raw: Any, known_fields: set[str]) -> dict[str, str]:
        raw = table(where, raw)
        for source, target in raw.items():
            if not isinstance(target, str):
                raise FieldError(f"{where}.{source}", "must name a field as a string")
            if target not in known_fields:
                raise FieldError(
                    f"{where}.{source}",
                    f"unknown field '{target}': declare it under [features] or [targets], or use a schema field: "
                    f"{', '.join(sorted(known_fields))}",
                )
        return dict(raw)

    def _nodes(
        self, shared: dict[str, str], shared_omop: dict[str, Any], known_fields: set[str], mapping: DataMapping
    ) -> list[NodeSource]:
        raw = table("nodes", self.raw.get("nodes", {}))
        if not raw:
            raise FieldError("nodes", "declare at least one node, e.g. [nodes.st-mary] with its file")
        nodes = []
        for name, spec in raw.items():
            with self.mistakes.kept():
                nodes.append(self._node(name, spec, shared, shared_omop, known_fields, mapping))
        return nodes

    def _node(
        self,
        name: str,
        raw: Any,
        shared: dict[str, str],
        shared_omop: dict[str, Any],
        known_fields: set[str],
        mapping: DataMapping,
    ) -> NodeSource:
        where = f"nodes.{name}"
        check_party_name(name, path=str(self.path), field=where, error=MappingError)
        spec = table(where, raw)
        allowed = {"role", "file", "test_file", "columns", "lacks", "omop", "episodes"} | _OMOP_OPTIONS
        unknown_keys(spec, sorted(allowed), where, self.mistakes)
        if ("file" in spec) == ("omop" in spec):
            raise FieldError(
                where,
                'give the node\'s data file (file = "...", CSV or Parquet) or its OMOP CDM '
                'extract\'s folder (omop = "..."), one of the two',
            )
        source = "omop" if "omop" in spec else "file"
        if not isinstance(spec[source], str) or not spec[source]:
            raise FieldError(f"{where}.{source}", "must be a path, as a string")
        role = spec.get("role", "hospital" if source == "omop" else schema.ROLELESS)
        if role not in schema.ROLES:
            raise FieldError(f"{where}.role", f"role must be one of {', '.join(schema.ROLES)}, not {role!r}")
        test_file = spec.get("test_file")
        if test_file is not None and not isinstance(test_file, str):
            raise FieldError(f"{where}.test_file", "must be a file path")
        episodes = spec.get("episodes")
        if episodes is not None and (not isinstance(episodes, str) or not episodes):
            raise FieldError(f"{where}.episodes", "must be the path of the node's episode extract (CSV or Parquet)")
        if episodes is not None and role not in ("hospital", "insurer", "pharma"):
            raise FieldError(
                f"{where}.episodes", "only a hospital (its stays) or an insurer or pharma node (its claims) has one"
            )
        columns = {**shared, **self._columns(f"{where}.columns", spec.get("columns", {}), known_fields)}
        mapped = list(columns.values())
        duplicated = {f for f in mapped if mapped.count(f) > 1}
        if duplicated:
            field_name = sorted(duplicated)[0]
            raise FieldError(f"{where}.columns", f"several source columns map to '{field_name}'; keep one")
        lacks = spec.get("lacks", [])
        role_fields = set(schema.ROLES[role].features) | mapping.declared_features
        if not isinstance(lacks, list) or any(f not in role_fields for f in lacks):
            raise FieldError(
                f"{where}.lacks", f"list fields of role {role} the node does not have: {', '.join(sorted(role_fields))}"
            )
        folder = self.path.parent
        if source == "file":
            options = sorted(set(spec) & _OMOP_OPTIONS)
            if options:
                raise FieldError(
                    f"{where}.{options[0]}",
                    'is an option of an OMOP node (omop = "folder"); a file node maps its columns under [columns]',
                )
            return NodeSource(
                name=name,
                role=role,
                file=folder / spec["file"],
                test_file=folder / test_file if test_file else None,
                columns=columns,
                lacks=tuple(lacks),
                episodes=folder / episodes if episodes else None,
            )
        self._check_omop_node(where, spec, columns, lacks, mapping)
        options = self._omop_options(where, spec)
        payers = {**shared_omop.get("payer_concepts", {}), **options.get("payer_concepts", {})}
        return NodeSource(
            name=name,
            role=role,
            file=None,
            test_file=None,
            columns={},
            lacks=tuple(lacks),
            episodes=folder / episodes if episodes else None,
            omop=OmopReading(
                folder / spec["omop"],
                options.get("cost_column", shared_omop.get("cost_column", "total_cost")),
                payers,
            ),
        )

    def _check_omop_node(
        self, where: str, spec: dict[str, Any], columns: dict[str, str], lacks: list[str], mapping: DataMapping
    ) -> None:
        """An OMOP extract gives the schema's fields and outcomes under their own names."""
        if "test_file" in spec:
            raise FieldError(
                f"{where}.test_file", "an OMOP node's stays are split into training and test rows; leave test_file out"
            )
        if columns:
            raise FieldError(
                f"{where}.columns",
                "an OMOP extract is read into the schema's fields by fedcost "
                '(README, "OMOP CDM"); leave [columns] out for an OMOP node, or give it a file',
            )
        others = [r.column for r in mapping.targets.values() if r.column not in (schema.READMISSION, schema.COST)]
        if others:
            raise FieldError(
                f"{where}.omop",
                f"an OMOP extract gives the outcomes {schema.READMISSION} and "
                f"{schema.COST}, not '{others[0]}': declare those under [targets]",
            )
        unread = sorted(mapping.declared_features - set(lacks))
        if unread:
            raise FieldError(f"{where}.lacks", f"an OMOP extract lacks the declared feature '{unread[0]}': list it")

    def _omop_options(self, where: str, spec: dict[str, Any]) -> dict[str, Any]:
        """The OMOP options in ``spec`` (the [omop] section or a node), checked; payer concept ids as integers."""
        if where == "omop":
            unknown_keys(spec, sorted(_OMOP_OPTIONS), "omop", self.mistakes)
        options: dict[str, Any] = {}
        if "cost_column" in spec:
            if spec["cost_column"] not in OMOP_COST_COLUMNS:
                raise FieldError(
                    f"{where}.cost_column",
                    f"must be one of {', '.join(OMOP_COST_COLUMNS)}, not {spec['cost_column']!r}",
                )
            options["cost_column"] = spec["cost_column"]
        if "payer_concepts" in spec:
            payers = table(f"{where}.payer_concepts", spec["payer_concepts"])
            levels = schema.COLUMNS["payer"].levels
            options["payer_concepts"] = {}
            for concept, level in payers.items():
                at = f"{where}.payer_concepts.{concept}"
                if not concept.strip().isdigit():
                    raise FieldError(at, "a payer_concept_id is a whole number")
                if level not in levels:
                    raise FieldError(at, f"'{level}' is not one of {', '.join(levels)}")
                options["payer_concepts"][int(concept)] = level
        return options

    def _levels(self, where: str, raw: Any) -> tuple[str, ...]:
        """A declared feature's levels in the order given: the first is the reference level a
        GLM compares the others with (odds and cost ratios against it)."""
        levels = tuple(as_token(v) for v in self._list(where, raw))
        twice = sorted({level for level in levels if levels.count(level) > 1})
        if twice:
            raise FieldError(where, f"level {twice[0]!r} is listed twice")
        return levels

    def _list(self, where: str, raw: Any) -> list:
        if not isinstance(raw, list) or not raw:
            raise FieldError(where, "must be a non-empty list of values")
        return raw

    def _tokens(self, where: str, raw: Any) -> frozenset[str]:
        return frozenset(as_token(v) for v in self._list(where, raw))


_WHOLE_NUMBER = re.compile(r"[+-]?\d+\.0*")


def as_token(value: Any) -> str:
    """A cell or TOML value as a comparable token: 1, 1.0, "1" and "1.0" all read as "1" (a
    CSV written from a column with a gap writes its codes 1.0, 2.0), True and "TRUE" as "true"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    token = str(value).strip().lower()
    return str(int(token.split(".")[0])) if _WHOLE_NUMBER.fullmatch(token) else token
