"""A private intersection-sum between one hospital and one payer, relayed by the coordinator.

The hospital H holds items A (patient key, day); the payer P holds items B, each with a
cost. The coordinator C learns Σ cost(b) over b ∈ A ∩ B and nothing else of either set's
content; neither party learns the other's items. Diffie–Hellman PSI with commutative
blinding (Huberman–Franklin–Hogg 1999; the intersection-sum of Ion et al., "On Deploying
Secure Computing: Private Intersection-Sum-with-Cardinality", 2020), with the sum done by
additive secret sharing in place of Paillier:

1. H hashes each item to the curve, blinds it with a fresh secret a and sends the
   shuffled set {h(x)^a}, with a fresh X25519 key for the answer, signed (``Offer``).
2. P checks H's signature, blinds it again: {h(x)^ab}, shuffled. For each own item y it
   sends h(y)^b, a tag h'(key(y))^b naming its patient under a pseudonym that only this
   session uses, and s1(y), where cost(y) = s1(y) + s2(y) mod 2^64 with s1 uniformly
   random; all of it sealed for H and signed (``Answer``). The s2 go to C, in the same
   shuffled order (``Shares``).
3. H raises each h(y)^b to a, finds the positions J whose h(y)^ab is in {h(x)^ab}, counts
   the distinct tags at J (the patients the sum describes) and, if there are at least
   min_cohort of them, sends J and Σ_J s1 to C (``Report``); otherwise it withholds.
4. C adds Σ_J s2 to H's sum: the episode cost P adds at H, in cents.

The group: X25519 (RFC 7748) from ``cryptography``. x([a]·[b]U) = x([b]·[a]U), so
blinding commutes on x-coordinates; items hash (SHA-512, domain-separated) to a field
element u, which is an x-coordinate on Curve25519 or on its quadratic twist. Both have a
large prime-order subgroup (cofactors 8 and 4) and X25519 clamps scalars to multiples of 8,
so a blinded value lies in the prime-order subgroup of one of the two; Curve25519 is
twist-secure, so the decisional Diffie–Hellman assumption this PSI rests on holds on
either side. A point of small order from a peer gives an all-zero result, which
``cryptography`` refuses: the exchange aborts.

Leakage (message sizes included): P learns |A|. H learns |B|, |A ∩ B|, and for each of P's
items its session pseudonym (so how many days P paid for per patient, unlinkable to H's
own keys and to other sessions), and how many patients the sum describes. C learns |A|,
|B|, |A ∩ B| (the size of J) and the sum; J itself is a set of positions in an order P
shuffled. Assumptions: C colludes with neither party of a session (C with P would read
H's matched positions against P's order; C with H would read s1 and s2, so every one of
P's costs); H lists only its own stays' windows (it signs its offer, which its audit log
keeps). A coordinator acting alone cannot make H intersect with a set of its choosing
(the answer must carry P's signature over this session) nor make P answer a set of its
choosing (the offer must carry H's); an honest payer whose overlap is a handful of
patients is withheld at H under the small-cell rule.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedcost.errors import PolicyViolationError, ProtocolAbort
from fedcost.linkage.windows import Item
from fedcost.secagg.crypto import (
    agree,
    canonical,
    decrypt,
    derive_key,
    encrypt,
    load_agreement_key,
    private_bytes,
    public_bytes,
    sign,
    verify,
)

PROTOCOL = b"fedcost/episode-intersection-sum/v1"
POINT = 32
SHARE = 8
MODULUS = 2**64
_FIELD = 2**255 - 19
_ITEM = b"fedcost/episode-item/v1"
_PATIENT = b"fedcost/episode-patient/v1"


@dataclass(frozen=True)
class Session:
    """One hospital–payer intersection-sum of one run; every message is bound to it."""

    run_id: str
    hospital: str
    payer: str

    def context(self, message: str) -> bytes:
        return canonical(PROTOCOL, message, self.run_id, self.hospital, self.payer)


@dataclass(frozen=True)
class Offer:
    """H to P: H's items blinded once, shuffled, and H's key for sealing the answer."""

    session: Session
    reply_key: bytes
    items: bytes
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return canonical(self.session.context("offer"), self.reply_key, self.items)


@dataclass(frozen=True)
class Answer:
    """P to H, sealed for H: H's items blinded twice, P's items with tags and first shares."""

    session: Session
    sender_key: bytes
    sealed: bytes
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return canonical(self.session.context("answer"), self.sender_key, self.sealed)


@dataclass(frozen=True)
class Shares:
    """P to C: the second share of each of P's items, in the order P sent them to H."""

    session: Session
    shares: bytes
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return canonical(self.session.context("shares"), self.shares)


