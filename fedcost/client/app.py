"""The node's Flower ClientApp: a thin binding of ``Node`` to the Message API.

Train, evaluate and query messages all arrive here; the config record says which
transport (see ``fedcost.records``) and purpose. Whatever the transport, the node only
ever sends its name and role, or its contribution to a shared sum — masked under
secure aggregation, in the clear only when the run turned it off. Never rows, never
per-record values.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcost import records as rec
from fedcost.audit import AuditLog
from fedcost.client.node import Contribution, Node, NodeSetup
from fedcost.errors import FederationError
from fedcost.identity import Identity
from fedcost.job import TrainingJob
from fedcost.secagg import MaskedInputRequest, Quantizer, SetupRequest, request_from_dict
from fedcost.secagg import Node as SecAggNode

SetupResolver = Callable[[Context], NodeSetup]
COORDINATOR = "coordinator"
# The last exchange of a round at a node: its log signs a checkpoint after it.
ROUND_ENDS = ("secagg:evaluate:unmask", "plain:evaluate")


def make_client_app(resolve_setup: SetupResolver, node_factory: Callable[[NodeSetup], Node] = Node) -> ClientApp:
    """A ClientApp whose node is found by ``resolve_setup`` from Flower's node context.

    ``node_factory`` builds the node's local side; benchmarks swap in one that contributes
    synthetic vectors without training.
    """
    app = ClientApp()

    def respond(message: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        setup = resolve_setup(context)
        node = node_factory(setup)
        with _audit_log(setup, node) as log:
            kind = rec.message_kind(message.content)
            config = message.content[rec.CONFIG]
            round_ = int(config[rec.ROUND]) if rec.ROUND in config else None
            log.message_received(rec.content_bytes(message.content), sender=COORDINATOR, kind=kind, round=round_)
            try:
                content = _reply_content(node, setup, message, context, log)
            except Exception as error:
                log.append("refusal", round=round_, details={"kind": kind, "reason": str(error)})
                raise
            log.message_sent(rec.content_bytes(content), recipient=COORDINATOR, kind=f"{kind}>reply", round=round_)
            if kind in ROUND_ENDS:
                log.checkpoint(round=round_)
            if config[rec.TRANSPORT] == rec.CLOSE:
                log.close()
        return Message(content, reply_to=message)

    app.query()(respond)
    app.train()(respond)
    app.evaluate()(respond)
    return app


def _reply_content(node: Node, setup: NodeSetup, message: Message, context: Context, log: AuditLog) -> RecordDict:
    config = message.content[rec.CONFIG]
    transport = config[rec.TRANSPORT]
    content = RecordDict({rec.NODE: ConfigRecord({"name": node.name, "role": node.role})})
    if transport == rec.HELLO:
        log.append("job_received", details={"run_id": str(config["run_id"]), "secure_aggregation": bool(config["secure_aggregation"])})
        log.append("data_loaded", details={"train_rows": len(node.data.train), "test_rows": len(node.data.test), "schema_digest": node.schema_digest})
    elif transport == rec.PLAIN:
        if _drops_out(setup, config, "masked-input"):
            raise FederationError(f"node {node.name} drops out (injected fault)")
        contribution = _contribution(node, message)
        content[rec.CONTRIBUTION] = rec.arrays_record(contribution.arrays)
        content[rec.METRICS] = MetricRecord({rec.WEIGHT: contribution.weight})
    elif transport == rec.SECURE:
        content[rec.SECAGG], arrays = _secure_stage(node, setup, message, context)
        if arrays:
            content[rec.CONTRIBUTION] = arrays
    elif transport != rec.CLOSE:
        raise FederationError(f"node {node.name}: unknown transport {transport!r}")
    return content


def _audit_log(setup: NodeSetup, node: Node) -> AuditLog:
    """The node's own signed log, reopened for each message (any worker may carry it)."""
    identity = Identity(node.name, node.role, Ed25519PrivateKey.from_private_bytes(setup.identity_key))
    return AuditLog(setup.audit_dir / f"{node.name}.jsonl", identity)


def _contribution(node: Node, message: Message) -> Contribution:
    config = message.content[rec.CONFIG]
    purpose = str(config[rec.PURPOSE])
    if purpose not in ("statistics", "train", "evaluate"):
        raise FederationError(f"node {node.name}: unknown purpose {purpose!r}")
    job = TrainingJob.from_json(str(config[rec.JOB])) if rec.JOB in config else None
    weights = {k: a.numpy() for k, a in message.content[rec.ARRAYS].items()} if rec.ARRAYS in message.content else {}
    return node.contribution(purpose, job, weights, int(config[rec.ROUND]))  # type: ignore[arg-type]


def _secure_stage(node: Node, setup: NodeSetup, message: Message, context: Context):
    """One SecAgg+ stage; the node's round state lives in its own context between stages."""
    config = message.content[rec.CONFIG]
    request = request_from_dict(rec.join_message_dict(message.content[rec.SECAGG], None))
    names = [name for name, _ in setup.roster]
    identities = {i + 1: Ed25519PublicKey.from_public_bytes(key) for i, (_, key) in enumerate(setup.roster)}
    identity_key = Ed25519PrivateKey.from_private_bytes(setup.identity_key)
    if isinstance(request, SetupRequest):
        secure = SecAggNode(names.index(node.name) + 1, identity_key, identities)
    else:
        secure = SecAggNode.restore(bytes(context.state[rec.SECAGG]["state"]), identity_key, identities)
    vector = None
    if isinstance(request, MaskedInputRequest):
        contribution = _contribution(node, message)
        quantizer = Quantizer(
            float(config["q_clip"]), int(config["q_levels"]), int(config["q_max_nodes"]), int(config["q_max_weight"])
        )
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
