"""A request as a node reads it: every record and config field checked before anything acts on it.

A request carries exactly the records and fields its transport, purpose and stage call
for, each of its type; an extra record or field is refused, not ignored (data a site
never agreed to read may hide in it, and a field a node ignores today may mean
something tomorrow). Ranges that depend on the accepted job (rounds, model size, the
plan's tables) are the site's to check (``fedcost.client.site``).

A secure consistency request may carry the next sum's setup, an unmask request its
share-keys (``records.CARRIED``; ``records.NEXT_CONFIG`` and ``records.NEXT_SECAGG``, both or
neither): that part is read as strictly as if it had come alone, must be of the stage its
carrier carries, and becomes the request's ``next``.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedcost.errors import PolicyViolationError
from fedcost.secagg import Stage
from fedcost.wire import records as rec
from fedcost.wire.purposes import PURPOSES, Purpose

_refusal = PolicyViolationError.request_refused

# Extra records a hello may carry: in a deployment, the roster as CA-signed certificates.
ROSTER = "fedcost.roster"
QUANTIZER = ("q_clip", "q_levels", "q_max_nodes", "q_max_weight")
TOTAL_WEIGHT = "q_total_weight"  # a training sum's total weight, for 32-bit words
NEXT = frozenset({rec.NEXT_CONFIG, rec.NEXT_SECAGG})  # the next sum's part, on a consistency or unmask request
# Each step of the episode linkage and the bytes its request relays: a payer's answer step
# carries the hospital's offer, a hospital's report step the payer's answer (``fedcost.linkage``).
LINK_STAGES: dict[str, tuple[str, ...]] = {
    "totals": (),
    "offer": (),
    "answer": ("reply_key", "items", "signature"),
    "report": ("sender_key", "sealed", "signature"),
}


@dataclass(frozen=True)
class Request:
    """A checked request: its transport, and for a contribution its purpose, round and stage."""

    transport: str
    config: ConfigRecord
    content: RecordDict
    purpose: Purpose | None = None
    round: int | None = None
    stage: Stage | None = None
    next: Request | None = None  # the next sum's part, riding on a consistency or unmask request

    @property
    def weights(self) -> ArrayRecord | None:
        """The global model a request carries, if any."""
        return self.content.array_records.get(rec.ARRAYS)


def read_request(content: RecordDict) -> Request:
    """The request ``content`` states, or ``PolicyViolationError`` naming what is wrong."""
    config = content.config_records.get(rec.CONFIG)
    if config is None:
        raise _refusal("it carries no config record")
    transport = config.get(rec.TRANSPORT)
    if transport == rec.HELLO:
        _records(content, {rec.CONFIG}, optional={ROSTER})
        return Request(rec.HELLO, config, content)
    if transport == rec.CLOSE:
        _records(content, {rec.CONFIG})
        _fields(config, {rec.TRANSPORT})
        return Request(rec.CLOSE, config, content)
    if transport == rec.LINK:
        return _linkage(content, config)
    if transport not in (rec.PLAIN, rec.SECURE):
        raise _refusal(
            f"unknown request type {str(transport)!r:.40}; a node answers hello, plain, secagg, linkage and close"
        )
    purpose = PURPOSES.get(config.get(rec.PURPOSE))  # type: ignore[arg-type]
    if purpose is None:
        raise _refusal(f"unknown purpose {str(config.get(rec.PURPOSE))!r:.40}; a node answers {', '.join(PURPOSES)}")
    round_ = config.get(rec.ROUND)
    if isinstance(round_, bool) or not isinstance(round_, int):
        raise _refusal(f"its round {round_!r:.20} is not a whole number")
    needs_job = purpose.carries_model or purpose.name == "analytics"
    expected = {rec.TRANSPORT, rec.PURPOSE, rec.ROUND, *([rec.JOB] if needs_job else [])}
    if needs_job and not isinstance(config.get(rec.JOB), str):
        raise _refusal(f"a {purpose.name} request must state its job")
    if transport == rec.PLAIN:
        _records(content, {rec.CONFIG, *([rec.ARRAYS] if purpose.carries_model else [])})
        _fields(config, expected)
        return Request(rec.PLAIN, config, content, purpose, round_)
    stage = _stage(content)
    model = purpose.carries_model and stage is Stage.MASKED_INPUT
    ahead = stage in rec.CARRIED and bool(NEXT & set(content))
    _records(content, {rec.CONFIG, rec.SECAGG, *([rec.ARRAYS] if model else []), *(NEXT if ahead else ())})
    optional = {TOTAL_WEIGHT} if purpose.name == "train" else set()
    _fields(config, expected | set(QUANTIZER), optional=optional)
    for key in (*QUANTIZER, *optional):
        value = config.get(key)
        if key in config and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise _refusal(f"its secure-aggregation setting {key} is not a positive number")
    return Request(rec.SECURE, config, content, purpose, round_, stage, _next_part(content, stage) if ahead else None)


def _next_part(content: RecordDict, carrier: Stage) -> Request:
    """The next sum's part a ``carrier`` stage's request carries, read as if it had come alone."""
    part = read_request(RecordDict({rec.CONFIG: content[rec.NEXT_CONFIG], rec.SECAGG: content[rec.NEXT_SECAGG]}))
    carried = rec.CARRIED[carrier]
    if part.transport != rec.SECURE or part.stage is not carried:
        raise _refusal(f"the next sum's part a {carrier.value} request carries must be its {carried.value}")
    return part


def _linkage(content: RecordDict, config: ConfigRecord) -> Request:
    """One step of the episode linkage: its stage, the peer it concerns, the bytes it relays."""
    _records(content, {rec.CONFIG})
    stage = config.get(rec.STAGE)
    if stage not in LINK_STAGES:
        raise _refusal(f"it names no step of the episode linkage a node knows ({str(stage)!r:.30})")
    relayed = LINK_STAGES[stage]  # type: ignore[index]  # checked above
    _fields(config, {rec.TRANSPORT, rec.PURPOSE, rec.ROUND, rec.STAGE, rec.PEER, *relayed})
    if config[rec.PURPOSE] != "episodes" or config[rec.ROUND] != 0:
        raise _refusal("a linkage request is for the episodes of round 0")
    if not isinstance(config[rec.PEER], str):
        raise _refusal("its peer must be a site's name")
    for key in relayed:
        if not isinstance(config[key], bytes):
            raise _refusal(f"its {key} must be bytes")
    return Request(rec.LINK, config, content, PURPOSES["episodes"], 0)


def _stage(content: RecordDict) -> Stage:
    secagg = content.config_records.get(rec.SECAGG)
    stage = secagg.get("stage") if secagg is not None else None
    if stage not in {s.value for s in Stage}:
        raise _refusal(f"it names no secure-aggregation stage a node knows ({str(stage)!r:.30})")
    return Stage(stage)


def _records(content: RecordDict, required: set[str], *, optional: frozenset[str] | set[str] = frozenset()) -> None:
    """Exactly the records a request of its kind carries, each of its type."""
    names = set(content)
    if not required <= names or not names <= required | set(optional):
        extra, missing = sorted(names - required - set(optional)), sorted(required - names)
        what = f"records it should not carry ({', '.join(extra)})" if extra else f"no {', '.join(missing)} record"
        raise _refusal(f"it carries {what}")
    for name in names:
        expected = ArrayRecord if name == rec.ARRAYS else ConfigRecord
        if not isinstance(content[name], expected):
            raise _refusal(f"its {name!r} record is not a {expected.__name__}")


def _fields(config: ConfigRecord, required: set[str], *, optional: set[str] | frozenset[str] = frozenset()) -> None:
    """Exactly the config fields a request of its kind carries."""
    keys = set(config)
    extra = sorted(keys - required - set(optional))
    if extra:
        raise _refusal(f"it asks for {', '.join(repr(k) for k in extra)[:80]}, which a node does not read")
    missing = sorted(required - keys)
    if missing:
        raise _refusal(f"it does not state its {', '.join(missing)}")
