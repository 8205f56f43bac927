"""Attacks on a SecAgg+ round: each test names what a coordinator (or network) tries."""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedcost.errors import InvalidSignatureError, ProtocolAbort
from fedcost.secagg import (
    ConsistencyRequest,
    Coordinator,
    EncryptedShare,
    KeyAdvertisement,
    MaskedInputReply,
    MaskedInputRequest,
    Node,
    RoundConfig,
    ShareKeysRequest,
    Stage,
    UnmaskReply,
    UnmaskRequest,
    crypto,
    neighbours,
    request_from_dict,
    shamir,
)
from fedcost.secagg.prg import MaskSum, word
from fedcost.secagg.protocol import _pair_mask_key, _self_mask_key  # the adversary derives masks as nodes do


class _Federation:
    """Nodes (five unless a config names others) and a coordinator; the test plays the network."""

    def __init__(
        self,
        n: int = 5,
        round_number: int = 1,
        keys: dict | None = None,
        run_id: str = "attack",
        config: RoundConfig | None = None,
    ):
        ids = config.node_ids if config else tuple(range(1, n + 1))
        self.config = config or RoundConfig.create(run_id=run_id, round=round_number, node_ids=ids, dim=3, bits=20)
        self.keys = keys or {u: Ed25519PrivateKey.generate() for u in ids}
        self.identities = {u: key.public_key() for u, key in self.keys.items()}
        self.nodes = {u: Node(u, self.keys[u], self.identities) for u in ids}
        self.coordinator = Coordinator(self.config, self.identities)
        self.requests = self.coordinator.start()
        self.inputs = {u: np.array([u, 1, 0], dtype=word(self.config.bits)) for u in ids}

    def answer(self, u: int, request=None):
        request = request or self.requests[u]
        vector = self.inputs[u] if request.stage is Stage.MASKED_INPUT else None
        return self.nodes[u].handle(request, vector=vector)

    def step(self) -> list:
        replies = [self.answer(u) for u in self.requests]
        self.requests = self.coordinator.handle(replies)
        return replies


def _substitute(request: ShareKeysRequest, victim: int, **fields) -> ShareKeysRequest:
    ads = tuple(dataclasses.replace(ad, **fields) if ad.node_id == victim else ad for ad in request.advertisements)
    return ShareKeysRequest(ads)


@pytest.mark.parametrize("field", ["mask_key", "share_key"])
def test_coordinator_substituting_a_public_key_is_detected(field):
    federation = _Federation()
    federation.step()
    attacker_key = crypto.public_bytes(crypto.generate_agreement_key())
    forged = _substitute(federation.requests[1], 2, **{field: attacker_key})
    with pytest.raises(InvalidSignatureError) as info:
        federation.answer(1, forged)
    assert str(info.value) == "authentication failed"  # opaque ...
    assert info.value.__notes__ == ["in the key advertisement of node 2"]  # ... but says whose


def test_coordinator_re_signing_keys_with_its_own_identity_is_detected():
    federation = _Federation()
    federation.step()
    impostor = Ed25519PrivateKey.generate()
    original = next(ad for ad in federation.requests[1].advertisements if ad.node_id == 2)
    mask_key = crypto.public_bytes(crypto.generate_agreement_key())
    unsigned = dataclasses.replace(original, mask_key=mask_key)
    signature = impostor.sign(unsigned.signed_bytes(federation.config.run_id, federation.config.round))
    with pytest.raises(InvalidSignatureError):
        federation.answer(1, _substitute(federation.requests[1], 2, mask_key=mask_key, signature=signature))


def test_replaying_keys_from_another_round_is_detected():
    old = _Federation(round_number=1)
    old.step()
    stale = old.requests[1].advertisements
    current = _Federation(round_number=2, keys=old.keys)
    current.step()
    with pytest.raises(InvalidSignatureError):
        current.answer(1, ShareKeysRequest(stale))


def test_coordinator_drops_a_node_whose_advertisement_fails_its_signature():
    federation = _Federation()
    replies = [federation.answer(u) for u in federation.requests]
    replies[2] = dataclasses.replace(replies[2], signature=bytes(64))
    requests = federation.coordinator.handle(replies)
    assert 3 not in requests
    assert all(ad.node_id != 3 for request in requests.values() for ad in request.advertisements)
    assert federation.coordinator.dropouts == {
        3: "refused in stage advertise-keys: key advertisement fails its signature check"
    }


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def test_a_tampered_encrypted_share_is_detected():
    federation = _Federation()
    federation.step()
    federation.step()
    request = federation.requests[1]
    first = request.shares[0]
    tampered = MaskedInputRequest(
        (dataclasses.replace(first, ciphertext=_flip_last_byte(first.ciphertext)), *request.shares[1:])
    )
    with pytest.raises(InvalidSignatureError) as info:
        federation.answer(1, tampered)
    assert info.value.__notes__ == [f"in the encrypted share from node {first.sender}"]


