"""The egress guard at the node: a reply's Flower records as the pure core's ``OutgoingMessage``.

``inspect_outgoing`` rules on a flat description of a reply; this module builds that
description from exactly the records that would leave, and takes the vectors the
reply may carry (``expected_arrays``) from the request the node accepted, never from
the reply itself: a reply cannot vouch for its own shape.
"""

from __future__ import annotations

from flwr.app import Message, RecordDict

from fedcost.wire import records as rec
from fedcost.errors import PolicyViolationError
from fedcost.job import TrainingJob
from fedcost.models import evaluation
from fedcost.privacy import OutgoingMessage, SitePolicy, error_reply_reason, inspect_outgoing
from fedcost.privacy.policy import EXAMPLES
from fedcost.secagg.messages import Stage

Shapes = list[tuple[int, ...]]
MASKED = "masked"  # the masked vector's name in a masked-input reply (MaskedInputReply)


def contribution_shapes(request: Message, vector_size: int) -> Shapes:
    """The shapes of the contribution the request asks for, from the request and the job.

    train: the global weights' shapes and the training-loss slot; evaluate: one sums
    vector per task of the job's model; statistics, analytics and benchmark: one vector
    of ``vector_size``, which the node works out from its own layout and roster.
    """
    config = request.content[rec.CONFIG]
    purpose = config[rec.PURPOSE]
    if purpose in ("statistics", "analytics", "benchmark"):
        return [(vector_size,)]
    if purpose == "train":
        return rec.update_shapes(request.content[rec.ARRAYS])
    return evaluation.sums_shapes(TrainingJob.from_json(str(config[rec.JOB])).model.tasks)


def expected_arrays(request: Message, vector_size: int) -> dict[str, tuple[int, ...]]:
    """The vectors the reply to ``request`` may carry, named as the reply names them."""
    config = request.content[rec.CONFIG]
    transport = config[rec.TRANSPORT]
    if transport == rec.PLAIN:
        shapes = contribution_shapes(request, vector_size)
        return {f"{i:04d}": shape for i, shape in enumerate(shapes)}
    if transport == rec.SECURE and request.content[rec.SECAGG]["stage"] == Stage.MASKED_INPUT:
        quantizer = rec.quantizer_from_config(config)
        return {MASKED: (quantizer.length(contribution_shapes(request, vector_size)),)}
    return {}


def outgoing_message(
    request: Message, content: RecordDict, expected: dict[str, tuple[int, ...]], cohort_size: int
) -> OutgoingMessage:
    """Every record of ``content`` flattened: identity and protocol fields as configs.

    The plain transport's weight becomes the example count of a training update; the
    weight of a statistics or evaluation sum is the constant 1 and carries nothing, so
    it is left out only when it is exactly 1 (any other value meets the guard).
    """
    configs: dict = {}
    for name in (rec.NODE, rec.SECAGG):
        if name in content:
            configs.update(content[name])
    metrics = dict(content[rec.METRICS]) if rec.METRICS in content else {}
    purpose = request.content[rec.CONFIG].get(rec.PURPOSE)
    if rec.WEIGHT in metrics:
        weight = metrics.pop(rec.WEIGHT)
        if purpose == "train":
            metrics[EXAMPLES] = weight
        elif weight != 1:
            metrics[rec.WEIGHT] = weight
    arrays = {key: array.numpy() for key, array in content[rec.CONTRIBUTION].items()} if rec.CONTRIBUTION in content else {}
    stage = content[rec.SECAGG]["stage"] if rec.SECAGG in content else None
    return OutgoingMessage(
        kind=request.metadata.message_type.split(".")[0],
        stage=None if stage is None else str(stage),
        arrays=arrays,
        metrics=metrics,
        configs=configs,
        cohort_size=cohort_size,
        expected_arrays=expected,
    )


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
