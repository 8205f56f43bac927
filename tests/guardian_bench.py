"""A deviating coordinator against real nodes, in one process: the site guardian's test bench.

Every site is fedcost's real ClientApp (``make_client_app``) with its own Flower context,
identity, policy, audit log and release ledger. The bench speaks to them as a
coordinator would, message by message, and lets a test deviate wherever an attacker
could: which sites a secure sum is over, what each is told, what is replayed, which
model is sent. Nothing of the node is mocked.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tomli_w
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message

from fedcost.client.app import make_client_app
from fedcost.client.node import Node, NodeSetup
from fedcost.identity import Identity
from fedcost.models.nets import ModelSpec, build_model
from fedcost.models.training import TrainConfig
from fedcost.models.training_job import TrainingJob
from fedcost.secagg import Coordinator as SecAggCoordinator
from fedcost.secagg import Quantizer, Request, RoundConfig, reply_from_dict
from fedcost.server.shared_sum import SUMS_CLIP, SUMS_LEVELS
from fedcost.wire import records as rec
from fedcost.wire.hello import Hello
from fedcost.wire.purposes import PURPOSES

COORDINATOR = Identity.generate("coordinator", "coordinator")
RUN = "attack"


def policy_file(folder: Path, name: str, **overrides: object) -> Path:
    policy = {
        "coordinator": COORDINATOR.public().key_id,
        "require_secure_aggregation": True,
        "min_cohort": 11,
        "max_rounds": 5,
        "max_model_parameters": 100_000,
        "metrics": {"auroc": 3},
        "privacy": {"epsilon": math.inf},
        **overrides,
    }
    path = folder / f"{name}.policy.toml"
    path.write_bytes(tomli_w.dumps(policy).encode())
    return path


@dataclass
class Site:
    """One node's ClientApp as a coordinator reaches it, and what it logged."""

    setup: NodeSetup
    node_id: int
    context: Context = field(default_factory=lambda: Context(1, 1, {}, RecordDict(), {}))

    def __post_init__(self) -> None:
        self.app = make_client_app(lambda context: self.setup)

    @property
    def name(self) -> str:
        return self.setup.name

    def answer(self, content: RecordDict, message_type: str = "query") -> Message:
        metadata = Metadata(1, uuid.uuid4().hex, 0, self.node_id, "", "", time.time(), DEFAULT_TTL, message_type)
        return self.app(make_message(metadata, content), self.context)

    def send(self, config: dict, records: dict | None = None, message_type: str = "query") -> Message:
        return self.answer(RecordDict({rec.CONFIG: ConfigRecord(config), **(records or {})}), message_type)

    def restart(self) -> None:
        """A fresh Flower run for this node: nothing in memory, only what is on its disk."""
        self.context = Context(2, 1, {}, RecordDict(), {})

    def events(self, event: str) -> list[dict]:
        lines = (self.setup.audit_dir / f"{self.name}.jsonl").read_text().splitlines()
        return [entry for entry in map(json.loads, lines) if entry["event"] == event]

    def assert_refused(self, reply: Message, reason: str) -> None:
        assert reply.has_error() and not reply.has_content(), "the reply carries content"
        assert reason in reply.error.reason, reply.error.reason
        assert any(reason in entry["details"]["reason"] for entry in self.events("refusal"))


@dataclass
class Outcome:
    """A secure sum as the coordinator saw it: the sum (None if it never came) and each
    site's refusal."""

    sums: list[np.ndarray] | None
    refusals: dict[str, str]
    abort: str | None = None
    replies: dict[str, Message] = field(default_factory=dict)  # each site's last reply
    stages: dict[str, dict[str, Message]] = field(default_factory=dict)  # stage -> each site's reply to it