def test_a_share_passed_off_as_another_senders_is_detected():
    federation = _Federation()
    federation.step()
    federation.step()
    shares = federation.requests[1].shares
    swapped = (
        EncryptedShare(shares[0].sender, 1, shares[1].ciphertext),
        EncryptedShare(shares[1].sender, 1, shares[0].ciphertext),
        *shares[2:],
    )
    with pytest.raises(InvalidSignatureError):
        federation.answer(1, MaskedInputRequest(swapped))


def test_a_share_addressed_to_another_node_is_refused():
    federation = _Federation()
    federation.step()
    federation.step()
    misrouted = federation.requests[2].shares
    with pytest.raises(ProtocolAbort, match="unexpected share from node 1 to node 2"):
        federation.answer(1, MaskedInputRequest(misrouted))


def test_withholding_shares_below_the_threshold_is_refused():
    """With too few pair masks, the seed shares alone would unmask the node's input."""
    federation = _Federation()
    federation.step()
    federation.step()
    few = federation.requests[1].shares[: federation.config.threshold - 1]
    with pytest.raises(ProtocolAbort, match="fewer than the threshold"):
        federation.answer(1, MaskedInputRequest(few))


@pytest.mark.parametrize(
    "forge",
    [
        lambda masked: masked.astype(np.uint64),  # 64-bit words in a 20-bit round
        lambda masked: masked[:-1],  # an entry short
        lambda masked: masked | np.uint32(1 << 20),  # entries at 2**bits or more
    ],
)
def test_a_masked_input_outside_the_rounds_words_drops_its_node_and_the_rest_still_sum(forge):
    federation = _Federation()
    federation.step()
    federation.step()
    replies = [federation.answer(u) for u in federation.requests]
    replies[2] = dataclasses.replace(replies[2], masked=forge(replies[2].masked))
    federation.requests = federation.coordinator.handle(replies)
    assert federation.coordinator.dropouts == {
        3: "refused in stage masked-input: masked input is not 3 entries of uint32 mod 2**20"
    }
    federation.step()
    federation.step()
    assert federation.coordinator.result.included == (1, 2, 4, 5)
    assert federation.coordinator.result.total.tolist() == [1 + 2 + 4 + 5, 4, 0]


# --- consistency: one signed survivor set per round --------------------------------------


def _at_consistency(federation: _Federation, *, silent: int | None = None) -> _Federation:
    """Every node has sent its masked input (``silent``: shared no keys) and waits for S."""
    federation.step()
    federation.requests = federation.coordinator.handle(
        [federation.answer(u) for u in federation.requests if u != silent]
    )
    federation.step()
    return federation


@pytest.mark.parametrize(
    "survivors,why",
    [
        ((2, 3, 4, 5), "node 1 is not in the survivor set"),
        ((1, 2), "the survivor set has 2 nodes, fewer than the 3 node 1 needs to take part in a sum"),
        ((1, 2, 3, 6), "the survivor set names node(s) [6] outside the round"),
    ],
)
def test_a_node_refuses_a_survivor_set_it_cannot_be_summed_over(survivors, why):
    federation = _at_consistency(_Federation())
    with pytest.raises(ProtocolAbort, match=f"^{re.escape(why)}$"):
        federation.answer(1, ConsistencyRequest(survivors))


def test_a_node_refuses_a_survivor_set_smaller_than_its_own_minimum():
    federation = _Federation()
    federation.nodes[1] = Node(1, federation.keys[1], federation.identities, min_survivors=5)
    _at_consistency(federation)
    with pytest.raises(ProtocolAbort, match="the survivor set has 4 nodes, fewer than the 5 node 1 needs"):
        federation.answer(1, ConsistencyRequest((1, 2, 3, 4)))


def test_a_node_refuses_a_survivor_set_naming_a_neighbour_whose_shares_it_does_not_hold():
    """Node 5 shared no keys, so node 1's input carries no pair mask with it."""
    federation = _at_consistency(_Federation(), silent=5)
    assert federation.requests[1] == ConsistencyRequest((1, 2, 3, 4))
    with pytest.raises(ProtocolAbort, match=re.escape("neighbour(s) [5] whose shares node 1 does not hold")):
        federation.answer(1, ConsistencyRequest((1, 2, 3, 4, 5)))


