"""Identities pinned by the federation's CA: each party's key must be the one its certificate binds.

The CA is the one authority a run folder cannot rewrite: whoever replaces a party's key
and re-signs its log cannot get a certificate for the new key without the CA's private
key. An audit asks whether a certificate was in force while its log was written, not
whether it is now: one that expired or was revoked after the run leaves the run's logs
standing (and a revocation is reported as a note). That is why this module uses
``party_identity`` and ``check_crl`` from ``federation_ca`` but not ``verify_party``, which
judges one instant and refuses a certificate revoked at any time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fedcost.errors import CertificateError, ConfigError
from fedcost.identity import PublicIdentity
from fedcost.identity.federation_ca import certificate_from_pem, check_crl, party_identity

CERTIFICATE_SUFFIX = ".cert.pem"
_ENTRY_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # how entry.format_time writes an entry's time
_GIVE_THE_CA = "give the federation's ca/ca.cert.pem"


def short(key_id: str) -> str:
    """A key id as people compare it: 16 hex digits (64 bits) are plenty to tell two keys apart."""
    return f"{key_id[:16]}…"


def _when(at: datetime) -> str:
    return f"{at:%Y-%m-%d %H:%M:%S} UTC"


def _checked_ca(certificate: x509.Certificate, path: Path) -> x509.Certificate:
    """The certificate, if it is a CA's: a party's certificate passed as --ca would fail every party."""
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"not a CA certificate (a party's or a TLS certificate?); {_GIVE_THE_CA}", path=str(path))
    return certificate


def _read_certificate(path: Path, shown: str, party: str) -> x509.Certificate:
    try:
        return certificate_from_pem(path.read_bytes())
    except OSError as e:
        raise CertificateError(f"{shown} cannot be read ({e.strerror})") from None
    except ValueError as e:
        raise CertificateError(
            f"{shown} is not a PEM certificate ({e}): replace it with {party}'s certificate "
            "from the federation operator"
        ) from None


def _entry_time(time: str, party: str) -> datetime:
    try:
        return datetime.strptime(time, _ENTRY_TIME).replace(tzinfo=UTC)
    except ValueError:
        raise CertificateError(
            f"{party}'s log has a time that is no date ({time!r}), so whether its certificate "
            "was in force cannot be told"
        ) from None


@dataclass(frozen=True)
class TrustedCA:
    """The federation's CA certificate; from a federation folder, also its revocation list and party certificates."""

    certificate: x509.Certificate
    source: Path  # the CA certificate's file, for messages
    crl: x509.CertificateRevocationList | None = None
    # Where a federation folder keeps a party's certificate (``Federation.party_certificate``).
    party_certificate: Callable[[str], Path] | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TrustedCA:
        """``--ca``: a CA certificate file; a defect is a ``ConfigError`` naming it."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot be read ({e.strerror}); {_GIVE_THE_CA}", path=str(path)) from None
        try:
            certificate = certificate_from_pem(data)
        except ValueError as e:
            raise ConfigError(f"not a PEM certificate ({e}); {_GIVE_THE_CA}", path=str(path)) from None
        return cls(_checked_ca(certificate, path), path)

    @classmethod
    def with_revocations(
        cls,
        certificate: x509.Certificate,
        source: Path,
        crl: x509.CertificateRevocationList,
        crl_file: Path,
        *,
        at: datetime,
        party_certificate: Callable[[str], Path],
    ) -> TrustedCA:
        """A federation's CA with its revocation list (checked current at ``at``) and its party
        certificates (``Federation.trusted_ca``, behind ``--federation``).

        A revocation list that is not the CA's, or has expired, is a ``ConfigError``: an
        audit must not take an old or forged list's silence for "nothing was revoked".
        """
        certificate = _checked_ca(certificate, source)
        try:
            check_crl(certificate, crl, at=at)
        except CertificateError as e:
            raise ConfigError(str(e), path=str(crl_file)) from None
        return cls(certificate, source, crl, party_certificate)

    @property
    def note(self) -> str | None:
        """What this verification cannot tell: revocations, without a revocation list."""
        if self.crl is not None:
            return None
        return (
            f"no revocation list came with {self.source}, so revocations were not checked; "
            "--federation DIR checks them against DIR/ca/revoked.crl.pem"
        )

    def certify(
        self, identity: PublicIdentity, *, identity_file: Path, run_copy: Path, shown: Callable[[Path], str]
    ) -> tuple[x509.Certificate, str]:
        """The certificate that pins ``identity``, and its file as ``shown`` names it.

        Raises ``CertificateError`` naming the file at the first check that fails:
        (a) there is a certificate: the run's own copy, else the federation folder's;
        (b) it is a PEM certificate; (c) this CA issued and signed it;
        (d) it binds a party: an Ed25519 key, a name and a role;
        (e) that name is the identity's, (f) that role is the identity's,
        (g) and that key is the identity file's.
        """
        party = identity.name
        # (a) the run's copy first: it is what the run recorded; the federation's is the fallback.
        candidates = [
            path
            for path in (run_copy, self.party_certificate(party) if self.party_certificate else None)
            if path is not None
        ]
        path = next((path for path in candidates if path.is_file()), None)
        if path is None:
            raise CertificateError(
                f"no certificate for {party} (looked for {' and '.join(map(shown, candidates))}): without one from "
                "the federation's CA its key is trusted from this folder only; ask the federation operator for it"
            )
        name, id_name = shown(path), shown(identity_file)
        # (b)
        certificate = _read_certificate(path, name, party)
        # (c)
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise CertificateError(
                f"{name} is not issued by the federation's CA ({self.source}): the key it "
                f"certifies is not the federation's key for {party}"
            ) from None
        # (d)
        try:
            certified = party_identity(certificate)
        except CertificateError as e:
            raise CertificateError(f"{name}: {e}") from None
        # (e)
        if certified.name != party:
            raise CertificateError(
                f"{name} certifies {certified.name!r}, not {party}: it is another party's "
                f"certificate; {party}'s is with the federation operator"
            )
        # (f)
        if certified.role != identity.role:
            raise CertificateError(
                f"{name} certifies {party} as {certified.role}, but {id_name} says "
                f"{identity.role}: the identity file was replaced"
            )
        # (g)
        if certified.key_id != identity.key_id:
            raise CertificateError(
                f"{id_name} has key id {short(identity.key_id)}, but {name} from the federation's CA certifies "
                f"{short(certified.key_id)} for {party}: the identity file (or the log it verifies) was replaced"
            )
        return certificate, name

    def in_force(
        self, certificate: x509.Certificate, name: str, party: str, first: str, last: str, *, withdrawn: bool = False
    ) -> str | None:
        """Whether the certificate was in force from ``first`` to ``last`` (the log's entry times).

        Raises ``CertificateError`` unless (h) the certificate was valid from the log's first
        entry to its last, and (i) it was not revoked at or before the last. A revocation
        after the last entry is returned as a note instead: a revocation withdraws trust
        from then on, and refusing every run a party ever signed whenever it leaves the
        federation would leave nothing to audit. The times are the party's own clock, so the
        note is kept for the auditor to ask whether the key could have leaked before.

        ``withdrawn``: the log is unclosed, as a site's revoked mid-run is. Its exchanges go on
        until the coordinator drops it, so a revocation after the log's first entry and before
        its last is a note too, and the log stands only where a coordinator's log explains its
        end (``reconcile.withdrawals``: the coordinator dropped it after their last shared
        message) and witnesses its messages one for one (``reconcile``). A key revoked before
        the log began was never in force for it.
        """
        start, end = _entry_time(first, party), _entry_time(last, party)
        # (h)
        if start < certificate.not_valid_before_utc or end > certificate.not_valid_after_utc:
            raise CertificateError(
                f"{name} is valid from {_when(certificate.not_valid_before_utc)} to "
                f"{_when(certificate.not_valid_after_utc)}, but {party}'s log runs from {_when(start)} to "
                f"{_when(end)}: it was signed outside its certificate's validity"
            )
        # (i)
        revoked = (
            None if self.crl is None else self.crl.get_revoked_certificate_by_serial_number(certificate.serial_number)
        )
        if revoked is None:
            return None
        at = revoked.revocation_date_utc
        if start < at <= end and withdrawn:
            return (
                f"{party}'s certificate ({name}) was revoked at {_when(at)}, while its log ran (to {_when(end)}): "
                "what it signed after that stands only as the coordinator's log witnesses it"
            )
        if at <= end:
            raise CertificateError(
                f"{name} was revoked at {_when(at)}, before {party}'s log ended ({_when(end)}): "
                "what it signed since is not the federation's to vouch for; ask the operator why"
            )
        return (
            f"{party}'s certificate ({name}) was revoked at {_when(at)}, after its log ended ({_when(end)}), "
            "so the log stands; by the log's own clock, so ask the operator whether the key leaked earlier"
        )
