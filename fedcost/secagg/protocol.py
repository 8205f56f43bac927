"""Node and coordinator state machines of one SecAgg+ round.

Both sides are driven by messages: ``Node.handle(request) -> reply`` on each node,
``Coordinator.start()`` then ``Coordinator.handle(replies) -> requests`` on the
coordinator. Stages: setup, advertise-keys, share-keys, masked-input, consistency,
unmask. Every handler checks, in this order, the stage, the message and config types,
and only then does crypto. A message for any stage but the expected one raises
``ProtocolAbort("expected stage X, received stage Y")``. Anything that raises ends the
round for that object, which then refuses every later message.

Masks, with u < v for the sign and ``+``/``-`` mod 2**bits:
``y_u = x_u + PRG(self seed of u) + sum over neighbours v of +-PRG(pair key of u, v)``.

Consistency (Bonawitz et al., CCS 2017, section 4, "ConsistencyCheck"). After masked
input the coordinator names the survivor set S, the nodes whose masked inputs it holds;
every member signs S with its identity key, and the unmask request carries S and every
member's signature. A node verifies all of them against the identity keys it was given
(never keys from the coordinator), then reveals, per neighbour whose shares it holds, the
seed share if the neighbour is in S and the key share if it is not. Why that suffices:

* an honest node signs one set per round and reveals only for that set, once every member
  has signed it too: any set shares are revealed for is one all its members signed, and
  the coordinator cannot show the members of one sum different survivor sets;
* an honest node reveals a neighbour's seed share only if the neighbour signed the set,
  its key share only if the neighbour is outside it, one share per neighbour; t is a
  strict majority of the k neighbours, so no node's seed and key can both be rebuilt
  (unless more than the threshold collude, which the threat model leaves out);
* so a node's input is unmasked only as part of a sum over a set that node signed.

Consequence: a node that drops out between masked input and consistency aborts the
round. The others have already signed S, and the coordinator must not ask them to sign
a smaller set over the same inputs (two sums that differ by one node give its input);
a node refuses a second set within a round, and "one set per release" across rounds of
the same input is the site binding's rule.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcost.errors import InvalidSignatureError, ProtocolAbort
from fedcost.secagg import crypto, shamir
from fedcost.secagg.graph import neighbours, neighbours_of
from fedcost.secagg.messages import (
    ConsistencyReply,
    ConsistencyRequest,
    EncryptedShare,
    KeyAdvertisement,
    MaskedInputReply,
    MaskedInputRequest,
    Reply,
    Request,
    RevealedShare,
    RoundConfig,
    SetupRequest,
    ShareKeysReply,
    ShareKeysRequest,
    Stage,
    UnmaskReply,
    UnmaskRequest,
)
from fedcost.secagg.prg import MaskSum, word

_X_SIZE = 4  # bytes of a share's x-coordinate inside the encrypted plaintext
_PLAINTEXT_SIZE = _X_SIZE + 2 * shamir.SHARE_SIZE
# No node takes part in a sum over fewer nodes: with two, the sum and one input give the other.
MIN_SURVIVORS = 3

# Stage of each request a node accepts: the request type and the stage after it.
_NODE_STAGES: dict[Stage, tuple[type, Stage | None]] = {
    Stage.SETUP: (SetupRequest, Stage.SHARE_KEYS),
    Stage.SHARE_KEYS: (ShareKeysRequest, Stage.MASKED_INPUT),
    Stage.MASKED_INPUT: (MaskedInputRequest, Stage.CONSISTENCY),
    Stage.CONSISTENCY: (ConsistencyRequest, Stage.UNMASK),
    Stage.UNMASK: (UnmaskRequest, None),
}
# Stage of the replies the coordinator collects: the reply type and the stage after it.
_COORDINATOR_STAGES: dict[Stage, tuple[type, Stage | None]] = {
    Stage.ADVERTISE_KEYS: (KeyAdvertisement, Stage.SHARE_KEYS),
    Stage.SHARE_KEYS: (ShareKeysReply, Stage.MASKED_INPUT),
    Stage.MASKED_INPUT: (MaskedInputReply, Stage.CONSISTENCY),
    Stage.CONSISTENCY: (ConsistencyReply, Stage.UNMASK),
    Stage.UNMASK: (UnmaskReply, None),
}


def _hex_dict(data: Mapping[str, object]) -> dict[str, object]:
    return {k: {"hex": v.hex()} if isinstance(v, bytes) else v for k, v in data.items()}


def _unhex_dict(data: Mapping[str, object]) -> dict[str, object]:
    return {k: bytes.fromhex(v["hex"]) if isinstance(v, dict) else v for k, v in data.items()}


def _unexpected(expected: Stage | None, received: str) -> ProtocolAbort:
    wanted = expected.value if expected else "none (the round is over)"
    return ProtocolAbort(f"expected stage {wanted}, received {received}")


def _check_min_survivors(min_survivors: int) -> None:
    if isinstance(min_survivors, bool) or not isinstance(min_survivors, int) or min_survivors < MIN_SURVIVORS:
        raise ValueError(f"min_survivors must be an int of at least {MIN_SURVIVORS}, got {min_survivors!r}")


def _check_stage(expected: Stage | None, message: object, kinds: Mapping[Stage, tuple[type, Stage | None]]) -> None:
    """Refuse a message for any stage but ``expected``, then a message of the wrong type."""
    received = getattr(message, "stage", None)
    if not isinstance(received, Stage):
        raise ProtocolAbort(f"expected a secure-aggregation message, received {type(message).__name__}")
    if received is not expected:
        raise _unexpected(expected, f"stage {received.value}")
    kind = kinds[received][0]
    if not isinstance(message, kind):
        raise ProtocolAbort(f"stage {received.value} needs a {kind.__name__}, received {type(message).__name__}")


def _in_round_words(config: RoundConfig, vector: np.ndarray) -> bool:
    """Whether a vector is ``dim`` of the round's words, each below 2**bits (one pass, no copy)."""
    return vector.dtype == word(config.bits) and vector.shape == (config.dim,) and int(vector.max()) >> config.bits == 0


