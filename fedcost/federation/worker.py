"""A site's node: one long-lived process that holds the coordinator connection and the ClientApp.

Flower's SuperNode polls the SuperLink every 3 s when idle, and for every message its
SuperExec (polling every 1 s) starts a fresh ``flwr-clientapp`` process that imports
Flower and the app (about 5 s on a 2-core machine), reads the site's rows again and
exits; a SecAgg+ sum is six such exchanges (``benchmarks/RESULTS.md``, "Deployment").
The worker keeps all of that in one process for the life of the node instead: it speaks
Flower's Fleet API itself (over gRPC, with TLS, SuperNode authentication and heartbeats:
see ``FleetSession``), asks for its next message again as soon as the last is answered
(the coordinator holds the question until there is one), and answers each message by
calling the node's ClientApp in-process, exactly the app a SuperNode would load
(``fedcost.federation.node_app.app``: roster check, then the site guardian with its policy
check, egress guard, release ledger and audit log on the path of every reply).
No per-message process exists, so there is no local channel to guard. The worker never
runs code a run's app bundle (FAB) names: it answers every run with the site's own,
installed ClientApp.

The worker also keeps, per run, the site's own report (``reports/<run-id>.json`` in its
state folder): rows, the privacy spent from its ledger, and the final model's figures on
its held-out rows. It never leaves the site by itself; the site sends it with its audit
log for the operator's ``fedcost federation collect``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.app import Context, Error, Message, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.app.user_config import UserConfig
from flwr.clientapp import ClientApp
from flwr.common.constant import (
    HEARTBEAT_MIN_INTERVAL,
    PUBLIC_KEY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    ErrorCode,
)
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.fleet_pb2 import (  # pylint: disable=no-name-in-module
    ActivateNodeRequest,
    DeactivateNodeRequest,
    PullMessagesRequest,
    PushMessagesRequest,
)
from flwr.proto.fleet_pb2_grpc import FleetStub  # pylint: disable=no-name-in-module
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import ObjectTree  # pylint: disable=no-name-in-module
from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
from flwr.supercore.date import now
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supercore.grpc import create_channel
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
    make_push_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    pull_and_inflate_object_from_tree,
    push_objects,
)
from flwr.supercore.interceptors.runtime_version_interceptor import (
    RuntimeVersionClientInterceptor,
)
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

from fedcost.errors import KitError
from fedcost.federation.provision import PULL_HOLD, Kit, fleet_address
from fedcost.federation.site_report import SiteReports
from fedcost.wire import records as rec

log = logging.getLogger("fedcost.worker")

# The node tells the coordinator to expect a heartbeat every 10 s (Flower's minimum) and
# sends one every 4 s: a node that dies is offline for the coordinator, and its pending
# exchanges come back as dropouts, about 20 s later (Flower allows two missed intervals).
HEARTBEAT_SECONDS, BEAT_EVERY = float(HEARTBEAT_MIN_INTERVAL), 4.0
# The coordinator holds a pull that finds nothing (``PULL_HOLD``), so the worker asks again at
# once; only a pull answered early with nothing (a coordinator stopping) is followed by a
# wait, 20 ms growing by a third each time, up to 1 s.
POLL_FAST, POLL_IDLE, POLL_GROWTH = 0.02, 1.0, 1.33
# A lost coordinator is retried after 1, 2, 4, ... seconds, at most 10 s apart: a restarted
# one resumes its run once enough nodes are back.
RETRY_FIRST, RETRY_MAX = 1.0, 10.0
# Activation refused may pass: the coordinator admits a new key within seconds, and a node
# that crashed stays online for it until two heartbeat intervals have passed. So long the
# worker keeps asking before it takes a refusal as final: at its start, and once a node it
# served no longer knows it (revoked, or a coordinator restarted that admits it again).
ADMISSION_PATIENCE, READMISSION_PATIENCE = 25.0, 10.0
# A reply that could not be sent is tried again for so long: the coordinator waits for it.
PUSH_PATIENCE = 120.0
# An object of a message not yet all uploaded is asked for again after 10 ms, doubling up
# to 0.2 s (Flower's default waits 1 s first: most of an exchange on loopback).
OBJECT_BACKOFF, OBJECT_BACKOFF_CAP = 0.01, 0.2
# A Fleet call not answered within so long is a lost coordinator (Flower's SuperNode: 5 s
# for a heartbeat); a pull of a large model's object may take longer on a slow link.
CALL_TIMEOUT = 30.0
# gRPC statuses that say the coordinator is away or failed, not that it refused the call.
LOST = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)
KEEP_CONTEXTS = 16  # runs whose Flower context the worker keeps (the SuperNode keeps all)


class NodeRefused(Exception):
    """The coordinator does not (or no longer) admit this node's key."""


