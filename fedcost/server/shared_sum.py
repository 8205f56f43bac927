"""Shared sums over the nodes: the only way the coordinator learns anything from them.

With secure aggregation on (the default), each sum is one SecAgg+ round over Flower
messages and the coordinator sees only the total of the surviving nodes' quantised
contributions. With it off (an explicit setting, recorded in the run summary), nodes
send their contributions in the clear and the coordinator adds them.

A secure sum is five exchanges where a plain one is one. The sum that follows needs nothing
from this one until its masked input (its node set, size and purpose are known before this
one ends), so its setup rides on this sum's consistency request and its share-keys on the
unmask request (``NextSum``, ``records.CARRIED``): each node answers both parts in one reply,
and the next sum, if it is still the one prepared, starts at masked input. A round of a
training and an evaluation sum is then six exchanges, the fewest SecAgg+ allows: a sum's
masked input, consistency and unmask each wait for every node (``fedcost.secagg.protocol``).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedcost.config import SecureAggregationSection
from fedcost.errors import ProtocolAbort, SumNotRecoveredError
from fedcost.privacy.distributed import NOISE_CLIP, NOISE_GRID
from fedcost.secagg import Coordinator as SecAggCoordinator
from fedcost.secagg import (
    MaskedInputRequest,
    Quantizer,
    Reply,
    Request,
    RoundConfig,
    Stage,
    reply_from_dict,
    reply_kind,
)
from fedcost.wire import records as rec
from fedcost.wire.purposes import PURPOSES

log = logging.getLogger("fedcost.coordinator")

# Statistics and evaluation sums are counts and moderate totals: fixed point in steps of
# 2**-10 up to ±2**30 keeps counts exact and totals to a thousandth.
SUMS_CLIP, SUMS_LEVELS = float(2**30), 2**40
# A sum over two nodes would tell each of them the other's contribution.
MIN_SECURE_NODES = 3


@dataclass
class SumResult:
    """A shared sum: the summed arrays, the summed weight, who was in it and who dropped."""

    arrays: list[np.ndarray]
    weight: float
    included: list[str]
    dropouts: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NextSum:
    """The sum a coordinator asks for after the one it is running, as far as its setup needs
    it (``SharedSums.run`` takes the same arguments): its setup and share-keys ride on this
    sum's consistency and unmask."""

    purpose: str
    round: int
    shapes: tuple[tuple[int, ...], ...]
    node_ids: tuple[int, ...]
    job: str | None = None
    total_weight: int | None = None
    noisy: bool = False
    quantizer: Quantizer | None = None


@dataclass
class _Ahead:
    """A secure sum run on the last two stages of the sum before it: ``requests`` are what its
    ``coordinator`` asks of each node (by SecAgg+ node id) at its next stage, as long as every
    node answered the one before; ``refusals`` say why a node did not."""

    coordinator: SecAggCoordinator
    base: dict
    nodes: frozenset[int]  # their Flower node ids
    requests: dict[int, Request]
    refusals: dict[str, str] = field(default_factory=dict)

    @property
    def purpose(self) -> str:
        return str(self.base[rec.PURPOSE])

    def rides_on(self, carrier: Stage | None) -> bool:
        """Whether this sum's next stage is the one an exchange of stage ``carrier`` carries."""
        stages = {request.stage for request in self.requests.values()}
        return carrier in rec.CARRIED and stages == {rec.CARRIED[carrier]}  # type: ignore[index]

    def fits(self, round_config: RoundConfig, base: dict) -> bool:
        """Whether this is the sum about to run, at its masked input at every one of its nodes."""
        config = self.coordinator.config
        same = (config.round, config.node_ids, config.dim, config.bits) == (
            round_config.round,
            round_config.node_ids,
            round_config.dim,
            round_config.bits,
        )
        ready = all(isinstance(request, MaskedInputRequest) for request in self.requests.values())
        return same and base == self.base and ready and set(self.requests) == set(config.node_ids)

    def carried(self, secure_id: int) -> dict:
        """The records that carry this sum's request to one node on the other sum's request."""
        secagg, _ = rec.split_message_dict(self.requests[secure_id].to_dict())
        return {rec.NEXT_CONFIG: ConfigRecord(self.base), rec.NEXT_SECAGG: secagg}

    def alone(self, secure_id: int) -> dict:
        """The records of this sum's request to a node the other sum's stage does not ask."""
        secagg, _ = rec.split_message_dict(self.requests[secure_id].to_dict())
        return {rec.SECAGG: secagg}

    def take(self, reply: Message, sites: dict[int, str], secure_ids: dict[str, int], *, alone: bool) -> Reply | None:
        """A node's reply to this sum's part, from its reply to the other sum's request or to the
        part sent ``alone``; its reason where it refused. Anything else is no reply."""
        site = sites.get(reply.metadata.src_node_id)
        if site is None or reply.metadata.src_node_id not in self.nodes:
            return None
        if reply.has_error():
            if alone:
                self.refusals[site] = rec.their_reason(reply.error.reason)
            return None
        records = reply.content.config_records
        if rec.NEXT_REFUSED in records and not alone:
            self.refusals[site] = rec.their_reason(records[rec.NEXT_REFUSED].get(rec.REASON, ""))
            return None
        record = records.get(rec.SECAGG if alone else rec.NEXT_SECAGG)
        if record is None:
            return None
        try:
            part = reply_from_dict(rec.join_message_dict(record, None))
        except (ProtocolAbort, KeyError):
            return None
        return part if part.node_id == secure_ids[site] else None

    def advance(self, replies: list[Reply]) -> None:
        """Hand the nodes' replies to this sum's coordinator: its next stage's requests, kept only
        where every node answered (else the sum is set up afresh when it runs)."""
        try:
            requests = self.coordinator.handle(replies)
        except ProtocolAbort as abort:
            self.refusals.setdefault("coordinator", str(abort))
            requests = {}
        self.requests = requests if set(requests) == set(self.coordinator.config.node_ids) else {}


