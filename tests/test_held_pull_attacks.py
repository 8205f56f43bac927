"""Attacks on the coordinator's held pulls (``fedcost.federation.link.HeldPulls``).

A pull that finds nothing is held at the coordinator, and a held pull holds one of the
Fleet API server's workers (Flower's default: 1,000, and no more RPCs than that at once).
An enrolled node that opens many pulls at once must not tie them all up and leave the
other nodes' replies no worker: one pull per node is held, and a bounded number in all;
any other pull is answered at once, as Flower answers it. Quick: Flower's own Fleet pull
handler on an in-memory state, called as the gRPC server calls it; no network.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import grpc
import pytest
from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
from flwr.proto.fleet_pb2 import PullMessagesRequest  # pylint: disable=no-name-in-module
from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.servicer.fleet import fleet_handlers

from fedcost.federation import link as link_module
from fedcost.federation.link import HeldPulls
from fedcost.server.link_grid import Doorbell


class _Call:
    """A call as the gRPC server hands it to a handler; ``hang_up`` ends it."""

    def __init__(self) -> None:
        self.open = True

    def is_active(self) -> bool:
        return self.open


class _Fleet:
    """An in-memory SuperLink state with ``nodes`` online nodes, and their pulls behind one ``HeldPulls``."""

    def __init__(self, nodes: int, most: int = link_module.MOST_HELD):
        state = LinkStateFactory(":flwr-in-memory:", NoOpFederationManager(), ObjectStoreFactory()).state()
        self.nodes = [
            Node(node_id=state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, b"key-%d" % i, 30)) for i in range(nodes)
        ]
        assert all(state.activate_node(node.node_id, 30) for node in self.nodes)
        handler = grpc.unary_unary_rpc_method_handler(
            lambda request, _: fleet_handlers.pull_messages(request, state, state.object_store)
        )
        self.doorbell = Doorbell()
        details = SimpleNamespace(method="/flwr.proto.Fleet/PullMessages")
        self.held = HeldPulls(self.doorbell, most).intercept_service(lambda _: handler, details)
        self.calls: list[_Call] = []
        self.threads: list[threading.Thread] = []

    def pull(self, node: Node) -> threading.Thread:
        """A pull of ``node``, in a thread of its own as the server runs it."""
        call = _Call()
        thread = threading.Thread(target=lambda: self.held.unary_unary(PullMessagesRequest(node=node), call))
        self.calls.append(call)
        self.threads.append(thread)
        thread.start()
        return thread

    def hang_up(self) -> None:
        """Every caller goes: each held pull looks once more and ends."""
        for call in self.calls:
            call.open = False
        self.doorbell.ring()
        for thread in self.threads:
            thread.join(timeout=10)
        assert not any(thread.is_alive() for thread in self.threads)


@pytest.fixture(autouse=True)
def _long_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hold far longer than the test: a pull that ends did so because it was not held."""
    monkeypatch.setattr(link_module, "PULL_HOLD", 60.0)


def test_a_node_that_opens_many_pulls_at_once_has_one_held() -> None:
    fleet = _Fleet(nodes=1)
    (node,) = fleet.nodes
    first = fleet.pull(node)
    first.join(timeout=0.3)
    assert first.is_alive(), "the node's pull is held: nothing for it yet"
    more = [fleet.pull(node) for _ in range(20)]
    for thread in more:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in more), "its other pulls were held too, each holding a worker"
    assert first.is_alive()
    fleet.hang_up()


def test_no_more_pulls_than_the_bound_are_held_at_once() -> None:
    fleet = _Fleet(nodes=4, most=2)
    held = [fleet.pull(node) for node in fleet.nodes[:2]]
    for thread in held:
        thread.join(timeout=0.3)
    assert all(thread.is_alive() for thread in held)
    beyond = [fleet.pull(node) for node in fleet.nodes[2:]]
    for thread in beyond:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in beyond), "pulls beyond the bound are answered at once"
    fleet.hang_up()
    again = fleet.pull(fleet.nodes[0])
    again.join(timeout=0.3)
    assert again.is_alive(), "a pull is held again once the held ones ended"
    fleet.hang_up()
