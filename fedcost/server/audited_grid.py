"""The coordinator's grid, logging every message it sends and receives.

Each request is logged with the digest of its records just before it leaves, each reply
with the digest of its records as it arrives, under the same kinds the nodes use, so an
auditor can reconcile the coordinator's log against every node's. Error replies carry
no data and are not logged as received: the coordinator logs the dropout instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedcost.audit import AuditLog
from fedcost.wire import records as rec


class AuditedGrid:
    """``send_and_receive`` through a Flower grid, with both directions in the audit log."""

    def __init__(self, grid: Grid, log: AuditLog):
        self.grid = grid
        self.log = log
        self.sites: dict[int, str] = {}

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message]) -> list[Message]:
        """Send, wait for the replies; log every request and every non-error reply.

        A request to a node not yet named (the hello stage) is logged once its reply
        names the node.
        """
        messages = list(messages)
        requests = {m.metadata.dst_node_id: m for m in messages}
        for message in messages:
            if message.metadata.dst_node_id in self.sites:
                self._log_sent(message)
        replies = list(self.grid.send_and_receive(messages))
        for reply in replies:
            # An error reply may come from the SuperLink itself (a node gone offline), so
            # it names no node of ours: check for it before looking up its request.
            if reply.has_error():
                continue
            request = requests[reply.metadata.src_node_id]
            if reply.metadata.src_node_id not in self.sites:
                self.sites[reply.metadata.src_node_id] = str(reply.content[rec.NODE]["name"])
                self._log_sent(request)
            self.log.message_received(
                rec.content_bytes(reply.content),
                sender=self.sites[reply.metadata.src_node_id],
                kind=f"{rec.message_kind(request.content)}>reply",
                round=_round(request),
            )
        return replies

    def _log_sent(self, message: Message) -> None:
        self.log.message_sent(
            rec.content_bytes(message.content),
            recipient=self.sites[message.metadata.dst_node_id],
            kind=rec.message_kind(message.content),
            round=_round(message),
        )


def _round(message: Message) -> int | None:
    config = message.content[rec.CONFIG]
    return int(config[rec.ROUND]) if rec.ROUND in config else None
