"""SecAgg+ primitives: HKDF labels, AEAD, signatures, the mask PRG, Shamir sharing."""

from __future__ import annotations

import contextlib
import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcost.errors import InvalidSignatureError
from fedcost.secagg import crypto, shamir
from fedcost.secagg.prg import MaskSum, expand, word

# --- HKDF labels -------------------------------------------------------------------


def test_labels_differ_by_run_round_purpose_and_nodes():
    base = ("run-1", 3, crypto.PAIRWISE_MASK, 1, 2)
    variants = [
        ("run-2", 3, crypto.PAIRWISE_MASK, 1, 2),
        ("run-1", 4, crypto.PAIRWISE_MASK, 1, 2),
        ("run-1", 3, crypto.SHARE_ENCRYPTION, 1, 2),
        ("run-1", 3, crypto.PAIRWISE_MASK, 1, 3),
        ("run-1", 3, crypto.PAIRWISE_MASK, 2, 1),
        ("run-1", 3, crypto.SELF_MASK, 1),
    ]
    labels = {crypto.label(*args) for args in [base, *variants]}
    assert len(labels) == 1 + len(variants)
    secret = secrets.token_bytes(32)
    keys = {crypto.derive_key(secret, info) for info in labels}
    assert len(keys) == len(labels)


def test_label_spells_out_its_context():
    info = crypto.label("run-1", 3, crypto.PAIRWISE_MASK, 1, 2)
    assert info == b"fedcost/secagg/v1|run=run-1|round=3|purpose=pairwise-mask|a=1|b=2"


@pytest.mark.parametrize("run_id", ["", "a|b", "run=1|round=2", "x" * 129, "caf\u00e9"])
def test_label_refuses_run_ids_that_could_read_alike(run_id):
    with pytest.raises(ValueError, match="run id"):
        crypto.label(run_id, 0, crypto.SELF_MASK, 1)


def test_hkdf_refuses_to_derive_without_a_label():
    with pytest.raises(ValueError, match="label"):
        crypto.derive_key(secrets.token_bytes(32), b"")


def test_canonical_encoding_is_unambiguous():
    assert crypto.canonical(b"ab", b"c") != crypto.canonical(b"a", b"bc")
    assert crypto.canonical("run", 1) != crypto.canonical("run1")


# --- AEAD and signatures: one opaque error -----------------------------------------


def _failure_message(call) -> str:
    with pytest.raises(InvalidSignatureError) as info:
        call()
    return str(info.value)


def test_tampered_or_misaddressed_ciphertext_fails_with_one_opaque_error():
    key, aad = secrets.token_bytes(32), b"sender=1|recipient=2"
    token = crypto.encrypt(key, b"share", aad)
    assert crypto.decrypt(key, token, aad) == b"share"
    flipped = token[:-1] + bytes([token[-1] ^ 1])
    messages = {
        _failure_message(lambda: crypto.decrypt(key, flipped, aad)),
        _failure_message(lambda: crypto.decrypt(key, token, b"sender=2|recipient=1")),
        _failure_message(lambda: crypto.decrypt(secrets.token_bytes(32), token, aad)),
        _failure_message(lambda: crypto.decrypt(key, token[:20], aad)),
    }
    assert messages == {"authentication failed"}


def test_bad_signature_fails_with_the_same_opaque_error():
    identity = Ed25519PrivateKey.generate()
    signature = crypto.sign(identity, b"keys")
    crypto.verify(identity.public_key(), signature, b"keys")
    messages = {
        _failure_message(lambda: crypto.verify(identity.public_key(), signature, b"other keys")),
        _failure_message(lambda: crypto.verify(Ed25519PrivateKey.generate().public_key(), signature, b"keys")),
        _failure_message(lambda: crypto.verify(identity.public_key(), b"short", b"keys")),
    }
    assert messages == {"authentication failed"}


def test_x25519_agreement_is_symmetric():
    a, b = crypto.generate_agreement_key(), crypto.generate_agreement_key()
    assert crypto.agree(a, crypto.public_bytes(b)) == crypto.agree(b, crypto.public_bytes(a))
    rebuilt = crypto.load_agreement_key(crypto.private_bytes(a))
    assert crypto.public_bytes(rebuilt) == crypto.public_bytes(a)


# --- PRG ---------------------------------------------------------------------------


def test_prg_matches_the_aes256_known_answer():
    # AES-256 of the zero block under the zero key (FIPS-197 style known answer):
    # dc95c078a2408989ad48a21492842087, read as two little-endian uint64.
    expected = [int.from_bytes(bytes.fromhex(h), "little") for h in ("dc95c078a2408989", "ad48a21492842087")]
    assert expand(bytes(32), 2, 64).tolist() == expected
    # 32-bit words read the same keystream four bytes at a time
    assert expand(bytes(32), 4, 32).tolist() == [
        int.from_bytes(bytes.fromhex(h), "little") for h in ("dc95c078", "a2408989", "ad48a214", "92842087")
    ]


def test_prg_same_key_same_mask_and_different_label_different_mask():
    secret = secrets.token_bytes(32)
    key = crypto.derive_key(secret, crypto.label("run", 1, crypto.SELF_MASK, 7))
    other = crypto.derive_key(secret, crypto.label("run", 2, crypto.SELF_MASK, 7))
    first = expand(key, 1000, 40)
    assert np.array_equal(first, expand(key, 1000, 40))
    assert not np.array_equal(first, expand(other, 1000, 40))
    assert first.dtype == np.uint64 and first.shape == (1000,)
    assert expand(key, 1000, 32).dtype == np.uint32