class SharedSums:
    """Runs shared sums over a fixed set of sites (Flower node id -> site name)."""

    def __init__(
        self,
        grid: Grid,
        sites: dict[int, str],
        settings: SecureAggregationSection,
        run_id: str,
        roster: tuple[tuple[str, bytes], ...],
    ):
        self.grid = grid
        self.sites = sites
        self.settings = settings
        self.run_id = run_id
        self.secure_ids = {name: rec.secure_id(roster, name) for name in sites.values()}
        self.identities = rec.roster_identities(roster)
        # Labels every secure sum of this coordinator session apart from any a restarted
        # coordinator runs: a node answers each labelled exchange once.
        self.session = secrets.token_hex(4)
        self._ahead: _Ahead | None = None  # the next sum, run up to its masked input on the last sum
        self._set_up_ahead = itertools.count(1)  # labels each sum set up ahead apart

    def run(
        self,
        purpose: str,
        server_round: int,
        shapes: list[tuple[int, ...]],
        node_ids: list[int],
        arrays: ArrayRecord | None = None,
        job: str | None = None,
        total_weight: int | None = None,
        noisy: bool = False,
        quantizer: Quantizer | None = None,
        then: NextSum | None = None,
    ) -> SumResult:
        """Sum the contributions of ``node_ids`` for ``purpose``.

        ``arrays`` (the global weights) ride with the request that asks for the
        contribution; ``job`` with every request. ``total_weight``: what the nodes'
        training weights add up to at most (the federation's training rows), which lets
        a training sum travel in 32-bit words (``Quantizer``). ``noisy``: a sum the nodes send
        normalised and with their share of the job's noise, on its grid (``NOISE_GRID``).
        ``quantizer``: the fixed point a sum needs beyond these (an exact GLM's Newton sums).
        ``then``: the sum the caller will ask for next, run up to its masked input on this sum's
        consistency and unmask; the next call goes on with it if it asks for exactly that sum
        and every node answered both parts, and sets the sum up afresh otherwise.
        """
        ahead, self._ahead = self._ahead, None  # a sum set up ahead serves the next call only
        base = self._base(purpose, server_round, job)
        payload = RecordDict({rec.ARRAYS: arrays}) if arrays is not None else None
        quantizer = quantizer or self._quantizer(purpose, len(node_ids), total_weight, noisy)
        if not self.settings.enabled:
            return self._plain(purpose, shapes, node_ids, base, payload, quantizer)
        attempts = self.settings.retries + 1 if self.settings.on_abort == "retry" else 1
        config = self._secure_config(base, quantizer)
        if ahead is not None and ahead.refusals:
            log.info("round %s %s: set up afresh (%s)", server_round, purpose, _reasons(ahead.refusals))
        dropouts: dict[str, str] = {}
        for attempt in range(1, attempts + 1):
            round_config = self._round_config(f"{purpose}:{attempt}", server_round, shapes, node_ids, quantizer)
            prepared = ahead if ahead is not None and ahead.fits(round_config, config) else None
            ahead = None  # a sum set up ahead is tried once: a retry sets up afresh
            try:
                result = self._secure(shapes, node_ids, config, payload, quantizer, round_config, prepared, then)
                result.dropouts = {**dropouts, **result.dropouts}
                return result
            except _Aborted as aborted:
                dropouts.update(aborted.dropouts)
                node_ids = [n for n in node_ids if self.sites[n] not in aborted.dropouts]
                log.warning("round %s %s: secure aggregation aborted (%s)", server_round, purpose, aborted.reason)
                if attempt == attempts or len(node_ids) < MIN_SECURE_NODES:
                    raise SumNotRecoveredError(
                        f"round {server_round} {purpose}: secure aggregation aborted after {attempt} attempt(s): "
                        f"{aborted.reason}. The sum could not be recovered: where nodes dropped out, raise "
                        "[secure_aggregation] dropout_tolerance or retries; where a site was lost after its masked "
                        "input, the others refuse a sum without it (it would give away that site's input): run the "
                        "job again once that site is back, or without it. The nodes' logs say which",
                        dropouts,
                    ) from None
        raise AssertionError("unreachable")

    def _base(self, purpose: str, server_round: int, job: str | None) -> dict:
        """What every request of a sum states: its purpose, round and (where it has one) job."""
        return {rec.PURPOSE: purpose, rec.ROUND: server_round, **({rec.JOB: job} if job else {})}

    def _secure_config(self, base: dict, quantizer: Quantizer) -> dict:
        """What every request of a secure sum states: ``base``, the transport and the fixed point."""
        return {**base, rec.TRANSPORT: rec.SECURE, **rec.quantizer_config(quantizer)}

    def _round_config(
        self, attempt: str, server_round: int, shapes: list[tuple[int, ...]], node_ids: list[int], quantizer: Quantizer
    ) -> RoundConfig:
        """A SecAgg+ round over ``node_ids``, labelled ``run:session:purpose:attempt``."""
        return RoundConfig.create(
            run_id=f"{self.run_id}:{self.session}:{attempt}",
            round=server_round,
            node_ids=sorted(self.secure_ids[self.sites[n]] for n in node_ids),
            dim=quantizer.length(shapes),
            bits=quantizer.bits,
            dropout_tolerance=self.settings.dropout_tolerance,
        )

    def _set_up(self, then: NextSum) -> _Ahead:
        """The next sum, to ride on this sum's last stages: its config created as ``run`` creates
        it, labelled apart from any attempt of its own, and its coordinator started."""
        nodes = list(then.node_ids)
        quantizer = then.quantizer or self._quantizer(then.purpose, len(nodes), then.total_weight, then.noisy)
        attempt = f"{then.purpose}:ahead{next(self._set_up_ahead)}"
        round_config = self._round_config(attempt, then.round, list(then.shapes), nodes, quantizer)
        config = self._secure_config(self._base(then.purpose, then.round, then.job), quantizer)
        coordinator = SecAggCoordinator(round_config, {i: self.identities[i] for i in round_config.node_ids})
        return _Ahead(coordinator, config, frozenset(nodes), dict(coordinator.start()))

    def _quantizer(self, purpose: str, nodes: int, total_weight: int | None, noisy: bool) -> Quantizer:
        if noisy:
            return Quantizer(NOISE_CLIP, int(NOISE_CLIP) * NOISE_GRID, nodes)
        if purpose == "train":
            settings = self.settings
            return Quantizer(settings.update_clip, settings.update_levels, nodes, settings.max_examples, total_weight)
        return Quantizer(SUMS_CLIP, SUMS_LEVELS, nodes)

    def _message(self, node_id: int, purpose: str, config: dict, content: dict) -> Message:
        return Message(
            RecordDict({rec.CONFIG: ConfigRecord(config), **content}),
            dst_node_id=node_id,
            message_type=PURPOSES[purpose].message_type,
        )

    def _plain(
        self,
        purpose: str,
        shapes: list[tuple[int, ...]],
        node_ids: list[int],
        base: dict,
        payload: RecordDict | None,
        quantizer: Quantizer,
    ) -> SumResult:
        """Contributions in the clear, bounded and weighted as the quantiser bounds and weighs
        them under SecAgg+; a contribution outside those bounds is that node's dropout."""
        config = {**base, rec.TRANSPORT: rec.PLAIN}
        messages = [self._message(n, purpose, config, dict(payload or {})) for n in node_ids]
        total = [np.zeros(shape) for shape in shapes]
        weight, included, dropouts, claims = 0.0, [], {}, []
        for reply in self.grid.send_and_receive(messages):
            site = self.sites.get(reply.metadata.src_node_id, str(reply.metadata.src_node_id))
            if reply.has_error():
                dropouts[site] = rec.their_reason(reply.error.reason)
                continue
            try:
                arrays, node_weight = _plain_contribution(reply.content, shapes, quantizer)
            except ValueError as refused:
                dropouts[site] = f"contribution refused: {refused}"
                continue
            total = [t + a * node_weight for t, a in zip(total, arrays)]
            weight += node_weight
            included.append(site)
            claims.append(f"{site} {node_weight:g}")
        if not included:
            raise SumNotRecoveredError(f"{purpose}: no node contributed ({_reasons(dropouts)})", dropouts)
        _check_weight(quantizer, weight, included, f"round {base[rec.ROUND]} {purpose}", ", ".join(claims), dropouts)
        return SumResult(total, weight, sorted(included), dropouts)

    def _secure(
        self,
        shapes: list[tuple[int, ...]],
        node_ids: list[int],
        config: dict,
        payload: RecordDict | None,
        quantizer: Quantizer,
        round_config: RoundConfig,
        prepared: _Ahead | None,
        then: NextSum | None,
    ) -> SumResult:
        """One SecAgg+ round: drive the coordinator's stage machine over Flower messages, from
        its setup or, where it was ``prepared`` on the sum before, from its masked input.

        With ``then``, the next sum's setup rides on this sum's consistency requests and its
        share-keys on the unmask requests, to each of its nodes; any of its nodes a stage does
        not ask (one that withheld or dropped out of this sum) gets that part alone, in the
        same exchange."""
        by_secure_id = {self.secure_ids[self.sites[n]]: n for n in node_ids}
        if prepared is not None:
            coordinator, requests = prepared.coordinator, prepared.requests
        else:
            coordinator = SecAggCoordinator(round_config, {i: self.identities[i] for i in by_secure_id})
            requests = coordinator.start()
        purpose = str(config[rec.PURPOSE])
        ahead = self._set_up(then) if then is not None else None
        errors: dict[str, str] = {}
        try:
            while not coordinator.done:
                stage = next(iter(requests.values())).stage if requests else None
                riding = ahead if ahead is not None and ahead.rides_on(stage) else None
                messages = []
                for secure_id, request in requests.items():
                    secagg, _ = rec.split_message_dict(request.to_dict())
                    content = {rec.SECAGG: secagg}
                    if isinstance(request, MaskedInputRequest) and payload is not None:
                        content.update(dict(payload))
                    if riding is not None and by_secure_id[secure_id] in riding.nodes:
                        content.update(riding.carried(secure_id))
                    messages.append(self._message(by_secure_id[secure_id], purpose, config, content))
                alone = riding.nodes - {by_secure_id[i] for i in requests} if riding else frozenset()
                for node in sorted(alone):  # the next sum's nodes this stage does not ask: its part alone
                    part = riding.alone(self.secure_ids[self.sites[node]])  # type: ignore[union-attr]
                    messages.append(self._message(node, riding.purpose, riding.base, part))  # type: ignore[union-attr]
                owed = {by_secure_id[i]: reply_kind(request) for i, request in requests.items()}
                replies, parts = [], []
                for reply in self.grid.send_and_receive(messages):
                    lone = reply.metadata.src_node_id in alone
                    if riding is not None and (part := riding.take(reply, self.sites, self.secure_ids, alone=lone)):
                        parts.append(part)
                    if not lone and (parsed := self._parse(reply, owed, errors)) is not None:
                        replies.append(parsed)
                if riding is not None:
                    riding.advance(parts)
                requests = coordinator.handle(replies)
        except ProtocolAbort as abort:
            raise _Aborted(str(abort), self._dropouts(coordinator, by_secure_id, errors)) from None
        sums, weight = quantizer.decode(coordinator.result.total, shapes)
        included = sorted(self.sites[by_secure_id[i]] for i in coordinator.result.included)
        dropouts = self._dropouts(coordinator, by_secure_id, errors)
        where = f"round {config[rec.ROUND]} {purpose}"
        _check_weight(quantizer, weight, included, where, "secure aggregation hides which", dropouts)
        self._ahead = ahead
        return SumResult(sums, float(weight), included, dropouts)

    def _parse(self, reply: Message, owed: dict[int, type], errors: dict[str, str]):
        """A node's reply as the protocol message ``owed`` says it owes; a failed, forged or
        other stage's reply counts as that node's dropout (it would abort the whole round)."""
        site = self.sites.get(reply.metadata.src_node_id)
        if site is None or reply.metadata.src_node_id not in owed:
            return None
        if reply.has_error():
            errors[site] = rec.their_reason(reply.error.reason)
            return None
        try:
            parsed = reply_from_dict(
                rec.join_message_dict(reply.content[rec.SECAGG], reply.content.array_records.get(rec.CONTRIBUTION))
            )
        except (ProtocolAbort, KeyError) as error:
            errors[site] = f"malformed secure-aggregation reply: {error}"
            return None
        if parsed.node_id != self.secure_ids[site]:
            errors[site] = f"reply claims to come from node {parsed.node_id}"
            return None
        if not isinstance(parsed, kind := owed[reply.metadata.src_node_id]):
            errors[site] = f"a {parsed.stage.value} reply where a {kind.stage.value} reply was owed"
            return None
        return parsed

    def _dropouts(
        self, coordinator: SecAggCoordinator, by_secure_id: dict[int, int], errors: dict[str, str]
    ) -> dict[str, str]:
        dropouts = {}
        for secure_id, reason in coordinator.dropouts.items():
            site = self.sites[by_secure_id[secure_id]]
            dropouts[site] = f"{reason} ({errors[site]})" if site in errors else reason
        return dropouts


