"""The node's Flower ClientApp: the site guardian on the path of every reply.

Whatever a coordinator sends, a node releases only what its accepted job allows, once,
within sums over enough sites, and accounted. Every message takes the same path:

1. the request is read strictly (``fedcost.wire.requests``): records, fields, types;
2. a hello is checked as a whole plan (``fedcost.wire.hello``) against the site policy
   before any row is read, and recorded in the site's release ledger; every later
   request must be part of the accepted plan (``site.check_request``);
3. the release ledger (``fedcost.privacy.ledger``) refuses a request the site has
   answered before, and a secure sum whose survivor set — with the sums the same input
   joined before — would let the coordinator isolate fewer than the site's minimum of
   sites; a DP round is paid for in it before the node trains;
4. the reply is built (rows are read only now) and the egress guard inspects exactly
   what would leave (``outgoing``);
5. the ledger records the reply (run, purpose, round, label, stage, digest) before it
   leaves, and the audit log logs it.

A secure sum's consistency request may carry the next sum's setup, its unmask request the
next sum's share-keys (``wire.requests``): once the carrier's reply is recorded, that part
takes the same path as a lone request of its stage, and its reply, or the reason it was
refused, rides in the same reply. So a node holds at most two sums' states: the one ending
and the one set up on it.

A refusal at any step is logged as ``refusal`` in the node's audit log and answered with
an error that carries only the reason. A failure of the site's own data, files or code
is answered without its text (which may quote a cell) and logged at the site.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedcost.analytics import GroupedStatisticsLayout
from fedcost.analytics.statistics import TableRelease, plan_release
from fedcost.audit import AuditLog, LogPosition
from fedcost.client import budget, outgoing, site
from fedcost.client.exchanges import SHAPES, noisy_bounds, noisy_touched, release_keys
from fedcost.client.node import Ask, Contribution, Node, NodeSetup
from fedcost.data.features import StatisticsLayout
from fedcost.data.mapping import DataMapping
from fedcost.errors import (
    ConfigError,
    DataValidationError,
    FederationError,
    InvalidSignatureError,
    LedgerError,
    PolicyViolationError,
    PrivacyBudgetExhausted,
    ProtocolAbort,
)
from fedcost.identity import Identity
from fedcost.linkage import Claims, Stays
from fedcost.linkage.episodes import EpisodePlan, EpisodeSite
from fedcost.linkage.intersection_sum import Answer, Offer, Session
from fedcost.linkage.windows import read_extract
from fedcost.models.nets import build_model
from fedcost.models.training_job import TrainingJob, noisy_releases
from fedcost.privacy import SitePolicy
from fedcost.privacy.distributed import NOISE_GRID, NewtonNoise, StatisticsNoise, secure_generator, with_noise_share
from fedcost.privacy.ledger import ReleaseLedger
from fedcost.secagg import ConsistencyRequest, MaskedInputRequest, Quantizer, SetupRequest, request_from_dict
from fedcost.secagg import Node as SecAggNode
from fedcost.wire import COORDINATOR
from fedcost.wire import records as rec
from fedcost.wire.events import Event
from fedcost.wire.hello import Hello
from fedcost.wire.purposes import PURPOSES
from fedcost.wire.requests import Request, read_request

_request_refusal = PolicyViolationError.request_refused

logger = logging.getLogger("fedcost.node")

SetupResolver = Callable[[Context], NodeSetup]
# The last exchange of a round at a node: its log signs a checkpoint after it.
ROUND_ENDS = ("secagg:evaluate:unmask", "plain:evaluate")
# The training loss is computed without DP noise: it rides in the update's last slot
# only where the site policy shares it as a metric; elsewhere that slot is zero.
TRAIN_LOSS = "train-loss"
AUDIT_POSITION = "audit-position"
SECURE_SUM = "secure-sum"  # the node's state of each secure sum in progress (``_sum_slot``), in its Flower context
EPISODE_SESSIONS = "episode-sessions"  # a hospital's intersection-sums between offer and report
# Refusals: the site's rules at work. Their reasons name rules, never data, and are sent.
REFUSALS = (
    PolicyViolationError,
    PrivacyBudgetExhausted,
    LedgerError,
    ProtocolAbort,
    InvalidSignatureError,
    FederationError,
)
# The site's own configuration or data at fault: logged at the site, never sent (the
# message may quote a cell).
SITE_FAULTS = (ConfigError, DataValidationError)
# Stages whose reply releases something (an input, however masked; a signature that lets it
# be unmasked; shares of the neighbours' secrets): the ledger is fsynced before they leave.
RELEASING_STAGES = frozenset({"masked-input", "consistency", "unmask"})


def make_client_app(resolve_setup: SetupResolver, node_factory: Callable[[NodeSetup], Node] = Node) -> ClientApp:
    """A ClientApp whose node is found by ``resolve_setup`` from Flower's node context.

    ``node_factory`` builds the node's local side; benchmarks swap in one that contributes
    synthetic vectors without training.
    """
    app = ClientApp()

    def respond(message: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        return Guardian(resolve_setup(context), node_factory, context).answer(message)

    app.query()(respond)
    app.train()(respond)
    app.evaluate()(respond)
    return app


class Guardian:
    """One message's way through site control at one node."""

    def __init__(self, setup: NodeSetup, node_factory: Callable[[NodeSetup], Node], context: Context):
        self.setup = setup
        self.node_factory = node_factory
        self.context = context
        role = _mapping_role(setup)
        self.identity = Identity(setup.name, role, Ed25519PrivateKey.from_private_bytes(setup.identity_key))

    def answer(self, message: Message) -> Message:
        """The reply to ``message``: the guarded content, or an error that carries only a reason."""
        try:
            with self._audit_log() as audit:
                return self._answer(message, audit)
        except _RunClosed:
            logger.warning("site %s: a request for a run it has closed was refused", self.setup.name)
            return _error(message, f"site {self.setup.name}: this run is closed at this site; it answers nothing more")

    def _answer(self, message: Message, audit: AuditLog) -> Message:
        kind, round_ = _kind(message), _round(message)
        audit.message_received(rec.content_bytes(message.content), sender=COORDINATOR, kind=kind, round=round_)
        try:
            ledger = ReleaseLedger.open(self.setup.ledger_path, self.identity, audit_logs=self.setup.audit_logs())
            with ledger:
                content = self._reply(message, audit, ledger)
        except Exception as error:
            return _error(message, self._refused(error, kind, round_, audit))
        audit.message_sent(rec.content_bytes(content), recipient=COORDINATOR, kind=f"{kind}>reply", round=round_)
        if kind in ROUND_ENDS:
            audit.checkpoint(round=round_)
        if kind == rec.CLOSE:
            audit.close()
        return Message(content, reply_to=message)

    def _refused(self, error: Exception, kind: str, round_: int | None, audit: AuditLog) -> str:
        """Log a request's refusal and return what the coordinator is told: a refusal's reason
        (the site's rules at work), never the text of the site's own fault."""
        if isinstance(error, REFUSALS):  # its notes name the peer at fault (a share's sender, a signer)
            reason = " ".join([str(error), *(f"({note})" for note in getattr(error, "__notes__", ()))])
        elif isinstance(error, SITE_FAULTS):
            logger.error("site %s cannot answer a %s request: %s", self.setup.name, kind, error)
            reason = "the site's own data or configuration failed its check; the site's log names the problem"
        else:
            logger.error("site %s failed on a %s request", self.setup.name, kind, exc_info=error)
            reason = f"the site could not answer ({type(error).__name__}); the site's log has the details"
        audit.append(Event.REFUSAL, round=round_, details={"kind": kind, "reason": reason})
        return f"site {self.setup.name}: {reason}"

    # --- the steps -------------------------------------------------------------------------

    def _reply(self, message: Message, audit: AuditLog, ledger: ReleaseLedger) -> RecordDict:
        """The reply's content, through the egress guard, recorded in the ledger before it leaves."""
        request = read_request(message.content)
        exchange, expected, releasing = None, {}, False
        if request.transport == rec.HELLO:
            hello, node = self._hello(request, audit, ledger)
            policy = site.site_policy(self.setup.policy, hello)
            content, cohort = _identity_record(node.name, node.role), 0
        else:
            hello = site.accepted_hello(self.context.state)
            ledger.check_run_open(hello.run_id)
            policy = site.site_policy(self.setup.policy, hello)
            if request.transport == rec.CLOSE:
                exchange, releasing = f"{hello.run_id}/close", True
                content, cohort = _identity_record(self.setup.name, self.identity.role), 0
            elif request.transport == rec.LINK:
                exchange, content = self._linkage(request, hello, policy, ledger)
                cohort, releasing = 0, True
            else:
                return self._contribute(request, hello, policy, ledger, audit)
        guarded = outgoing.guard(policy, content, outgoing.outgoing_message(request, content, expected, cohort))
        if exchange is not None:
            ledger.answered(exchange, _digest(guarded), durable=releasing)
        if request.transport == rec.CLOSE:
            ledger.end_run(hello.run_id)
        return guarded

    def _contribute(
        self,
        request: Request,
        hello: Hello,
        policy: SitePolicy,
        ledger: ReleaseLedger,
        audit: AuditLog,
        riding_in: RecordDict | None = None,
        carrier_slot: str | None = None,
    ) -> RecordDict:
        """A contribution's reply (plain, or one secure-sum stage), guarded and recorded; a
        consistency or unmask reply then answers the next sum's part it carries (``_next``).
        ``riding_in``: the carrier's reply that a next part's reply would join, which must stay
        within the site's size limit; ``carrier_slot``: where the carrier's sum keeps its state."""
        site.check_request(policy, hello, request)
        node = self.node_factory(self.setup)
        cohort = site.purpose_rows(request.purpose, len(node.data.train), len(node.data.test))  # type: ignore[arg-type]
        site.check_cohort(policy, cohort)
        ask = self._ask(request, hello, node, ledger)
        sum_state = None
        if request.transport == rec.PLAIN:
            exchange, content, expected = self._plain(ask, node, policy, hello, ledger, audit)
            releasing = True
        else:
            exchange, content, expected, sum_state = self._secure(
                request, ask, node, policy, hello, ledger, audit, carrier_slot
            )
            releasing = str(request.stage) in RELEASING_STAGES
        guarded = outgoing.guard(policy, content, outgoing.outgoing_message(request, content, expected, cohort))
        if riding_in is not None:
            outgoing.check_room(policy, riding_in, guarded)
        ledger.answered(exchange, _digest(guarded), durable=releasing)
        if sum_state is not None:  # the sum moves on only with a reply that leaves
            self.context.state[_sum_slot(ask)] = sum_state
        if request.next is None:
            return guarded
        part = self._next(request.next, guarded, _sum_slot(ask), hello, policy, ledger, audit)
        return outgoing.with_next(guarded, part)

    def _next(
        self,
        part: Request,
        guarded: RecordDict,
        carrier_slot: str,
        hello: Hello,
        policy: SitePolicy,
        ledger: ReleaseLedger,
        audit: AuditLog,
    ) -> RecordDict | str:
        """The next sum's part that rides on a request, answered as a lone request of its stage is
        where its reply fits beside the carrier's ``guarded`` reply, or the reason it was refused,
        logged as a lone request's refusal is: the carrier's reply leaves either way."""
        try:
            return self._contribute(part, hello, policy, ledger, audit, riding_in=guarded, carrier_slot=carrier_slot)
        except Exception as error:
            return self._refused(error, rec.message_kind(part.content), part.round, audit)

    def _hello(self, request: Request, audit: AuditLog, ledger: ReleaseLedger) -> tuple[Hello, Node]:
        """Check the plan against the policy and record it; only then read the rows."""
        hello = Hello.from_record(request.config)
        policy = site.site_policy(self.setup.policy, hello)
        tables = site.check_plan(policy, hello, self.setup.name)
        mapping = _mapping(self.setup.mapping)
        site.check_data(hello, mapping)
        if "episodes" in hello.outputs:
            _check_extract(mapping, self.setup.name, site.episode_plan(hello), ledger, hello.run_id)
        releases = noisy_releases(
            purposes=hello.purposes,
            rounds=hello.rounds,
            tables=tables,
            tasks=mapping.tasks,
            statistics=StatisticsLayout(mapping.feature_columns, tuple(mapping.targets)),
        )
        site.check_noise(policy, hello, releases)
        spent = budget.committed(ledger, policy.privacy, hello.run_id) if policy.privacy.enabled else None
        site.check_newton_noise(policy, hello, spent, releases)
        ledger.accept_plan(hello.run_id, hello.digest)
        node = self.node_factory(self.setup)
        if tables:
            _check_tables_against_earlier(tables, node, hello, ledger)
        self.context.state[site.ACCEPTED_JOB] = hello.to_record()
        key_ids = {COORDINATOR: hello.coordinator, **{name: _key_id(key) for name, key in self.setup.roster}}
        details = {
            "run_id": hello.run_id,
            "plan": hello.digest,
            "secure_aggregation": hello.secure_aggregation,
            "rounds": hello.rounds,
            "dp_epsilon_budget": str(policy.privacy.epsilon),
            "key_ids": key_ids,
        }
        audit.append(Event.JOB_RECEIVED, details=details)
        audit.append(
            Event.DATA_LOADED,
            details={
                "train_rows": len(node.data.train),
                "test_rows": len(node.data.test),
                "schema_digest": node.schema_digest,
            },
        )
        return hello, node

    def _plain(
        self, ask: Ask, node: Node, policy: SitePolicy, hello: Hello, ledger: ReleaseLedger, audit: AuditLog
    ) -> tuple[str, RecordDict, dict[str, tuple[int, ...]]]:
        """The contribution in the clear, where the job and the site's policy have it so."""
        exchange = f"{hello.run_id}/{ask.purpose}/{ask.round}/plain{_table_suffix(ask)}"
        ledger.check_unanswered(exchange)
        contribution = self._contribution(node, ask, policy, hello, ledger, audit)
        content = _identity_record(node.name, node.role)
        content[rec.CONTRIBUTION] = rec.arrays_record(contribution.arrays)
        content[rec.METRICS] = MetricRecord({rec.WEIGHT: contribution.weight})
        shapes = SHAPES[ask.purpose](ask, node)
        return exchange, content, {f"{i:04d}": shape for i, shape in enumerate(shapes)}

    def _linkage(
        self, request: Request, hello: Hello, policy: SitePolicy, ledger: ReleaseLedger
    ) -> tuple[str, RecordDict]:
        """One step of the episode linkage on the site's own extract (``fedcost.linkage``); a
        hospital's session lives in the node's context between its offer and its report."""
        plan = site.check_linkage_request(policy, hello, request, self.setup.name, self.identity.role)
        config = request.config
        stage, peer = str(config[rec.STAGE]), str(config[rec.PEER])
        exchange = f"{hello.run_id}/episodes/{stage}/{peer}"
        ledger.check_unanswered(exchange)
        saved = self.context.state.config_records.get(EPISODE_SESSIONS)
        party = EpisodeSite(
            self.setup.name,
            self.identity.role,
            _extract(_mapping(self.setup.mapping), self.setup.name),
            Ed25519PrivateKey.from_private_bytes(self.setup.identity_key),
            {name: Ed25519PublicKey.from_public_bytes(key) for name, key in self.setup.roster},
            shares_episodes=policy.share_episodes,
            min_cohort=policy.min_cohort,
            sessions={payer: bytes(state) for payer, state in saved.items()} if saved else {},  # type: ignore[arg-type]
        )
        party.accept(plan)
        hospital = stage in ("totals", "offer", "report")
        session = (
            Session(hello.run_id, self.setup.name, peer) if hospital else Session(hello.run_id, peer, self.setup.name)
        )
        try:
            fields = _linkage_step(party, stage, peer, session, config)
        finally:  # a session is spent by any report on it, an answer refused included
            self.context.state[EPISODE_SESSIONS] = ConfigRecord(party.sessions)  # type: ignore[arg-type]
        content = _identity_record(self.setup.name, self.identity.role)
        content[rec.LINKAGE] = ConfigRecord({rec.STAGE: f"episodes-{stage}", **fields})
        return exchange, content

    def _ask(self, request: Request, hello: Hello, node: Node, ledger: ReleaseLedger) -> Ask:
        """What the request asks of the rows, with everything the coordinator chose checked."""
        purpose = request.purpose
        assert purpose is not None and request.round is not None
        job, weights = None, {}
        if purpose.carries_model:
            job = _job(request)
            carried = request.weights
            weights = {name: array.numpy() for name, array in carried.items()} if carried is not None else {}
            _check_model(job, weights, node, purpose.name, carried=carried is not None)
        layout = site.request_layout(request) if purpose.name == "analytics" else None
        release = None
        if layout is not None:
            tables = site.plan_tables(hello)
            releases = _plan_releases(tables, node, hello, ledger)
            _check_released_as_planned(tables, releases, node, hello, ledger)
            release = releases[hello.tables.index(str(request.config[rec.JOB]))]
        names = [name for name, _ in self.setup.roster]
        slot = names.index(node.name) if node.name in names else 0
        limit = float(request.config.get("q_clip", math.inf))  # type: ignore[arg-type]  # read_request checked it
        return Ask(
            purpose.name,
            request.round,
            hello.min_cohort,
            job,
            weights,
            layout,
            release,
            slot,
            len(names),
            hello.noise,
            limit,
            hello.newton_noise if purpose.name == "newton" else None,
            request.transport == rec.SECURE,
        )

    def _contribution(
        self, node: Node, ask: Ask, policy: SitePolicy, hello: Hello, ledger: ReleaseLedger, audit: AuditLog
    ) -> Contribution:
        """The node's part of the sum; a DP training round is paid for before it trains."""
        if ask.purpose != "train":
            contribution = node.contribution(ask)
            if ask.purpose == "analytics" and ask.release is not None and ask.layout is not None:
                ledger.record_table(
                    data=node.data_digest,
                    layout=ask.layout.to_json(),
                    release=ask.release.to_dict(),
                    run_id=hello.run_id,
                )
            return contribution
        dp = None
        if policy.privacy.enabled:
            dp, spent, (seq, head) = budget.pay_for_round(
                ledger,
                policy.privacy,
                examples=len(node.data.train),
                training=ask.job.training,  # type: ignore[union-attr]
                rounds_left=hello.rounds - ask.round + 1,
                run_id=hello.run_id,
                round=ask.round,
            )
            details = {
                "dp_epsilon_spent": spent,
                "dp_epsilon_budget": policy.privacy.epsilon,
                "noise_multiplier": dp.noise_multiplier,
                "ledger_seq": seq,
                "ledger_head": head,
            }
            audit.append(Event.DP_ROUND, round=ask.round, details=details)
        contribution = node.contribution(ask, dp)
        if TRAIN_LOSS in policy.metrics:
            return contribution
        return Contribution([*contribution.arrays[:-1], np.zeros(1)], contribution.weight)

    def _secure(
        self,
        request: Request,
        ask: Ask,
        node: Node,
        policy: SitePolicy,
        hello: Hello,
        ledger: ReleaseLedger,
        audit: AuditLog,
        carrier_slot: str | None,
    ) -> tuple[str, RecordDict, dict[str, tuple[int, ...]], ConfigRecord]:
        """One SecAgg+ stage, and the sum's state after it: the node's round state lives in its own
        context between stages, one slot per sum. A setup clears every other slot but the one of
        the sum whose request it rides on: a sum set up afresh ends the ones before it here."""
        stage_request = request_from_dict(rec.join_message_dict(request.content[rec.SECAGG], None))
        identities = rec.roster_identities(self.setup.roster)
        identity_key = Ed25519PrivateKey.from_private_bytes(self.setup.identity_key)
        minimum = policy.min_nodes
        if isinstance(stage_request, SetupRequest):
            if carrier_slot == _sum_slot(ask):
                raise _request_refusal("the next sum it sets up is the sum whose request it rides on")
            label = stage_request.config.run_id
            _check_label(label, hello, ask, stage_request.config.round)
            self._sites(stage_request.config.node_ids)
            secure = SecAggNode(
                rec.secure_id(self.setup.roster, node.name), identity_key, identities, min_survivors=minimum
            )
            state: dict = {"label": label, "plan": hello.digest, "keys": "[]"}
            for slot in [name for name in self.context.state if name.startswith(SECURE_SUM) and name != carrier_slot]:
                del self.context.state[slot]
        else:
            saved = self.context.state.config_records.get(_sum_slot(ask))
            if saved is None:
                raise _request_refusal(
                    f"no secure sum of {ask.purpose} round {ask.round} is in progress at this node; a sum starts with "
                    "its setup"
                )
            state = dict(saved)
            if state.get("plan") != hello.digest:
                raise _request_refusal(
                    f"it continues a secure sum set up under another job than run {hello.run_id!r} the site accepted "
                    "last; a sum ends under the job it began in (its noise, its sites): set the sum up again"
                )
            secure = SecAggNode.restore(bytes(state.pop("state")), identity_key, identities, min_survivors=minimum)
        exchange = f"{hello.run_id}/{ask.purpose}/{ask.round}/{state['label']}/{request.stage}{_table_suffix(ask)}"
        ledger.check_unanswered(exchange)
        vector, expected = None, {}
        if isinstance(stage_request, MaskedInputRequest):
            contribution = self._contribution(node, ask, policy, hello, ledger, audit)
            quantizer = rec.quantizer_from_config(request.config)
            if ask.cost_clip is None and ask.newton_noise is None:
                vector = quantizer.encode(contribution.arrays, seed=secrets.token_bytes(32), weight=contribution.weight)
            else:
                vector = self._noisy(contribution, quantizer, ask, node, policy, hello, ledger, audit)
            state["keys"] = json.dumps(release_keys(ask, node, hello.run_id))
            expected = {outgoing.MASKED: (quantizer.length(SHAPES[ask.purpose](ask, node)),)}
        if isinstance(stage_request, ConsistencyRequest):
            survivors = self._sites(stage_request.survivors)
            noise = ask.newton_noise or (hello.noise if ask.cost_clip is not None else None)
            if noise is not None and len(survivors) < noise.sites:
                raise _request_refusal(
                    f"its noisy sum would be unmasked over {len(survivors)} sites; the job's noise "
                    f"is shared among {noise.sites}"
                )
            keys = [tuple(key) for key in json.loads(state["keys"])]
            ledger.sign_set(keys, survivors, minimum=minimum, exchange=exchange)
        reply = secure.handle(stage_request, vector=vector)
        if _drops_out(self.setup, ask, reply.stage.value):
            raise FederationError(f"node {node.name} drops out at stage {reply.stage.value} (injected fault)")
        secagg, arrays = rec.split_message_dict(reply.to_dict())
        content = _identity_record(node.name, node.role)
        content[rec.SECAGG] = secagg
        if arrays:
            content[rec.CONTRIBUTION] = arrays
        return exchange, content, expected, ConfigRecord({**state, "state": secure.export_state()})

    def _noisy(
        self,
        contribution: Contribution,
        quantizer: Quantizer,
        ask: Ask,
        node: Node,
        policy: SitePolicy,
        hello: Hello,
        ledger: ReleaseLedger,
        audit: AuditLog,
    ) -> np.ndarray:
        """The contribution as a noisy sum: each slot divided by the most one row adds to it
        (an exact GLM's Newton sums come so from the node), encoded on the noise grid, then this
        node's share of the job's Skellam noise added, inside the mask. The release is paid for
        in the ledger before it is encoded."""
        noise: StatisticsNoise | NewtonNoise
        if ask.newton_noise is not None:
            noise, grid, release = ask.newton_noise, ask.newton_noise.grid, ask.newton_noise.release()
            normalised = contribution.arrays
        else:
            assert hello.noise is not None
            noise, grid, release = hello.noise, NOISE_GRID, hello.noise.release(noisy_touched(ask, node))
            bounds = noisy_bounds(ask, node)
            normalised = [array / bound for array, bound in zip(contribution.arrays, bounds, strict=True)]
        if not math.isclose(quantizer.clip / quantizer.levels, 1 / grid):
            raise _request_refusal(f"its noisy sum is not on the noise grid of 1/{grid} that its noise assumes")
        owed = hello.rounds - ask.round if ask.newton_noise is not None else None
        spent, (seq, head) = budget.pay_for_noisy_sum(
            ledger, policy.privacy, release, run_id=hello.run_id, round=ask.round, owed=owed
        )
        details = {
            "purpose": ask.purpose,
            "dp_epsilon_spent": spent,
            "noise_sd": noise.sd,
            "ledger_seq": seq,
            "ledger_head": head,
        }
        audit.append(Event.DP_ROUND, round=ask.round, details=details)
        vector = quantizer.encode(normalised, seed=secrets.token_bytes(32), weight=contribution.weight)
        return with_noise_share(vector, noise.share(), quantizer.bits, rng=secure_generator())

    def _sites(self, node_ids: tuple[int, ...]) -> frozenset[str]:
        """The roster names of a sum's SecAgg+ node ids; an id outside the roster is refused."""
        names = [name for name, _ in self.setup.roster]
        if any(not 1 <= node_id <= len(names) for node_id in node_ids):
            raise _request_refusal("its secure sum names a node outside the federation's roster")
        return frozenset(names[node_id - 1] for node_id in node_ids)

    @contextmanager
    def _audit_log(self) -> Iterator[AuditLog]:
        """The node's own signed log, reopened for each message (any worker may carry it).

        The node keeps where its log ended in its own context, so reopening continues the
        chain without re-verifying every line (a changed file falls back to the full check).
        """
        state = self.context.state
        saved = state.config_records.get(AUDIT_POSITION)
        resume = LogPosition(int(saved["seq"]), str(saved["head"]), int(saved["size"])) if saved else None
        try:
            log = AuditLog(self.setup.audit_dir / f"{self.setup.name}.jsonl", self.identity, resume=resume)
        except ValueError as closed:  # the log ends with run_closed: so does the run at this site
            raise _RunClosed() from closed
        try:
            yield log
        finally:
            position = log.position
            state[AUDIT_POSITION] = ConfigRecord({"seq": position.seq, "head": position.head, "size": position.size})
            log.detach()


