"""The coordinator's grid on its in-process SuperLink, and which runs it accepts.

A message the coordinator sends through ``LinkGrid`` is fetched by a node the way the
Fleet API serves it (Flower's own Fleet handlers on the same in-memory state: envelope,
then each object from the object store), and the node's reply, uploaded the same way,
comes back with its content; both carry the grid's run even while another run is the
process's latest. A submission naming another federation's folder, or a run folder that
is not this federation's, is refused with what to do. The coordinator's log gets the key
Flower refused (for the reason fedcost adds) and no tracebacks. Quick: no network, no
process.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import SimpleNamespace

import grpc
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.fleet_pb2 import PullMessagesRequest, PushMessagesRequest  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import (  # pylint: disable=no-name-in-module
    ConfirmMessageReceivedRequest,
    PullObjectRequest,
    PushObjectRequest,
)
from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree, iterate_object_tree
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.servicer.fleet import fleet_handlers

from fedcost.errors import FederationError
from fedcost.federation import link as link_module
from fedcost.federation.link import HeldPulls, LogCopy, refused_key
from fedcost.federation.provision import Federation, FederationConfig
from fedcost.federation.submission import FEDERATION_DIR, RUN_ID, run_folder
from fedcost.identity.federation_ca import utc_now
from fedcost.server.link_grid import Doorbell, LinkGrid


class Link:
    """An in-memory SuperLink state with one online node and two submitted runs."""

    def __init__(self) -> None:
        self.factory = LinkStateFactory(":flwr-in-memory:", NoOpFederationManager(), ObjectStoreFactory())
        self.state = self.factory.state()
        self.node = Node(node_id=self.state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, b"site-key", 30))
        assert self.state.activate_node(self.node.node_id, 30)
        self.tasks = [self._submitted() for _ in range(2)]

    def _submitted(self):  # type: ignore[no-untyped-def]
        """A run submitted, claimed and started (Flower: running), as the coordinator's ``Runs`` does."""
        run_id = self.state.create_run(
            None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID, TaskType.SERVER_APP
        )
        task_id = self.state.get_run_info(run_ids=[run_id])[0].primary_task_id
        assert self.state.claim_task(task_id) and self.state.activate_task(task_id)
        return self.state.get_tasks(task_ids=[task_id])[0]

    def grid(self, task, doorbell: Doorbell | None = None) -> LinkGrid:  # type: ignore[no-untyped-def]
        grid = LinkGrid(self.factory, task, doorbell)
        grid.set_run(self.state.get_run_info(run_ids=[task.run_id])[0])
        return grid

    def node_receives(self) -> Message:
        """What the node's worker does: pull the envelope, then every object, then confirm."""
        pulled = fleet_handlers.pull_messages(PullMessagesRequest(node=self.node), self.state, self.state.object_store)
        (envelope,), (tree,) = pulled.messages_list, pulled.message_object_trees
        run_id = envelope.metadata.run_id
        contents = {}
        for branch in iterate_object_tree(tree):
            request = PullObjectRequest(node=self.node, run_id=run_id, object_id=branch.object_id)
            response = fleet_handlers.pull_object(request, self.state)
            assert response.object_available, "the coordinator's objects were not all stored with the message"
            contents[branch.object_id] = response.object_content
        fleet_handlers.confirm_message_received(
            ConfirmMessageReceivedRequest(node=self.node, run_id=run_id, message_object_id=tree.object_id),
            self.state,
            self.state.object_store,
        )
        message = inflate_object_from_contents(tree.object_id, contents)
        message.metadata.__dict__["_message_id"] = tree.object_id
        assert message_from_proto(envelope).metadata.run_id == message.metadata.run_id
        return message

    def node_replies(self, reply: Message) -> None:
        """The envelope first, then the objects the coordinator asks for."""
        reply.metadata.__dict__["_message_id"] = reply.object_id
        request = PushMessagesRequest(
            node=self.node,
            messages_list=[message_to_proto(remove_content_from_message(reply))],
            message_object_trees=[get_object_tree(reply)],
        )
        pushed = fleet_handlers.push_messages(request, self.state)
        objects = get_all_nested_objects(reply)
        for object_id in pushed.objects_to_push:
            stored = fleet_handlers.push_object(
                PushObjectRequest(
                    node=self.node,
                    run_id=reply.metadata.run_id,
                    object_id=object_id,
                    object_content=objects[object_id].deflate(),
                    session_id=pushed.session_id,
                ),
                self.state,
            )
            assert stored.stored


def _question(node_id: int, value: str) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"question": value})}), node_id, "query")