class PollingGrid:
    """A Flower grid whose ``send_and_receive`` polls for replies every few milliseconds.

    Flower's ``InMemoryGrid.send_and_receive`` sleeps 0.1 s between polls. A SecAgg+ sum
    is four exchanges where a plain sum is one, so that wait is paid four times (at 10
    nodes it was about 40% of a round). Polling at ``_pull_interval`` keeps the wait short
    without letting the polls themselves (each checks every pending message in the link
    state) take a noticeable share of a core. Wrap the grid once, before anything else
    (e.g. the audited grid) wraps it.
    """

    def __init__(self, grid: Grid):
        self.grid = grid

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message]) -> list[Message]:
        """Send ``messages`` and wait, without a time limit, for every reply."""
        pending = set(self.grid.push_messages(messages))
        replies: list[Message] = []
        while pending:
            arrived = list(self.grid.pull_messages(pending))
            replies += arrived
            pending -= {reply.metadata.reply_to_message_id for reply in arrived}
            if pending:
                time.sleep(_pull_interval(len(pending)))
        return replies


def _pull_interval(pending: int) -> float:
    """Seconds between polls: 5 ms plus 0.2 ms per pending reply, at most Flower's 0.1 s."""
    return min(0.1, 0.005 + 0.0002 * pending)


