"""Attacks on a SecAgg+ round: each test names what a coordinator (or network) tries."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcost.errors import InvalidSignatureError, ProtocolAbort
from fedcost.secagg import (
    Coordinator,
    EncryptedShare,
    MaskedInputRequest,
    Node,
    RoundConfig,
    ShareKeysRequest,
    Stage,
    UnmaskRequest,
    crypto,
    shamir,
)
from fedcost.secagg.prg import word


class _Federation:
    """Five nodes and a coordinator; the test plays the network in between."""

    def __init__(self, n: int = 5, round_number: int = 1, keys: dict | None = None):
        ids = tuple(range(1, n + 1))
        self.config = RoundConfig.create(run_id="attack", round=round_number, node_ids=ids, dim=3, bits=20)
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
    ads = tuple(
        dataclasses.replace(ad, **fields) if ad.node_id == victim else ad for ad in request.advertisements
    )
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


def test_coordinator_lying_about_a_node_gets_fewer_than_threshold_shares_of_each_kind():
    """It tells half of node 1's neighbours that 1 survived and half that 1 dropped."""
    federation = _Federation()
    for _ in range(3):
        federation.step()
    assert federation.config.degree == 4 and federation.config.threshold == 3
    seed_shares, key_shares = [], []
    for u, claim in [(2, "survived"), (3, "survived"), (4, "dropped"), (5, "dropped")]:
        others = tuple(v for v in range(2, 6) if v != u)
        if claim == "survived":
            request = UnmaskRequest(survivors=tuple(sorted((1, *others))), dropped=())
        else:
            request = UnmaskRequest(survivors=others, dropped=(1,))
        reply = federation.answer(u, request)
        seed_shares += [(s.x, s.value) for s in reply.seed_shares if s.owner == 1]
        key_shares += [(s.x, s.value) for s in reply.key_shares if s.owner == 1]
    assert len(seed_shares) == len(key_shares) == 2 < federation.config.threshold
    for shares in (seed_shares, key_shares):
        with pytest.raises(ValueError, match="need 3 shares"):
            shamir.combine(shares, federation.config.threshold)


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
    assert federation.coordinator.result.included == (1, 2, 4, 5)
    assert federation.coordinator.result.total.tolist() == [1 + 2 + 4 + 5, 4, 0]
