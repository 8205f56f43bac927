"""The site's worker without a coordinator: a fake Fleet session drives it.

What a site sees when the coordinator refuses it, goes away or forgets it, and that every
message is answered by the node's ClientApp in the context of its own run. Quick.
"""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest
from flwr.app import DEFAULT_TTL, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.clientapp import ClientApp
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supercore.error.grpc import _flower_error_to_grpc_json

from fedcost.errors import KitError
from fedcost.federation import worker as worker_module
from fedcost.federation.provision import Federation, FederationConfig, Kit
from fedcost.federation.worker import ConnectionLost, NodeRefused, NodeWorker, Polling, Rejected, fleet_failure
from fedcost.identity.federation_ca import utc_now
from fedcost.wire import records as rec


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Kit:
    root = tmp_path_factory.mktemp("federation") / "demo"
    federation = Federation.init(root, FederationConfig("demo", "127.0.0.1:9093"), at=utc_now())
    return Kit.load(federation.add_node("st-mary", "hospital", at=utc_now()))


def _message(run_id: int, transport: str) -> Message:
    metadata = Metadata(run_id, uuid.uuid4().hex, 0, 1, "", "", time.time(), DEFAULT_TTL, MessageType.QUERY)
    return make_message(metadata, RecordDict({rec.CONFIG: ConfigRecord({rec.TRANSPORT: transport})}))


class FakeSession:
    """A Fleet session scripted as a list of outcomes for ``pull``: a message, None, or an exception."""

    def __init__(self, pulls: list, *, activations: list | None = None):
        self.pulls = list(pulls)
        self.activations = list(activations or [1])
        self.pushed: list[Message] = []
        self.refused = threading.Event()
        self.node_id = 0
        self.calls = 0
        self.closed = False

    def activate(self) -> int:
        outcome = self.activations.pop(0) if len(self.activations) > 1 else self.activations[0]
        if isinstance(outcome, Exception):
            raise outcome
        self.node_id = outcome
        return outcome

    def pull(self):
        outcome = self.pulls.pop(0) if self.pulls else None
        if isinstance(outcome, Exception):
            raise outcome
        return None if outcome is None else (outcome, None)

    def content(self, message: Message, tree: object) -> Message:
        return message

    def push(self, reply: Message, runtime: float) -> None:
        self.pushed.append(reply)

    def close(self) -> None:
        self.closed = True


class Reports:
    def __init__(self) -> None:
        self.seen: list[tuple[Message, Message]] = []

    def observe(self, message: Message, reply: Message, context: Context) -> None:
        self.seen.append((message, reply))


def _worker(kit: Kit, session: FakeSession, app: ClientApp, said: list[str]) -> NodeWorker:
    worker = NodeWorker(
        kit,
        app,
        {"kit": str(kit.folder)},
        Reports(),
        say=said.append,  # type: ignore[arg-type]
        session=lambda: session,
    )  # type: ignore[arg-type, return-value]
    return worker


def _stop_when_drained(worker: NodeWorker, session: FakeSession) -> threading.Thread:
    def watch() -> None:
        while session.pulls:
            time.sleep(0.01)
        time.sleep(0.1)
        worker.stop.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _echo_app(seen: list[Context]) -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        seen.append(context)
        context.state["count"] = ConfigRecord(
            {"n": int(context.state["count"]["n"]) + 1 if "count" in context.state else 1}
        )
        if message.content[rec.CONFIG][rec.TRANSPORT] == "boom":
            raise RuntimeError("a cell value that must not leave the site")
        return Message(RecordDict(), reply_to=message)

    return app


def test_a_refused_key_stops_the_node_with_what_to_do(kit, monkeypatch):
    monkeypatch.setattr(worker_module, "ADMISSION_PATIENCE", 0.0)
    session = FakeSession([], activations=[NodeRefused("the coordinator did not activate this node's key")])
    with pytest.raises(KitError, match="refused this node's key.*ask your federation operator"):
        _worker(kit, session, ClientApp(), []).serve()
    assert session.closed


def test_a_lost_coordinator_is_retried_with_growing_waits_and_the_node_says_so(kit):
    session = FakeSession([ConnectionLost("connection refused"), ConnectionLost("connection refused"), None])
    said: list[str] = []
    worker = _worker(kit, session, ClientApp(), said)
    _stop_when_drained(worker, session)
    started = time.monotonic()
    worker.serve()
    lost = [line for line in said if line.startswith("lost the coordinator")]
    assert [line.split("retrying in ")[1].split(" s")[0] for line in lost] == ["1", "2"]
    assert "reconnected to the coordinator" in said[-1] and time.monotonic() - started >= 3.0


def test_a_node_the_coordinator_no_longer_knows_connects_again_or_stops_if_refused(kit, monkeypatch):
    monkeypatch.setattr(worker_module, "READMISSION_PATIENCE", 0.0)
    forgotten = FakeSession([NodeRefused("unknown node id"), None], activations=[1, 2])
    worker = _worker(kit, forgotten, ClientApp(), said := [])
    _stop_when_drained(worker, forgotten)
    worker.serve()
    assert forgotten.node_id == 2 and any("connecting again" in line for line in said)

    revoked = FakeSession([NodeRefused("unknown node id")], activations=[1, NodeRefused("not admitted")])
    with pytest.raises(KitError, match="was revoked, has expired or was never enrolled"):
        _worker(kit, revoked, ClientApp(), []).serve()


def test_each_run_has_its_own_context_and_a_failure_is_answered_without_its_text(kit):
    contexts: list[Context] = []
    session = FakeSession(
        [_message(5, "hello"), _message(5, "secagg"), _message(6, "hello"), _message(5, "boom"), _message(5, rec.CLOSE)]
    )
    worker = _worker(kit, session, _echo_app(contexts), [])
    _stop_when_drained(worker, session)
    worker.serve()
    assert [c.run_id for c in contexts] == [5, 5, 6, 5, 5]
    assert contexts[0] is contexts[1] is contexts[4] and contexts[2] is not contexts[0]
    assert int(contexts[4].state["count"]["n"]) == 4  # the node's state lives on between messages
    failed = session.pushed[3]
    assert failed.has_error() and "RuntimeError" in failed.error.reason
    assert "cell value" not in failed.error.reason
    assert 5 not in worker.contexts and 6 in worker.contexts  # a closed run's context is let go


def test_polling_backs_off_while_nothing_comes_and_is_quick_again_after_a_message():
    polling = Polling()
    waits = [polling.idle() for _ in range(30)]
    assert waits[0] == worker_module.POLL_FAST and waits[0] < waits[1] < waits[2]
    assert max(waits) == waits[-1] == worker_module.POLL_IDLE
    polling.found()
    assert polling.idle() == worker_module.POLL_FAST


def _flower_error(code: ApiErrorCode) -> str:
    """What Flower's SuperLink puts in a failed call's details (its own serialiser)."""
    return _flower_error_to_grpc_json(FlowerError(code, "internal detail"), "public message")


@pytest.mark.parametrize(
    "code, details, kind",
    [
        (grpc.StatusCode.UNAUTHENTICATED, "Invalid node ID", NodeRefused),
        (grpc.StatusCode.FAILED_PRECONDITION, _flower_error(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED), NodeRefused),
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", ConnectionLost),
        (grpc.StatusCode.PERMISSION_DENIED, _flower_error(ApiErrorCode.FLEET_RUN_STATUS_NOT_ALLOWED), Rejected),
    ],
)
def test_a_failed_fleet_call_is_refused_lost_or_rejected(code, details, kind):
    assert type(fleet_failure(code, details)) is kind