def _self_mask_key(config: RoundConfig, node: int, seed: bytes) -> bytes:
    return crypto.derive_key(seed, crypto.label(config.run_id, config.round, crypto.SELF_MASK, node))


def _pair_mask_key(config: RoundConfig, private: X25519PrivateKey, peer_public: bytes, u: int, v: int) -> bytes:
    """The key of the mask nodes u and v share; the smaller id adds it, the larger subtracts it."""
    info = crypto.label(config.run_id, config.round, crypto.PAIRWISE_MASK, min(u, v), max(u, v))
    return crypto.derive_key(crypto.agree(private, peer_public), info)


def _share_cipher_key(config: RoundConfig, shared_secret: bytes, sender: int, recipient: int) -> bytes:
    """One key per direction: shares from u to v and from v to u never share a key."""
    info = crypto.label(config.run_id, config.round, crypto.SHARE_ENCRYPTION, sender, recipient)
    return crypto.derive_key(shared_secret, info)


def _share_associated_data(config: RoundConfig, sender: int, recipient: int) -> bytes:
    return crypto.canonical(crypto.PROTOCOL, "share", config.run_id, config.round, sender, recipient)


class Node:
    """One node's side of one round; make a new one for every round.

    ``identities`` holds the Ed25519 identity keys of the federation's nodes, from its
    certificates, never from the coordinator: they are what detects substituted keys and
    forged survivor-set signatures. ``min_survivors`` (at least ``MIN_SURVIVORS``) is the
    fewest nodes this node's input may be summed with, itself included.
    """

    def __init__(
        self,
        node_id: int,
        identity_key: Ed25519PrivateKey,
        identities: Mapping[int, Ed25519PublicKey],
        *,
        min_survivors: int = MIN_SURVIVORS,
    ):
        _check_min_survivors(min_survivors)
        self.node_id = node_id
        self.min_survivors = min_survivors
        self._identity_key = identity_key
        self._identities = dict(identities)
        self._next: Stage | None = Stage.SETUP
        self._config: RoundConfig | None = None
        self._neighbours: frozenset[int] = frozenset()
        self._mask_key: X25519PrivateKey | None = None
        self._share_key: X25519PrivateKey | None = None
        self._seed: bytes | None = None
        self._peers: dict[int, bytes] = {}  # neighbour whose advertisement verified -> its mask public key
        self._share_secrets: dict[int, bytes] = {}  # neighbour -> X25519 secret of the share keys
        self._held: dict[int, tuple[int, bytes, bytes]] = {}  # neighbour -> (x, seed share, key share)
        self._signed: tuple[int, ...] | None = None  # the one survivor set this node signed this round

    def export_state(self) -> bytes:
        """This node's round state as bytes, for a binding that keeps it between messages.

        Flower may hand a node's successive messages to different worker processes, so a
        binding stores this in the node's own context (never sends it anywhere) and
        ``restore``s it for the next stage. It holds the round's secrets.
        """
        state = {
            "node_id": self.node_id,
            "min_survivors": self.min_survivors,
            "next": self._next.value if self._next else None,
            "config": _hex_dict(self._config.to_dict()) if self._config else None,
            "neighbours": sorted(self._neighbours),
            "mask_key": crypto.private_bytes(self._mask_key).hex() if self._mask_key else None,
            "share_key": crypto.private_bytes(self._share_key).hex() if self._share_key else None,
            "seed": self._seed.hex() if self._seed else None,
            "peers": {str(k): v.hex() for k, v in self._peers.items()},
            "share_secrets": {str(k): v.hex() for k, v in self._share_secrets.items()},
            "held": {str(k): [x, a.hex(), b.hex()] for k, (x, a, b) in self._held.items()},
            "signed": list(self._signed) if self._signed is not None else None,
        }
        return json.dumps(state).encode()

    @classmethod
    def restore(
        cls,
        state: bytes,
        identity_key: Ed25519PrivateKey,
        identities: Mapping[int, Ed25519PublicKey],
        *,
        min_survivors: int = MIN_SURVIVORS,
    ) -> Node:
        """The node ``export_state`` saved; a malformed state ends the round (ProtocolAbort).

        ``min_survivors`` can only raise the saved minimum: the node never joins a sum over
        fewer nodes than it required at setup, nor than its site requires now.
        """
        _check_min_survivors(min_survivors)
        try:
            data = json.loads(state)
            saved = data["min_survivors"]
            _check_min_survivors(saved)
            node = cls(data["node_id"], identity_key, identities, min_survivors=max(saved, min_survivors))
            node._next = Stage(data["next"]) if data["next"] else None
            node._config = RoundConfig.from_dict(_unhex_dict(data["config"])) if data["config"] else None
            node._neighbours = frozenset(data["neighbours"])
            node._mask_key = crypto.load_agreement_key(bytes.fromhex(data["mask_key"])) if data["mask_key"] else None
            node._share_key = crypto.load_agreement_key(bytes.fromhex(data["share_key"])) if data["share_key"] else None
            node._seed = bytes.fromhex(data["seed"]) if data["seed"] else None
            node._peers = {int(k): bytes.fromhex(v) for k, v in data["peers"].items()}
            node._share_secrets = {int(k): bytes.fromhex(v) for k, v in data["share_secrets"].items()}
            node._held = {int(k): (x, bytes.fromhex(a), bytes.fromhex(b)) for k, (x, a, b) in data["held"].items()}
            node._signed = tuple(data["signed"]) if data["signed"] is not None else None
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolAbort(f"the node's saved secure-aggregation state is unreadable: {exc}") from exc
        return node

    def handle(self, request: Request, *, vector: np.ndarray | None = None) -> Reply:
        """Answer the coordinator's request for the next stage.

        ``vector`` is this node's quantised input (``config.dim`` entries of
        ``prg.word(config.bits)``, below 2**bits); pass it with the masked-input request
        and only then.
        """
        expected, self._next = self._next, None  # whatever raises below ends the round for this node
        _check_stage(expected, request, _NODE_STAGES)
        if (vector is not None) != (request.stage is Stage.MASKED_INPUT):
            raise ValueError("pass the input vector with the masked-input request, and only then")
        if isinstance(request, SetupRequest):
            reply: Reply = self._setup(request)
        elif isinstance(request, ShareKeysRequest):
            reply = self._share_keys(request)
        elif isinstance(request, MaskedInputRequest):
            reply = self._masked_input(request, vector)
        elif isinstance(request, ConsistencyRequest):
            reply = self._consistency(request)
        else:
            reply = self._unmask(request)
        self._next = _NODE_STAGES[request.stage][1]
        return reply

    def _setup(self, request: SetupRequest) -> KeyAdvertisement:
        """Check the round, make fresh keys and a self-mask seed, sign the public keys.

        Every node of the round needs an identity key here, not just the neighbours: any of
        them may be in the survivor set whose signatures this node verifies before unmasking.
        """
        config = request.config
        if self.node_id not in config.node_ids:
            raise ProtocolAbort(f"node {self.node_id} is not among the round's nodes")
        if len(config.node_ids) < self.min_survivors:
            raise ProtocolAbort(
                f"the round has {len(config.node_ids)} nodes, fewer than the {self.min_survivors} "
                f"node {self.node_id} needs to take part in a sum"
            )
        unknown = set(config.node_ids) - self._identities.keys()
        if unknown:
            raise ProtocolAbort(f"no identity key for node(s) {sorted(unknown)} of the round")
        self._neighbours = neighbours_of(self.node_id, config.node_ids, config.graph_seed, config.degree)
        self._config = config
        self._mask_key = crypto.generate_agreement_key()
        self._share_key = crypto.generate_agreement_key()
        self._seed = secrets.token_bytes(crypto.KEY_SIZE)
        unsigned = KeyAdvertisement(
            self.node_id, crypto.public_bytes(self._mask_key), crypto.public_bytes(self._share_key), b""
        )
        signature = crypto.sign(self._identity_key, unsigned.signed_bytes(config.run_id, config.round))
        return dataclasses.replace(unsigned, signature=signature)

    def _share_keys(self, request: ShareKeysRequest) -> ShareKeysReply:
        """Verify the neighbours' keys, then Shamir-share seed and mask key, encrypted per neighbour."""
        config, threshold = self._config, self._config.threshold
        peers: dict[int, KeyAdvertisement] = {}
        for ad in request.advertisements:
            if ad.node_id not in self._neighbours or ad.node_id in peers:
                raise ProtocolAbort(f"key advertisement of node {ad.node_id}, not a neighbour or repeated")
            try:
                crypto.verify(self._identities[ad.node_id], ad.signature, ad.signed_bytes(config.run_id, config.round))
            except InvalidSignatureError as exc:
                exc.add_note(f"in the key advertisement of node {ad.node_id}")
                raise
            peers[ad.node_id] = ad
        if len(peers) < threshold:
            raise ProtocolAbort(f"{len(peers)} neighbours advertised keys, fewer than the threshold {threshold}")
        self._peers = {peer: ad.mask_key for peer, ad in peers.items()}
        self._share_secrets = {peer: crypto.agree(self._share_key, ad.share_key) for peer, ad in peers.items()}
        self._share_key = None
        recipients = sorted(peers)
        seed_shares = shamir.share(self._seed, threshold, len(recipients))
        key_shares = shamir.share(crypto.private_bytes(self._mask_key), threshold, len(recipients))
        shares = []
        for recipient, (x, seed_share), (_, key_share) in zip(recipients, seed_shares, key_shares):
            key = _share_cipher_key(config, self._share_secrets[recipient], self.node_id, recipient)
            plaintext = x.to_bytes(_X_SIZE, "big") + seed_share + key_share
            ciphertext = crypto.encrypt(key, plaintext, _share_associated_data(config, self.node_id, recipient))
            shares.append(EncryptedShare(self.node_id, recipient, ciphertext))
        return ShareKeysReply(self.node_id, tuple(shares))

    def _masked_input(self, request: MaskedInputRequest, vector: np.ndarray) -> MaskedInputReply:
        """Decrypt the shares held for neighbours, then mask the input with every pair key."""
        config = self._config
        if not isinstance(vector, np.ndarray) or not _in_round_words(config, vector):
            raise ValueError(f"input must be {config.dim} entries of {word(config.bits)} below 2**{config.bits}")
        held: dict[int, tuple[int, bytes, bytes]] = {}
        for share in request.shares:
            if share.recipient != self.node_id or share.sender not in self._peers or share.sender in held:
                raise ProtocolAbort(f"unexpected share from node {share.sender} to node {share.recipient}")
            key = _share_cipher_key(config, self._share_secrets[share.sender], share.sender, self.node_id)
            try:
                plaintext = crypto.decrypt(
                    key, share.ciphertext, _share_associated_data(config, share.sender, self.node_id)
                )
            except InvalidSignatureError as exc:
                exc.add_note(f"in the encrypted share from node {share.sender}")
                raise
            if len(plaintext) != _PLAINTEXT_SIZE:
                raise ProtocolAbort(f"the share from node {share.sender} has the wrong size")
            seed_share, key_share = plaintext[_X_SIZE : -shamir.SHARE_SIZE], plaintext[-shamir.SHARE_SIZE :]
            held[share.sender] = (int.from_bytes(plaintext[:_X_SIZE], "big"), seed_share, key_share)
        if len(held) < config.threshold:
            raise ProtocolAbort(f"shares from {len(held)} neighbours, fewer than the threshold {config.threshold}")
        masked = MaskSum(vector, config.bits)
        masked.add(_self_mask_key(config, self.node_id, self._seed))
        for peer in sorted(held):
            key = _pair_mask_key(config, self._mask_key, self._peers[peer], self.node_id, peer)
            if self.node_id < peer:
                masked.add(key)
            else:
                masked.subtract(key)
        self._held = held
        # The node's own secrets now live only as its neighbours' shares.
        self._seed, self._mask_key, self._share_secrets = None, None, {}
        return MaskedInputReply(self.node_id, masked.reduced())

    def _consistency(self, request: ConsistencyRequest) -> ConsistencyReply:
        """Check the survivor set S, then sign it: the one set this node signs this round.

        The message itself refuses an S that is not sorted and distinct. Here, in order: S
        lies within the round, holds this node and at least ``min_survivors`` nodes, and
        every neighbour in S is one whose shares this node holds (a neighbour it holds no
        shares of never had its pair mask in this node's input, so no sum over S unmasks).
        """
        config, survivors = self._config, request.survivors
        members = frozenset(survivors)
        outside = members - set(config.node_ids)
        if outside:
            raise ProtocolAbort(f"the survivor set names node(s) {sorted(outside)} outside the round")
        if self.node_id not in members:
            raise ProtocolAbort(f"node {self.node_id} is not in the survivor set")
        if len(members) < self.min_survivors:
            raise ProtocolAbort(
                f"the survivor set has {len(members)} nodes, fewer than the {self.min_survivors} "
                f"node {self.node_id} needs to take part in a sum"
            )
        unheld = (members & self._neighbours) - self._held.keys()
        if unheld:
            raise ProtocolAbort(
                f"the survivor set names neighbour(s) {sorted(unheld)} whose shares node {self.node_id} does not hold"
            )
        self._signed = survivors
        signature = crypto.sign(self._identity_key, request.signed_bytes(config.run_id, config.round))
        return ConsistencyReply(self.node_id, signature)

    def _unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Verify that every member signed the set this node signed, then reveal one share per neighbour.

        Per neighbour whose shares it holds: the seed share if the neighbour is in S (it
        signed S), the key share if it is not. Never both, by construction: S is fixed by
        this node's own signature, and the round ends here.
        """
        config = self._config
        if request.survivors != self._signed:
            raise ProtocolAbort(f"the unmask request's survivor set is not the one node {self.node_id} signed")
        signed_bytes = request.signed_bytes(config.run_id, config.round)
        for member, signature in zip(request.survivors, request.signatures, strict=True):
            try:
                crypto.verify(self._identities[member], signature, signed_bytes)
            except InvalidSignatureError as exc:
                exc.add_note(f"in the survivor-set signature of node {member}")
                raise
        members = frozenset(request.survivors)
        held, self._held = sorted(self._held.items()), {}
        return UnmaskReply(
            self.node_id,
            tuple(RevealedShare(owner, x, seed) for owner, (x, seed, _) in held if owner in members),
            tuple(RevealedShare(owner, x, key) for owner, (x, _, key) in held if owner not in members),
        )


@dataclass(frozen=True, eq=False)
class Aggregate:
    """The outcome of a round: the sum of the included nodes' inputs mod 2**bits."""

    total: np.ndarray
    included: tuple[int, ...]