class _Aborted(Exception):
    def __init__(self, reason: str, dropouts: dict[str, str]):
        super().__init__(reason)
        self.reason = reason
        self.dropouts = dropouts


def _check_weight(
    quantizer: Quantizer, weight: float, included: list[str], where: str, which: str, dropouts: dict[str, str]
) -> None:
    """Refuse a sum whose weight the ``included`` sites cannot honestly add up to; ``which``:
    what is known of each site's part (the weights it claimed, or that none is known)."""
    try:
        quantizer.check_weight(weight, len(included))
    except ValueError as impossible:
        raise SumNotRecoveredError(
            f"{where}: the sum of {', '.join(sorted(included))} is refused: {impossible}. One of these sites "
            f"sent a weight outside the round's range ({which}): a site claiming more rows than it has, or a "
            "node running modified code. Each site's audit log records its rows (data_loaded); run the job "
            "again without the site at fault",
            dropouts,
        ) from None


def _plain_contribution(
    content: RecordDict, shapes: list[tuple[int, ...]], quantizer: Quantizer
) -> tuple[list[np.ndarray], float]:
    """A node's plain contribution and weight, checked as the quantiser encodes them under
    SecAgg+: arrays of the sum's shapes, finite, clipped to ±clip; a weight in 1..max_weight,
    and at most the round's total weight.

    Raises ValueError naming the record or field at fault.
    """
    record = content.array_records.get(rec.CONTRIBUTION)
    metrics = content.metric_records.get(rec.METRICS)
    if record is None or metrics is None or rec.WEIGHT not in metrics:
        raise ValueError(f"the reply lacks its {rec.CONTRIBUTION!r} arrays or its {rec.WEIGHT!r} metric")
    arrays = [np.asarray(array, dtype=np.float64) for array in rec.arrays_list(record)]
    if [a.shape for a in arrays] != shapes:
        raise ValueError(f"its arrays have shapes {[a.shape for a in arrays]}, not the sum's {shapes}")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("its arrays hold NaN or infinite entries")
    weight, most = metrics[rec.WEIGHT], min(quantizer.max_weight, quantizer.weight_bound)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= most:
        raise ValueError(f"its weight {weight!r} is not an integer in 1..{most}")
    return [np.clip(a, -quantizer.clip, quantizer.clip) for a in arrays], float(weight)


def _reasons(dropouts: dict[str, str]) -> str:
    return "; ".join(f"{site}: {reason}" for site, reason in dropouts.items()) or "no replies"
