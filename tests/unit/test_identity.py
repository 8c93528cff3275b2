"""Enrolled site identities: only this study's CA-certified sites, signing exactly this round's keys, get through."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from common.deploy.certs import StudyPaths, make_study
from common.secagg.errors import AbortReason, SecAggAbort
from common.secagg.identity import (
    ADVERTISE_DOMAIN,
    IDENTITY_EKU,
    STUDY_ID_EXTENSION,
    IdentityError,
    IdentityProblem,
    IdentityRefused,
    IdentityVerifier,
    SiteIdentity,
    VerifiedPeer,
    advertisement_payload,
    enrol_virtual_sites,
    issue_identity,
    refuse_duplicate_identities,
)

STUDY = "lung-2026"
NOW = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)
ROUND = {"study_id": STUDY, "run_id": "run-7", "server_round": 3, "node_id": 11, "c_pk": b"c" * 32,
         "s_pk": b"s" * 32, "config_hash": hashlib.sha256(b"config").digest()}


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CareFed study CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW - dt.timedelta(days=30))
            .not_valid_after(NOW + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA384()))
    return key, cert


CA = _ca()
OTHER_CA = _ca()  # another study's CA: same subject name, another key


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _identity(site: str = "st-marys", study: str = STUDY, ca=CA, days: int = 30,
              start: dt.datetime = NOW - dt.timedelta(days=1)) -> tuple[Ed25519PrivateKey, bytes]:
    key, cert = issue_identity(ca[0], ca[1], site, study, not_before=start, not_after=start + dt.timedelta(days=days))
    return key, _der(cert)


def _verifier(now: dt.datetime | None = NOW) -> IdentityVerifier:
    return IdentityVerifier(_pem(CA[1]), STUDY, now=now)


def _refusal(problem: IdentityProblem, call, *args) -> IdentityRefused:
    with pytest.raises(IdentityRefused) as caught:
        call(*args)
    assert caught.value.problem is problem, caught.value
    return caught.value


def test_a_signed_advertisement_verifies_and_names_the_site_its_certificate_names():
    key, cert = _identity()
    payload = advertisement_payload(**ROUND)
    peer = _verifier().verify_advertisement(cert, key.sign(payload), payload)
    assert peer == VerifiedPeer("st-marys", key.public_key().public_bytes_raw(), hashlib.sha256(cert).hexdigest())


def test_a_forged_signature_is_refused_as_a_bad_signature_abort():
    key, cert = _identity()
    payload = advertisement_payload(**ROUND)
    good = key.sign(payload)
    for forged in (bytes([good[0] ^ 1]) + good[1:], Ed25519PrivateKey.generate().sign(payload), b"", b"\0" * 64):
        refusal = _refusal(IdentityProblem.BAD_SIGNATURE, _verifier().verify_advertisement, cert, forged, payload)
        assert isinstance(refusal, SecAggAbort) and refusal.reason is AbortReason.BAD_SIGNATURE


@pytest.mark.parametrize("field", ["study_id", "run_id", "server_round", "node_id", "c_pk", "s_pk", "config_hash"])
def test_an_advertisement_replayed_into_another_round_run_study_or_config_is_refused(field: str):
    key, cert = _identity()
    signed = key.sign(advertisement_payload(**ROUND))
    value = ROUND[field]
    other = value + 1 if isinstance(value, int) else (value + "x" if isinstance(value, str) else bytes(len(value)))
    replayed = advertisement_payload(**{**ROUND, field: other})
    _refusal(IdentityProblem.BAD_SIGNATURE, _verifier().verify_advertisement, cert, signed, replayed)


def test_the_payload_is_domain_separated_and_length_prefixed():
    payload = advertisement_payload(**ROUND)
    assert payload[4:4 + len(ADVERTISE_DOMAIN)] == ADVERTISE_DOMAIN == b"carefed/advertise/v2"
    shifted = advertisement_payload(**{**ROUND, "study_id": "lung-202", "run_id": "6run-7"})
    assert shifted != payload
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        advertisement_payload(**{**ROUND, "node_id": -1})


_fields = st.tuples(st.text(max_size=6), st.text(max_size=6), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
                    st.binary(max_size=6), st.binary(max_size=6), st.binary(max_size=6))


@given(_fields, _fields)
def test_two_payloads_are_equal_only_for_the_same_fields(a: tuple, b: tuple):
    assert (advertisement_payload(*a) == advertisement_payload(*b)) == (a == b)


def test_a_certificate_from_another_studys_ca_is_refused():
    key, cert = _identity(ca=OTHER_CA)
    payload = advertisement_payload(**ROUND)
    _refusal(IdentityProblem.UNKNOWN_CA, _verifier().verify_advertisement, cert, key.sign(payload), payload)


def test_a_certificate_for_another_study_under_the_same_ca_is_refused():
    _, cert = _identity(study="someone-elses-study")
    refusal = _refusal(IdentityProblem.WRONG_STUDY, _verifier().verify_certificate, cert)
    assert "someone-elses-study" in str(refusal) and STUDY in str(refusal)


def test_expired_and_not_yet_valid_certificates_are_refused():
    _, cert = _identity(start=NOW - dt.timedelta(days=10), days=5)
    _refusal(IdentityProblem.EXPIRED, _verifier().verify_certificate, cert)
    _, cert = _identity(start=NOW + dt.timedelta(days=1))
    _refusal(IdentityProblem.NOT_YET_VALID, _verifier().verify_certificate, cert)


def test_a_cached_certificate_is_rechecked_against_the_clock():
    _, cert = _identity(days=3)
    verifier = _verifier()
    verifier.verify_certificate(cert)
    verifier.now = NOW + dt.timedelta(days=5)
    _refusal(IdentityProblem.EXPIRED, verifier.verify_certificate, cert)


def test_a_certificate_checked_once_is_not_checked_again_by_a_new_verifier_of_the_same_ca_and_study(monkeypatch):
    """A site builds a verifier per message; the certificate checks it passed stay checked in the process."""
    from common.secagg import identity

    _, cert = _identity(site="cached-once")
    _verifier().verify_certificate(cert)
    checks = []
    monkeypatch.setattr(IdentityVerifier, "_check", lambda self, der: checks.append(der))
    assert _verifier().verify_certificate(cert).name == "cached-once" and checks == []
    assert (_der(CA[1]), STUDY, cert) in identity._CHECKED


def test_a_certificate_passed_under_one_ca_or_study_is_checked_again_under_another():
    """The process-wide record of passed checks is keyed by the study CA and the study id too: a certificate that
    passed for one study is refused where it does not belong, and the clock still applies to a cached pass."""
    _, cert = _identity(site="two-studies")
    _verifier().verify_certificate(cert)
    _refusal(IdentityProblem.UNKNOWN_CA, IdentityVerifier(_pem(OTHER_CA[1]), STUDY, now=NOW).verify_certificate,
             cert)
    _refusal(IdentityProblem.WRONG_STUDY, IdentityVerifier(_pem(CA[1]), "another-study", now=NOW).verify_certificate,
             cert)
    _refusal(IdentityProblem.EXPIRED, _verifier(NOW + dt.timedelta(days=400)).verify_certificate, cert)


def _custom(*, eku=(IDENTITY_EKU,), key=None, ca_flag=False, usage_sign=True, study_ext=True) -> bytes:
    """An otherwise valid identity certificate from the study CA with one property changed."""
    reference = x509.load_der_x509_certificate(_identity()[1])
    key = key or Ed25519PrivateKey.generate()
    builder = (x509.CertificateBuilder().subject_name(reference.subject).issuer_name(CA[1].subject)
               .public_key(key.public_key()).serial_number(7)
               .not_valid_before(reference.not_valid_before_utc).not_valid_after(reference.not_valid_after_utc)
               .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(usage_sign, False, False, False, False, not usage_sign, False, False,
                                            False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=True))
    if study_ext:
        builder = builder.add_extension(reference.extensions.get_extension_for_oid(STUDY_ID_EXTENSION).value,
                                        critical=True)
    return _der(builder.sign(CA[0], hashes.SHA384()))


def test_a_tls_certificate_node_key_or_ca_presented_as_an_identity_is_refused(tmp_path: Path):
    make_study(tmp_path, sites=["a"], hosts=["localhost"], study=STUDY)
    paths = StudyPaths(tmp_path)
    verifier = IdentityVerifier(paths.ca_cert.read_bytes(), STUDY)
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    _refusal(IdentityProblem.WRONG_USAGE, verifier.verify_certificate, _der(server))
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    _refusal(IdentityProblem.WRONG_USAGE, verifier.verify_certificate, _der(ca))
    node_pub = (paths.site("a") / "node.pub").read_bytes()
    _refusal(IdentityProblem.MALFORMED, verifier.verify_certificate, node_pub)
    node_key = serialization.load_ssh_private_key((paths.site("a") / "node.key").read_bytes(), None)
    spki = node_key.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    _refusal(IdentityProblem.MALFORMED, verifier.verify_certificate, spki)


@pytest.mark.parametrize(("changes", "problem"), [
    ({"eku": (ExtendedKeyUsageOID.SERVER_AUTH,)}, IdentityProblem.WRONG_USAGE),
    ({"eku": (ExtendedKeyUsageOID.CLIENT_AUTH,)}, IdentityProblem.WRONG_USAGE),
    ({"eku": (IDENTITY_EKU, ExtendedKeyUsageOID.SERVER_AUTH)}, IdentityProblem.WRONG_USAGE),
    ({"ca_flag": True}, IdentityProblem.WRONG_USAGE),
    ({"usage_sign": False}, IdentityProblem.WRONG_USAGE),
    ({"study_ext": False}, IdentityProblem.WRONG_USAGE),
    ({"key": ec.generate_private_key(ec.SECP256R1())}, IdentityProblem.WRONG_KEY_TYPE),
    ({}, None),
])
def test_only_the_identity_profile_passes(changes: dict, problem: IdentityProblem | None):
    cert = _custom(**changes)
    if problem is None:
        assert _verifier().verify_certificate(cert).name == "st-marys"
    else:
        _refusal(problem, _verifier().verify_certificate, cert)


def test_one_identity_claimed_by_two_node_ids_is_refused_as_a_sybil_attempt():
    key, cert = _identity()
    ads = {}
    for node in (11, 12):
        payload = advertisement_payload(**{**ROUND, "node_id": node})
        ads[node] = (cert, key.sign(payload), payload)
    refusal = _refusal(IdentityProblem.DUPLICATE_IDENTITY, _verifier().verify_cohort, ads)
    assert refusal.reason is AbortReason.DUPLICATE_ID and "11" in str(refusal) and "12" in str(refusal)


def test_two_certificates_for_one_site_name_in_one_cohort_are_refused():
    peers = {}
    for node in (1, 2):
        key, cert = _identity()  # the CA certified "st-marys" twice (a renewal, or a rogue issuance)
        payload = advertisement_payload(**{**ROUND, "node_id": node})
        peers[node] = _verifier().verify_advertisement(cert, key.sign(payload), payload)
    assert peers[1].fingerprint != peers[2].fingerprint
    _refusal(IdentityProblem.DUPLICATE_IDENTITY, refuse_duplicate_identities, peers)
    same_key = dataclasses.replace(peers[1], name="renamed", fingerprint="another certificate")
    _refusal(IdentityProblem.DUPLICATE_IDENTITY, refuse_duplicate_identities, {1: peers[1], 3: same_key})
    refuse_duplicate_identities({1: peers[1]})


def test_a_cohort_of_distinct_sites_verifies():
    ads = {}
    for node in range(1, 6):
        key, cert = _identity(site=f"site-{node}")
        payload = advertisement_payload(**{**ROUND, "node_id": node})
        ads[node] = (cert, key.sign(payload), payload)
    assert [peer.name for peer in _verifier().verify_cohort(ads).values()] == [f"site-{n}" for n in range(1, 6)]


@pytest.mark.parametrize("garbage", [b"", b"\x30\x03\x02\x01", b"not a certificate", "a str", b"\x30" * 9000])
def test_malformed_certificates_are_refused(garbage):
    _refusal(IdentityProblem.MALFORMED, _verifier().verify_certificate, garbage)


def test_truncated_certificate_is_refused():
    _, cert = _identity()
    _refusal(IdentityProblem.MALFORMED, _verifier().verify_certificate, cert[:-10])


def test_the_trust_anchor_must_be_a_ca_certificate():
    _, cert = _identity()
    with pytest.raises(IdentityError, match="must be a CA certificate"):
        IdentityVerifier(cert, STUDY)
    with pytest.raises(IdentityError, match="cannot be used"):
        IdentityVerifier(b"garbage", STUDY)


def test_virtual_sites_are_enrolled_under_a_throwaway_ca_and_sign_the_default_path(tmp_path: Path):
    enrolment = enrol_virtual_sites(4, STUDY, tmp_path / "ids")
    assert [f.name for f in enrolment.site_folders] == ["site-0", "site-1", "site-2", "site-3"]
    assert sorted(p.name for p in (tmp_path / "ids").rglob("*.key")) == ["identity.key"] * 4  # no CA key kept
    ca = x509.load_pem_x509_certificate(enrolment.ca_cert.read_bytes())
    assert isinstance(ca.public_key().curve, ec.SECP256R1)
    verifier = IdentityVerifier.for_site(enrolment.site_folders[2], STUDY)
    ads = {}
    for node, folder in enumerate(enrolment.site_folders):
        identity = SiteIdentity.load(folder)
        payload = advertisement_payload(**{**ROUND, "node_id": node})
        ads[node] = (identity.certificate, identity.sign(payload), payload)
    assert {p.name for p in verifier.verify_cohort(ads).values()} == {f"site-{k}" for k in range(4)}


def test_identity_keys_are_0600_and_never_overwritten(tmp_path: Path):
    enrolment = enrol_virtual_sites(2, STUDY, tmp_path)
    key_file = enrolment.site_folders[0] / "identity.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    before = key_file.read_bytes()
    with pytest.raises(IdentityError, match="exists"):
        enrol_virtual_sites(2, STUDY, tmp_path)
    assert key_file.read_bytes() == before


def test_a_site_identity_refuses_loose_permissions_a_foreign_key_and_missing_files(tmp_path: Path):
    enrolment = enrol_virtual_sites(2, STUDY, tmp_path)
    first, second = enrolment.site_folders
    identity = SiteIdentity.load(first)
    assert "PRIVATE" not in repr(identity) and identity.name == "site-0"
    (first / "identity.key").chmod(0o640)
    with pytest.raises(IdentityError, match="chmod 600"):
        SiteIdentity.load(first)
    (first / "identity.key").chmod(0o600)
    (first / "identity.crt").write_bytes((second / "identity.crt").read_bytes())
    with pytest.raises(IdentityError, match="is not the Ed25519 key certified by"):
        SiteIdentity.load(first)
    (first / "identity.crt").unlink()
    with pytest.raises(IdentityError, match="not found"):
        SiteIdentity.load(first)
