"""The roster as it travels in a deployment: CA-signed certificates in the hello.

The coordinator sends every node the certificates of the run's nodes and the CA's
current revocation list; the node trusts a roster key only after ``trusted_roster``
checked it against the CA certificate of its own startup kit. So a coordinator that
does not hold the CA key cannot put itself in the middle of secure aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from cryptography import x509
from flwr.app import ConfigRecord

from fedcost.errors import CertificateError
from fedcost.federation.provision import Kit
from fedcost.identity.federation_ca import (
    certificate_from_pem,
    certificate_to_pem,
    crl_from_pem,
    crl_to_pem,
    verify_roster,
)

RECORD = "fedcost.roster"  # the hello's record that carries the roster
CERTIFICATES, REVOCATIONS = "certificates", "revocations"


def roster_record(certificates: Iterable[x509.Certificate], crl: x509.CertificateRevocationList) -> ConfigRecord:
    return ConfigRecord(
        {
            CERTIFICATES: [certificate_to_pem(c).decode("ascii") for c in certificates],
            REVOCATIONS: crl_to_pem(crl).decode("ascii"),
        }
    )


def trusted_roster(record: ConfigRecord, kit: Kit, *, at: datetime) -> tuple[tuple[str, bytes], ...]:
    """``(name, raw Ed25519 key)`` per roster member, each checked against the kit's CA.

    The node's own entry must carry its own key: a roster that swaps it is refused too.
    """
    try:
        certificates = [certificate_from_pem(str(pem).encode("ascii")) for pem in record[CERTIFICATES]]
        crl = crl_from_pem(str(record[REVOCATIONS]).encode("ascii"))
    except (KeyError, TypeError, ValueError) as error:
        raise CertificateError(f"the roster is not a list of PEM certificates and a CRL ({error})") from None
    identities = verify_roster(certificates, kit.ca, crl, at=at)
    own = {identity.name: identity for identity in identities}.get(kit.name)
    if own is None or own.public_key != kit.identity.private_key.public_key():
        raise CertificateError(f"the roster does not carry this site's own certificate for {kit.name!r}")
    return tuple((identity.name, identity.raw_key) for identity in identities)