def _signed_unmask_request(federation: _Federation) -> UnmaskRequest:
    """Every node signs S; the coordinator's unmask request (the same for all of them)."""
    _at_consistency(federation)
    federation.step()
    return federation.requests[1]


def test_a_node_refuses_an_unmask_request_for_a_set_it_did_not_sign():
    federation = _Federation()
    request = _signed_unmask_request(federation)
    with pytest.raises(ProtocolAbort, match="survivor set is not the one node 1 signed"):
        federation.answer(1, UnmaskRequest(request.survivors[:-1], request.signatures[:-1]))
    with pytest.raises(ProtocolAbort, match="expected stage none"):  # and the round is over for it
        federation.answer(1, request)


def test_an_unmask_request_lacking_a_signature_is_refused():
    federation = _Federation()
    request = _signed_unmask_request(federation)
    with pytest.raises(ProtocolAbort, match="one per survivor, got 4 for 5 survivors"):
        request_from_dict({**request.to_dict(), "signatures": list(request.signatures[1:])})
    with pytest.raises(InvalidSignatureError) as info:
        federation.answer(1, UnmaskRequest(request.survivors, (b"", *request.signatures[1:])))
    assert str(info.value) == "authentication failed"
    assert info.value.__notes__ == ["in the survivor-set signature of node 1"]


def _swap_signature(request: UnmaskRequest, node: int, signature: bytes) -> UnmaskRequest:
    signatures = tuple(signature if u == node else s for u, s in zip(request.survivors, request.signatures))
    return UnmaskRequest(request.survivors, signatures)


def test_a_signature_by_the_right_node_over_another_set_is_refused():
    federation = _Federation()
    request = _signed_unmask_request(federation)
    config = federation.config
    other = ConsistencyRequest((1, 2, 3, 4)).signed_bytes(config.run_id, config.round)
    forged = _swap_signature(request, 5, crypto.sign(federation.keys[5], other))
    for u in (1, 2, 3, 4):
        with pytest.raises(InvalidSignatureError) as info:
            federation.answer(u, forged)
        assert info.value.__notes__ == ["in the survivor-set signature of node 5"]


def test_a_node_checks_the_signatures_of_members_that_are_not_its_neighbours():
    """On a sparse graph a node holds no shares of some members, and still checks each one."""
    ids = tuple(range(1, 8))
    config = RoundConfig(
        run_id="sparse", round=1, node_ids=ids, graph_seed=bytes(32), degree=4, threshold=3, bits=20, dim=3
    )
    federation = _Federation(config=config)
    request = _signed_unmask_request(federation)
    stranger = min(set(ids) - neighbours(ids, config.graph_seed, config.degree)[1] - {1})
    other = ConsistencyRequest((1, 2, 3)).signed_bytes(config.run_id, config.round)
    with pytest.raises(InvalidSignatureError) as info:
        federation.answer(1, _swap_signature(request, stranger, crypto.sign(federation.keys[stranger], other)))
    assert info.value.__notes__ == [f"in the survivor-set signature of node {stranger}"]


@pytest.mark.parametrize("other", [{"round_number": 2}, {"run_id": "attack-2"}])
def test_a_survivor_set_signature_from_another_round_or_run_is_refused(other):
    """The same nodes signed the same set (1..5), but in another round or run: a replay."""
    earlier = _Federation(**other)
    replayed = _signed_unmask_request(earlier).signatures
    federation = _Federation(keys=earlier.keys)
    request = _signed_unmask_request(federation)
    assert replayed != request.signatures and request.survivors == (1, 2, 3, 4, 5)
    with pytest.raises(InvalidSignatureError):
        federation.answer(1, _swap_signature(request, 3, replayed[2]))
    with pytest.raises(InvalidSignatureError):
        federation.answer(2, UnmaskRequest(request.survivors, replayed))


def test_a_signature_by_another_identity_is_refused():
    federation = _Federation()
    request = _signed_unmask_request(federation)
    config = federation.config
    impostor = crypto.sign(Ed25519PrivateKey.generate(), request.signed_bytes(config.run_id, config.round))
    with pytest.raises(InvalidSignatureError):
        federation.answer(1, _swap_signature(request, 4, impostor))


