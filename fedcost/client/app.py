"""The node's Flower ClientApp: a thin binding of ``Node`` to the Message API.

Train, evaluate and query messages all arrive here; the config record says which
transport (see ``fedcost.records``) and purpose. Whatever the transport, the node only
ever sends its name and role, or its contribution to a shared sum — masked under
secure aggregation, in the clear only when the run turned it off. Never rows, never
per-record values.

Site control (``fedcost.client.site``, ``outgoing``, ``budget``) wraps every exchange:
the job is checked against the site policy before any rows are read, a DP round is
paid for before it trains, and the egress guard inspects every reply last.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.clientapp import ClientApp

from fedcost.wire import records as rec
from fedcost.analytics import GroupedStatisticsLayout
from fedcost.analytics.benchmarking import shared_vector, shared_vector_size
from fedcost.audit import AuditLog, LogPosition
from fedcost.client import budget, outgoing, site
from fedcost.client.node import Contribution, Node, NodeSetup
from fedcost.data.mapping import DataMapping
from fedcost.errors import ConfigError, FederationError, PolicyViolationError, PrivacyBudgetExhausted
from fedcost.identity import Identity
from fedcost.job import TrainingJob
from fedcost.privacy import SitePolicy
from fedcost.privacy.dp import DPConfig
from fedcost.secagg import MaskedInputRequest, SetupRequest, request_from_dict
from fedcost.secagg import Node as SecAggNode

SetupResolver = Callable[[Context], NodeSetup]
COORDINATOR = "coordinator"
# The last exchange of a round at a node: its log signs a checkpoint after it.
ROUND_ENDS = ("secagg:evaluate:unmask", "plain:evaluate")
# The training loss is computed without DP noise: it rides in the update's last slot
# only where the site policy shares it as a metric; elsewhere that slot is zero.
TRAIN_LOSS = "train-loss"
AUDIT_POSITION = "audit-position"


def make_client_app(resolve_setup: SetupResolver, node_factory: Callable[[NodeSetup], Node] = Node) -> ClientApp:
    """A ClientApp whose node is found by ``resolve_setup`` from Flower's node context.

    ``node_factory`` builds the node's local side; benchmarks swap in one that contributes
    synthetic vectors without training. A request the site policy refuses (at the job
    check, the privacy budget or the egress guard) is logged as a refusal and answered
    with an error reply that carries only the reason.
    """
    app = ClientApp()

    def respond(message: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        setup = resolve_setup(context)
        with _audit_log(setup, context) as log:
            kind, round_ = _kind(message), _round(message)
            log.message_received(rec.content_bytes(message.content), sender=COORDINATOR, kind=kind, round=round_)
            try:
                content = _guarded_reply(setup, node_factory, message, context, log)
            except (PolicyViolationError, PrivacyBudgetExhausted) as refusal:
                log.append("refusal", round=round_, details={"kind": kind, "reason": str(refusal)})
                return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"site {setup.name}: {refusal}"), reply_to=message)
            except Exception as error:
                log.append("refusal", round=round_, details={"kind": kind, "reason": str(error)})
                raise
            log.message_sent(rec.content_bytes(content), recipient=COORDINATOR, kind=f"{kind}>reply", round=round_)
            if kind in ROUND_ENDS:
                log.checkpoint(round=round_)
            if kind == rec.CLOSE:
                log.close()
        return Message(content, reply_to=message)

    app.query()(respond)
    app.train()(respond)
    app.evaluate()(respond)
    return app


def _guarded_reply(
    setup: NodeSetup, node_factory: Callable[[NodeSetup], Node], message: Message, context: Context, log: AuditLog
) -> RecordDict:
    """Check the job, then read data and build the reply, then pass it through the egress guard.

    The hello's job is checked against the site policy and kept in the node's context;
    every later request must stay inside it. Rows are read (``node_factory``) only after
    the checks, and the guard runs last, on exactly the records that would leave.
    """
    if rec.CONFIG not in message.content:
        raise PolicyViolationError("the site policy refuses this job: the request carries no config record")
    config = message.content[rec.CONFIG]
    transport = config.get(rec.TRANSPORT)
    if transport == rec.HELLO:
        job = site.hello_job(config)
        policy = site.site_policy(setup.policy, job)
        site.check_hello(policy, job)
        context.state[site.ACCEPTED_JOB] = job.to_record()
    else:
        job = site.accepted_job(context.state[site.ACCEPTED_JOB] if site.ACCEPTED_JOB in context.state else None)
        policy = site.site_policy(setup.policy, job)
        if transport != rec.CLOSE:
            site.check_request(policy, job, message)
    node = node_factory(setup)
    content = _reply_content(node, setup, policy, job, message, context, log)
    purpose = config.get(rec.PURPOSE)
    expected = outgoing.expected_arrays(message, _vector_size(node, setup, message))
    return outgoing.guard(policy, content, outgoing.outgoing_message(message, content, expected, _cohort(node, purpose)))


def _cohort(node: Node, purpose: object) -> int:
    """The rows a reply describes: held-out rows for evaluation, training rows for training
    and the feature statistics, every row of the site for its analytics."""
    if purpose == "evaluate":
        return len(node.data.test)
    if purpose in ("train", "statistics"):
        return len(node.data.train)
    return len(node.data.train) + len(node.data.test)


def _vector_size(node: Node, setup: NodeSetup, message: Message) -> int:
    """The length of the one vector a statistics, analytics or benchmark reply carries."""
    config = message.content[rec.CONFIG]
    purpose = config.get(rec.PURPOSE)
    if purpose == "statistics":
        return len(node.layout.slots())
    if purpose == "analytics":
        return _analytics_layout(config).size
    return shared_vector_size(len(setup.roster)) if purpose == "benchmark" else 0


def _analytics_layout(config: ConfigRecord) -> GroupedStatisticsLayout:
    """The statistics layout a request states; one this node cannot read is refused."""
    try:
        return GroupedStatisticsLayout.from_json(str(config.get(rec.JOB, "")))
    except ConfigError as error:
        raise PolicyViolationError(f"the site policy refuses this job: its statistics layout is invalid: {error}") from None


def _reply_content(
    node: Node,
    setup: NodeSetup,
    policy: SitePolicy,
    job: site.AcceptedJob,
    message: Message,
    context: Context,
    log: AuditLog,
) -> RecordDict:
    config = message.content[rec.CONFIG]
    transport = config[rec.TRANSPORT]
    content = RecordDict({rec.NODE: ConfigRecord({"name": node.name, "role": node.role})})
    if transport == rec.HELLO:
        log.append("job_received", details={"run_id": str(config["run_id"]), "secure_aggregation": job.secure_aggregation, "rounds": job.rounds, "dp_epsilon_budget": str(policy.privacy.epsilon)})
        log.append("data_loaded", details={"train_rows": len(node.data.train), "test_rows": len(node.data.test), "schema_digest": node.schema_digest})
    elif transport == rec.PLAIN:
        if _drops_out(setup, config, "masked-input"):
            raise FederationError(f"node {node.name} drops out (injected fault)")
        contribution = _contribution(node, setup, policy, job, message, log)
        content[rec.CONTRIBUTION] = rec.arrays_record(contribution.arrays)
        content[rec.METRICS] = MetricRecord({rec.WEIGHT: contribution.weight})
    elif transport == rec.SECURE:
        content[rec.SECAGG], arrays = _secure_stage(node, setup, policy, job, message, context, log)
        if arrays:
            content[rec.CONTRIBUTION] = arrays
    return content


def _kind(message: Message) -> str:
    """The request's kind for the audit log; one without a transport is logged as ``unknown``."""
    try:
        return rec.message_kind(message.content)
    except KeyError:
        return "unknown"


