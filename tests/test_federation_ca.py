"""The federation CA and the roster check: every way a coordinator could slip in a key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from fedcost.errors import CertificateError
from fedcost.identity import Identity
from fedcost.identity.federation_ca import (
    Authority,
    certificate_from_pem,
    certificate_to_pem,
    crl_from_pem,
    crl_to_pem,
    verify_party,
    verify_roster,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority.generate("demo", lifetime=100 * DAY, at=NOW)


def _party(ca: Authority, name: str, role: str = "hospital", lifetime: timedelta = 10 * DAY) -> x509.Certificate:
    return ca.issue_party(Identity.generate(name, role).public(), lifetime=lifetime, at=NOW)


def _crl(ca: Authority, revoked: dict[int, datetime] | None = None) -> x509.CertificateRevocationList:
    return ca.revocation_list(revoked or {}, lifetime=30 * DAY, at=NOW)


def test_a_party_certificate_binds_name_role_and_identity_key(ca):
    identity = Identity.generate("st-mary", "hospital")
    certificate = ca.issue_party(identity.public(), lifetime=DAY, at=NOW)
    bound = verify_party(
        certificate_from_pem(certificate_to_pem(certificate)),
        ca.certificate,
        crl_from_pem(crl_to_pem(_crl(ca))),
        at=NOW,
    )
    assert (bound.name, bound.role, bound.key_id) == ("st-mary", "hospital", identity.public().key_id)


def test_expired_certificate_is_refused(ca):
    certificate = _party(ca, "h1", lifetime=DAY)
    with pytest.raises(CertificateError, match="expired"):
        verify_party(certificate, ca.certificate, _crl(ca), at=NOW + 2 * DAY)


def test_revoked_certificate_is_refused(ca):
    certificate = _party(ca, "h1")
    with pytest.raises(CertificateError, match="revoked"):
        verify_party(certificate, ca.certificate, _crl(ca, {certificate.serial_number: NOW}), at=NOW)


def test_certificate_from_another_ca_is_refused(ca):
    rogue = Authority.generate("demo", lifetime=100 * DAY, at=NOW)
    with pytest.raises(CertificateError, match="not issued by the federation's CA"):
        verify_party(_party(rogue, "h1"), ca.certificate, _crl(ca), at=NOW)


def test_revocation_list_from_another_ca_is_refused(ca):
    rogue = Authority.generate("demo", lifetime=100 * DAY, at=NOW)
    with pytest.raises(CertificateError, match="revocation list is not signed"):
        verify_party(_party(ca, "h1"), ca.certificate, _crl(rogue), at=NOW)


def test_stale_revocation_list_is_refused(ca):
    with pytest.raises(CertificateError, match="revocation list expired"):
        verify_party(_party(ca, "h1"), ca.certificate, _crl(ca), at=NOW + 31 * DAY)


def test_tls_certificate_is_not_a_party_certificate(ca):
    _, tls = ca.issue_tls(["127.0.0.1", "localhost"], lifetime=DAY, at=NOW)
    with pytest.raises(CertificateError, match="not a party certificate"):
        verify_party(tls, ca.certificate, _crl(ca), at=NOW)


def test_roster_with_one_name_twice_is_refused(ca):
    with pytest.raises(CertificateError, match="more than once"):
        verify_roster([_party(ca, "h1"), _party(ca, "h1")], ca.certificate, _crl(ca), at=NOW)


def test_roster_is_sorted_by_name(ca):
    roster = verify_roster([_party(ca, "b"), _party(ca, "a", "pharma")], ca.certificate, _crl(ca), at=NOW)
    assert [(i.name, i.role) for i in roster] == [("a", "pharma"), ("b", "hospital")]


def test_tls_certificate_names_every_host(ca):
    _, tls = ca.issue_tls(["coordinator.example.org", "127.0.0.1", "localhost"], lifetime=DAY, at=NOW)
    names = tls.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
