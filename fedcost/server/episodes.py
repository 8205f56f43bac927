"""The coordinator's end of the episode linkage: each site reached through Flower.

``RemoteSite`` is an ``EpisodeParty`` (``fedcost.linkage.episodes``) whose every call is
one ``linkage`` request to the site's node and its reply, so ``link_episodes`` runs the
same exchange over the network as in one process. The coordinator relays the hospital's
offer to the payer and the payer's sealed answer back; it reads only what it is sent to
add up (the payer's second shares, the hospital's matched positions and share sum).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedcost.errors import FederationError
from fedcost.linkage.episodes import EpisodePlan, StayTotals
from fedcost.linkage.intersection_sum import Answer, Offer, Report, Session, Shares
from fedcost.wire import records as rec


class RemoteSite:
    """One site of the linkage, at Flower node ``node_id``; it accepted the plan at its hello."""

    def __init__(self, grid: Grid, node_id: int, name: str, run_id: str):
        self.grid, self.node_id, self.name, self.run_id = grid, node_id, name, run_id

    def accept(self, plan: EpisodePlan) -> None:
        """Nothing to ask: the site checked the plan with the rest of the job at its hello."""

    def stay_totals(self) -> StayTotals | None:
        reply = self._ask("totals", "")
        if reply["withheld"]:
            return None
        return StayTotals(int(reply["stays"]), int(reply["cost_cents"]), int(reply["readmitted"]))

    def offer(self, payer: str) -> Offer:
        reply = self._ask("offer", payer)
        session = Session(self.run_id, self.name, payer)
        return Offer(session, bytes(reply["reply_key"]), bytes(reply["items"]), bytes(reply["signature"]))

    def answer(self, offer: Offer) -> tuple[Answer, Shares]:
        relayed = {"reply_key": offer.reply_key, "items": offer.items, "signature": offer.signature}
        reply = self._ask("answer", offer.session.hospital, relayed)
        answer = Answer(offer.session, bytes(reply["sender_key"]), bytes(reply["sealed"]), bytes(reply["signature"]))
        return answer, Shares(offer.session, bytes(reply["shares"]), bytes(reply["shares_signature"]))

    def report(self, answer: Answer) -> Report:
        relayed = {"sender_key": answer.sender_key, "sealed": answer.sealed, "signature": answer.signature}
        reply = self._ask("report", answer.session.payer, relayed)
        return Report(
            answer.session,
            tuple(int(position) for position in reply["positions"]),  # type: ignore[union-attr]
            int.from_bytes(bytes(reply["share_sum"]), "little"),
            bool(reply["withheld"]),
            bytes(reply["signature"]),
        )

    def _ask(self, stage: str, peer: str, relayed: dict[str, bytes] | None = None) -> ConfigRecord:
        """One step at the site; a refusal or a reply of another shape stops the linkage."""
        config = ConfigRecord(
            {
                rec.TRANSPORT: rec.LINK,
                rec.PURPOSE: "episodes",
                rec.ROUND: 0,
                rec.STAGE: stage,
                rec.PEER: peer,
                **(relayed or {}),
            }
        )
        message = Message(RecordDict({rec.CONFIG: config}), dst_node_id=self.node_id, message_type=MessageType.QUERY)
        (reply,) = self.grid.send_and_receive([message])
        if reply.has_error():
            raise FederationError(
                f"the episode linkage stops: {self.name} did not answer its {stage} step: "
                f"{rec.their_reason(reply.error.reason)}"
            )
        record = reply.content.config_records.get(rec.LINKAGE)
        if record is None or record.get(rec.STAGE) != f"episodes-{stage}":
            raise FederationError(f"the episode linkage stops: {self.name} answered its {stage} step out of shape")
        return record