def test_coordinator_drops_a_bad_survivor_set_signature_and_aborts():
    federation = _Federation()
    federation.step()
    federation.step()
    federation.step()
    replies = [federation.answer(u) for u in federation.requests]
    replies[3] = dataclasses.replace(replies[3], signature=bytes(64))
    with pytest.raises(ProtocolAbort, match=re.escape("node(s) [4] did not sign the survivor set")):
        federation.coordinator.handle(replies)
    assert federation.coordinator.dropouts == {
        4: "refused in stage consistency: survivor-set signature fails its check"
    }


def test_coordinator_telling_nodes_different_survivor_sets_gets_no_shares():
    """It tells nodes 1-3 that everyone survived and nodes 4-5 that node 1 dropped out.

    Before the consistency check each group would have revealed shares of node 1 (seed
    shares from one, key shares from the other); now neither set is signed by all its
    members, so no node reveals anything.
    """
    federation = _at_consistency(_Federation())
    assert federation.config.degree == 4 and federation.config.threshold == 3
    claims = {u: (1, 2, 3, 4, 5) for u in (1, 2, 3)} | {u: (2, 3, 4, 5) for u in (4, 5)}
    signed = {u: federation.answer(u, ConsistencyRequest(claim)).signature for u, claim in claims.items()}
    for u, claim in claims.items():
        other = (2, 3, 4, 5) if claim == (1, 2, 3, 4, 5) else (1, 2, 3, 4, 5)
        with pytest.raises(ProtocolAbort, match="not the one node .* signed"):
            federation.answer(u, UnmaskRequest(other, tuple(signed[v] for v in other)))
    with pytest.raises(ProtocolAbort, match="expected stage none"):
        federation.answer(1, UnmaskRequest((1, 2, 3, 4, 5), tuple(signed[v] for v in range(1, 6))))
    federation = _at_consistency(_Federation())
    signed = {u: federation.answer(u, ConsistencyRequest(claim)).signature for u, claim in claims.items()}
    for u, claim in claims.items():  # its own set, with the signatures the members gave
        with pytest.raises(InvalidSignatureError):
            federation.answer(u, UnmaskRequest(claim, tuple(signed[v] for v in claim)))


# --- the property: a coordinator lying about S unmasks only sums every member signed ------


@dataclass
class _Loot:
    """What a deviating coordinator holds: every advertisement and masked input it saw, and
    the shares revealed to it; ``held`` is whose shares each node holds (and masked with)."""

    config: RoundConfig
    advertised: dict[int, KeyAdvertisement] = field(default_factory=dict)
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    held: dict[int, set[int]] = field(default_factory=dict)
    seed_shares: dict[int, list[shamir.Share]] = field(default_factory=lambda: defaultdict(list))
    key_shares: dict[int, list[shamir.Share]] = field(default_factory=lambda: defaultdict(list))

    def take(self, reply: UnmaskReply) -> None:
        for share in reply.seed_shares:
            self.seed_shares[share.owner].append((share.x, share.value))
        for share in reply.key_shares:
            self.key_shares[share.owner].append((share.x, share.value))

    def rebuild(self) -> tuple[dict[int, bytes], dict[int, X25519PrivateKey]]:
        """Every seed and mask key with at least t shares, the keys checked against the advertised ones."""
        t = self.config.threshold
        seeds = {w: shamir.combine(s, t) for w, s in self.seed_shares.items() if len(s) >= t}
        keys = {w: shamir.combine(s, t) for w, s in self.key_shares.items() if len(s) >= t}
        mask_keys = {w: crypto.load_agreement_key(key) for w, key in keys.items()}
        assert all(crypto.public_bytes(key) == self.advertised[w].mask_key for w, key in mask_keys.items())
        return seeds, mask_keys

    def unmaskable(self, group: set[int], seeds: dict, mask_keys: dict) -> bool:
        """Whether every mask on the group's masked inputs can be taken off: each self mask, and
        each pair mask with a node outside the group (through either node's mask key)."""
        return group <= seeds.keys() & self.masked.keys() and all(
            u in mask_keys or w in mask_keys for u in group for w in self.held[u] - group
        )

    def unmask(self, group: set[int], seeds: dict, mask_keys: dict) -> list[int]:
        """The sum of the group's masked inputs with every mask taken off, as the coordinator does."""
        config = self.config
        total = MaskSum(sum((self.masked[u] for u in group), np.zeros(config.dim, word(config.bits))), config.bits)
        for u in group:
            total.subtract(_self_mask_key(config, u, seeds[u]))
            for w in self.held[u] - group:
                private, peer = (mask_keys[u], w) if u in mask_keys else (mask_keys[w], u)
                key = _pair_mask_key(config, private, self.advertised[peer].mask_key, u, w)
                if u < w:  # u added it
                    total.subtract(key)
                else:
                    total.add(key)
        return total.reduced().tolist()