def test_a_message_and_its_reply_travel_with_their_content_through_the_object_store():
    link = Link()
    first, second = link.grid(link.tasks[0]), link.grid(link.tasks[1])  # the second is the process's latest
    (message_id,) = first.push_messages([_question(link.node.node_id, "rows?")])
    assert message_id and not first.pull_messages([message_id])  # nothing answered yet

    received = link.node_receives()
    assert received.content["config"]["question"] == "rows?"
    assert received.metadata.run_id == link.tasks[0].run_id != second.run.run_id
    assert received.metadata.src_node_id == SUPERLINK_NODE_ID
    link.node_replies(Message(RecordDict({"config": ConfigRecord({"rows": 412})}), reply_to=received))

    (reply,) = first.pull_messages([message_id])
    assert not reply.has_error() and reply.content["config"]["rows"] == 412
    assert reply.metadata.reply_to_message_id == message_id and reply.metadata.src_node_id == link.node.node_id


class _Call:
    """What a gRPC server hands a handler beside the request: here, a call still open."""

    def is_active(self) -> bool:
        return True


def _held_pull(link: Link, doorbell: Doorbell):  # type: ignore[no-untyped-def]
    """Flower's Fleet pull handler on the link's state, behind ``HeldPulls``, as the server calls it."""
    handler = grpc.unary_unary_rpc_method_handler(
        lambda request, _: fleet_handlers.pull_messages(request, link.state, link.state.object_store)
    )
    details = SimpleNamespace(method="/flwr.proto.Fleet/PullMessages")
    held = HeldPulls(doorbell).intercept_service(lambda _: handler, details)
    return lambda: held.unary_unary(PullMessagesRequest(node=link.node), _Call())


def test_a_pull_that_finds_nothing_is_answered_when_the_coordinator_sends(monkeypatch):
    monkeypatch.setattr(link_module, "PULL_HOLD", 30.0)
    link, doorbell = Link(), Doorbell()
    pull, answers = _held_pull(link, doorbell), []
    waiting = threading.Thread(target=lambda: answers.append(pull()))
    waiting.start()
    waiting.join(timeout=0.3)
    assert waiting.is_alive() and not answers  # held: nothing for this node yet
    link.grid(link.tasks[0], doorbell).push_messages([_question(link.node.node_id, "rows?")])
    waiting.join(timeout=10)
    assert not waiting.is_alive(), "the held pull was not answered when a message was stored"
    (envelope,) = answers[0].messages_list
    assert envelope.metadata.dst_node_id == link.node.node_id


def test_a_held_pull_woken_for_another_node_ends_empty_when_nothing_comes_for_its_own(monkeypatch):
    monkeypatch.setattr(link_module, "PULL_HOLD", 2.0)
    link, doorbell = Link(), Doorbell()
    other = link.state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, b"other-site-key", 30)
    assert link.state.activate_node(other, 30)
    pull, answers = _held_pull(link, doorbell), []
    waiting = threading.Thread(target=lambda: answers.append(pull()))
    waiting.start()
    link.grid(link.tasks[0], doorbell).push_messages([_question(other, "rows?")])  # rings the doorbell
    waiting.join(timeout=10)
    assert not waiting.is_alive() and not answers[0].messages_list


def _federation(tmp_path) -> Federation:
    return Federation.init(tmp_path / "demo", FederationConfig("demo", "127.0.0.1:9093"), at=utc_now())


def test_a_submitted_run_is_one_of_this_federations_run_folders(tmp_path):
    federation = _federation(tmp_path)
    folder = federation.runs_dir / "20261207-101500-abcdef"
    folder.mkdir(parents=True)
    (folder / "job.toml").write_text("[run]\nrounds = 1\n")
    root = str(federation.root.resolve())
    assert run_folder(federation, {FEDERATION_DIR: root, RUN_ID: folder.name}) == folder

    other = _federation(tmp_path / "elsewhere")
    with pytest.raises(FederationError, match="not this coordinator's"):
        run_folder(federation, {FEDERATION_DIR: str(other.root.resolve()), RUN_ID: folder.name})
    for run_id in ("", "../elsewhere", "20261207-000000-000000"):
        with pytest.raises(FederationError, match="has no job.toml"):
            run_folder(federation, {FEDERATION_DIR: root, RUN_ID: run_id})


def test_the_coordinator_log_names_a_refused_key_and_keeps_tracebacks_to_their_last_line():
    key = b"-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n"
    line = f"[/flwr.proto.Fleet/ActivateNode][ApiError:7] Attempted to register SuperNode with public key: {key!r}, x"
    assert refused_key(line) == key and refused_key("[Fleet.ActivateNode] Activated node_id=5") is None

    lines: list[str] = []
    handler = LogCopy(lines.append, lambda refused: lines.append(f"refused {refused!r}"))
    try:
        raise SystemExit("Port in server address 127.0.0.1:9094 is already in use.")
    except SystemExit:
        record = logging.LogRecord("uvicorn.error", logging.ERROR, "", 0, "startup failed", None, sys.exc_info())
    handler.emit(record)
    handler.emit(logging.LogRecord("flwr", logging.ERROR, "", 0, line, None, None))
    assert lines[0].endswith(
        "uvicorn.error: startup failed SystemExit: Port in server address 127.0.0.1:9094 is already in use."
    )
    assert "Traceback" not in lines[0] and lines[-1] == f"refused {key!r}"