class ConnectionLost(Exception):
    """The coordinator did not answer (or answered that it cannot now); it may come back."""


class Rejected(ConnectionLost):
    """The coordinator answered, and refused the request (e.g. for a run it no longer has)."""


@dataclass
class Polling:
    """The wait before asking again after a pull the coordinator answered at once with
    nothing: short at first, longer while nothing comes, short again after a message."""

    interval: float = POLL_FAST

    def found(self) -> None:
        self.interval = POLL_FAST

    def idle(self) -> float:
        wait = self.interval
        self.interval = min(POLL_IDLE, self.interval * POLL_GROWTH)
        return wait


@dataclass
class Backoff:
    """Waits of 1, 2, 4, ... seconds, at most ``RETRY_MAX``, until reset."""

    wait: float = RETRY_FIRST

    def next(self) -> float:
        wait, self.wait = self.wait, min(RETRY_MAX, self.wait * 2)
        return wait

    def reset(self) -> None:
        self.wait = RETRY_FIRST


def load_auth_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The kit's SuperNode authentication key (OpenSSH EC key, as the kit writes it)."""
    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (OSError, ValueError) as error:
        raise KitError(f"not a readable OpenSSH private key ({error})", path=str(path)) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KitError("expected an EC private key", path=str(path))
    return key


class NodeAuthInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Signs every Fleet call as Flower's SuperNode does: the node's public key, the time,
    and the node's signature of that time (the coordinator refuses a call without them)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey):
        self.key = key
        self.public = public_key_to_bytes(key.public_key())

    def intercept_unary_unary(self, continuation, call, request):  # type: ignore[no-untyped-def]
        timestamp = now().isoformat()
        signed = [
            (PUBLIC_KEY_HEADER, self.public),
            (TIMESTAMP_HEADER, timestamp),
            (SIGNATURE_HEADER, sign_message(self.key, timestamp.encode("ascii"))),
        ]
        return continuation(call._replace(metadata=[*(call.metadata or ()), *signed]), request)