def _round(message: Message) -> int | None:
    """The request's round for the audit log, if it states one as an integer."""
    value = message.content[rec.CONFIG].get(rec.ROUND) if rec.CONFIG in message.content else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@contextmanager
def _audit_log(setup: NodeSetup, context: Context) -> Iterator[AuditLog]:
    """The node's own signed log, reopened for each message (any worker may carry it).

    The node keeps where its log ended in its own context, so reopening continues the
    chain without re-verifying every line (a changed file falls back to the full check).
    Its role comes from the mapping file, not the rows, so a refusal is logged before
    any data is read.
    """
    role = _mapping(setup.mapping).node(setup.name).role
    identity = Identity(setup.name, role, Ed25519PrivateKey.from_private_bytes(setup.identity_key))
    saved = context.state[AUDIT_POSITION] if AUDIT_POSITION in context.state else None
    resume = LogPosition(int(saved["seq"]), str(saved["head"]), int(saved["size"])) if saved else None
    log = AuditLog(setup.audit_dir / f"{setup.name}.jsonl", identity, resume=resume)
    try:
        yield log
    finally:
        position = log.position
        context.state[AUDIT_POSITION] = ConfigRecord({"seq": position.seq, "head": position.head, "size": position.size})
        log.detach()


@lru_cache(maxsize=8)
def _mapping(path: Path) -> DataMapping:
    return DataMapping.load(path)


