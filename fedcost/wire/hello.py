"""The hello: the whole job a coordinator asks of a site, stated before anything else.

A site decides on the plan as a whole, before it reads any data: which purposes the job
will ask for (and what each reply carries), how many rounds, over what size of model,
the smallest cohort any shared figure may describe, whether every sum is secure, and
every grouped-statistics table it will request. Every later request must be part of
this plan. The node keeps the accepted hello in its Flower context and its digest in
its release ledger, so a coordinator that restarts a run must restate the same plan.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any, TypeVar

from flwr.app import ConfigRecord

from fedcost.errors import PolicyViolationError
from fedcost.privacy.distributed import NewtonNoise, StatisticsNoise
from fedcost.wire import records as rec
from fedcost.wire.purposes import PURPOSES

_refusal = PolicyViolationError.job_refused

OUTPUTS = "outputs."
TABLES = "tables"
DATA = "data"
EPISODES = "episodes"
_FIELDS = ("run_id", "coordinator", "secure_aggregation", "rounds", "min_cohort", "model_parameters")
# The job's distributed DP noise on every sum but training updates: all three, or none.
_NOISE = {"noise_sd": "sd", "noise_sites": "sites", "noise_cost_clip": "cost_clip"}
# The distributed DP noise on an exact GLM's Newton sums: all of these, or none.
_NEWTON_NOISE = {
    f"newton_noise_{name}": name
    for name in ("sd", "sites", "grid", "parameters", "blocks", "feature_clip", "response_clip")
}
Noise = TypeVar("Noise", StatisticsNoise, NewtonNoise)
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class Hello:
    """A job plan. ``outputs`` maps each purpose the job will ask for to what its replies
    carry; ``tables`` holds every grouped-statistics layout (JSON) the analytics purpose
    will request; ``noise``, the distributed DP noise every sum but a training update
    carries, if the job adds any; ``data``, the job's targets and extra columns (JSON,
    ``StatisticsLayout.data_json``), which the site's own data must match; ``episodes``,
    the episode linkage's plan (JSON, ``EpisodePlan.to_json``: window, hospitals, payers)
    when the job asks for episodes; ``newton_noise``, the distributed DP noise on an exact
    GLM's Newton sums, if the job adds any."""

    run_id: str
    coordinator: str
    secure_aggregation: bool
    rounds: int
    min_cohort: int
    model_parameters: int
    outputs: Mapping[str, tuple[str, ...]]
    tables: tuple[str, ...] = ()
    noise: StatisticsNoise | None = None
    data: str = ""
    episodes: str = ""
    newton_noise: NewtonNoise | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "outputs", MappingProxyType({k: tuple(v) for k, v in self.outputs.items()}))

    @property
    def purposes(self) -> tuple[str, ...]:
        """The purposes of the plan, in the order a job asks for them."""
        return tuple(name for name in PURPOSES if name in self.outputs)

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the plan: a restarted run must state exactly the same one."""
        return hashlib.sha256(json.dumps(self._plain(), sort_keys=True).encode()).hexdigest()

    def _plain(self) -> dict[str, Any]:
        fields = {name: getattr(self, name) for name in _FIELDS}
        data = {DATA: self.data} if self.data else {}
        episodes = {EPISODES: self.episodes} if self.episodes else {}
        return {
            **fields,
            "outputs": {k: list(v) for k, v in self.outputs.items()},
            TABLES: list(self.tables),
            **self._noise_fields(),
            **data,
            **episodes,
        }

    def _noise_fields(self) -> dict[str, Any]:
        noise = {key: getattr(self.noise, name) for key, name in _NOISE.items()} if self.noise else {}
        newton = self.newton_noise
        return noise | ({key: getattr(newton, name) for key, name in _NEWTON_NOISE.items()} if newton else {})

    def to_record(self) -> ConfigRecord:
        """The hello as its config record travels (``transport = hello``)."""
        plan = {name: getattr(self, name) for name in _FIELDS}
        outputs = {OUTPUTS + purpose: list(names) for purpose, names in self.outputs.items()}
        tables = {TABLES: list(self.tables)} if self.tables else {}
        data = {DATA: self.data} if self.data else {}
        episodes = {EPISODES: self.episodes} if self.episodes else {}
        return ConfigRecord(
            {rec.TRANSPORT: rec.HELLO, **plan, **outputs, **tables, **self._noise_fields(), **data, **episodes}
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Hello:
        """The plan a hello states, read strictly: a field this node does not know (a
        subgroup filter, a query) is a request the site never agreed to answer."""
        known = {rec.TRANSPORT, TABLES, DATA, EPISODES, *_FIELDS, *_NOISE, *_NEWTON_NOISE}
        for key in record:
            if key not in known and not key.startswith(OUTPUTS):
                raise _refusal(f"the hello asks for {key!r:.60}, which this node does not know")
        missing = [key for key in _FIELDS if key not in record]
        if missing:
            raise _refusal(f"the hello does not state the job's {', '.join(missing)}; a site accepts only a stated job")
        outputs = {key.removeprefix(OUTPUTS): record[key] for key in record if key.startswith(OUTPUTS)}
        if not outputs:
            raise _refusal("the hello states no outputs; a site accepts only a stated job")
        for purpose, names in outputs.items():
            if purpose not in PURPOSES:
                raise _refusal(f"the hello plans an exchange {purpose!r:.40}; a site answers {', '.join(PURPOSES)}")
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise _refusal(f"the hello's outputs of {purpose!r} must be a list of output names")
        tables = record.get(TABLES, [])
        if not isinstance(tables, list) or not all(isinstance(table, str) for table in tables):
            raise _refusal("the hello's tables must be a list of statistics layouts")
        if bool(tables) != ("analytics" in outputs):
            raise _refusal("the hello must state every statistics table of its analytics, and tables only with them")
        data = record.get(DATA, "")
        if not isinstance(data, str):
            raise _refusal("the hello's data section must be a JSON text")
        episodes = record.get(EPISODES, "")
        if not isinstance(episodes, str) or bool(episodes) != ("episodes" in outputs):
            raise _refusal("the hello must state the episode linkage's plan with its episodes, and only then")
        run_id, coordinator = record["run_id"], record["coordinator"]
        if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
            raise _refusal(f"the hello's run id {str(run_id)[:40]!r} is not a plain name")
        if not isinstance(coordinator, str):
            raise _refusal("the hello's coordinator must be a key id")
        if not isinstance(record["secure_aggregation"], bool):
            raise _refusal("the hello's secure_aggregation must be true or false")
        for name in ("rounds", "min_cohort", "model_parameters"):
            if isinstance(record[name], bool) or not isinstance(record[name], int):
                raise _refusal(f"the hello's {name} must be a whole number, not {record[name]!r:.20}")
        if _NEWTON_NOISE.keys() & set(record) and "newton" not in outputs:
            raise _refusal("the hello states noise for Newton sums it does not plan")
        return cls(
            noise=_noise(record, _NOISE, StatisticsNoise),
            newton_noise=_noise(record, _NEWTON_NOISE, NewtonNoise),
            run_id=run_id,
            coordinator=coordinator,
            secure_aggregation=record["secure_aggregation"],
            rounds=record["rounds"],  # type: ignore[arg-type]  # checked above
            min_cohort=record["min_cohort"],  # type: ignore[arg-type]
            model_parameters=record["model_parameters"],  # type: ignore[arg-type]
            outputs={purpose: tuple(names) for purpose, names in outputs.items()},  # type: ignore[union-attr]
            tables=tuple(tables),
            data=data,
            episodes=episodes,
        )


def _noise(record: ConfigRecord, fields: dict[str, str], kind: type[Noise]) -> Noise | None:
    """The job's noise of one ``kind``, stated in full or not at all."""
    stated = [key for key in fields if key in record]
    if not stated:
        return None
    if len(stated) != len(fields):
        raise _refusal(f"the hello states its noise only in part; it needs {', '.join(fields)}")
    try:
        return kind(**{name: record[key] for key, name in fields.items()})
    except (ValueError, TypeError) as error:
        raise _refusal(f"the hello's noise is not usable: {error}") from None