@dataclass(frozen=True)
class Report:
    """H to C: the matched positions and the sum of their first shares, or why H withholds."""

    session: Session
    positions: tuple[int, ...]
    share_sum: int
    withheld: bool = False
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        positions = np.asarray(self.positions, dtype="<u4").tobytes()
        return canonical(self.session.context("report"), positions, self.share_sum, int(self.withheld))


def item_bytes(item: Item) -> bytes:
    key, day = item
    return canonical(key, day)


def hash_to_curve(domain: bytes, data: bytes) -> bytes:
    """A field element from SHA-512 (bias 2^-257): an X25519 u-coordinate (curve or twist)."""
    digest = hashlib.sha512(canonical(domain, data)).digest()
    return (int.from_bytes(digest, "little") % _FIELD).to_bytes(POINT, "little")


class Blinding:
    """A fresh secret exponent: raises points to it (X25519 scalar multiplication)."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._key = X25519PrivateKey.generate() if secret is None else X25519PrivateKey.from_private_bytes(secret)

    def secret(self) -> bytes:
        return private_bytes(self._key)

    def apply(self, points: Iterable[bytes]) -> list[bytes]:
        try:
            return [self._key.exchange(X25519PublicKey.from_public_bytes(point)) for point in points]
        except ValueError:  # a point of small order: its multiple is zero
            raise ProtocolAbort("a peer sent a curve point of small order; the intersection-sum stops") from None


def _points(data: bytes, what: str) -> list[bytes]:
    if len(data) % POINT:
        raise ProtocolAbort(f"the {what} are not whole curve points; the intersection-sum stops")
    return [data[i : i + POINT] for i in range(0, len(data), POINT)]


def _shuffled(values: Sequence) -> list:
    order = list(range(len(values)))
    secrets.SystemRandom().shuffle(order)
    return [values[i] for i in order]


def _split(fields: bytes, count: int) -> list[bytes]:
    """The inverse of ``canonical`` for ``count`` fields; a malformed text aborts."""
    out, at = [], 0
    for _ in range(count):
        size = int.from_bytes(fields[at : at + 4], "big")
        if at + 4 + size > len(fields):
            raise ProtocolAbort("a sealed message is malformed; the intersection-sum stops")
        out.append(fields[at + 4 : at + 4 + size])
        at += 4 + size
    if at != len(fields):
        raise ProtocolAbort("a sealed message is malformed; the intersection-sum stops")
    return out


def _seal_key(session: Session, secret: bytes) -> bytes:
    return derive_key(secret, session.context("seal"))


class HospitalSide:
    """H's half of one session: its offer, then its report on P's answer. Used once."""

    def __init__(
        self,
        session: Session,
        identity: Ed25519PrivateKey,
        payer_identity: Ed25519PublicKey,
        items: Iterable[Item],
        min_cohort: int,
    ):
        self.session, self.identity, self.payer_identity = session, identity, payer_identity
        self.min_cohort = min_cohort
        self._blinding, self._reply = Blinding(), X25519PrivateKey.generate()
        self._items = [hash_to_curve(_ITEM, item_bytes(item)) for item in items]
        self._offered: int | None = None

    def export(self) -> bytes:
        """What H keeps between its offer and its report: both secrets and the offer's size."""
        if self._offered is None:
            raise PolicyViolationError("the site keeps an intersection-sum only between its offer and its report")
        return canonical(self._blinding.secret(), private_bytes(self._reply), self._offered)

    @classmethod
    def restore(
        cls,
        state: bytes,
        session: Session,
        identity: Ed25519PrivateKey,
        payer_identity: Ed25519PublicKey,
        min_cohort: int,
    ) -> HospitalSide:
        """H's side after its offer, from ``export``: ready for the one report."""
        blinding, reply, offered = _split(state, 3)
        side = cls(session, identity, payer_identity, (), min_cohort)
        side._blinding, side._reply = Blinding(blinding), load_agreement_key(reply)
        side._offered = int(offered.decode())
        return side

    def offer(self) -> Offer:
        blinded = self._blinding.apply(_shuffled(self._items))
        self._offered = len(blinded)
        offer = Offer(self.session, public_bytes(self._reply), b"".join(blinded))
        return Offer(offer.session, offer.reply_key, offer.items, sign(self.identity, offer.signed_bytes()))

    def report(self, answer: Answer) -> Report:
        """Which of P's items H also lists, and the sum of their first shares; withheld when
        they describe 1 to ``min_cohort`` - 1 patients. Refuses an answer not P's own."""
        if self._offered is None:
            raise PolicyViolationError("the site answers an intersection-sum only after its own offer, once")
        offered, self._offered = self._offered, None
        if answer.session != self.session:
            raise PolicyViolationError("the answer belongs to another intersection-sum; the site refuses it")
        verify(self.payer_identity, answer.signature, answer.signed_bytes())
        opened = decrypt(_seal_key(self.session, agree(self._reply, answer.sender_key)), answer.sealed, b"")
        doubled, theirs, tags, shares = _split(opened, 4)
        ours = set(_points(doubled, "offered items"))
        if len(ours) != offered:
            raise ProtocolAbort("the payer's answer does not blind exactly the items offered; the sum stops")
        points, tags_ = _points(theirs, "payer's items"), _points(tags, "patient tags")
        firsts = np.frombuffer(shares, dtype="<u8")
        if not len(points) == len(tags_) == len(firsts):
            raise ProtocolAbort("the payer's items, tags and shares do not line up; the sum stops")
        positions = [j for j, point in enumerate(self._blinding.apply(points)) if point in ours]
        patients = len({tags_[j] for j in positions})
        if 0 < patients < self.min_cohort:
            report = Report(self.session, (), 0, withheld=True)
        else:
            total = int(firsts[positions].sum(dtype=np.uint64)) if positions else 0
            report = Report(self.session, tuple(positions), total % MODULUS)
        return Report(
            report.session,
            report.positions,
            report.share_sum,
            report.withheld,
            sign(self.identity, report.signed_bytes()),
        )