class _RunClosed(Exception):
    """The run's audit log at this node is closed."""


def _plan_releases(
    tables: list[GroupedStatisticsLayout], node: Node, hello: Hello, ledger: ReleaseLedger, *, earlier: bool = True
) -> list[TableRelease]:
    """The cells every table of the plan withholds, decided over the plan as a whole and the
    tables this site released over the same rows in other runs."""
    before = []
    if earlier:
        for table in ledger.tables(node.data_digest):
            if table["run_id"] != hello.run_id:
                before.append(
                    (GroupedStatisticsLayout.from_json(table["layout"]), TableRelease.from_dict(table["release"]))
                )
    return plan_release(tables, node.rows, role=node.role, site=node.name, min_cohort=hello.min_cohort, earlier=before)


def _check_released_as_planned(
    tables: list[GroupedStatisticsLayout],
    releases: list[TableRelease],
    node: Node,
    hello: Hello,
    ledger: ReleaseLedger,
) -> None:
    """Refuse a table of a plan whose tables this site already released, in this run, otherwise
    than the plan decides now: tables released in another run since (another Flower run at the
    same node needs no hello here) change the plan's decision, and the rest of the plan decided
    anew would fit tables that never left, not the ones that did."""
    for table in ledger.tables(node.data_digest):
        layout = GroupedStatisticsLayout.from_json(table["layout"])
        if table["run_id"] == hello.run_id and layout in tables:
            if TableRelease.from_dict(table["release"]) != releases[tables.index(layout)]:
                raise PolicyViolationError(
                    "the site refuses this request: tables it released in another run since this job's first table "
                    "change which cells this job's plan may release, and part of the plan left under the old "
                    "decision; the site answers no more of this job's tables: run the job again"
                )


