"""Reading the TOML files users write: configs, jobs, mappings, site policies, federations.

``read_toml`` gives a file's tables. ``read_table`` turns one table into a frozen dataclass
by its type hints: unknown keys are refused with the known ones listed, a required key
asks for itself, every value is checked against its hint (a nested dataclass is read the
same way) and every mistake of the file is reported at once, naming the file and the
dotted field, so a user fixes them in one go rather than one per run. A module keeps only
its own rules (ranges, cross-field checks) in its dataclasses' ``__post_init__``: a
``FieldError`` there names the field, any other ``ValueError`` the table. ``Mistakes``
collects the mistakes of a file that a module reads by hand (a mapping's named nodes).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from fedcost.errors import ConfigError, FieldError

T = TypeVar("T")
_EXAMPLE, _READ = "example", "read"
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def read_toml(path: Path, what: str, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The file's tables, or ``error`` naming the file: missing, not UTF-8, or not TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} not found", path=str(path)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as decode_error:
        raise error(f"not valid TOML: {decode_error}", path=str(path)) from None


def example(text: str) -> dict[str, str]:
    """A field's metadata: what to write, shown when the key is missing or mistyped
    (without it, a scalar's default is shown)."""
    return {_EXAMPLE: text}


def read_with(convert: Callable[[Any], Any]) -> dict[str, Any]:
    """A field's metadata: ``convert`` reads its TOML value instead of its type hint (a
    value of more than one shape); it raises ``FieldError`` naming a key inside the value,
    or "" for the value itself."""
    return {_READ: convert}


def dotted(where: str, key: object) -> str:
    """The dotted name of ``key`` inside the table at ``where`` ("" for the file's top)."""
    return f"{where}.{key}" if where and key != "" else f"{where}{key}"


class Mistakes:
    """Every mistake found in one file, raised together as one ``error`` naming the file."""

    def __init__(self, source: str, error: type[ConfigError] = ConfigError):
        self.source = source
        self.error = error
        self.found: list[ConfigError] = []

    def add(self, field: str, message: str) -> None:
        self.found.append(self.error(message, path=self.source, field=field or None))

    @contextmanager
    def kept(self, where: str = "") -> Iterator[None]:
        """Run a check and go on past its mistake: a ``ConfigError`` as it is, a
        ``FieldError`` named under ``where``."""
        try:
            yield
        except ConfigError as error:
            self.found.append(error)
        except FieldError as error:
            self.add(dotted(where, error.field), error.reason)

    def raise_any(self) -> None:
        if self.found:
            raise self.error.of(self.found)


def unknown_keys(raw: Mapping[str, Any], allowed: Iterable[str], where: str, mistakes: Mistakes) -> None:
    """Refuse each key of ``raw`` not ``allowed``, listing the allowed ones; at a file's top
    a table is a section."""
    allowed = tuple(allowed)
    for key in (key for key in raw if key not in allowed):
        noun = "section" if not where and isinstance(raw[key], dict) else "key"
        mistakes.add(dotted(where, key), f"unknown {noun}; allowed: {', '.join(allowed)}")


def table(where: str, raw: Any) -> Mapping[str, Any]:
    """``raw`` if it is a TOML table, else a ``FieldError`` at ``where``."""
    if not isinstance(raw, Mapping):
        raise FieldError(where, f"expected a [{where}] table, got {raw!r:.60}")
    return raw


def read_table(cls: type[T], raw: Any, *, source: str, where: str = "", error: type[ConfigError] = ConfigError) -> T:
    """Dataclass ``cls`` from the TOML table ``raw`` found at ``where`` in file ``source``.

    Raises ``error`` naming the file and the dotted field of every mistake at once.
    """
    mistakes = Mistakes(source, error)
    with mistakes.kept():
        raw = table(where, raw)
    mistakes.raise_any()
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown_keys(raw, sorted(fields), where, mistakes)
    values = {}
    for name, field in fields.items():
        at = dotted(where, name)
        sample = field.metadata.get(_EXAMPLE) or _default_example(name, field)
        if name in raw and _READ in field.metadata:
            with mistakes.kept(at):
                values[name] = field.metadata[_READ](raw[name])
        elif name in raw:
            with mistakes.kept():
                values[name] = _value(hints[name], raw[name], at, sample, mistakes)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            mistakes.add(at, f"required; write {sample or name + ' = ...'}")
    mistakes.raise_any()
    try:
        return cls(**values)
    except FieldError as rule:
        raise error(rule.reason, path=source, field=dotted(where, rule.field)) from None
    except ValueError as rule:
        raise error(str(rule), path=source, field=where or None) from None


def _value(hint: Any, value: Any, where: str, example_text: str, mistakes: Mistakes) -> Any:
    """``value`` checked against ``hint``; TOML arrays become tuples, tables dataclasses."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None: TOML has no null
        (hint,) = (arg for arg in args if arg is not type(None))
        return _value(hint, value, where, example_text, mistakes)
    if dataclasses.is_dataclass(hint):
        return read_table(hint, value, source=mistakes.source, where=where, error=mistakes.error)  # type: ignore[arg-type]
    if origin is Literal:
        if value not in args:
            raise FieldError(where, f"must be one of {', '.join(map(str, args))}, not {value!r}")
        return value
    write = f"; write e.g. {example_text}" if example_text else ""
    if origin is tuple:
        if not isinstance(value, list):
            raise FieldError(where, f"expected a list, got {value!r:.60}{write}")
        return tuple(_value(args[0], item, f"{where}[{i}]", "", mistakes) for i, item in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise FieldError(where, f"expected a [{where}] table, got {value!r:.60}{write}")
        return {key: _value(args[1], item, dotted(where, key), example_text, mistakes) for key, item in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise FieldError(where, f"expected {_KINDS.get(hint, hint.__name__)}, got {value!r:.60}{write}")
    return value


def _default_example(name: str, field: dataclasses.Field) -> str:
    """``name = default`` for a scalar default, as TOML writes it; "" otherwise."""
    default = field.default
    if isinstance(default, bool):
        return f"{name} = {str(default).lower()}"
    if isinstance(default, (int, float)):
        return f"{name} = {default:_}" if isinstance(default, int) else f"{name} = {default!r}"
    if isinstance(default, str) and default:
        return f"{name} = {json.dumps(default)}"
    return ""