def answer_offer(
    offer: Offer,
    session: Session,
    identity: Ed25519PrivateKey,
    hospital_identity: Ed25519PublicKey,
    items: dict[Item, int],
) -> tuple[Answer, Shares]:
    """P's half: blind H's offer again and send its own items, tags and first shares sealed
    for H, and the second shares to C. ``items`` are P's cents per (key, day)."""
    if offer.session != session:
        raise PolicyViolationError("the offer belongs to another intersection-sum; the site refuses it")
    verify(hospital_identity, offer.signature, offer.signed_bytes())
    blinding = Blinding()
    doubled = _shuffled(blinding.apply(_points(offer.items, "offered items")))
    ordered = _shuffled(list(items.items()))
    points = blinding.apply(hash_to_curve(_ITEM, item_bytes(item)) for item, _ in ordered)
    patients = {key: hash_to_curve(_PATIENT, key.encode()) for key in {key for (key, _), _ in ordered}}
    tag_of = dict(zip(patients, blinding.apply(patients.values())))
    tags = [tag_of[key] for (key, _), _ in ordered]
    costs = np.array([cents for _, cents in ordered], dtype=np.uint64)
    firsts = np.frombuffer(secrets.token_bytes(SHARE * len(ordered)), dtype="<u8")
    seconds = costs - firsts  # mod 2^64: numpy's unsigned arithmetic wraps
    sender = X25519PrivateKey.generate()
    sealed = encrypt(
        _seal_key(session, agree(sender, offer.reply_key)),
        canonical(b"".join(doubled), b"".join(points), b"".join(tags), firsts.astype("<u8").tobytes()),
        b"",
    )
    answer = Answer(session, public_bytes(sender), sealed)
    shares = Shares(session, seconds.astype("<u8").tobytes())
    return (
        Answer(session, answer.sender_key, sealed, sign(identity, answer.signed_bytes())),
        Shares(session, shares.shares, sign(identity, shares.signed_bytes())),
    )


def add_up(
    session: Session,
    shares: Shares,
    report: Report,
    payer_identity: Ed25519PublicKey,
    hospital_identity: Ed25519PublicKey,
) -> int | None:
    """C's step: the cents P adds at H, or None where H withheld. Both halves must be signed
    by their senders for this session, and the positions distinct and in range."""
    if shares.session != session or report.session != session:
        raise ProtocolAbort("a share or report belongs to another intersection-sum")
    verify(payer_identity, shares.signature, shares.signed_bytes())
    verify(hospital_identity, report.signature, report.signed_bytes())
    if report.withheld:
        return None
    seconds = np.frombuffer(shares.shares, dtype="<u8")
    positions = np.asarray(report.positions, dtype=np.int64)
    if len(set(report.positions)) != len(positions) or (
        positions.size and not 0 <= positions.min() <= positions.max() < len(seconds)
    ):
        raise ProtocolAbort("the hospital's matched positions are not distinct positions of the payer's items")
    total = (int(seconds[positions].sum(dtype=np.uint64)) + report.share_sum) % MODULUS
    if total >= MODULUS // 2:
        raise ProtocolAbort("the shares do not add up to a cost; a party sent inconsistent shares")
    return total