def _check_tables_against_earlier(
    tables: list[GroupedStatisticsLayout], node: Node, hello: Hello, ledger: ReleaseLedger
) -> None:
    """Refuse a plan whose tables, next to tables released in earlier runs, would let the
    coordinator rebuild cells either release withheld."""
    if _plan_releases(tables, node, hello, ledger) != _plan_releases(tables, node, hello, ledger, earlier=False):
        raise PolicyViolationError(
            "the site policy refuses this job: its statistics tables, next to tables this site released in earlier "
            "runs over the same rows, would let the coordinator rebuild cells one of them withheld; ask for the "
            "tables released before, or for tables the site has not yet released anything like"
        )


def _job(request: Request) -> TrainingJob:
    try:
        return TrainingJob.from_json(str(request.config[rec.JOB]))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _request_refusal("its training job is malformed") from None


def _check_model(job: TrainingJob, weights: dict[str, np.ndarray], node: Node, purpose: str, *, carried: bool) -> None:
    """The job may use only the site's feature columns, and the weights (where the request
    ``carried`` them, even as an empty record) must be its model's: an exact GLM's
    coefficients (Newton sums), else the torch model's state."""
    columns = {column.name: column for column in node.layout.columns}
    features = job.features
    named = [*features.numeric, *features.vocabularies, *features.flagged]
    strangers = sorted(name for name in named if name not in columns)
    if strangers:
        raise _request_refusal(f"its job uses {', '.join(strangers)[:80]} as features, which are not feature columns")
    for name, levels in features.vocabularies.items():
        if columns[name].kind != "categorical" or not set(levels) <= set(columns[name].levels):
            raise _request_refusal(f"its job's levels of {name!r} are not that column's levels")
    if any(columns[name].kind != "numeric" for name in features.numeric):
        raise _request_refusal("its job treats a categorical column as a number")
    if not carried:  # a secure sum's stages before and after its masked input carry no model
        return
    if purpose == "newton":
        shapes = {task: (len(features.design_names) + 1,) for task in job.model.tasks}
    else:
        try:
            model = build_model(job.model, features.n_features, seed=job.seed)
        except (ValueError, TypeError):
            raise _request_refusal("its job's model cannot be built") from None
        shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if shapes != {name: tuple(array.shape) for name, array in weights.items()}:
        raise _request_refusal("its model weights do not fit the model its job states")


