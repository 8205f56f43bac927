"""The egress guard's checks: may this outgoing message leave the site, and in what form?

A pure function over a description of a reply, for the client mod that runs last before
the wire. Everything not explicitly allowed is refused:

- arrays: only the update or sum vectors the accepted job fixed (names and shapes),
  masked (32- or 64-bit unsigned words, secure aggregation) or, where the policy does
  not require secure aggregation, plain finite floats; never more numbers or bytes than
  the policy allows;
- metrics: the example count used for weighting, and the policy's metrics, rounded to
  the policy's precision;
- configs: the node's name and role, and the protocol fields of the stage at hand
  (secure aggregation, or a step of the episode linkage); any other key, and any other
  string, is refused (data hides in strings and in names as well as in values);
- nothing that describes fewer rows than the policy's ``min_cohort``.

A refusal has two texts: ``reason``, safe to send (it never repeats the message's
content, which may be the very data being smuggled, nor the cohort size), and
``detail``, for the site's own log.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from fedcost.privacy.policy import EXAMPLES, SitePolicy
from fedcost.schema import ROLES
from fedcost.secagg.crypto import KEY_SIZE
from fedcost.secagg.messages import Stage
from fedcost.secagg.prg import WORDS

MESSAGE_KINDS = ("train", "evaluate", "query")
ConfigValue = str | int | float | bool | bytes | list[int] | list[bytes]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # as fedcost.identity names a party
_SIGNATURE_SIZE = 64  # Ed25519


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _is_counts(value: Any) -> bool:
    return isinstance(value, list) and all(_is_count(v) for v in value)


def _is_blobs(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, bytes) for v in value)


_IDENTITY: dict[str, Callable[[Any], bool]] = {
    "name": lambda v: isinstance(v, str) and _NAME.fullmatch(v) is not None,
    "role": lambda v: isinstance(v, str) and v in ROLES,
}


def _is_points(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) % KEY_SIZE == 0


def _is_signature(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == _SIGNATURE_SIZE


def _is_key(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == KEY_SIZE


# The fields of each step of the episode linkage (``fedcost.linkage``): a hospital's stays'
# totals (over at least min_cohort stays, checked at the node), and the intersection-sum's
# curve points, sealed text, shares, signatures and matched positions, all protocol output.
LINKAGE_STEPS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "episodes-totals": {
        "stays": _is_count,
        "cost_cents": _is_count,
        "readmitted": _is_count,
        "withheld": lambda v: isinstance(v, bool),
    },
    "episodes-offer": {"reply_key": _is_key, "items": _is_points, "signature": _is_signature},
    "episodes-answer": {
        "sender_key": _is_key,
        "sealed": lambda v: isinstance(v, bytes),
        "signature": _is_signature,
        "shares": lambda v: isinstance(v, bytes) and len(v) % 8 == 0,
        "shares_signature": _is_signature,
    },
    "episodes-report": {
        "positions": _is_counts,
        "share_sum": lambda v: isinstance(v, bytes) and len(v) == 8,
        "withheld": lambda v: isinstance(v, bool),
        "signature": _is_signature,
    },
}

# The config fields of each secure-aggregation reply (fedcost.secagg.messages, to_dict),
# the masked vector excepted: it travels as an array. Keys, shares and ciphertexts are
# cryptographic material produced by the protocol, not by data-dependent code.
_PROTOCOL: dict[str, dict[str, Callable[[Any], bool]]] = {
    Stage.ADVERTISE_KEYS: {
        "node_id": _is_count,
        "mask_key": lambda v: isinstance(v, bytes) and len(v) == KEY_SIZE,
        "share_key": lambda v: isinstance(v, bytes) and len(v) == KEY_SIZE,
        "signature": lambda v: isinstance(v, bytes) and len(v) == _SIGNATURE_SIZE,
    },
    Stage.SHARE_KEYS: {"node_id": _is_count, "senders": _is_counts, "recipients": _is_counts, "ciphertexts": _is_blobs},
    Stage.MASKED_INPUT: {"node_id": _is_count},
    Stage.CONSISTENCY: {
        "node_id": _is_count,
        "signature": lambda v: isinstance(v, bytes) and len(v) == _SIGNATURE_SIZE,
    },
    Stage.UNMASK: {
        "node_id": _is_count,
        **{f"{p}_owners": _is_counts for p in ("seed", "key")},
        **{f"{p}_xs": _is_counts for p in ("seed", "key")},
        **{f"{p}_values": _is_blobs for p in ("seed", "key")},
    },
    **LINKAGE_STEPS,
}


@dataclass(frozen=True, eq=False)
class OutgoingMessage:
    """What a reply carries, flattened out of its Flower records.

    ``kind`` is the Flower message type (train, evaluate, query); ``stage`` the
    secure-aggregation stage, or None for a plain reply. ``cohort_size`` is the number
    of rows the arrays and metrics describe. ``expected_arrays`` maps the names of the
    vectors the accepted job produces to their shapes; the binding derives it from the
    job it checked (model, statistics layout, round config), never from the reply.
    """

    kind: str
    stage: str | None
    arrays: Mapping[str, np.ndarray]
    metrics: Mapping[str, int | float]
    configs: Mapping[str, ConfigValue]
    cohort_size: int
    expected_arrays: Mapping[str, tuple[int, ...]]

    @property
    def masked(self) -> bool:
        """Whether the arrays are secure-aggregation masked inputs (only the masked-input stage sends them)."""
        return self.stage == Stage.MASKED_INPUT


@dataclass(frozen=True, eq=False)
class EgressDecision:
    """Whether a message may leave and, if so, exactly what to send (copies, metrics rounded).

    ``reason`` is safe to send to the coordinator. ``detail`` may quote the offending
    content (up to 80 characters): keep it in the site's own log, out of anything that
    leaves the site, audit logs handed to an auditor included.
    """

    allowed: bool
    reason: str
    detail: str = ""
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    metrics: Mapping[str, int | float] = field(default_factory=dict)
    configs: Mapping[str, ConfigValue] = field(default_factory=dict)


class _Refused(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def inspect_outgoing(policy: SitePolicy, message: OutgoingMessage) -> EgressDecision:
    """Allow ``message`` under ``policy`` (with its content sanitised) or refuse it with a reason."""
    try:
        # (1) A message kind and stage this site knows.
        if message.kind not in MESSAGE_KINDS or (message.stage is not None and message.stage not in _PROTOCOL):
            detail = f"kind={message.kind!r:.40} stage={message.stage!r:.40}"
            raise _Refused("an unknown message kind or stage", detail)
        # (2) Configs: identity and this stage's protocol fields only, each of its form.
        configs = _configs(message)
        # (3) Metrics: the example count and the whitelisted metrics, rounded.
        metrics = _metrics(policy, message)
        # (4) Arrays: the job's vectors only, masked unless the policy allows plain ones.
        arrays = _arrays(policy, message)
        # (5) Nothing that describes fewer rows than the site's smallest cohort.
        if (arrays or metrics) and not (_is_count(message.cohort_size) and message.cohort_size >= policy.min_cohort):
            raise _Refused(
                f"outputs over a cohort smaller than the site's min_cohort ({policy.min_cohort})",
                f"cohort_size={message.cohort_size!r}",
            )
        # (6) Within the site's size limit.
        size = payload_bytes(arrays, metrics, configs)
        if size > policy.max_message_bytes:
            limit = policy.max_message_bytes
            raise _Refused(f"a message larger than the site's max_message_bytes ({limit})", f"{size} bytes")
    except _Refused as refused:
        return EgressDecision(allowed=False, reason=refused.reason, detail=refused.detail)
    return EgressDecision(
        allowed=True,
        reason="allowed by the site policy",
        arrays=MappingProxyType(arrays),
        metrics=MappingProxyType(metrics),
        configs=MappingProxyType(configs),
    )


def error_reply_reason(decision: EgressDecision) -> str:
    """What the node tells the coordinator about a refused message: the rule, no data."""
    if decision.allowed:
        raise ValueError("the message was allowed; there is no refusal to report")
    return f"refused by the site's egress policy: {decision.reason}"


def _configs(message: OutgoingMessage) -> dict[str, ConfigValue]:
    """Identity and protocol fields only, each of the form its key fixes."""
    allowed = {**_IDENTITY, **_PROTOCOL.get(message.stage or "", {})}
    if message.stage is not None:
        allowed["stage"] = lambda v: v == message.stage
    for key, value in message.configs.items():
        if key not in allowed:
            raise _Refused("a config field outside the site's whitelist", f"key {key!r:.80}")
        if not allowed[key](value):
            raise _Refused(f"a config field '{key}' whose value has the wrong form", f"value {value!r:.80}")
    return {key: list(value) if isinstance(value, list) else value for key, value in message.configs.items()}


def _metrics(policy: SitePolicy, message: OutgoingMessage) -> dict[str, int | float]:
    """The example count (exactly the cohort size) and whitelisted metrics, rounded."""
    rounded: dict[str, int | float] = {}
    for name, value in message.metrics.items():
        if name == EXAMPLES:
            if not (_is_count(value) and value == message.cohort_size):
                raise _Refused(f"a '{EXAMPLES}' that is not the size of the cohort", f"value {value!r:.80}")
            rounded[name] = value
            continue
        if name not in policy.metrics:
            shared = ", ".join((EXAMPLES, *policy.metrics))
            raise _Refused(f"a metric outside the site's whitelist ({shared})", f"name {name!r:.80}")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise _Refused(f"a metric '{name}' that is not a number", f"value {value!r:.80}")
        if not math.isfinite(value):
            raise _Refused(f"a metric '{name}' that is NaN or infinite", "")
        rounded[name] = round(float(value), policy.metrics[name])
    return rounded


def _arrays(policy: SitePolicy, message: OutgoingMessage) -> dict[str, np.ndarray]:
    """Read-only copies of the expected vectors, after checking form, size and values."""
    if not message.arrays:
        return {}
    if message.stage is not None and not message.masked:
        raise _Refused(f"arrays in the secure-aggregation stage '{message.stage}'", "")
    if not message.masked and policy.require_secure_aggregation:
        raise _Refused("plain (unmasked) arrays; the site requires secure aggregation", "")
    total = 0
    for name, array in message.arrays.items():
        expected = message.expected_arrays.get(name)
        if not isinstance(array, np.ndarray) or expected is None or array.shape != tuple(expected):
            raise _Refused("an array that is not an expected update or sum vector", f"array {name!r:.80}")
        total += array.size
    if total > policy.max_model_parameters:
        limit = policy.max_model_parameters
        raise _Refused(f"more numbers than the site's max_model_parameters ({limit})", f"{total} numbers")
    copies = {}
    for name, array in message.arrays.items():
        if message.masked and array.dtype not in WORDS:
            raise _Refused("a masked array that is not uint32 or uint64", f"array {name!r:.80} dtype {array.dtype}")
        if not message.masked:
            if not np.issubdtype(array.dtype, np.floating):
                raise _Refused("a plain array that is not floating point", f"array {name!r:.80} dtype {array.dtype}")
            if not np.isfinite(array).all():
                raise _Refused("an array holding NaN or infinite values", f"array {name!r:.80}")
        copy = np.array(array, copy=True)
        copy.flags.writeable = False
        copies[name] = copy
    return copies


def payload_bytes(arrays: Mapping[str, np.ndarray], metrics: Mapping[str, Any], configs: Mapping[str, Any]) -> int:
    """An upper estimate of the message's size: raw bytes, 8 per number, plus the names."""

    def size(value: Any) -> int:
        if isinstance(value, (bytes, str)):
            return len(value.encode() if isinstance(value, str) else value)
        if isinstance(value, list):
            return sum(size(v) for v in value)
        return 8

    names = [*arrays, *metrics, *configs]
    return (
        sum(a.nbytes for a in arrays.values())
        + sum(size(v) for v in (*metrics.values(), *configs.values()))
        + sum(len(n.encode()) for n in names)
    )