class Bench:
    """Sites over one mapping, a roster of their real keys, and a coordinator that deviates on
    request."""

    def __init__(self, folder: Path, mapping: Path, names: Iterable[str], **policy: object):
        self.folder = folder
        names = sorted(names)
        identities = {name: Identity.generate(name, "hospital") for name in names}
        self.identities = identities
        self.roster = tuple((name, identities[name].public().raw_key) for name in names)
        self.sites: dict[str, Site] = {}
        for i, name in enumerate(names, start=1):
            audit = folder / name
            audit.mkdir(parents=True, exist_ok=True)
            setup = NodeSetup(
                mapping,
                name,
                3,
                identity_key=identities[name].raw_private_key,
                roster=self.roster,
                audit_dir=audit,
                policy=policy_file(audit, name, **policy),
            )
            self.sites[name] = Site(setup, i)

    def site(self, name: str) -> Site:
        return self.sites[name]

    def identity(self, name: str) -> Identity:
        return self.identities[name]

    def hello(self, **overrides: object) -> Hello:
        """The honest plan: statistics, training, evaluation over two rounds."""
        plan = {
            "run_id": RUN,
            "coordinator": COORDINATOR.public().key_id,
            "secure_aggregation": True,
            "rounds": 2,
            "min_cohort": 11,
            "model_parameters": 10_000,
            "outputs": {p: PURPOSES[p].outputs for p in ("statistics", "train", "evaluate")},
        }
        return Hello(**{**plan, **overrides})  # type: ignore[arg-type]

    def say_hello(self, hello: Hello, names: Iterable[str] | None = None) -> dict[str, Message]:
        return {name: self.sites[name].send(dict(hello.to_record())) for name in (names or self.sites)}

    def job_and_weights(self, name: str) -> tuple[TrainingJob, ArrayRecord]:
        """A valid round's job and global weights, as an honest coordinator sends them."""
        node = Node(self.sites[name].setup)
        features = node.layout.feature_spec(node.statistics())
        spec = ModelSpec(tasks=node.mapping.tasks)
        model = build_model(spec, features.n_features, seed=0)
        weights = ArrayRecord({k: Array(v.detach().numpy()) for k, v in model.state_dict().items()})
        return TrainingJob(spec, TrainConfig(epochs=1, batch_size=64), features, 0), weights

    def secure_sum(
        self,
        purpose: str,
        round_: int,
        names: Iterable[str],
        shapes: list[tuple[int, ...]],
        *,
        label: str | None = None,
        job: str | None = None,
        weights: ArrayRecord | None = None,
        tamper: Callable[[str, Request], Request] | None = None,
        quantizer: Quantizer | None = None,
        carry: Callable[[str, Request], dict] | None = None,
        answered: Callable[[str, Message], None] | None = None,
    ) -> Outcome:
        """One SecAgg+ sum over ``names``, driven stage by stage; ``tamper`` may change any
        site's request before it is sent (a coordinator telling sites different things), and
        ``carry`` add records to it (the next sum's part); ``answered`` sees every reply."""
        names = sorted(names)
        ids = {rec.secure_id(self.roster, name): name for name in names}
        quantizer = quantizer or Quantizer(SUMS_CLIP, SUMS_LEVELS, len(names))
        config = RoundConfig.create(
            run_id=label or f"{RUN}:bench:{purpose}:1",
            round=round_,
            node_ids=sorted(ids),
            dim=quantizer.length(shapes),
            bits=quantizer.bits,
        )
        identities = rec.roster_identities(self.roster)
        coordinator = SecAggCoordinator(config, {i: identities[i] for i in ids})
        base = {rec.TRANSPORT: rec.SECURE, rec.PURPOSE: purpose, rec.ROUND: round_, **rec.quantizer_config(quantizer)}
        if job is not None:
            base[rec.JOB] = job
        refusals: dict[str, str] = {}
        last: dict[str, Message] = {}
        stages: dict[str, dict[str, Message]] = {}
        requests = coordinator.start()
        while not coordinator.done:
            replies = []
            for node_id, request in requests.items():
                name = ids[node_id]
                request = tamper(name, request) if tamper else request
                secagg, _ = rec.split_message_dict(request.to_dict())
                records = {rec.SECAGG: secagg}
                if weights is not None and request.stage.value == "masked-input":
                    records[rec.ARRAYS] = weights
                records.update(carry(name, request) if carry else {})
                reply = last[name] = self.sites[name].send(base, records, PURPOSES[purpose].message_type)
                stages.setdefault(request.stage.value, {})[name] = reply
                if answered is not None:
                    answered(name, reply)
                if reply.has_error():
                    refusals[name] = reply.error.reason
                    continue
                arrays = reply.content.array_records.get(rec.CONTRIBUTION)
                replies.append(reply_from_dict(rec.join_message_dict(reply.content[rec.SECAGG], arrays)))
            try:
                requests = coordinator.handle(replies)
            except Exception as abort:  # noqa: BLE001 - any abort ends the sum; the test reads why
                return Outcome(None, refusals, str(abort), last, stages)
        sums, _ = quantizer.decode(coordinator.result.total, shapes)
        return Outcome(sums, refusals, replies=last, stages=stages)