def _table_suffix(ask: Ask) -> str:
    """What tells two requests of one purpose and round apart: the statistics table asked for."""
    if ask.layout is None:
        return ""
    return "/" + hashlib.sha256(ask.layout.to_json().encode()).hexdigest()[:16]


def _sum_slot(ask: Ask) -> str:
    """Where a node keeps the state of the secure sum ``ask`` belongs to, in its context."""
    return f"{SECURE_SUM}/{ask.purpose}/{ask.round}{_table_suffix(ask)}"


def _check_label(label: str, hello: Hello, ask: Ask, round_: int) -> None:
    """A secure sum's label binds it to this run, its purpose and round."""
    parts = label.split(":")
    if len(parts) < 3 or parts[0] != hello.run_id or parts[-2] != ask.purpose or round_ != ask.round:
        raise _request_refusal("its secure sum is labelled for another run, purpose or round")


def _drops_out(setup: NodeSetup, ask: Ask, stage: str) -> bool:
    """An injected fault: this node goes silent at ``stage`` of a training round."""
    return PURPOSES[ask.purpose].trains and ask.round in setup.drop_rounds and stage == setup.drop_stage


def _mapping_role(setup: NodeSetup) -> str:
    """The node's role, from its mapping file (not its rows), so a refusal is logged before
    any data is read."""
    return _mapping(setup.mapping).node(setup.name).role


