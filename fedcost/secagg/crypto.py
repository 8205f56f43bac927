"""Cryptographic primitives of SecAgg+, all from pyca/cryptography.

Every derived key carries an HKDF ``info`` label that binds the protocol version, the
run, the round, the purpose and the nodes involved, so a key can never be reused in
another context (Flower's own SecAgg+ derives its keys with ``info=None``). Every
failed signature or tag check raises the same detail-free ``InvalidSignatureError``,
before anything that was signed or encrypted is parsed.
"""

from __future__ import annotations

import os
import re

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcost.errors import InvalidSignatureError, ProtocolAbort

PROTOCOL = b"fedcost/secagg/v1"
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16

PAIRWISE_MASK = "pairwise-mask"
SELF_MASK = "self-mask"
SHARE_ENCRYPTION = "share-encryption"
_PURPOSES = {PAIRWISE_MASK, SELF_MASK, SHARE_ENCRYPTION}

# Run ids go into labels between '|' separators, so they may not contain one.
_RUN_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_AUTHENTICATION_FAILED = "authentication failed"


def check_run_id(run_id: str) -> None:
    """Refuse a run id that could make two labels read alike."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"run id must be 1-128 characters of [A-Za-z0-9._:-], got {run_id!r}")


def label(run_id: str, round_number: int, purpose: str, *nodes: int) -> bytes:
    """The HKDF ``info`` of one key: version, run, round, purpose and its nodes (a, b)."""
    check_run_id(run_id)
    if purpose not in _PURPOSES:
        raise ValueError(f"unknown key purpose {purpose!r}")
    if len(nodes) > 2:
        raise ValueError(f"a key belongs to one or two nodes, got {len(nodes)}")
    fields = [f"run={run_id}", f"round={int(round_number)}", f"purpose={purpose}"]
    fields += [f"{name}={int(node)}" for name, node in zip("ab", nodes)]
    return b"|".join([PROTOCOL, *(field.encode() for field in fields)])


def derive_key(secret: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 of a shared or random secret into a 256-bit key bound to ``info``."""
    if not info:
        raise ValueError("HKDF needs a context label; derive keys with label(...)")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=PROTOCOL, info=info)
    return hkdf.derive(secret)


def canonical(*fields: bytes | str | int) -> bytes:
    """Length-prefixed fields: the one encoding that is signed or authenticated.

    Length prefixes keep two different field lists from giving the same bytes.
    """
    out = bytearray()
    for field in fields:
        data = field if isinstance(field, bytes) else str(field).encode()
        out += len(data).to_bytes(4, "big") + data
    return bytes(out)


def generate_agreement_key() -> X25519PrivateKey:
    """A fresh X25519 key pair for one round (mask agreement or share encryption)."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key that a node advertises."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key, which a node Shamir-shares among its neighbours."""
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def load_agreement_key(raw: bytes) -> X25519PrivateKey:
    """An X25519 private key from its raw bytes, e.g. a dropped node's, reconstructed."""
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """Performs an X25519 exchange with a peer's raw public key."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise ProtocolAbort("a peer's X25519 public key is not usable") from exc


def sign(identity: Ed25519PrivateKey, message: bytes) -> bytes:
    """Signs canonical bytes with a node's long-term identity key."""
    return identity.sign(message)


def verify(identity: Ed25519PublicKey, signature: bytes, message: bytes) -> None:
    """Checks a signature; any failure is the same opaque InvalidSignatureError."""
    try:
        identity.verify(signature, message)
    except InvalidSignature:
        raise InvalidSignatureError(_AUTHENTICATION_FAILED) from None


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """ChaCha20-Poly1305 with a random nonce, returned as nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, token: bytes, associated_data: bytes) -> bytes:
    """Checks the tag, then decrypts; any failure is the same opaque InvalidSignatureError."""
    if len(token) < NONCE_SIZE + TAG_SIZE:
        raise InvalidSignatureError(_AUTHENTICATION_FAILED)
    try:
        return ChaCha20Poly1305(key).decrypt(token[:NONCE_SIZE], token[NONCE_SIZE:], associated_data)
    except InvalidTag:
        raise InvalidSignatureError(_AUTHENTICATION_FAILED) from None
