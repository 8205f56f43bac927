"""Provisioning a federation: its folder, the CA, the coordinator's material, node kits.

The federation folder is the operator's (NVIDIA FLARE calls the same idea a project):

```
NAME/
  federation.toml                  name, coordinator address, certificate lifetime
  ca/ca.key.pem                    the CA key (0600): only provisioning needs it
  ca/ca.cert.pem, ca/revoked.crl.pem, ca/revoked.toml
  coordinator/                     TLS key and certificate, identity key, party certificate
  nodes/<name>/                    what the operator keeps of each node: public parts only
  kits/<name>/                     the startup kit to hand to that site (then delete here)
  runs/<run-id>/, logs/, state/    written by `fedcost coordinator start` and `fedcost run`
```

A startup kit holds the CA certificate, the coordinator's party certificate, the
coordinator address, and the node's own keys and certificate: nothing of any other
party's secrets. Files are checked where they are read; a defect names the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcost.atomic import replace_atomically
from fedcost.audit.authority import TrustedCA
from fedcost.errors import CertificateError, ConfigError, KitError
from fedcost.identity import Identity, PublicIdentity
from fedcost.identity.federation_ca import (
    Authority,
    certificate_from_pem,
    certificate_to_pem,
    check_crl,
    crl_from_pem,
    crl_to_pem,
    party_identity,
    verify_certificate,
)
from fedcost.identity.party import check_party_name
from fedcost.tomlfile import read_table, read_toml
from fedcost.wire import COORDINATOR

CONFIG_FILE = "federation.toml"
KIT_FILE = "kit.toml"
NODE_ROLES = ("hospital", "insurer", "pharma", "site")
# The CA outlives the certificates it issues; the revocation list is re-signed on every
# revocation and lasts as long as the CA.
CA_LIFETIME = timedelta(days=3650)
_ADDRESS = re.compile(r"(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>[0-9]{1,5})")


# A node's pull that finds no message is held at the coordinator for up to so long and
# answered the moment one is stored for it (``fedcost.federation.link.HeldPulls``): the node
# asks again at once, so a message reaches it within milliseconds, not a polling interval.
PULL_HOLD = 1.0


def fleet_address(address: str) -> str:
    """Where the coordinator at ``address`` (``HOST:PORT``) serves its nodes: the port after.

    The federation's port is the operator's (Flower's Control API, used by ``fedcost run``
    and to admit nodes, and the ServerApp's link); the nodes' workers speak Flower's gRPC
    Fleet API on the next one (``fedcost.federation.worker.FleetSession``).
    """
    host, port = address.rsplit(":", 1)
    return f"{host}:{int(port) + 1}"


@dataclass(frozen=True)
class FederationConfig:
    """``federation.toml``: what every command reads about the federation."""

    name: str
    address: str
    bind_host: str = "127.0.0.1"
    cert_days: float = 365.0

    def __post_init__(self) -> None:
        match = _ADDRESS.fullmatch(self.address)
        if not match or not 0 < int(match["port"]) < 65535:
            raise ValueError(
                f"address must be HOST:PORT with PORT below 65535 (the coordinator as sites reach it; "
                f"its nodes use the next port), not {self.address!r}"
            )
        if not self.cert_days > 0:
            raise ValueError(f"cert_days must be positive, not {self.cert_days}")

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def to_dict(self) -> dict:
        return {"name": self.name, "address": self.address, "bind_host": self.bind_host, "cert_days": self.cert_days}

    @classmethod
    def load(cls, path: Path) -> FederationConfig:
        return read_table(cls, read_toml(path, "federation config"), source=str(path))


@dataclass(frozen=True)
class KitFile:
    """``kit.toml``: whom a startup kit is for, and the coordinator and federation it trusts."""

    federation: str
    name: str
    role: str
    address: str
    coordinator_key_id: str


@dataclass(frozen=True)
class Kit:
    """A site's startup kit, as read and checked from its folder."""

    folder: Path
    federation: str
    name: str
    role: str
    address: str
    identity: Identity
    certificate: x509.Certificate
    ca: x509.Certificate
    coordinator: PublicIdentity

    @property
    def auth_key(self) -> Path:
        return self.folder / "auth.key.pem"

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.cert.pem"

    def check_valid(self, *, at: datetime) -> None:
        """The kit's own certificate must still be valid; otherwise say what to do."""
        if at > self.certificate.not_valid_after_utc:
            raise KitError(
                f"the kit of {self.name!r} expired at {self.certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                "ask your federation operator for a new kit",
                path=str(self.folder / "node.cert.pem"),
            )

    @classmethod
    def load(cls, folder: Path) -> Kit:
        """Read every file of the kit; the certificates must match the keys beside them."""
        if not folder.is_dir():
            raise KitError("no such startup kit folder", path=str(folder))
        kit_file = folder / KIT_FILE
        raw = read_table(
            KitFile, read_toml(kit_file, "startup kit file", KitError), source=str(kit_file), error=KitError
        )
        identity = Identity.load(folder, raw.name)
        ca = _read_certificate(folder / "ca.cert.pem")
        certificate = _read_certificate(folder / "node.cert.pem")
        coordinator_cert = _read_certificate(folder / "coordinator.cert.pem")
        if certificate.public_key() != identity.private_key.public_key():
            raise KitError("does not certify this kit's identity key", path=str(folder / "node.cert.pem"))
        for path, cert in (
            (folder / "node.cert.pem", certificate),
            (folder / "coordinator.cert.pem", coordinator_cert),
        ):
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature) as error:
                raise KitError(f"not issued by the kit's CA ({type(error).__name__})", path=str(path)) from None
        coordinator = _bound_identity(coordinator_cert, folder / "coordinator.cert.pem")
        if coordinator.key_id != raw.coordinator_key_id:
            raise KitError(
                "does not match coordinator.cert.pem", path=str(folder / KIT_FILE), field="coordinator_key_id"
            )
        if not (folder / "auth.key.pem").is_file():
            raise KitError("missing: the SuperNode authentication key", path=str(folder / "auth.key.pem"))
        return cls(folder, raw.federation, raw.name, raw.role, raw.address, identity, certificate, ca, coordinator)