@lru_cache(maxsize=8)
def _mapping(path: Path) -> DataMapping:
    return DataMapping.load(path)


def _linkage_step(party: EpisodeSite, stage: str, peer: str, session: Session, config: ConfigRecord) -> dict:
    """The fields of this site's reply to one step of the linkage (``LINKAGE_STEPS``)."""
    if stage == "totals":
        totals = party.stay_totals()
        return {"withheld": True} if totals is None else {**vars(totals), "withheld": False}
    if stage == "offer":
        offer = party.offer(peer)
        return {"reply_key": offer.reply_key, "items": offer.items, "signature": offer.signature}
    if stage == "answer":
        relayed = Offer(session, *(bytes(config[k]) for k in ("reply_key", "items", "signature")))  # type: ignore[arg-type]
        answer, shares = party.answer(relayed)
        return {
            "sender_key": answer.sender_key,
            "sealed": answer.sealed,
            "signature": answer.signature,
            "shares": shares.shares,
            "shares_signature": shares.signature,
        }
    relayed_answer = Answer(session, *(bytes(config[k]) for k in ("sender_key", "sealed", "signature")))  # type: ignore[arg-type]
    report = party.report(relayed_answer)
    return {
        "positions": list(report.positions),
        "share_sum": report.share_sum.to_bytes(8, "little"),
        "withheld": report.withheld,
        "signature": report.signature,
    }