def _contribution(
    node: Node, setup: NodeSetup, policy: SitePolicy, accepted: site.AcceptedJob, message: Message, log: AuditLog
) -> Contribution:
    """The node's part of the sum; a training round under DP is paid for before it trains."""
    config = message.content[rec.CONFIG]
    purpose = str(config[rec.PURPOSE])
    if purpose == "analytics":
        return Contribution([node.grouped_statistics(_analytics_layout(config), accepted.min_cohort)], 1)
    job = TrainingJob.from_json(str(config[rec.JOB])) if rec.JOB in config else None
    weights = {k: a.numpy() for k, a in message.content[rec.ARRAYS].items()} if rec.ARRAYS in message.content else {}
    round_ = int(config[rec.ROUND])  # type: ignore[arg-type]  # site.check_request checked it
    if purpose == "benchmark" and job is not None:
        totals = node.benchmark_totals(job, weights, accepted.min_cohort)
        slot = rec.secure_id(setup.roster, node.name) - 1
        return Contribution([shared_vector(totals, slot, len(setup.roster))], 1)
    if purpose != "train" or job is None:
        return node.contribution(purpose, job, weights, round_)  # type: ignore[arg-type]
    dp = _paid_round(node, setup, policy, accepted, job, round_, log) if policy.privacy.enabled else None
    contribution = node.contribution("train", job, weights, round_, dp)
    if TRAIN_LOSS in policy.metrics:
        return contribution
    return Contribution([*contribution.arrays[:-1], np.zeros(1)], contribution.weight)


def _paid_round(
    node: Node, setup: NodeSetup, policy: SitePolicy, accepted: site.AcceptedJob, job: TrainingJob, round_: int,
    log: AuditLog,
) -> DPConfig:
    """Pay for a DP-SGD round in the ledger file and log ε spent, before any training."""
    dp, spent = budget.pay_for_round(
        budget.ledger_path(setup.audit_dir, node.name),
        policy.privacy,
        examples=len(node.data.train),
        training=job.training,
        rounds_left=accepted.rounds - round_ + 1,
    )
    details = {"dp_epsilon_spent": spent, "dp_epsilon_budget": policy.privacy.epsilon, "noise_multiplier": dp.noise_multiplier}
    log.append("dp_round", round=round_, details=details)
    return dp


def _secure_stage(
    node: Node,
    setup: NodeSetup,
    policy: SitePolicy,
    accepted: site.AcceptedJob,
    message: Message,
    context: Context,
    log: AuditLog,
) -> tuple[ConfigRecord, ArrayRecord]:
    """One SecAgg+ stage; the node's round state lives in its own context between stages."""
    config = message.content[rec.CONFIG]
    request = request_from_dict(rec.join_message_dict(message.content[rec.SECAGG], None))
    identities = rec.roster_identities(setup.roster)
    identity_key = Ed25519PrivateKey.from_private_bytes(setup.identity_key)
    if isinstance(request, SetupRequest):
        secure = SecAggNode(rec.secure_id(setup.roster, node.name), identity_key, identities)
    else:
        secure = SecAggNode.restore(bytes(context.state[rec.SECAGG]["state"]), identity_key, identities)
    vector = None
    if isinstance(request, MaskedInputRequest):
        contribution = _contribution(node, setup, policy, accepted, message, log)
        quantizer = rec.quantizer_from_config(config)
        vector = quantizer.encode(contribution.arrays, seed=secrets.token_bytes(32), weight=contribution.weight)
    reply = secure.handle(request, vector=vector)
    if _drops_out(setup, config, reply.stage.value):
        raise FederationError(f"node {node.name} drops out at stage {reply.stage.value} (injected fault)")
    context.state[rec.SECAGG] = ConfigRecord({"state": secure.export_state()})
    return rec.split_message_dict(reply.to_dict())


def _drops_out(setup: NodeSetup, config: ConfigRecord, stage: str) -> bool:
    """An injected fault: this node goes silent at ``stage`` of a training round."""
    return (
        config[rec.PURPOSE] == "train" and int(config[rec.ROUND]) in setup.drop_rounds and stage == setup.drop_stage
    )