class FleetSession:
    """This node's authenticated session with the coordinator's Fleet API over gRPC (TLS).

    Flower 1.42's SuperNode speaks the Fleet API as protobuf over HTTP, which the SuperLink
    serves through its per-request web middleware; its gRPC Fleet service, on the port
    after the federation's (``fleet_address``), answers the same calls from the same state
    for a fraction of the SuperLink's time per request (``benchmarks/RESULTS.md``,
    "Deployment"), and checks the same SuperNode authentication.
    """

    def __init__(self, address: str, ca_file: Path, auth_key: ec.EllipticCurvePrivateKey):
        self.address = address
        self.channel = create_channel(
            fleet_address(address),
            False,
            ca_file.read_bytes(),
            interceptors=[RuntimeVersionClientInterceptor(component_name="SuperNode"), NodeAuthInterceptor(auth_key)],
        )
        self.client = FleetStub(self.channel)
        self.public_key = auth_key.public_key()
        self.node: Node | None = None
        self.refused = threading.Event()
        self.closed = threading.Event()
        self.beats = threading.Thread(target=self._beat, daemon=True)
        self.calls = 0  # Fleet API requests so far (a profile's unit of the coordinator's work)

    @property
    def node_id(self) -> int:
        return 0 if self.node is None else int(self.node.node_id)

    def activate(self) -> int:
        """Go online as this node; raises ``NodeRefused`` or ``ConnectionLost``."""
        request = ActivateNodeRequest(
            public_key=public_key_to_bytes(self.public_key), heartbeat_interval=HEARTBEAT_SECONDS
        )
        response = self._call(self.client.ActivateNode, request)
        self.node = Node(node_id=response.node_id)
        self.refused.clear()
        if not self.beats.is_alive():
            self.beats.start()
        return self.node_id

    def pull(self) -> tuple[Message, ObjectTree] | None:
        """The next message for this node, its content still at the coordinator; None if none."""
        response = self._call(self.client.PullMessages, PullMessagesRequest(node=self.node))
        if not response.messages_list:
            return None
        return message_from_proto(response.messages_list[0]), response.message_object_trees[0]

    def content(self, message: Message, tree: ObjectTree) -> Message:
        """The message with its content, pulled object by object and confirmed received."""
        assert self.node is not None
        run_id = message.metadata.run_id
        pull = make_pull_object_fn_protobuf(lambda r: self._call(self.client.PullObject, r), self.node, run_id)
        confirm = make_confirm_message_received_fn_protobuf(
            lambda r: self._call(self.client.ConfirmMessageReceived, r), self.node, run_id
        )
        full = pull_and_inflate_object_from_tree(
            tree, pull, confirm, return_type=Message, initial_backoff=OBJECT_BACKOFF, backoff_cap=OBJECT_BACKOFF_CAP
        )
        full.metadata.__dict__["_message_id"] = tree.object_id
        return full

    def push(self, reply: Message, runtime: float) -> None:
        """Send a reply: its envelope, then every object the coordinator does not hold yet."""
        assert self.node is not None
        reply.metadata.__dict__["_message_id"] = reply.object_id
        with no_object_id_recompute():
            tree = get_object_tree(reply)
            envelope = message_to_proto(remove_content_from_message(reply))
            request = PushMessagesRequest(
                node=self.node, messages_list=[envelope], message_object_trees=[tree], clientapp_runtime_list=[runtime]
            )
            response = self._call(self.client.PushMessages, request)
            push = make_push_object_fn_protobuf(
                lambda r: self._call(self.client.PushObject, r), self.node, reply.metadata.run_id, response.session_id
            )
            push_objects(get_all_nested_objects(reply), push, object_ids_to_push=set(response.objects_to_push))

    def close(self) -> None:
        """Go offline at once (the coordinator need not wait for missed heartbeats), then disconnect."""
        self.closed.set()
        if self.node is not None:
            try:
                self.client.DeactivateNode(DeactivateNodeRequest(node_id=self.node.node_id), timeout=CALL_TIMEOUT)
            except grpc.RpcError:
                pass
        if self.beats.is_alive():
            self.beats.join(timeout=10)
        self.channel.close()

    def _beat(self) -> None:
        """Heartbeats while the session lasts; one the coordinator refuses marks the node refused."""
        while not self.closed.wait(BEAT_EVERY):
            try:
                self._call(
                    self.client.SendNodeHeartbeat,
                    SendNodeHeartbeatRequest(node=self.node, heartbeat_interval=HEARTBEAT_SECONDS),
                )
            except NodeRefused:
                self.refused.set()
            except ConnectionLost:
                continue

    def _call(self, method, request):  # type: ignore[no-untyped-def]
        """One Fleet API call; Flower's and the network's failures as the worker's two."""
        self.calls += 1
        try:
            return method(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            raise fleet_failure(error.code(), error.details() or "") from None


def fleet_failure(code: grpc.StatusCode, details: str) -> NodeRefused | ConnectionLost:
    """A failed Fleet call as the worker acts on it: refused, lost (retry), or rejected."""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return NodeRefused("the coordinator does not recognise this node's key")
    flower = FlowerError.from_json(details)
    if flower is not None and flower.code == ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED:
        # Flower says no more: the key is not admitted, or the same node is still
        # online from a session that ended without going offline (a crash).
        return NodeRefused("the coordinator did not activate this node's key")
    detail = flower.message if flower else f"{code.name}: {details}"
    return ConnectionLost(detail) if code in LOST else Rejected(detail)


class NodeWorker:
    """Serves one site's node until told to stop: connect, answer messages, ride out outages."""

    def __init__(
        self,
        kit: Kit,
        app: ClientApp,
        node_config: UserConfig,
        reports: SiteReports,
        *,
        say: Callable[[str], None],
        session: Callable[[], FleetSession] | None = None,
    ):
        self.kit = kit
        self.app = app
        self.node_config = node_config
        self.reports = reports
        self.say = say
        self.new_session = session or (lambda: FleetSession(kit.address, kit.ca_file, load_auth_key(kit.auth_key)))
        self.contexts: OrderedDict[int, Context] = OrderedDict()
        self.stop = threading.Event()
        self.calls = 0

    def serve(self) -> None:
        """Answer the coordinator until ``stop`` is set; raises ``KitError`` if it refuses this node."""
        session = self.new_session()
        try:
            node_id = self._activate(session)
            if node_id is None:
                return
            self.say(f"connected to the coordinator at {self.kit.address} as node {node_id}; waiting for jobs")
            self._answer_until_stopped(session)
        except NodeRefused as refused:
            raise KitError(
                f"the coordinator at {self.kit.address} refused this node's key ({refused}): the kit was revoked, "
                "has expired or was never enrolled in this federation; ask your federation operator (details in "
                "their coordinator log)",
                path=str(self.kit.folder),
            ) from None
        finally:
            session.close()

    def _activate(self, session: FleetSession, *, again: bool = False) -> int | None:
        """Go online (``again``: after the coordinator forgot this node); None if stopped
        meanwhile. A key the coordinator has not admitted is asked about again for a while;
        a coordinator that does not answer, until it does."""
        patience = READMISSION_PATIENCE if again else ADMISSION_PATIENCE
        deadline, backoff = time.monotonic() + patience, Backoff()
        while not self.stop.is_set():
            try:
                return session.activate()
            except NodeRefused:
                if time.monotonic() > deadline:
                    raise
                self.stop.wait(2.0 + random.random())
            except ConnectionLost as lost:
                self._wait_out(lost, backoff)
        return None

    def _answer_until_stopped(self, session: FleetSession) -> None:
        polling, backoff, lost = Polling(), Backoff(), False
        while not self.stop.is_set():
            try:
                if session.refused.is_set():
                    raise NodeRefused("its heartbeat was refused")
                asked = time.monotonic()
                pulled = session.pull()
            except ConnectionLost as error:
                lost = True
                self._wait_out(error, backoff)
                continue
            except NodeRefused:
                # A restarted coordinator (its state is in memory) admits this key again under a
                # new node id; one that revoked it refuses it here too.
                self.say(f"node {session.node_id} is no longer known to the coordinator; connecting again")
                self._activate(session, again=True)
                continue
            if lost:
                lost = False
                backoff.reset()
                self.say(f"reconnected to the coordinator at {self.kit.address}")
            if pulled is None:
                if time.monotonic() - asked < PULL_HOLD / 2:  # a coordinator that does not hold pulls
                    self.stop.wait(polling.idle())
                continue
            polling.found()
            self._exchange(session, *pulled)

    def _exchange(self, session: FleetSession, envelope: Message, tree: ObjectTree) -> None:
        """Pull one message's content, answer it, and send the reply (retried while the
        coordinator is away: it waits for it)."""
        started = time.perf_counter()
        try:
            message = session.content(envelope, tree)
        except (ConnectionLost, NodeRefused, ObjectPullError) as lost:  # the next pull tells which
            log.warning(
                "site %s: a message could not be received (%s); the coordinator counts it lost", self.kit.name, lost
            )
            return
        received = time.perf_counter()
        reply = self.answer(message, session.node_id)
        answered = time.perf_counter()
        deadline, backoff = time.monotonic() + PUSH_PATIENCE, Backoff()
        while True:
            try:
                session.push(reply, answered - started)
                log.info(
                    "run %s: %s answered%s; seconds: receive %.3f, answer %.3f, send %.3f; requests %d",
                    message.metadata.run_id,
                    _kind(message),
                    " (error)" if reply.has_error() else "",
                    received - started,
                    answered - received,
                    time.perf_counter() - answered,
                    session.calls - self.calls,
                )
                self.calls = session.calls
                return
            except (Rejected, NodeRefused) as refused:
                # Final: a restarted coordinator no longer has the run, nor this node under its
                # old id (the next pull connects again).
                log.warning("site %s: a reply could not be sent (%s)", self.kit.name, refused)
                return
            except ConnectionLost as lost:  # silence may pass: the coordinator waits for the reply
                if time.monotonic() > deadline or self.stop.is_set():
                    log.warning("site %s: a reply could not be sent (%s)", self.kit.name, lost)
                    return
                self._wait_out(lost, backoff)

    def _wait_out(self, lost: ConnectionLost, backoff: Backoff) -> None:
        wait = backoff.next()
        self.say(
            f"lost the coordinator at {self.kit.address} ({lost}); retrying in {wait:.0f} s "
            "(the node keeps its state; Ctrl-C stops it)"
        )
        self.stop.wait(wait)

    def answer(self, message: Message, node_id: int) -> Message:
        """The node's ClientApp's reply to ``message``, in this run's context; never raises."""
        context = self._context(message.metadata.run_id, node_id)
        try:
            reply = self.app(message, context)
        except Exception as error:  # the guardian answers every refusal itself: this is a fault
            log.error("site %s: the ClientApp failed on a message", self.kit.name, exc_info=True)
            reason = f"site {self.kit.name}: the node failed ({type(error).__name__}); the site's node log has details"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)
        self.reports.observe(message, reply, context)
        if not reply.has_error() and _transport(message) == rec.CLOSE:
            self.contexts.pop(message.metadata.run_id, None)
        return reply

    def _context(self, run_id: int, node_id: int) -> Context:
        """This run's Flower context: the node's state between its messages (secure sum, log position)."""
        if run_id not in self.contexts:
            self.contexts[run_id] = Context(
                run_id=run_id, node_id=node_id, node_config=self.node_config, state=RecordDict(), run_config={}
            )
            while len(self.contexts) > KEEP_CONTEXTS:
                self.contexts.popitem(last=False)
        self.contexts.move_to_end(run_id)
        return self.contexts[run_id]


def _kind(message: Message) -> str:
    try:
        return rec.message_kind(message.content)
    except (KeyError, TypeError):
        return "unknown"


def _transport(message: Message) -> str | None:
    config = message.content.config_records.get(rec.CONFIG) if message.has_content() else None
    return None if config is None else str(config.get(rec.TRANSPORT))
