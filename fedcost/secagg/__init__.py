"""SecAgg+ (Bell et al. 2020 on Bonawitz et al. 2017): the coordinator learns only a sum.

Pure core: no Flower, no network, no files. One round, per node u with neighbours N(u)
in a public random graph (``graph``), threshold t among them:

1. setup -> advertise keys: u makes two X25519 pairs (mask agreement, share encryption)
   and a 32-byte self-mask seed, and signs both public keys with its Ed25519 identity key.
2. share keys: u verifies its neighbours' signatures, Shamir-shares (t of |N(u)|) its seed
   and its mask private key, and encrypts each neighbour's shares (ChaCha20-Poly1305).
3. masked input: u decrypts the shares it holds and sends
   y_u = x_u + PRG(seed_u) + sum_v +-PRG(pair key u,v) mod 2**bits (AES-CTR PRG, HKDF keys).
4. consistency (Bonawitz et al. 2017, section 4): the coordinator names the survivor set S,
   the nodes whose masked inputs it holds; every member checks S and signs it, once.
5. unmask: u verifies every member's signature on the S it signed, then for each
   neighbour returns its seed share if it is in S, its key share if not, never both; the
   coordinator rebuilds seeds and keys and strips the masks. A node's input is thus
   unmasked only in a sum over a set it signed; a dropout during consistency aborts.

API. Coordinator: ``c = Coordinator(RoundConfig.create(...), identities)``;
``requests = c.start()``; then, while ``not c.done``: send each node its request,
collect the replies that arrive, ``requests = c.handle(replies)``; finally ``c.result``
(``Aggregate(total, included)``). Node: ``node = Node(node_id, identity_key,
identities, min_survivors=3)``; ``reply = node.handle(request)`` for each request, passing
``vector=Quantizer.encode(...)`` with the masked-input one. Messages convert with
``to_dict`` and ``request_from_dict``/``reply_from_dict``. ``simulate_round`` runs the loop
in memory. Too few survivors, a stage out of order, a repeated stage: ``ProtocolAbort``;
a bad signature or tag: ``InvalidSignatureError``.
"""

from fedcost.secagg.graph import choose_degree, choose_threshold, neighbours
from fedcost.secagg.in_memory import simulate_round
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
    reply_from_dict,
    reply_kind,
    request_from_dict,
)
from fedcost.secagg.protocol import Aggregate, Coordinator, Node
from fedcost.secagg.quantize import Quantizer

__all__ = [
    "Aggregate",
    "ConsistencyReply",
    "ConsistencyRequest",
    "Coordinator",
    "EncryptedShare",
    "KeyAdvertisement",
    "MaskedInputReply",
    "MaskedInputRequest",
    "Node",
    "Quantizer",
    "Reply",
    "Request",
    "RevealedShare",
    "RoundConfig",
    "SetupRequest",
    "ShareKeysReply",
    "ShareKeysRequest",
    "Stage",
    "UnmaskReply",
    "UnmaskRequest",
    "choose_degree",
    "choose_threshold",
    "neighbours",
    "reply_from_dict",
    "reply_kind",
    "request_from_dict",
    "simulate_round",
]