@given(bits=st.integers(1, 64), length=st.integers(0, 300))
def test_prg_stays_below_the_modulus(bits, length):
    mask = expand(secrets.token_bytes(32), length, bits)
    assert mask.shape == (length,) and mask.dtype == word(bits)
    assert all(int(v) < 2**bits for v in mask)


def test_prg_uses_every_bit_of_the_key():
    key = bytearray(secrets.token_bytes(32))
    masks = set()
    for byte in (0, 15, 31):  # a folded seed would ignore some of these
        changed = bytearray(key)
        changed[byte] ^= 0x80
        masks.add(expand(bytes(changed), 4, 64).tobytes())
    assert len(masks) == 3


@settings(max_examples=25, deadline=None)
@given(data=st.data(), length=st.integers(1, 70_000), bits=st.integers(1, 64))
def test_mask_sum_equals_adding_every_expansion_one_at_a_time(data, length, bits):
    # 70k entries spans several of MaskSum's chunks, and a last partial one.
    start = expand(secrets.token_bytes(32), length, bits)
    terms = data.draw(st.lists(st.tuples(st.binary(min_size=32, max_size=32), st.booleans()), max_size=5))
    original = start.copy()
    total, expected = MaskSum(start, bits), start.copy()
    full = 8 * word(bits).itemsize  # a whole word of keystream, wrapping at the word's size
    for key, plus in terms:
        (total.add if plus else total.subtract)(key)
        expected = expected + expand(key, length, full) if plus else expected - expand(key, length, full)
    reduced = total.reduced()
    assert reduced.dtype == word(bits)
    assert np.array_equal(reduced, expected & word(bits).type((1 << bits) - 1))
    assert np.array_equal(start, original)  # the start vector is left alone


@pytest.mark.parametrize("key,bits", [(bytes(16), 32), (bytes(32), 0), (bytes(32), 65)])
def test_prg_refuses_short_keys_and_odd_moduli(key, bits):
    with pytest.raises(ValueError):
        expand(key, 4, bits)
    with pytest.raises(ValueError):
        MaskSum(np.zeros(4, np.uint64), bits).add(key)


@pytest.mark.parametrize("dtype,bits", [(np.uint64, 32), (np.uint32, 33), (np.int64, 48)])
def test_mask_sum_refuses_a_start_vector_of_another_word(dtype, bits):
    with pytest.raises(ValueError, match="starts from"):
        MaskSum(np.zeros(4, dtype), bits)


# --- Shamir ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.data(), count=st.integers(1, 20))
def test_any_threshold_shares_recover_the_secret(data, count):
    threshold = data.draw(st.integers(1, count))
    secret = data.draw(st.binary(min_size=32, max_size=32))
    shares = shamir.share(secret, threshold, count)
    chosen = data.draw(st.permutations(shares))[: data.draw(st.integers(threshold, count))]
    assert shamir.combine(chosen, threshold) == secret


def _lagrange_at(points: list[tuple[int, int]], x: int) -> int:
    total = 0
    for i, (xi, yi) in enumerate(points):
        term = yi
        for j, (xj, _) in enumerate(points):
            if j != i:
                term = term * (x - xj) * pow(xi - xj, -1, shamir.PRIME) % shamir.PRIME
        total = (total + term) % shamir.PRIME
    return total


@settings(max_examples=25, deadline=None)
@given(count=st.integers(2, 12), data=st.data())
def test_fewer_than_threshold_shares_fit_every_secret(count, data):
    threshold = data.draw(st.integers(2, count))
    secret, other = secrets.token_bytes(32), secrets.token_bytes(32)
    shares = shamir.share(secret, threshold, count)
    few = shares[: threshold - 1]
    # Recombining t-1 shares as if they were enough does not give the secret.
    with contextlib.suppress(ValueError):
        assert shamir.combine(few, threshold - 1) != secret
    # And t-1 shares are consistent with any other secret: one more point makes it so.
    points = [(0, int.from_bytes(other, "big"))] + [(x, int.from_bytes(v, "big")) for x, v in few]
    forged = (count + 1, _lagrange_at(points, count + 1).to_bytes(shamir.SHARE_SIZE, "big"))
    assert shamir.combine([*few, forged], threshold) == other


def test_sharing_twice_gives_fresh_shares():
    secret = secrets.token_bytes(32)
    assert shamir.share(secret, 3, 5) != shamir.share(secret, 3, 5)


@pytest.mark.parametrize(
    "shares,why",
    [
        ([(1, bytes(66))], "need 2 shares"),
        ([(1, bytes(66)), (1, bytes(66))], "distinct"),
        ([(0, bytes(66)), (1, bytes(66))], "distinct"),
        ([(1, bytes(65)), (2, bytes(66))], "66 bytes"),
        ([(1, b"\xff" * 66), (2, bytes(66))], "field element"),
    ],
)
def test_combine_refuses_malformed_shares(shares, why):
    with pytest.raises(ValueError, match=why):
        shamir.combine(shares, 2)


def test_share_refuses_wrong_sizes():
    with pytest.raises(ValueError):
        shamir.share(b"short", 2, 3)
    with pytest.raises(ValueError):
        shamir.share(bytes(32), 4, 3)
