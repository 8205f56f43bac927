"""A federation's certificate authority: party certificates, TLS certificates, revocation.

The CA binds each party's name, role and Ed25519 identity key in an X.509 certificate
(subject ``CN=<name>, OU=<role>, O=<federation>``) with an expiry, and revokes with a
CA-signed CRL. That solves the roster problem of secure aggregation: the coordinator
hands every node the roster as these certificates, and each node checks every entry
against the CA certificate in its own startup kit (``verify_roster``), so a coordinator
without the CA key cannot substitute a key. The CA and TLS keys are ECDSA P-256, which
every TLS stack (OpenSSL, gRPC, Python's ``ssl``) accepts.

Pure: no Flower, no files. The clock is an argument (``at``) everywhere it matters.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcost.errors import CertificateError
from fedcost.identity.party import PublicIdentity

# Issued certificates start this much in the past, so a peer whose clock runs a little
# behind still accepts a certificate issued a moment ago.
CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class Authority:
    """The CA's key and self-signed certificate; the key never leaves the operator."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def generate(cls, federation: str, *, lifetime: timedelta, at: datetime) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} root CA"),
            ]
        )
        certificate = (
            _builder(name, name, key.public_key(), at, lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @property
    def federation(self) -> str:
        return _attribute(self.certificate.subject, NameOID.ORGANIZATION_NAME)

    def issue_party(self, identity: PublicIdentity, *, lifetime: timedelta, at: datetime) -> x509.Certificate:
        """A certificate binding ``identity``'s name, role and Ed25519 key, until ``at + lifetime``."""
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.federation),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role),
                x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
            ]
        )
        return (
            _builder(subject, self.certificate.subject, identity.public_key, at, lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue_tls(
        self, hosts: Iterable[str], *, lifetime: timedelta, at: datetime
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A TLS server key and certificate valid for ``hosts`` (IP addresses or DNS names)."""
        hosts = list(dict.fromkeys(hosts))
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.federation),
                x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
            ]
        )
        certificate = (
            _builder(subject, self.certificate.subject, key.public_key(), at, lifetime)
            .add_extension(x509.SubjectAlternativeName([_general_name(host) for host in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return key, certificate

    def revocation_list(
        self, revoked: Mapping[int, datetime], *, lifetime: timedelta, at: datetime
    ) -> x509.CertificateRevocationList:
        """A CRL naming every revoked certificate serial, signed by the CA, valid until ``at + lifetime``."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(at - CLOCK_SKEW)
            .next_update(at + lifetime)
        )
        for serial, when in sorted(revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        return builder.sign(self.key, hashes.SHA256())


def verify_party(
    certificate: x509.Certificate,
    ca: x509.Certificate,
    crl: x509.CertificateRevocationList,
    *,
    at: datetime,
) -> PublicIdentity:
    """The identity a party certificate binds, after checking it against the CA.

    Raises ``CertificateError`` naming the first check that fails:

    1. the CRL is signed by the CA and still current at ``at``;
    2. the certificate is issued by the CA and its signature holds;
    3. it is valid at ``at`` (not before its start, not after its expiry);
    4. its serial is not on the CRL;
    5. it is an end-entity certificate for an Ed25519 key with a valid name and role.
    """
    check_crl(ca, crl, at=at)  # (1)
    return verify_certificate(certificate, ca, crl, at=at)


def check_crl(ca: x509.Certificate, crl: x509.CertificateRevocationList, *, at: datetime) -> None:
    """Check (1) of ``verify_party``: one signature check for a whole roster, not one per entry."""
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise CertificateError("the revocation list is not signed by the federation's CA")
    if crl.next_update_utc is not None and at > crl.next_update_utc:
        raise CertificateError(
            f"the revocation list expired at {crl.next_update_utc:%Y-%m-%d %H:%M:%S} UTC; "
            "the federation operator must issue a fresh one (fedcost federation revoke)"
        )


def verify_certificate(
    certificate: x509.Certificate, ca: x509.Certificate, crl: x509.CertificateRevocationList, *, at: datetime
) -> PublicIdentity:
    """Checks (2)-(5) of ``verify_party``, for a CRL already checked with ``check_crl``."""
    who = _describe(certificate)
    # (2)
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(f"{who} is not issued by the federation's CA") from None
    # (3)
    if at < certificate.not_valid_before_utc:
        raise CertificateError(f"{who} is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")
    if at > certificate.not_valid_after_utc:
        raise CertificateError(f"{who} expired at {certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    # (4)
    entry = crl.get_revoked_certificate_by_serial_number(certificate.serial_number)
    if entry is not None:
        raise CertificateError(f"{who} was revoked at {entry.revocation_date_utc:%Y-%m-%d %H:%M:%S} UTC")
    # (5)
    return party_identity(certificate)


def party_identity(certificate: x509.Certificate) -> PublicIdentity:
    """The name, role and Ed25519 key a party certificate binds (its issuer NOT checked here)."""
    who = _describe(certificate)
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    key = certificate.public_key()
    if constraints.ca or not isinstance(key, Ed25519PublicKey):
        raise CertificateError(f"{who} is not a party certificate (an Ed25519 identity key)")
    try:
        return PublicIdentity(
            _attribute(certificate.subject, NameOID.COMMON_NAME),
            _attribute(certificate.subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
            key,
        )
    except ValueError as error:
        raise CertificateError(f"{who}: {error}") from None


def verify_roster(
    certificates: Iterable[x509.Certificate],
    ca: x509.Certificate,
    crl: x509.CertificateRevocationList,
    *,
    at: datetime,
) -> tuple[PublicIdentity, ...]:
    """Every roster entry checked by ``verify_party``, names unique; sorted by name."""
    certificates = list(certificates)
    if certificates:
        check_crl(ca, crl, at=at)
    identities = [verify_certificate(certificate, ca, crl, at=at) for certificate in certificates]
    names = [identity.name for identity in identities]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise CertificateError(f"the roster names {duplicates[0]!r} more than once")
    return tuple(sorted(identities, key=lambda identity: identity.name))


def certificate_to_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def certificate_from_pem(data: bytes) -> x509.Certificate:
    """One PEM certificate; ``ValueError`` if the bytes are not one."""
    return x509.load_pem_x509_certificate(data)


def crl_to_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def crl_from_pem(data: bytes) -> x509.CertificateRevocationList:
    """One PEM CRL; ``ValueError`` if the bytes are not one."""
    return x509.load_pem_x509_crl(data)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: object, at: datetime, lifetime: timedelta
) -> x509.CertificateBuilder:
    if lifetime <= timedelta(0):
        raise ValueError(f"a certificate lifetime must be positive, not {lifetime}")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(at, at + lifetime) - CLOCK_SKEW)
        .not_valid_after(at + lifetime)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1:
        raise CertificateError(f"certificate subject {name.rfc4514_string()!r} needs exactly one {oid.dotted_string}")
    return str(values[0].value)


def _describe(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"the certificate of {names[0].value!r}" if names else "a certificate without a name"


def utc_now() -> datetime:
    """The current time, timezone-aware, for callers at the edge (CLI, processes)."""
    return datetime.now(UTC)