class Coordinator:
    """The coordinator's side of one round; make a new one for every round.

    ``dropouts`` says, for every node that left the round, in which stage and why (no
    reply, or a reply that failed its checks); a node that drops out during unmask is
    still in the sum, it just gives no shares. A node that drops out during consistency
    aborts the round: the sum is unmasked only over a set every member of it signed, and
    the others have signed this one (see the module docstring).
    """

    def __init__(self, config: RoundConfig, identities: Mapping[int, Ed25519PublicKey]):
        missing = set(config.node_ids) - identities.keys()
        if missing:
            raise ValueError(f"no identity key for node(s) {sorted(missing)}")
        self.config = config
        self.dropouts: dict[int, str] = {}
        self._identities = dict(identities)
        self._neighbours = neighbours(config.node_ids, config.graph_seed, config.degree)
        self._next: Stage | None = Stage.SETUP
        self._asked: set[int] = set()
        self._advertised: dict[int, KeyAdvertisement] = {}
        self._shared: set[int] = set()
        self._masked: set[int] = set()
        self._total = np.zeros(config.dim, dtype=word(config.bits))
        self._survivors: tuple[int, ...] = ()  # S, sorted: the nodes whose masked inputs are in the total
        self._result: Aggregate | None = None

    @property
    def done(self) -> bool:
        """Whether the round has finished with a result."""
        return self._result is not None

    @property
    def result(self) -> Aggregate:
        """The sum of the survivors' inputs and who they are, once the round is done."""
        if self._result is None:
            raise ValueError("the round has not finished")
        return self._result

    def start(self) -> dict[int, SetupRequest]:
        """The setup stage: the round's configuration, for every node."""
        expected, self._next = self._next, None
        if expected is not Stage.SETUP:
            raise _unexpected(expected, f"stage {Stage.SETUP.value}")
        self._next = Stage.ADVERTISE_KEYS
        self._asked = set(self.config.node_ids)
        request = SetupRequest(self.config)
        return {node: request for node in self.config.node_ids}

    def handle(self, replies: Iterable[Reply]) -> dict[int, Request]:
        """Take the replies that arrived for the current stage; return the next stage's requests.

        A node that was asked and did not reply has dropped out. Returns {} once the
        round is done; raises ProtocolAbort when too few nodes are left.
        """
        replies = list(replies)
        stage, self._next = self._next, None  # whatever raises below ends the round
        for reply in replies:
            _check_stage(stage, reply, _COORDINATOR_STAGES)
        if stage not in _COORDINATOR_STAGES:  # setup (call start) or the round is over
            raise _unexpected(stage, "no replies")
        by_node: dict[int, Reply] = {}
        for reply in replies:
            if reply.node_id not in self._asked or reply.node_id in by_node:
                raise ProtocolAbort(f"unasked or repeated reply from node {reply.node_id} in stage {stage.value}")
            by_node[reply.node_id] = reply
        for node in sorted(self._asked - by_node.keys()):
            self.dropouts[node] = f"no reply in stage {stage.value}"
        if stage is Stage.ADVERTISE_KEYS:
            requests: dict[int, Request] = self._advertise_keys(by_node)
        elif stage is Stage.SHARE_KEYS:
            requests = self._share_keys(by_node)
        elif stage is Stage.MASKED_INPUT:
            requests = self._masked_input(by_node)
        elif stage is Stage.CONSISTENCY:
            requests = self._consistency(by_node)
        else:
            requests = self._unmask(by_node)
        self._next = _COORDINATOR_STAGES[stage][1]
        self._asked = set(requests)
        return requests

    def _drop(self, node: int, stage: Stage, reason: str) -> None:
        self.dropouts[node] = f"refused in stage {stage.value}: {reason}"

    def _check_threshold(self, needing: set[int], alive: set[int], stage: Stage) -> None:
        """Abort unless every node in ``needing`` keeps at least t neighbours in ``alive``."""
        config = self.config
        if not needing:
            raise ProtocolAbort(f"round aborted in stage {stage.value}: no node is left")
        for node in sorted(needing):
            left = len(self._neighbours[node] & alive)
            if left < config.threshold:
                raise ProtocolAbort(
                    f"round aborted in stage {stage.value}: node {node} has {left} of its "
                    f"{config.degree} neighbours left, fewer than the threshold {config.threshold}"
                )

    def _advertise_keys(self, by_node: dict[int, KeyAdvertisement]) -> dict[int, ShareKeysRequest]:
        """Keep the validly signed advertisements; send each node its neighbours'."""
        config = self.config
        for node, ad in by_node.items():
            try:
                crypto.verify(self._identities[node], ad.signature, ad.signed_bytes(config.run_id, config.round))
            except InvalidSignatureError:
                self._drop(node, Stage.ADVERTISE_KEYS, "key advertisement fails its signature check")
                continue
            self._advertised[node] = ad
        alive = set(self._advertised)
        self._check_threshold(alive, alive, Stage.ADVERTISE_KEYS)
        return {
            node: ShareKeysRequest(tuple(self._advertised[v] for v in sorted(self._neighbours[node] & alive)))
            for node in sorted(alive)
        }

    def _share_keys(self, by_node: dict[int, ShareKeysReply]) -> dict[int, MaskedInputRequest]:
        """Keep the nodes that shared with exactly their advertised neighbours; route the shares."""
        advertised = set(self._advertised)
        inbox: dict[int, dict[int, EncryptedShare]] = defaultdict(dict)
        for node, reply in by_node.items():
            recipients = sorted(share.recipient for share in reply.shares)
            if recipients != sorted(self._neighbours[node] & advertised) or any(
                share.sender != node for share in reply.shares
            ):
                self._drop(node, Stage.SHARE_KEYS, "shares do not match its advertised neighbours")
                continue
            self._shared.add(node)
            for share in reply.shares:
                inbox[share.recipient][node] = share
        self._check_threshold(self._shared, self._shared, Stage.SHARE_KEYS)
        return {
            node: MaskedInputRequest(tuple(inbox[node][v] for v in sorted(self._neighbours[node] & self._shared)))
            for node in sorted(self._shared)
        }

    def _masked_input(self, by_node: dict[int, MaskedInputReply]) -> dict[int, ConsistencyRequest]:
        """Add up the masked inputs; ask every node in the survivor set S to sign S."""
        config = self.config
        for node, reply in by_node.items():
            if not _in_round_words(config, reply.masked):
                self._drop(
                    node,
                    Stage.MASKED_INPUT,
                    f"masked input is not {config.dim} entries of {word(config.bits)} mod 2**{config.bits}",
                )
                continue
            self._total += reply.masked
            self._masked.add(node)
        self._check_threshold(self._shared, self._masked, Stage.MASKED_INPUT)
        self._survivors = tuple(sorted(self._masked))
        request = ConsistencyRequest(self._survivors)
        return {node: request for node in self._survivors}

    def _consistency(self, by_node: dict[int, ConsistencyReply]) -> dict[int, UnmaskRequest]:
        """Check every member's signature on S; send S and all of them to every member.

        No smaller set is ever offered in S's place: the members have signed S, and a
        second sum over the same inputs would reveal the difference.
        """
        config = self.config
        signed_bytes = ConsistencyRequest(self._survivors).signed_bytes(config.run_id, config.round)
        signatures: dict[int, bytes] = {}
        for node, reply in by_node.items():
            try:
                crypto.verify(self._identities[node], reply.signature, signed_bytes)
            except InvalidSignatureError:
                self._drop(node, Stage.CONSISTENCY, "survivor-set signature fails its check")
                continue
            signatures[node] = reply.signature
        unsigned = [node for node in self._survivors if node not in signatures]
        if unsigned:
            raise ProtocolAbort(
                f"round aborted in stage {Stage.CONSISTENCY.value}: node(s) {unsigned} did not sign the "
                "survivor set; a sum is unmasked only over a set every member signed"
            )
        request = UnmaskRequest(self._survivors, tuple(signatures[node] for node in self._survivors))
        return {node: request for node in self._survivors}

    def _unmask(self, by_node: dict[int, UnmaskReply]) -> dict[int, Request]:
        """Rebuild survivors' seeds and dropped nodes' keys; remove every mask from the sum.

        Node u owes the seed shares of its neighbours in S and the key shares of its
        neighbours that shared keys but are not in S, as it derives them from S itself.
        """
        config = self.config
        outside = self._shared - self._masked
        seed_shares: dict[int, list[tuple[int, shamir.Share]]] = defaultdict(list)  # owner -> (revealer, share)
        key_shares: dict[int, list[tuple[int, shamir.Share]]] = defaultdict(list)
        answered = set()
        for node, reply in by_node.items():
            if (
                sorted(s.owner for s in reply.seed_shares) != sorted(self._neighbours[node] & self._masked)
                or sorted(s.owner for s in reply.key_shares) != sorted(self._neighbours[node] & outside)
                or any(len(s.value) != shamir.SHARE_SIZE for s in reply.seed_shares + reply.key_shares)
            ):
                self._drop(node, Stage.UNMASK, "shares do not match the survivor set")
                continue
            answered.add(node)
            for share in reply.seed_shares:
                seed_shares[share.owner].append((node, (share.x, share.value)))
            for share in reply.key_shares:
                key_shares[share.owner].append((node, (share.x, share.value)))
        self._check_threshold(self._shared, answered, Stage.UNMASK)
        total = MaskSum(self._total, config.bits)
        for node in self._survivors:
            total.subtract(_self_mask_key(config, node, self._combine(seed_shares[node], node, "seed")))
        for dropped in sorted(outside):
            private = crypto.load_agreement_key(self._combine(key_shares[dropped], dropped, "mask key"))
            if crypto.public_bytes(private) != self._advertised[dropped].mask_key:
                raise ProtocolAbort(f"the rebuilt mask key of node {dropped} does not match its advertised key")
            for node in sorted(self._neighbours[dropped] & self._masked):
                key = _pair_mask_key(config, private, self._advertised[node].mask_key, dropped, node)
                if node < dropped:  # the survivor added it; take it out
                    total.subtract(key)
                else:
                    total.add(key)
        self._result = Aggregate(total.reduced(), self._survivors)
        return {}

    def _combine(self, revealed: list[tuple[int, shamir.Share]], owner: int, what: str) -> bytes:
        """``owner``'s secret from the shares its neighbours revealed, each share beyond the
        threshold checked against the others: a false one (a node lying in unmask) would rebuild
        a wrong secret and pass noise off as the sum. Shares that disagree abort the round naming
        their revealers (which of them lied, the shares alone cannot tell for sure: two lying
        together can make an honest one look the odd one out)."""
        shares = [share for _, share in revealed]
        try:
            if not shamir.consistent(shares, self.config.threshold):
                revealers = sorted(node for node, _ in revealed)
                raise ProtocolAbort(
                    f"the {what} shares of node {owner} revealed by nodes {revealers} disagree: one of them "
                    "revealed a false share"
                )
            return shamir.combine(shares, self.config.threshold)
        except ValueError as exc:
            raise ProtocolAbort(f"the {what} shares of node {owner} do not combine") from exc
