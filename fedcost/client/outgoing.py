"""The egress guard at the node: a reply's Flower records as the pure core's ``OutgoingMessage``.

``inspect_outgoing`` rules on a flat description of a reply; this module builds that
description from exactly the records that would leave. The vectors the reply may carry
(``expected``) come from the request the node accepted (``fedcost.client.exchanges``),
never from the reply itself: a reply cannot vouch for its own shape.

A reply that also answers the next sum's part (its setup on a consistency request, its
share-keys on an unmask request) is guarded in two parts, each as if it were alone, and
joined only then (``with_next``): the joined reply carries exactly one record more, that
part's reply or the refusal's reason, and the two parts together stay within the site's
``max_message_bytes`` (``reply_bytes``).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict

from fedcost.errors import PolicyViolationError
from fedcost.privacy import OutgoingMessage, SitePolicy, error_reply_reason, inspect_outgoing
from fedcost.privacy.egress import payload_bytes
from fedcost.privacy.policy import EXAMPLES
from fedcost.wire import records as rec
from fedcost.wire.requests import Request

MASKED = "masked"  # the masked vector's name in a masked-input reply (MaskedInputReply)
# The records a reply is built of; any other is refused before the guard reads the rest.
RECORDS = frozenset({rec.NODE, rec.SECAGG, rec.LINKAGE, rec.METRICS, rec.CONTRIBUTION})


def outgoing_message(
    request: Request, content: RecordDict, expected: dict[str, tuple[int, ...]], cohort_size: int
) -> OutgoingMessage:
    """Every record of ``content`` flattened: identity and protocol fields as configs.

    The plain transport's weight becomes the example count of a training update; the
    weight of a statistics or evaluation sum is the constant 1 and carries nothing, so
    it is left out only when it is exactly 1 (any other value meets the guard).
    """
    strangers = sorted(set(content) - RECORDS)
    if strangers:
        raise PolicyViolationError(
            f"refused by the site's egress policy: a record it does not send ({strangers[0]!r:.40})"
        )
    configs, metrics, arrays = _flat(content)
    purpose = request.purpose.name if request.purpose else None
    if rec.WEIGHT in metrics:
        weight = metrics.pop(rec.WEIGHT)
        if purpose == "train":
            metrics[EXAMPLES] = weight
        elif weight != 1:
            metrics[rec.WEIGHT] = weight
    protocol = next((content[name] for name in (rec.SECAGG, rec.LINKAGE) if name in content), None)
    stage = None if protocol is None else protocol["stage"]
    return OutgoingMessage(
        kind=request.purpose.message_type if request.purpose else "query",
        stage=None if stage is None else str(stage),
        arrays=arrays,
        metrics=metrics,
        configs=configs,
        cohort_size=cohort_size,
        expected_arrays=expected,
    )


def _flat(content: RecordDict) -> tuple[dict, dict, dict]:
    """A reply's identity and protocol fields, its metrics and its arrays, as the guard reads them."""
    configs: dict = {}
    for name in (rec.NODE, rec.SECAGG, rec.LINKAGE):
        if name in content:
            configs.update(content[name])
    metrics = dict(content[rec.METRICS]) if rec.METRICS in content else {}
    arrays = (
        {key: array.numpy() for key, array in content[rec.CONTRIBUTION].items()} if rec.CONTRIBUTION in content else {}
    )
    return configs, metrics, arrays


def reply_bytes(content: RecordDict) -> int:
    """The egress guard's estimate of a reply's size (``payload_bytes``), the next sum's part
    included (a refusal's reason is the site's own words, as in an error reply, and not counted)."""
    configs, metrics, arrays = _flat(content)
    ahead = payload_bytes({}, {}, dict(content[rec.NEXT_SECAGG])) if rec.NEXT_SECAGG in content else 0
    return payload_bytes(arrays, metrics, configs) + ahead


def guard(policy: SitePolicy, content: RecordDict, outgoing: OutgoingMessage) -> RecordDict:
    """What may leave: ``content`` with its metrics as the guard sanitised them, or a refusal.

    Raises ``PolicyViolationError`` with the guard's reason (never the refused content).
    """
    decision = inspect_outgoing(policy, outgoing)
    if not decision.allowed:
        raise PolicyViolationError(error_reply_reason(decision))
    for name, value in decision.metrics.items():
        content[rec.METRICS][rec.WEIGHT if name == EXAMPLES else name] = value
    return content


def check_room(policy: SitePolicy, content: RecordDict, part: RecordDict) -> None:
    """Refuse the reply to a next sum's ``part`` (the guard passed it alone) that would take the
    reply ``content`` it rides in past the site's ``max_message_bytes``."""
    joined = reply_bytes(content) + payload_bytes({}, {}, dict(part[rec.SECAGG]))
    if joined > policy.max_message_bytes:
        stage = part[rec.SECAGG].get("stage")
        raise PolicyViolationError(
            f"refused by the site's egress policy: the next sum's {stage} would take the reply it rides in to "
            f"{joined} bytes, past the site's max_message_bytes ({policy.max_message_bytes}); the site answers "
            "it sent alone"
        )


def with_next(content: RecordDict, part: RecordDict | str) -> RecordDict:
    """A consistency or unmask reply the guard passed, with the next sum's part: the
    secure-aggregation record of that part's reply, which the guard passed on its own and
    ``check_room`` let join it, or the reason the site refused that part."""
    if isinstance(part, str):
        content[rec.NEXT_REFUSED] = ConfigRecord({rec.REASON: part})
    else:
        content[rec.NEXT_SECAGG] = part[rec.SECAGG]
    return content
