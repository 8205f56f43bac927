"""The node's ClientApp on Flower's deployment engine.

``fedcost node start`` runs it in the site's one long-lived worker
(``fedcost.federation.worker``), with a node config naming the startup kit, the node's
state folder (its checked mapping, audit log and DP ledger), its policy and its held-out
split. Before the node's own ClientApp (``make_client_app``) sees a hello,
the roster the hello carries is checked against the kit's CA (``roster.trusted_roster``)
and kept in the node's context: SecAgg+ then trusts only those keys. A hello from
another coordinator than the kit's, or with a roster that fails its check, is refused.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedcost.client.app import make_client_app
from fedcost.client.node import NodeSetup
from fedcost.errors import CertificateError
from fedcost.federation import roster
from fedcost.federation.provision import Kit
from fedcost.identity.federation_ca import utc_now
from fedcost.privacy.ledger import SUFFIX as LEDGER_SUFFIX
from fedcost.wire import records as rec

# The node-config keys `fedcost node start` sets.
KIT, STATE, POLICY, SPLIT_SEED, TEST_FRACTION = "kit", "state", "policy", "split-seed", "test-fraction"
MAPPING_FILE = "mapping.toml"  # the site's mapping, checked and resolved, in its state folder
TRUSTED_ROSTER = "fedcost-trusted-roster"  # where the checked roster lives in the context state
RUN = "fedcost-run"  # the fedcost run id of the accepted hello, in the context state


@lru_cache(maxsize=4)
def _kit(folder: Path) -> Kit:
    return Kit.load(folder)


def resolve_setup(context: Context) -> NodeSetup:
    """The node as ``fedcost node start`` configured it, with the roster its hello proved."""
    config = context.node_config
    kit = _kit(Path(str(config[KIT])))
    state = Path(str(config[STATE]))
    trusted = context.state[TRUSTED_ROSTER] if TRUSTED_ROSTER in context.state else None
    members = tuple(zip(trusted["names"], trusted["keys"])) if trusted else ()
    # One audit log per fedcost run, as the coordinator keeps one: a resumed run (a new
    # Flower run with the same fedcost run id) continues the same log.
    run = str(context.state[RUN]["id"]) if RUN in context.state else f"flower-{context.run_id}"
    (state / "audit" / run).mkdir(parents=True, exist_ok=True)
    return NodeSetup(
        mapping=state / MAPPING_FILE,
        name=kit.name,
        split_seed=int(config[SPLIT_SEED]),
        test_fraction=float(config[TEST_FRACTION]),
        identity_key=kit.identity.raw_private_key,
        roster=tuple((str(name), bytes(key)) for name, key in members),
        audit_dir=state / "audit" / run,
        policy=Path(str(config[POLICY])) if str(config.get(POLICY, "")) else None,
        ledger=state / f"{kit.name}{LEDGER_SUFFIX}",
        audit_root=state / "audit",
    )


def run_name(context: Context) -> str | None:
    """The fedcost run id of the hello this node accepted in ``context``, if any."""
    return str(context.state[RUN]["id"]) if RUN in context.state else None


node_app = make_client_app(resolve_setup)
app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    config = message.content[rec.CONFIG] if rec.CONFIG in message.content else None
    if config is not None and config.get(rec.TRANSPORT) == rec.HELLO:
        kit = _kit(Path(str(context.node_config[KIT])))
        try:
            if str(config.get("coordinator")) != kit.coordinator.key_id:
                raise CertificateError("the hello comes from another coordinator than the startup kit's")
            if roster.RECORD not in message.content:
                raise CertificateError("the hello carries no roster certificates")
            members = roster.trusted_roster(message.content[roster.RECORD], kit, at=utc_now())
            run = _run_folder_name(config.get("run_id"))
        except CertificateError as refusal:
            return Message(
                Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"site {kit.name}: {refusal}"), reply_to=message
            )
        context.state[TRUSTED_ROSTER] = ConfigRecord(
            {"names": [name for name, _ in members], "keys": [key for _, key in members]}
        )
        context.state[RUN] = ConfigRecord({"id": run})
    return node_app(message, context)


def _run_folder_name(run_id: object) -> str:
    """The hello's run id as a folder name; anything else than a plain name is refused."""
    name = str(run_id)
    if not name or name.startswith(".") or not all(c.isalnum() or c in "-_." for c in name):
        raise CertificateError(f"the hello's run id {name[:40]!r} is not a plain name")
    return name


@app.train()
def train(message: Message, context: Context) -> Message:
    return node_app(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return node_app(message, context)