def _honest_until_consistency(federation: _Federation, dropouts: dict[int, Stage]) -> _Loot:
    """Run the round honestly up to the consistency request, keeping what a coordinator sees.

    Raises ProtocolAbort when the dropouts end the round first.
    """
    loot = _Loot(federation.config)
    while not isinstance(next(iter(federation.requests.values())), ConsistencyRequest):
        replies = []
        for u, request in federation.requests.items():
            if isinstance(request, MaskedInputRequest):
                loot.held[u] = {share.sender for share in request.shares}
            reply = federation.answer(u, request)
            if isinstance(reply, KeyAdvertisement):
                loot.advertised[u] = reply
            if isinstance(reply, MaskedInputReply):
                loot.masked[u] = reply.masked
            if dropouts.get(u) is not reply.stage:
                replies.append(reply)
        federation.requests = federation.coordinator.handle(replies)
    return loot


def _exact(federation: _Federation, group) -> list[int]:
    return [sum(int(federation.inputs[u][i]) for u in group) % 2**federation.config.bits for i in range(3)]


def test_a_coordinator_leaving_a_survivor_out_gets_only_the_sum_over_the_set_the_others_signed():
    """It holds all six masked inputs but tells nodes 1-5 that only they survived.

    That set is the coordinator's to name (node 6 might have dropped out): every member
    signed it, so the sum over it is released, and node 6's input stays masked.
    """
    federation = _Federation(6)
    assert federation.config.degree == 5 and federation.config.threshold == 4
    loot = _honest_until_consistency(federation, {})
    smaller = (1, 2, 3, 4, 5)
    signatures = {u: federation.answer(u, ConsistencyRequest(smaller)).signature for u in smaller}
    federation.answer(6, federation.requests[6])  # node 6 signs the set it was really in
    request = UnmaskRequest(smaller, tuple(signatures[u] for u in smaller))
    for u in smaller:
        loot.take(federation.answer(u, request))
    with pytest.raises(ProtocolAbort, match="not the one node 6 signed"):
        federation.answer(6, request)
    seeds, mask_keys = loot.rebuild()
    assert set(seeds) == set(smaller) and set(mask_keys) == {6}
    assert loot.unmask(set(smaller), seeds, mask_keys) == _exact(federation, smaller) == [15, 5, 0]
    assert not loot.unmaskable({1, 2, 3, 4, 5, 6}, seeds, mask_keys)


BEFORE_CONSISTENCY = [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT]


def _may_sign(config: RoundConfig, graph: dict, held: dict[int, set[int]], node: int, claim: tuple) -> bool:
    """The documented rule: within the round, holds the node and three nodes, neighbours held."""
    members = set(claim)
    return (
        members <= set(config.node_ids)
        and node in members
        and len(members) >= 3
        and members & graph[node] <= held[node]
    )


