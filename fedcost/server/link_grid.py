"""The coordinator's grid on a SuperLink in its own process: no Runtime API between them.

Flower's ``InMemoryGrid`` stores a message whole in the SuperLink's state, which is what
a simulation's in-process nodes read; nodes on the Fleet API instead fetch a message's
content object by object from the SuperLink's object store, and upload their replies'
the same way. ``LinkGrid`` is that grid with the object store on the path: it pushes and
pulls through Flower's own Runtime API handlers, called directly on the state instead of
over HTTP, for the run's claimed task.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from flwr.app import Error, Message, Metadata
from flwr.app.message import make_message, remove_content_from_message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import Message as MessageProto  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import ObjectTree  # pylint: disable=no-name-in-module
from flwr.proto.runtime_pb2 import (  # pylint: disable=no-name-in-module
    PullAppMessagesRequest,
    PushAppMessagesRequest,
)
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, pull_and_inflate_object_from_tree
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import InMemoryGrid
from flwr.superlink.servicer.runtime import runtime_handlers

# A reply's envelope is stored before its objects: a missing one is asked for again after
# 5 ms, doubling up to 0.1 s (each ask is a lookup in memory, not a request).
OBJECT_BACKOFF, OBJECT_BACKOFF_CAP = 0.005, 0.1


class Doorbell:
    """Rung each time the coordinator has stored messages for nodes, so that a node's pull
    held at the coordinator (``fedcost.federation.link.HeldPulls``) looks again at once."""

    def __init__(self) -> None:
        self._rings = 0
        self._condition = threading.Condition()

    @property
    def rings(self) -> int:
        return self._rings

    def ring(self) -> None:
        with self._condition:
            self._rings += 1
            self._condition.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Until it rang after ``seen`` rings (read before the look that found nothing), or ``timeout``."""
        with self._condition:
            self._condition.wait_for(lambda: self._rings != seen, timeout)


class LinkGrid(InMemoryGrid):
    """Flower's in-memory grid for nodes that speak the Fleet API (see the module's doc)."""

    def __init__(self, state_factory: LinkStateFactory, task: Task, doorbell: Doorbell | None = None):
        super().__init__(state_factory)
        self.task = task
        self.doorbell = doorbell
        # Flower stamps every new message with the one task of its process (TaskIdentity, set
        # by a ServerApp process at its start); here runs share a process, so it names the
        # latest run started, and each grid stamps its own run's messages again when it sends.
        TaskIdentity.node_id, TaskIdentity.run_id, TaskIdentity.task_id = SUPERLINK_NODE_ID, task.run_id, task.task_id

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Store each message's envelope and object tree, then its objects; returns the ids
        ("" for one the state refused, as Flower's grids do)."""
        messages = list(messages)
        objects = {}
        with no_object_id_recompute():
            for message in messages:
                message.metadata.__dict__["_run_id"] = self.task.run_id
                message.metadata.src_task_id = self.task.task_id
                message.metadata.__dict__["_message_id"] = message.object_id
                objects.update(get_all_nested_objects(message))
            request = PushAppMessagesRequest(
                messages_list=[message_to_proto(remove_content_from_message(m)) for m in messages],
                message_object_trees=[get_object_tree(m) for m in messages],
            )
        response = runtime_handlers.push_messages(request, self.state, self.task)
        for object_id in response.objects_to_push:
            self.state.store_object(self.task.run_id, response.session_id, object_id, objects[object_id].deflate())
        if self.doorbell is not None:
            self.doorbell.ring()
        return list(response.message_ids)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies that arrived for ``message_ids``, with their content (or the state's
        error reply for a node that went offline)."""
        request = PullAppMessagesRequest(message_ids=list(message_ids))
        response = runtime_handlers.pull_messages(request, self.state, self.task)
        return [self._inflated(p, t) for p, t in zip(response.messages_list, response.message_object_trees)]

    def _inflated(self, envelope: MessageProto, tree: ObjectTree) -> Message:
        run_id = self.task.run_id
        pull = make_pull_object_fn_protobuf(
            lambda r: runtime_handlers.pull_object(r, self.state, self.task), self.node, run_id
        )
        confirm = make_confirm_message_received_fn_protobuf(
            lambda r: runtime_handlers.confirm_message_received(r, self.state, self.task), self.node, run_id
        )
        try:
            message = pull_and_inflate_object_from_tree(
                tree,
                pull,
                confirm,
                return_type=Message,
                max_concurrent_pulls=1,
                initial_backoff=OBJECT_BACKOFF,
                backoff_cap=OBJECT_BACKOFF_CAP,
            )
        except ObjectPullError as error:  # the sender never finished its upload
            return _unavailable(run_id, envelope.metadata.reply_to_message_id, str(error))
        message.metadata.__dict__["_message_id"] = tree.object_id
        return message


def _unavailable(run_id: int, reply_to: str, reason: str) -> Message:
    """An error reply for a reply whose objects never all arrived (a dropout, as Flower's
    own grids report it)."""
    metadata = Metadata(
        run_id=run_id,
        message_id="",
        src_node_id=SUPERLINK_NODE_ID,
        dst_node_id=SUPERLINK_NODE_ID,
        reply_to_message_id=reply_to,
        group_id="",
        created_at=now().timestamp(),
        ttl=0,
        message_type=SYSTEM_MESSAGE_TYPE,
    )
    return make_message(
        metadata=metadata,
        error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason=f"the reply's objects never all arrived ({reason})"),
    )
