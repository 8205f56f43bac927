"""The deployed coordinator's grid without a SuperLink: a fake Flower grid drives it.

Which nodes a run asks (its own, however many others are online), when a run that lost
nodes stops (at once for a revoked one, after the patience for one that went away), and
that every exchange is announced in ``progress.json`` and waited for to its last reply.
Quick.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from flwr.app import DEFAULT_TTL, ConfigRecord, Message, MessageType, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module

from fedcost.errors import FederationError
from fedcost.federation.coordinator_app import DeployedGrid
from fedcost.wire import records as rec


class FakeGrid:
    """Nodes online by name; each pushed message is answered after ``delay`` polls."""

    def __init__(self, online: dict[int, str], delay: int = 2):
        self.online = online
        self.delay = delay
        self.pending: dict[str, tuple[Message, int]] = {}
        self.polls = 0

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=node_id, name=name) for node_id, name in self.online.items()]

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            ids.append(uuid.uuid4().hex)
            self.pending[ids[-1]] = (message, self.delay)
        return ids

    def pull_messages(self, ids: set[str]) -> list[Message]:
        self.polls += 1
        replies = []
        for message_id in list(ids):
            message, left = self.pending[message_id]
            if left:
                self.pending[message_id] = (message, left - 1)
                continue
            metadata = Metadata(
                1,
                uuid.uuid4().hex,
                message.metadata.dst_node_id,
                0,
                message_id,
                "",
                time.time(),
                DEFAULT_TTL,
                MessageType.QUERY,
            )
            replies.append(make_message(metadata, RecordDict()))
        return replies


def _request(node_id: int) -> Message:
    metadata = Metadata(1, uuid.uuid4().hex, 0, node_id, "", "", time.time(), DEFAULT_TTL, MessageType.QUERY)
    config = ConfigRecord({rec.TRANSPORT: rec.SECURE, rec.PURPOSE: "train", rec.ROUND: 2})
    return make_message(metadata, RecordDict({rec.CONFIG: config, rec.SECAGG: ConfigRecord({"stage": "unmask"})}))


def test_a_run_asks_only_its_own_nodes(tmp_path):
    grid = FakeGrid({1: "st-mary", 2: "valley-general", 3: "northcare", 4: "admitted-since"})
    deployed = DeployedGrid(
        grid,
        tmp_path / "progress.json",
        minimum=3,  # type: ignore[arg-type]
        names={"st-mary", "valley-general", "northcare"},
    )
    assert deployed.get_node_ids() == [1, 2, 3] and deployed.connected() == {1, 2, 3}


def test_a_run_that_lost_a_revoked_node_below_its_minimum_stops_at_once_with_the_reason(tmp_path):
    grid = FakeGrid({1: "st-mary", 2: "valley-general"})
    deployed = DeployedGrid(
        grid,
        tmp_path / "progress.json",
        minimum=3,  # type: ignore[arg-type]
        names={"st-mary", "valley-general", "northcare"},
        withdrawn=lambda: {"northcare": "its certificate was revoked"},
        patience=600,
    )
    started = time.monotonic()
    with pytest.raises(
        FederationError,
        match="node 'northcare' is no longer admitted: its certificate was revoked; "
        "only 2 of the run's nodes are connected",
    ):
        deployed.get_node_ids()
    assert time.monotonic() - started < 5


def test_a_node_that_went_away_is_waited_for_then_the_run_stops(tmp_path):
    grid = FakeGrid({1: "st-mary", 2: "valley-general"})
    deployed = DeployedGrid(
        grid,
        tmp_path / "progress.json",
        minimum=3,  # type: ignore[arg-type]
        names={"st-mary", "valley-general", "northcare"},
        patience=1.0,
    )
    started = time.monotonic()
    with pytest.raises(FederationError, match="fewer than the 3 this run needs"):
        deployed.get_node_ids()
    assert time.monotonic() - started >= 1.0
    grid.online[3] = "northcare"  # back within the patience: the run goes on
    assert deployed.get_node_ids() == [1, 2, 3]


def test_an_exchange_is_announced_and_waited_for_to_its_last_reply(tmp_path):
    grid = FakeGrid({1: "a", 2: "b", 3: "c"}, delay=3)
    deployed = DeployedGrid(grid, tmp_path / "progress.json", minimum=3, names={"a", "b", "c"})  # type: ignore[arg-type]
    replies = deployed.send_and_receive([_request(n) for n in (1, 2, 3)])
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3] and grid.polls == 4
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["kind"] == "secagg:train:unmask" and progress["round"] == 2