def _claimed_sets(data: st.DataObject, real: list[int], outside: list[int]) -> list[tuple[int, ...]]:
    """Up to three lies about S, distinct: S, a part of S, S split in two, S plus other nodes."""
    claims: set[tuple[int, ...]] = set()
    for kind in data.draw(st.lists(st.sampled_from(["real", "part", "split", "more"]), min_size=1, max_size=3)):
        order = data.draw(st.permutations(real), label="order of S")
        if kind == "real":
            claims.add(tuple(real))
        elif kind == "part":  # as small as one node: the attack that reads that node's input
            claims.add(tuple(sorted(order[: data.draw(st.integers(1, len(real)), label="part size")])))
        elif kind == "split":  # two parts of at least 3 where S allows, each may be signed in full
            cut = data.draw(st.integers(min(3, len(real)), max(len(real) - 3, min(3, len(real)))), label="cut")
            claims |= {tuple(sorted(part)) for part in (order[:cut], order[cut:]) if part}
        else:
            extra = data.draw(st.permutations(outside), label="nodes outside S")
            claims.add(tuple(sorted(real + extra[: data.draw(st.integers(1, len(outside)), label="how many")])))
    return sorted(claims)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_coordinator_lying_about_the_survivor_set_unmasks_only_sums_every_member_signed(data):
    """Nodes drop out before masked input; then different nodes are told different sets.

    Either nothing is unmasked, or what is unmasked is exactly a sum over sets every
    member signed; and no node's seed and mask key are ever both rebuilt.
    """
    n = data.draw(st.integers(3, 9), label="n")
    ids = tuple(range(1, n + 1))
    degree = data.draw(st.sampled_from([n - 1, *range(2, n - 1, 2)]), label="degree")
    threshold = degree // 2 + 1 + data.draw(st.integers(0, degree - degree // 2 - 1), label="threshold - minimum")
    config = RoundConfig(
        run_id="liar",
        round=data.draw(st.integers(0, 100), label="round"),
        node_ids=ids,
        graph_seed=data.draw(st.binary(min_size=32, max_size=32), label="graph seed"),
        degree=degree,
        threshold=threshold,
        bits=20,
        dim=3,
    )
    graph = neighbours(ids, config.graph_seed, degree)
    leaving = data.draw(st.permutations(ids))[: data.draw(st.integers(0, n // 3), label="dropout count")]
    dropouts = {u: data.draw(st.sampled_from(BEFORE_CONSISTENCY), label=f"stage node {u} drops in") for u in leaving}
    federation = _Federation(config=config)
    try:
        loot = _honest_until_consistency(federation, dropouts)
    except ProtocolAbort:
        event("aborted before consistency")
        return
    real = set(next(iter(federation.requests.values())).survivors)

    # Different nodes are told different survivor sets, each a subset or a superset of S.
    variants = _claimed_sets(data, sorted(real), sorted(set(ids) - real) + [n + 1])
    plausible = data.draw(st.booleans(), label="each node is told the smallest set of 3 or more that holds it")
    signed: dict[int, tuple[int, ...]] = {}
    signatures: dict[tuple[int, ...], dict[int, bytes]] = defaultdict(dict)
    for u in sorted(loot.held):
        mine = [v for v in variants if u in v]
        if mine and plausible:
            claim = min(mine, key=lambda v: (len(v) < 3, len(v)))
        else:
            claim = data.draw(st.sampled_from(variants), label=f"set told to node {u}")
        try:
            reply = federation.answer(u, ConsistencyRequest(claim))
        except ProtocolAbort:
            assert not _may_sign(config, graph, loot.held, u, claim)
            continue
        assert _may_sign(config, graph, loot.held, u, claim)
        signed[u] = claim
        signatures[claim][u] = reply.signature
    complete = {claim for claim, by in signatures.items() if set(by) == set(claim)}

    # Unmask: the nodes that signed one set are all sent one of the claimed sets, with the
    # members' signatures on it where they gave one, else on their own set, else none.
    own = data.draw(st.booleans(), label="each node is sent the set it signed")
    sent = {
        claim: claim if own else data.draw(st.sampled_from(variants), label=f"set sent to the signers of {claim}")
        for claim in sorted(set(signed.values()))
    }
    for u, claim in signed.items():
        given_by = {v: signatures[signed[v]][v] for v in signed} | signatures[sent[claim]]
        request = UnmaskRequest(sent[claim], tuple(given_by.get(v, bytes(64)) for v in sent[claim]))
        if request.survivors != claim or claim not in complete:
            with pytest.raises((ProtocolAbort, InvalidSignatureError)):
                federation.answer(u, request)
            continue
        reply = federation.answer(u, request)
        assert {s.owner for s in reply.seed_shares} == loot.held[u] & set(claim)
        assert {s.owner for s in reply.key_shares} == loot.held[u] - set(claim)
        loot.take(reply)

    seeds, mask_keys = loot.rebuild()
    assert not seeds.keys() & mask_keys.keys()
    # Any group whose sum it can unmask is a union of sets every member signed ...
    candidates = sorted(seeds.keys() & loot.masked.keys())
    for size in range(1, len(candidates) + 1):
        for group in map(set, itertools.combinations(candidates, size)):
            if loot.unmaskable(group, seeds, mask_keys):
                assert all(signed.get(u) in complete and set(signed[u]) <= group for u in group), (group, signed)
    # ... and what it unmasks of such a set is exactly that set's sum.
    event(f"{len(complete)} fully signed set(s)")
    for claim in complete:
        if loot.unmaskable(set(claim), seeds, mask_keys):
            event(f"summed over {'S' if set(claim) == real else 'a set other than S'}")
            assert loot.unmask(set(claim), seeds, mask_keys) == _exact(federation, claim)
