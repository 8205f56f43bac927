"""Party identities: a name, a role and an Ed25519 key that signs what the party vouches for.

Everything here is pure except ``save``/``load``. A private key is stored as unencrypted
PKCS#8 PEM with file mode 0600 (``<name>.key.pem``); the public part as a small JSON file
(``<name>.pub.json``) that auditors receive. Parsing raises plain ``ValueError`` inside;
the file boundary wraps it once into :class:`~fedcost.errors.ConfigError` naming the file
and the field.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcost.errors import ConfigError, FieldError, InvalidSignatureError

ROLES = ("coordinator", "hospital", "insurer", "pharma", "site")

# Names become file names (``<name>.pub.json``, ``audit/<name>.jsonl``), so no separators.
PARTY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PUBLIC_FIELDS = ("name", "role", "public_key", "key_id")


def check_party_name(
    name: str, *, path: str | None = None, field: str = "name", error: type[ConfigError] = ConfigError
) -> None:
    """Refuse a party name that could not be a file name (``../../evil``) before it is used."""
    if not PARTY_NAME.fullmatch(name):
        raise error(
            f"a party's name becomes a file name: use up to 64 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit, not {name!r}",
            path=path,
            field=field,
        )


def _check_name_and_role(name: object, role: object) -> None:
    if not isinstance(name, str) or not PARTY_NAME.fullmatch(name):
        raise FieldError("name", f"must match {PARTY_NAME.pattern}, got {name!r}")
    if role not in ROLES:
        raise FieldError("role", f"must be one of {', '.join(ROLES)}, got {role!r}")


def _read(path: Path) -> bytes:
    """An identity file's bytes; a missing or unreadable one is a ``ConfigError`` naming it."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"cannot be read ({e.strerror}); restore it from the party's identity folder or startup kit", path=str(path)
        ) from None


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class PublicIdentity:
    """What every other party and the auditor know about a party."""

    name: str
    role: str
    public_key: Ed25519PublicKey

    def __post_init__(self) -> None:
        _check_name_and_role(self.name, self.role)

    @property
    def raw_key(self) -> bytes:
        """The 32 raw public-key bytes, as rosters and SecAgg+ carry them."""
        return _raw(self.public_key)

    @property
    def key_id(self) -> str:
        """SHA-256 (hex) of the raw public key: a short, unforgeable handle for the key."""
        return hashlib.sha256(self.raw_key).hexdigest()

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise ``InvalidSignatureError`` (and say nothing more) unless the signature holds."""
        try:
            self.public_key.verify(signature, message)
        except InvalidSignature:
            raise InvalidSignatureError("signature check failed") from None

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "role": self.role,
            "public_key": base64.b64encode(_raw(self.public_key)).decode("ascii"),
            "key_id": self.key_id,
        }

    @classmethod
    def from_dict(cls, data: Any) -> PublicIdentity:
        """Strict inverse of ``to_dict``: exact fields, 32-byte key, key id that matches it."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        for name in _PUBLIC_FIELDS:
            if name not in data:
                raise FieldError(name, "missing")
        extra = sorted(set(data) - set(_PUBLIC_FIELDS))
        if extra:
            raise FieldError(extra[0], "unexpected field")
        _check_name_and_role(data["name"], data["role"])
        try:
            raw = base64.b64decode(data["public_key"], validate=True)
        except (TypeError, ValueError) as e:  # binascii.Error, non-ASCII text
            raise FieldError("public_key", f"not base64: {e}") from e
        if len(raw) != 32:
            raise FieldError("public_key", f"expected 32 raw Ed25519 bytes, got {len(raw)}")
        identity = cls(data["name"], data["role"], Ed25519PublicKey.from_public_bytes(raw))
        if data["key_id"] != identity.key_id:
            raise FieldError("key_id", f"does not match the key (expected {identity.key_id})")
        return identity

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``<folder>/<name>.pub.json`` and return its path."""
        path = Path(folder) / f"{self.name}.pub.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PublicIdentity:
        """Read a ``.pub.json`` file; any defect is a ``ConfigError`` naming file and field."""
        try:
            return cls.from_dict(json.loads(_read(Path(path))))
        except FieldError as e:
            raise ConfigError(e.reason, path=str(path), field=e.field) from e
        except ValueError as e:
            raise ConfigError(f"not a public identity: {e}", path=str(path)) from e


@dataclass(frozen=True)
class Identity:
    """A party's own identity, private key included. Never leaves the party's premises."""

    name: str
    role: str
    private_key: Ed25519PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        _check_name_and_role(self.name, self.role)

    @classmethod
    def generate(cls, name: str, role: str) -> Identity:
        return cls(name, role, Ed25519PrivateKey.generate())

    @property
    def raw_private_key(self) -> bytes:
        """The 32 raw private-key bytes a node's setup carries into its ClientApp."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def public(self) -> PublicIdentity:
        return PublicIdentity(self.name, self.role, self.private_key.public_key())

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature; callers prefix ``message`` with their own context label."""
        return self.private_key.sign(message)

    def save(self, folder: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``<name>.key.pem`` (mode 0600, never overwritten) and ``<name>.pub.json``."""
        key_path = Path(folder) / f"{self.name}.key.pem"
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # O_EXCL: silently replacing a private key would orphan every log it signed.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return key_path, self.public().save(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], name: str) -> Identity:
        """Read ``<name>.key.pem`` and ``<name>.pub.json`` and check that they belong together."""
        public_path = Path(folder) / f"{name}.pub.json"
        public = PublicIdentity.load(public_path)
        if public.name != name:
            raise ConfigError(f"holds the identity of {public.name!r}", path=str(public_path), field="name")
        key_path = Path(folder) / f"{name}.key.pem"
        try:
            key = serialization.load_pem_private_key(_read(key_path), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise ConfigError(f"not an unencrypted PEM private key: {e}", path=str(key_path)) from e
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"expected an Ed25519 key, got {type(key).__name__}", path=str(key_path))
        if key.public_key() != public.public_key:
            raise ConfigError(f"key does not match {name}.pub.json", path=str(key_path))
        return cls(public.name, public.role, key)
