"""The messages of one SecAgg+ round, and the round's public configuration.

Frozen dataclasses that validate their own field types. ``to_dict`` gives a flat dict of
ints, strs, bytes and lists of those (plus, for a masked input, one numpy array of 32- or
64-bit words), so a binding can put it into Flower ConfigRecords and ArrayRecords as it is;
``from_dict`` is its strict inverse. ``request_from_dict`` and ``reply_from_dict`` are
the boundary: anything malformed there becomes a ``ProtocolAbort``. What a node signs
(its keys, the survivor set) is ``crypto.canonical`` bytes from ``signed_bytes``, never
the dict, so no change of wire format can change a signature's meaning.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, ClassVar, NamedTuple

import numpy as np

from fedcost.errors import ProtocolAbort
from fedcost.secagg import graph
from fedcost.secagg.crypto import KEY_SIZE, PROTOCOL, canonical, check_run_id
from fedcost.secagg.prg import WORDS
from fedcost.secagg.quantize import MAX_BITS


class Stage(StrEnum):
    """Stages of a round, in order; a message belongs to exactly one."""

    SETUP = "setup"
    ADVERTISE_KEYS = "advertise-keys"
    SHARE_KEYS = "share-keys"
    MASKED_INPUT = "masked-input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"


def _check_int(name: str, value: Any, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def _check_bytes(name: str, value: Any, size: int | None = None) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
    if size is not None and len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")


def _check_tuple(name: str, value: Any, item_type: type) -> None:
    if not isinstance(value, tuple) or not all(isinstance(item, item_type) for item in value):
        raise TypeError(f"{name} must be a tuple of {item_type.__name__}")


def _check_node_ids(name: str, value: Any) -> None:
    _check_tuple(name, value, int)
    for node in value:
        _check_int(f"{name} entry", node, minimum=1)
    if list(value) != sorted(set(value)):
        raise ValueError(f"{name} must be sorted and distinct")


def _check_keys(data: Mapping[str, Any], cls: type[_Message], keys: tuple[str, ...]) -> None:
    """Check that ``data`` is a ``cls`` message with exactly ``keys``; unknown keys are refused."""
    if data.get("stage") != cls.stage.value:
        raise ValueError(f"{cls.__name__} has stage {cls.stage.value}, got {data.get('stage')!r}")
    if set(data) != {"stage", *keys}:
        raise ValueError(f"{cls.__name__} needs keys {sorted(keys)}, got {sorted(set(data) - {'stage'})}")


class _Message:
    stage: ClassVar[Stage]

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage.value, **self._payload()}

    def _payload(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class RoundConfig:
    """Public parameters of one round; every node checks them before it takes part."""

    run_id: str
    round: int
    node_ids: tuple[int, ...]
    graph_seed: bytes
    degree: int
    threshold: int
    bits: int
    dim: int

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        _check_int("round", self.round)
        _check_node_ids("node_ids", self.node_ids)
        _check_bytes("graph_seed", self.graph_seed, KEY_SIZE)
        _check_int("degree", self.degree, minimum=1)
        _check_int("threshold", self.threshold, minimum=1)
        _check_int("bits", self.bits, minimum=1)
        _check_int("dim", self.dim, minimum=1)
        n = len(self.node_ids)
        if n < 2 or self.degree > n - 1:
            raise ValueError(f"degree {self.degree} does not fit {n} nodes")
        if self.degree < n - 1 and self.degree % 2:
            raise ValueError(f"a sparse graph needs an even degree, got {self.degree}")
        if not self.degree // 2 < self.threshold <= self.degree:
            raise ValueError(
                f"threshold must be a strict majority of the {self.degree} neighbours "
                f"and at most {self.degree}, got {self.threshold}"
            )
        if self.bits > MAX_BITS:
            raise ValueError(f"bits must be at most {MAX_BITS}, got {self.bits}")

    @classmethod
    def create(
        cls,
        *,
        run_id: str,
        round: int,
        node_ids: Iterable[int],
        dim: int,
        bits: int,
        dropout_tolerance: float = graph.DEFAULT_DROPOUT_TOLERANCE,
    ) -> RoundConfig:
        """A config with degree and threshold from ``graph``'s rule and a fresh graph seed."""
        ids = tuple(sorted(node_ids))
        degree = graph.choose_degree(len(ids), dropout_tolerance)
        return cls(
            run_id=run_id,
            round=round,
            node_ids=ids,
            graph_seed=secrets.token_bytes(KEY_SIZE),
            degree=degree,
            threshold=graph.choose_threshold(degree, dropout_tolerance),
            bits=bits,
            dim=dim,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "round": self.round,
            "node_ids": list(self.node_ids),
            "graph_seed": self.graph_seed,
            "degree": self.degree,
            "threshold": self.threshold,
            "bits": self.bits,
            "dim": self.dim,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundConfig:
        return cls(**{**data, "node_ids": tuple(data["node_ids"])})  # unknown keys: TypeError


_CONFIG_KEYS = tuple(f.name for f in fields(RoundConfig))


@dataclass(frozen=True)
class SetupRequest(_Message):
    """Coordinator to node: the round's configuration."""

    stage: ClassVar[Stage] = Stage.SETUP
    config: RoundConfig

    def __post_init__(self) -> None:
        if not isinstance(self.config, RoundConfig):
            raise TypeError(f"config must be a RoundConfig, got {type(self.config).__name__}")

    def _payload(self) -> dict[str, Any]:
        return self.config.to_dict()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SetupRequest:
        _check_keys(data, cls, _CONFIG_KEYS)
        return cls(RoundConfig.from_dict({key: data[key] for key in _CONFIG_KEYS}))


@dataclass(frozen=True)
class KeyAdvertisement(_Message):
    """Node to coordinator (and on to its neighbours): its two public keys, signed."""

    stage: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    node_id: int
    mask_key: bytes
    share_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_int("node_id", self.node_id, minimum=1)
        _check_bytes("mask_key", self.mask_key, KEY_SIZE)
        _check_bytes("share_key", self.share_key, KEY_SIZE)
        _check_bytes("signature", self.signature)

    def signed_bytes(self, run_id: str, round_number: int) -> bytes:
        """What the node's identity key signs: the keys bound to node, run and round."""
        return canonical(PROTOCOL, "advertise", run_id, round_number, self.node_id, self.mask_key, self.share_key)

    def _payload(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "mask_key": self.mask_key,
            "share_key": self.share_key,
            "signature": self.signature,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyAdvertisement:
        _check_keys(data, cls, ("node_id", "mask_key", "share_key", "signature"))
        return cls(data["node_id"], data["mask_key"], data["share_key"], data["signature"])


@dataclass(frozen=True)
class ShareKeysRequest(_Message):
    """Coordinator to node: the key advertisements of its neighbours still in the round."""

    stage: ClassVar[Stage] = Stage.SHARE_KEYS
    advertisements: tuple[KeyAdvertisement, ...]

    def __post_init__(self) -> None:
        _check_tuple("advertisements", self.advertisements, KeyAdvertisement)

    def _payload(self) -> dict[str, Any]:
        ads = self.advertisements
        return {
            "node_ids": [ad.node_id for ad in ads],
            "mask_keys": [ad.mask_key for ad in ads],
            "share_keys": [ad.share_key for ad in ads],
            "signatures": [ad.signature for ad in ads],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShareKeysRequest:
        keys = ("node_ids", "mask_keys", "share_keys", "signatures")
        _check_keys(data, cls, keys)
        columns = [data[key] for key in keys]
        if len({len(column) for column in columns}) != 1:
            raise ValueError("advertisement columns differ in length")
        return cls(tuple(KeyAdvertisement(*row) for row in zip(*columns)))


@dataclass(frozen=True)
class EncryptedShare:
    """A node's shares for one neighbour, readable only by that neighbour."""

    sender: int
    recipient: int
    ciphertext: bytes

    def __post_init__(self) -> None:
        _check_int("sender", self.sender, minimum=1)
        _check_int("recipient", self.recipient, minimum=1)
        _check_bytes("ciphertext", self.ciphertext)


def _shares_to_dict(shares: tuple[EncryptedShare, ...]) -> dict[str, Any]:
    return {
        "senders": [s.sender for s in shares],
        "recipients": [s.recipient for s in shares],
        "ciphertexts": [s.ciphertext for s in shares],
    }


def _shares_from_dict(data: Mapping[str, Any]) -> tuple[EncryptedShare, ...]:
    columns = [data["senders"], data["recipients"], data["ciphertexts"]]
    if len({len(column) for column in columns}) != 1:
        raise ValueError("share columns differ in length")
    return tuple(EncryptedShare(*row) for row in zip(*columns))


_SHARE_KEYS = ("senders", "recipients", "ciphertexts")


@dataclass(frozen=True)
class ShareKeysReply(_Message):
    """Node to coordinator: its encrypted shares, one per neighbour, to route."""

    stage: ClassVar[Stage] = Stage.SHARE_KEYS
    node_id: int
    shares: tuple[EncryptedShare, ...]

    def __post_init__(self) -> None:
        _check_int("node_id", self.node_id, minimum=1)
        _check_tuple("shares", self.shares, EncryptedShare)

    def _payload(self) -> dict[str, Any]:
        return {"node_id": self.node_id, **_shares_to_dict(self.shares)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShareKeysReply:
        _check_keys(data, cls, ("node_id", *_SHARE_KEYS))
        return cls(data["node_id"], _shares_from_dict(data))


@dataclass(frozen=True)
class MaskedInputRequest(_Message):
    """Coordinator to node: the encrypted shares its neighbours addressed to it."""

    stage: ClassVar[Stage] = Stage.MASKED_INPUT
    shares: tuple[EncryptedShare, ...]

    def __post_init__(self) -> None:
        _check_tuple("shares", self.shares, EncryptedShare)

    def _payload(self) -> dict[str, Any]:
        return _shares_to_dict(self.shares)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MaskedInputRequest:
        _check_keys(data, cls, _SHARE_KEYS)
        return cls(_shares_from_dict(data))


@dataclass(frozen=True, eq=False)
class MaskedInputReply(_Message):
    """Node to coordinator: its input plus masks, mod 2**bits."""

    stage: ClassVar[Stage] = Stage.MASKED_INPUT
    node_id: int
    masked: np.ndarray

    def __post_init__(self) -> None:
        _check_int("node_id", self.node_id, minimum=1)
        if not isinstance(self.masked, np.ndarray) or self.masked.dtype not in WORDS or self.masked.ndim != 1:
            raise TypeError("masked must be a one-dimensional uint32 or uint64 numpy array")

    def _payload(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "masked": self.masked}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MaskedInputReply:
        _check_keys(data, cls, ("node_id", "masked"))
        return cls(data["node_id"], data["masked"])


def _survivor_set_bytes(run_id: str, round_number: int, survivors: tuple[int, ...]) -> bytes:
    return canonical(PROTOCOL, "survivors", run_id, round_number, *survivors)


@dataclass(frozen=True)
class ConsistencyRequest(_Message):
    """Coordinator to node: the survivor set S, the nodes whose masked inputs it holds."""

    stage: ClassVar[Stage] = Stage.CONSISTENCY
    survivors: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_node_ids("survivors", self.survivors)

    def signed_bytes(self, run_id: str, round_number: int) -> bytes:
        """What a member's identity key signs: the survivor set bound to run and round."""
        return _survivor_set_bytes(run_id, round_number, self.survivors)

    def _payload(self) -> dict[str, Any]:
        return {"survivors": list(self.survivors)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConsistencyRequest:
        _check_keys(data, cls, ("survivors",))
        return cls(tuple(data["survivors"]))


@dataclass(frozen=True)
class ConsistencyReply(_Message):
    """Node to coordinator: its identity-key signature over the survivor set it was sent."""

    stage: ClassVar[Stage] = Stage.CONSISTENCY
    node_id: int
    signature: bytes

    def __post_init__(self) -> None:
        _check_int("node_id", self.node_id, minimum=1)
        _check_bytes("signature", self.signature)

    def _payload(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "signature": self.signature}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConsistencyReply:
        _check_keys(data, cls, ("node_id", "signature"))
        return cls(data["node_id"], data["signature"])


@dataclass(frozen=True)
class UnmaskRequest(_Message):
    """Coordinator to node: the signed survivor set S and every member's signature, in S's order.

    Each node derives its own split from S: a neighbour in S survived, one outside it dropped.
    """

    stage: ClassVar[Stage] = Stage.UNMASK
    survivors: tuple[int, ...]
    signatures: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_node_ids("survivors", self.survivors)
        _check_tuple("signatures", self.signatures, bytes)
        if len(self.signatures) != len(self.survivors):
            raise ValueError(
                f"signatures must be one per survivor, got {len(self.signatures)} for {len(self.survivors)} survivors"
            )

    def signed_bytes(self, run_id: str, round_number: int) -> bytes:
        """What each member signed: the same bytes as ``ConsistencyRequest.signed_bytes``."""
        return _survivor_set_bytes(run_id, round_number, self.survivors)

    def _payload(self) -> dict[str, Any]:
        return {"survivors": list(self.survivors), "signatures": list(self.signatures)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnmaskRequest:
        _check_keys(data, cls, ("survivors", "signatures"))
        return cls(tuple(data["survivors"]), tuple(data["signatures"]))


class RevealedShare(NamedTuple):
    """One Shamir share of a neighbour's secret, revealed to the coordinator."""

    owner: int
    x: int
    value: bytes


def _revealed_to_dict(prefix: str, shares: tuple[RevealedShare, ...]) -> dict[str, Any]:
    return {
        f"{prefix}_owners": [s.owner for s in shares],
        f"{prefix}_xs": [s.x for s in shares],
        f"{prefix}_values": [s.value for s in shares],
    }


def _revealed_from_dict(prefix: str, data: Mapping[str, Any]) -> tuple[RevealedShare, ...]:
    columns = [data[f"{prefix}_owners"], data[f"{prefix}_xs"], data[f"{prefix}_values"]]
    if len({len(column) for column in columns}) != 1:
        raise ValueError(f"{prefix} share columns differ in length")
    return tuple(RevealedShare(*row) for row in zip(*columns))


@dataclass(frozen=True)
class UnmaskReply(_Message):
    """Node to coordinator: seed shares of neighbours in the signed set, key shares of the others."""

    stage: ClassVar[Stage] = Stage.UNMASK
    node_id: int
    seed_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]

    def __post_init__(self) -> None:
        _check_int("node_id", self.node_id, minimum=1)
        for name in ("seed_shares", "key_shares"):
            shares = getattr(self, name)
            _check_tuple(name, shares, RevealedShare)
            for owner, x, value in shares:
                _check_int(f"{name} owner", owner, minimum=1)
                _check_int(f"{name} x", x, minimum=1)
                _check_bytes(f"{name} value", value)

    def _payload(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            **_revealed_to_dict("seed", self.seed_shares),
            **_revealed_to_dict("key", self.key_shares),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnmaskReply:
        keys = [f"{p}_{c}" for p in ("seed", "key") for c in ("owners", "xs", "values")]
        _check_keys(data, cls, ("node_id", *keys))
        return cls(data["node_id"], _revealed_from_dict("seed", data), _revealed_from_dict("key", data))


Request = SetupRequest | ShareKeysRequest | MaskedInputRequest | ConsistencyRequest | UnmaskRequest
Reply = KeyAdvertisement | ShareKeysReply | MaskedInputReply | ConsistencyReply | UnmaskReply

_REQUESTS: dict[str, type[_Message]] = {
    cls.stage.value: cls
    for cls in (SetupRequest, ShareKeysRequest, MaskedInputRequest, ConsistencyRequest, UnmaskRequest)
}
_REPLIES: dict[str, type[_Message]] = {
    cls.stage.value: cls for cls in (KeyAdvertisement, ShareKeysReply, MaskedInputReply, ConsistencyReply, UnmaskReply)
}


def _from_dict(kinds: Mapping[str, type[_Message]], data: Mapping[str, Any], what: str) -> Any:
    stage = data.get("stage") if isinstance(data, Mapping) else None
    if stage not in kinds:
        raise ProtocolAbort(f"no secure-aggregation {what} has stage {stage!r}")
    try:
        return kinds[stage].from_dict(data)  # type: ignore[attr-defined]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolAbort(f"malformed {stage} {what}: {exc}") from exc


def request_from_dict(data: Mapping[str, Any]) -> Request:
    """The request a node received, from its dict; ProtocolAbort if malformed."""
    return _from_dict(_REQUESTS, data, "request")


def reply_from_dict(data: Mapping[str, Any]) -> Reply:
    """The reply the coordinator received, from its dict; ProtocolAbort if malformed."""
    return _from_dict(_REPLIES, data, "reply")


def reply_kind(request: Request) -> type[Reply]:
    """The reply a node owes ``request``: its key advertisement to a setup, else that stage's reply."""
    stage = Stage.ADVERTISE_KEYS if request.stage is Stage.SETUP else request.stage
    return _REPLIES[stage.value]  # type: ignore[return-value]