def _check_extract(mapping: DataMapping, name: str, plan: EpisodePlan, ledger: ReleaseLedger, run_id: str) -> None:
    """A site the episode linkage names needs its extract, read and checked cell by cell at
    the hello (a missing one is refused, a bad one fails there, before anything leaves), and
    its sums over that extract keep the window of the first job (``fix_episode_window``)."""
    if name not in (*plan.hospitals, *plan.payers):
        return
    extract = mapping.node(name).episodes
    if extract is None:
        raise PolicyViolationError(
            "the site policy refuses this job: it asks for episode costs, and this site's mapping names no "
            f'episode extract ([nodes.{name}] episodes = "file.csv")'
        )
    _extract(mapping, name)
    window = (plan.window.before_days, plan.window.after_days)
    ledger.fix_episode_window(data=hashlib.sha256(extract.read_bytes()).hexdigest(), window=window, run_id=run_id)


def _extract(mapping: DataMapping, name: str) -> Stays | Claims:
    node = mapping.node(name)
    assert node.episodes is not None  # the hello checked it (_check_extract)
    return read_extract(node.role, node.episodes)


def _identity_record(name: str, role: str) -> RecordDict:
    """What every reply carries: the site's name and role, nothing else."""
    return RecordDict({rec.NODE: ConfigRecord({"name": name, "role": role})})


def _key_id(raw_key: bytes) -> str:
    return hashlib.sha256(raw_key).hexdigest()


def _digest(content: RecordDict) -> str:
    return hashlib.sha256(rec.content_bytes(content)).hexdigest()


def _kind(message: Message) -> str:
    """The request's kind for the audit log; one without a transport is logged as ``unknown``."""
    try:
        return rec.message_kind(message.content)
    except (KeyError, TypeError):
        return "unknown"


def _round(message: Message) -> int | None:
    """The request's round for the audit log, if it states one as a whole number that the log's
    JSON holds exactly (below 2**53: a larger one failed the log's write, and the request went
    unlogged and unanswered by the guardian)."""
    config = message.content.config_records.get(rec.CONFIG)
    value = config.get(rec.ROUND) if config is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53 else None


def _error(message: Message, reason: str) -> Message:
    return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)
