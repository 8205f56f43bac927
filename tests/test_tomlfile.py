"""The one TOML-to-dataclass reader: keys, types, nested tables and rules, every mistake at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from fedcost.errors import ConfigError, FieldError, MappingError
from fedcost.tomlfile import example, read_table, read_with


@dataclass(frozen=True)
class Noise:
    epsilon: float = field(metadata=example("epsilon = 1.0"))

    def __post_init__(self) -> None:
        if self.epsilon <= 0:
            raise FieldError("epsilon", f"must be positive, got {self.epsilon}")


def _names(raw: object) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise FieldError("", "must list at least one name")
    return tuple(map(str, raw))


@dataclass(frozen=True)
class Site:
    name: str
    noise: Noise | None = None
    kind: Literal["hospital", "insurer"] = "hospital"
    rounds: int = 5
    share: float = 0.5
    shared: bool = True
    sizes: tuple[int, ...] = ()
    metrics: dict[str, int] = field(default_factory=dict)
    peers: tuple[str, ...] = field(default=(), metadata=read_with(_names))

    def __post_init__(self) -> None:
        if self.rounds > 100:
            raise ValueError(f"rounds must be at most 100, not {self.rounds}")


def _mistakes(raw: dict, error: type[ConfigError] = ConfigError) -> dict[str | None, str]:
    with pytest.raises(error) as caught:
        read_table(Site, raw, source="site.toml", where="site", error=error)
    assert all(str(e).startswith("site.toml, ") for e in caught.value.errors)
    return {e.field: str(e).split(": ", 1)[1] for e in caught.value.errors}


def test_a_good_table_becomes_the_dataclass_arrays_tuples_ints_floats() -> None:
    site = read_table(
        Site, {"name": "h1", "noise": {"epsilon": 2}, "sizes": [1, 2], "share": 1, "peers": ["i1"]}, source="s"
    )
    assert site == Site("h1", Noise(2.0), sizes=(1, 2), share=1.0, peers=("i1",))
    assert isinstance(site.share, float) and isinstance(site.noise.epsilon, float)


def test_every_mistake_of_a_table_is_reported_together_naming_the_dotted_field() -> None:
    raw = {
        "nam": "h1",
        "noise": {"epsilon": "high", "sigma": 1},
        "kind": "pharmacy",
        "rounds": True,
        "share": "half",
        "shared": 1,
        "sizes": [3, "four"],
        "metrics": {"auroc": 2.5},
        "peers": [],
    }
    assert _mistakes(raw) == {
        "site.nam": "unknown key; allowed: kind, metrics, name, noise, peers, rounds, share, shared, sizes",
        "site.name": "required; write name = ...",
        "site.noise.sigma": "unknown key; allowed: epsilon",
        "site.noise.epsilon": "expected a number, got 'high'; write e.g. epsilon = 1.0",
        "site.kind": "must be one of hospital, insurer, not 'pharmacy'",
        "site.rounds": "expected an integer, got True; write e.g. rounds = 5",
        "site.share": "expected a number, got 'half'; write e.g. share = 0.5",
        "site.shared": "expected true or false, got 1; write e.g. shared = true",
        "site.sizes[1]": "expected an integer, got 'four'",
        "site.metrics.auroc": "expected an integer, got 2.5",
        "site.peers": "must list at least one name",
    }


def test_a_rule_names_its_field_or_its_table() -> None:
    assert _mistakes({"name": "h1", "noise": {"epsilon": -1}}) == {"site.noise.epsilon": "must be positive, got -1.0"}
    assert _mistakes({"name": "h1", "rounds": 500}) == {"site": "rounds must be at most 100, not 500"}
    assert _mistakes({"name": "h1", "noise": 3}) == {"site.noise": "expected a [site.noise] table, got 3"}


def test_several_mistakes_keep_the_error_class_a_caller_catches() -> None:
    mistakes = _mistakes({"rounds": "x", "share": "y"}, MappingError)
    assert list(mistakes) == ["site.name", "site.rounds", "site.share"]
    single = ConfigError.of([MappingError("one", path="m.toml", field="a")])
    assert type(single) is MappingError and single.errors == (single,)