@dataclass(frozen=True)
class EnrolledNode:
    """What the operator keeps of a node: its certificate and its SuperNode auth public key."""

    name: str
    certificate: x509.Certificate
    auth_public_key: ec.EllipticCurvePublicKey

    def auth_key_pem(self) -> bytes:
        """The key as Flower's SuperLink registers it (PEM SubjectPublicKeyInfo)."""
        return self.auth_public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class Federation:
    """A federation folder: read, extended (nodes, revocations) and checked."""

    def __init__(self, root: Path, config: FederationConfig):
        self.root = root
        self.config = config

    # -- layout -------------------------------------------------------------------------
    @property
    def ca_cert_file(self) -> Path:
        return self.root / "ca" / "ca.cert.pem"

    @property
    def crl_file(self) -> Path:
        return self.root / "ca" / "revoked.crl.pem"

    @property
    def coordinator_dir(self) -> Path:
        return self.root / COORDINATOR

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "coordinator.log"

    def kit_dir(self, name: str) -> Path:
        return self.root / "kits" / name

    # -- creation -----------------------------------------------------------------------
    @classmethod
    def init(cls, root: Path, config: FederationConfig, *, at: datetime) -> Federation:
        """A new federation folder: CA, empty revocation list, coordinator TLS and identity."""
        if root.exists() and any(root.iterdir()):
            raise ConfigError("the federation folder exists and is not empty; choose another name", path=str(root))
        for sub in ("ca", COORDINATOR, "nodes", "kits", "runs", "logs", "state"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        authority = Authority.generate(config.name, lifetime=CA_LIFETIME, at=at)
        _write_private(root / "ca" / "ca.key.pem", _private_pem(authority.key))
        (root / "ca" / "ca.cert.pem").write_bytes(certificate_to_pem(authority.certificate))
        (root / "ca" / "revoked.toml").write_text("")
        federation = cls(root, config)
        federation._write_crl(authority, {}, at)
        lifetime = timedelta(days=config.cert_days)
        tls_key, tls_cert = authority.issue_tls([config.host, "127.0.0.1", "localhost"], lifetime=lifetime, at=at)
        _write_private(root / COORDINATOR / "tls.key.pem", _private_pem(tls_key))
        (root / COORDINATOR / "tls.cert.pem").write_bytes(certificate_to_pem(tls_cert))
        identity = Identity.generate(COORDINATOR, "coordinator")
        identity.save(root / COORDINATOR)
        party = authority.issue_party(identity.public(), lifetime=lifetime, at=at)
        (root / COORDINATOR / "coordinator.cert.pem").write_bytes(certificate_to_pem(party))
        (root / CONFIG_FILE).write_bytes(tomli_w.dumps(config.to_dict()).encode())
        return federation

    @classmethod
    def load(cls, root: Path) -> Federation:
        if not (root / CONFIG_FILE).is_file():
            raise ConfigError(
                f"not a federation folder (no {CONFIG_FILE}); create one with `fedcost federation init`", path=str(root)
            )
        return cls(root, FederationConfig.load(root / CONFIG_FILE))

    def add_node(self, name: str, role: str, *, at: datetime, days: float | None = None) -> Path:
        """Enrol a node: identity, SuperNode auth key, certificate; returns its startup kit folder."""
        check_party_name(name)
        if role not in NODE_ROLES:
            raise ConfigError(f"must be one of {', '.join(NODE_ROLES)}, not {role!r}", field="role")
        keep = self.root / "nodes" / name
        if name == COORDINATOR or keep.exists():
            raise ConfigError(f"a party named {name!r} is already enrolled; pick another name", path=str(keep))
        try:
            identity = Identity.generate(name, role)
        except ValueError as error:
            raise ConfigError(str(error), field="name") from None
        lifetime = timedelta(days=self.config.cert_days if days is None else days)
        if lifetime <= timedelta(0):
            raise ConfigError(f"a certificate lifetime must be positive, not {days} days", field="days")
        certificate = self._authority().issue_party(identity.public(), lifetime=lifetime, at=at)
        auth_key = ec.generate_private_key(ec.SECP384R1())
        auth_public = auth_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        kit = self.kit_dir(name)
        kit.mkdir(parents=True)
        keep.mkdir(parents=True)
        identity.save(kit)
        _write_private(
            kit / "auth.key.pem",
            auth_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        for folder in (kit, keep):
            (folder / "node.cert.pem").write_bytes(certificate_to_pem(certificate))
            (folder / "auth.pub").write_bytes(auth_public)
        identity.public().save(keep)
        shutil.copyfile(self.ca_cert_file, kit / "ca.cert.pem")
        shutil.copyfile(self.coordinator_dir / "coordinator.cert.pem", kit / "coordinator.cert.pem")
        coordinator = PublicIdentity.load(self.coordinator_dir / "coordinator.pub.json")
        kit_file = KitFile(self.config.name, name, role, self.config.address, coordinator.key_id)
        (kit / KIT_FILE).write_bytes(tomli_w.dumps(dataclasses.asdict(kit_file)).encode())
        return kit

    def revoke(self, name: str, *, at: datetime) -> None:
        """Put the node's certificate on the CA-signed revocation list."""
        node = self.node(name)
        revoked = self._revoked()
        revoked[str(node.certificate.serial_number)] = {"name": name, "at": at}
        (self.root / "ca" / "revoked.toml").write_bytes(tomli_w.dumps(revoked).encode())
        self._write_crl(self._authority(), {int(s): v["at"] for s, v in revoked.items()}, at)

    # -- reading ------------------------------------------------------------------------
    def ca_certificate(self) -> x509.Certificate:
        return _read_certificate(self.ca_cert_file)

    def party_certificate(self, party: str) -> Path:
        """Where this folder keeps ``party``'s certificate."""
        if party == COORDINATOR:
            return self.coordinator_dir / f"{COORDINATOR}.cert.pem"
        return self.root / "nodes" / party / "node.cert.pem"

    def trusted_ca(self, *, at: datetime) -> TrustedCA:
        """What ``--federation`` verifies audit logs against: the CA, its revocation list and
        the party certificates of this folder."""
        return TrustedCA.with_revocations(
            self.ca_certificate(),
            self.ca_cert_file,
            self.crl(),
            self.crl_file,
            at=at,
            party_certificate=self.party_certificate,
        )

    def crl(self) -> x509.CertificateRevocationList:
        try:
            return crl_from_pem(self.crl_file.read_bytes())
        except (OSError, ValueError) as error:
            raise ConfigError(f"not a PEM revocation list: {error}", path=str(self.crl_file)) from None

    def coordinator_identity(self) -> Identity:
        return Identity.load(self.coordinator_dir, COORDINATOR)

    def node(self, name: str) -> EnrolledNode:
        folder = self.root / "nodes" / name
        if not folder.is_dir():
            raise ConfigError(
                f"no enrolled node named {name!r}; enrolled: {', '.join(self.node_names()) or 'none'}",
                path=str(self.root / "nodes"),
            )
        try:
            key = serialization.load_ssh_public_key((folder / "auth.pub").read_bytes())
        except (OSError, ValueError) as error:
            raise ConfigError(f"not an OpenSSH public key: {error}", path=str(folder / "auth.pub")) from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ConfigError("expected an EC key", path=str(folder / "auth.pub"))
        return EnrolledNode(name, _read_certificate(folder / "node.cert.pem"), key)

    def node_names(self) -> list[str]:
        return sorted(p.name for p in (self.root / "nodes").iterdir() if p.is_dir())

    def admission(self, *, at: datetime) -> dict[str, tuple[EnrolledNode, str | None]]:
        """Every enrolled node with ``None`` if it is admitted at ``at``, else the reason it is not."""
        ca, crl = self.ca_certificate(), self.crl()
        try:
            check_crl(ca, crl, at=at)
            crl_problem = None
        except CertificateError as error:  # then no node is admitted, each for this reason
            crl_problem = str(error)
        decisions: dict[str, tuple[EnrolledNode, str | None]] = {}
        for name in self.node_names():
            node = self.node(name)
            decisions[name] = (node, crl_problem or _certificate_problem(node.certificate, ca, crl, at))
        return decisions

    # -- private ------------------------------------------------------------------------
    def _authority(self) -> Authority:
        path = self.root / "ca" / "ca.key.pem"
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise ConfigError(
                "the CA key is not here; provisioning needs it (bring it back from offline storage)", path=str(path)
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("expected an EC private key", path=str(path))
        return Authority(key, self.ca_certificate())

    def _revoked(self) -> dict:
        return read_toml(self.root / "ca" / "revoked.toml", "revocation register")

    def _write_crl(self, authority: Authority, revoked: dict[int, datetime], at: datetime) -> None:
        crl = authority.revocation_list(revoked, lifetime=CA_LIFETIME, at=at)
        replace_atomically(self.crl_file, crl_to_pem(crl))


def _certificate_problem(
    certificate: x509.Certificate, ca: x509.Certificate, crl: x509.CertificateRevocationList, at: datetime
) -> str | None:
    """Why ``certificate`` is not admitted at ``at`` (its CRL already checked), or None."""
    try:
        verify_certificate(certificate, ca, crl, at=at)
    except CertificateError as error:
        return str(error)
    return None


def _read_certificate(path: Path) -> x509.Certificate:
    try:
        return certificate_from_pem(path.read_bytes())
    except FileNotFoundError:
        raise KitError("missing certificate", path=str(path)) from None
    except ValueError as error:
        raise KitError(f"not a PEM certificate: {error}", path=str(path)) from None


def _bound_identity(certificate: x509.Certificate, path: Path) -> PublicIdentity:
    try:
        return party_identity(certificate)
    except CertificateError as error:
        raise KitError(str(error), path=str(path)) from None


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    """A private key file, mode 0600, never silently replaced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
