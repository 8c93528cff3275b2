"""Study keys and certificates: permissions, SANs, no overwrites, and clear errors for the usual TLS mistakes."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.deploy.certs import CertError, StudyPaths, check_tls_files, make_study
from common.secagg.identity import IDENTITY_EKU, IdentityVerifier, SiteIdentity, issue_identity


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_study_has_a_ca_a_superlink_certificate_with_sans_and_flower_node_keys(tmp_path: Path):
    manifest = make_study(tmp_path, sites=["st-marys", "northfield"], hosts=["fl.example.org", "10.0.0.5"])
    paths = StudyPaths(tmp_path)
    check_tls_files(ca=paths.ca_cert, cert=paths.server_cert, key=paths.server_key)
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    for private in (paths.ca_key, paths.server_key, *(paths.site(s) / "node.key" for s in manifest["sites"])):
        assert _mode(private) == 0o600
    # Flower 1.42's SuperNode reads an OpenSSH EC private key; `flwr supernode register` an OpenSSH public key.
    key = serialization.load_ssh_private_key((paths.site("st-marys") / "node.key").read_bytes(), None)
    public = serialization.load_ssh_public_key((paths.site("st-marys") / "node.pub").read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert key.public_key() == public
    written = json.loads((tmp_path / "sites.json").read_text())
    assert set(written["sites"]) == {"st-marys", "northfield"}
    assert "PRIVATE" not in (tmp_path / "sites.json").read_text()


def test_running_again_adds_a_site_and_keeps_every_existing_key(tmp_path: Path):
    make_study(tmp_path, sites=["a"], hosts=["localhost"])
    paths = StudyPaths(tmp_path)
    before = {p: p.read_bytes() for p in (paths.ca_key, paths.server_key, paths.site("a") / "node.key")}
    make_study(tmp_path, sites=["b"], hosts=["localhost"])
    assert all(p.read_bytes() == data for p, data in before.items())
    assert (paths.site("b") / "node.key").exists()


@pytest.mark.parametrize(("sites", "hosts", "message"), [
    (["Bad Name"], ["localhost"], "site name 'Bad Name' is not allowed"),
    (["a", "a"], ["localhost"], "site names repeat"),
    (["a"], [], "give at least one --superlink-host"),
])
def test_bad_requests_are_refused(tmp_path: Path, sites, hosts, message):
    with pytest.raises(CertError, match=message):
        make_study(tmp_path, sites=sites, hosts=hosts)


def test_wrong_ca_expired_and_mismatched_certificates_and_missing_keys_get_clear_errors(tmp_path: Path):
    study, other = tmp_path / "study", tmp_path / "other"
    make_study(study, sites=["a"], hosts=["localhost"])
    make_study(other, sites=["a"], hosts=["localhost"])
    s, o = StudyPaths(study), StudyPaths(other)
    with pytest.raises(CertError, match="was not issued by the CA"):
        check_tls_files(ca=o.ca_cert, cert=s.server_cert)
    with pytest.raises(CertError, match="does not match"):
        check_tls_files(ca=s.ca_cert, cert=s.server_cert, key=o.server_key)
    with pytest.raises(CertError, match="not found; run `carefed certs`"):
        check_tls_files(ca=s.ca_cert, cert=s.server_cert, key=study / "missing.key")
    with pytest.raises(CertError, match="is not a PEM certificate"):
        check_tls_files(ca=s.server_key, cert=s.server_cert)
    old = tmp_path / "old"
    make_study(old, sites=["a"], hosts=["localhost"], days=1, now=dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    with pytest.raises(CertError, match="expired on 2020-01-02"):
        check_tls_files(ca=StudyPaths(old).ca_cert, cert=StudyPaths(old).server_cert)


def test_a_half_present_ca_is_refused_rather_than_replaced(tmp_path: Path):
    make_study(tmp_path, sites=["a"], hosts=["localhost"])
    StudyPaths(tmp_path).ca_key.unlink()
    with pytest.raises(CertError, match="has only one of ca.key and ca.crt"):
        make_study(tmp_path, sites=["b"], hosts=["localhost"])


def test_a_sites_key_folder_is_checked_before_it_joins(tmp_path: Path):
    from common.deploy.certs import check_site_keys

    make_study(tmp_path, sites=["a"], hosts=["localhost"])
    folder = StudyPaths(tmp_path).site("a")
    assert len(check_site_keys(folder)["node-key-fingerprint-sha256"]) == 64
    (folder / "node.key").chmod(0o644)
    with pytest.raises(CertError, match="readable by others"):
        check_site_keys(folder)
    (folder / "node.key").unlink()
    with pytest.raises(CertError, match="node key .* not found"):
        check_site_keys(folder)
    (folder / "ca.crt").write_text("not a certificate")
    with pytest.raises(CertError, match="not a PEM certificate"):
        check_site_keys(folder)


# Identities for secure aggregation: each site's Ed25519 key, certified by the study CA for one study.

def _identity_der(folder: Path) -> bytes:
    cert = x509.load_pem_x509_certificate((folder / "identity.crt").read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def test_each_site_gets_an_ed25519_identity_certified_by_the_study_ca_for_its_study(tmp_path: Path):
    manifest = make_study(tmp_path, sites=["st-marys", "northfield"], hosts=["localhost"], study="lung-2026")
    paths = StudyPaths(tmp_path)
    verifier = IdentityVerifier(paths.ca_cert.read_bytes(), "lung-2026")
    assert manifest["study-id"] == "lung-2026" == json.loads(paths.manifest.read_text())["study-id"]
    for name in ("st-marys", "northfield"):
        folder = paths.site(name)
        assert _mode(folder / "identity.key") == 0o600 and _mode(folder / "identity.crt") == 0o644
        identity = SiteIdentity.load(folder)
        peer = verifier.verify_certificate(identity.certificate)
        assert peer.name == name == identity.name
        assert manifest["sites"][name]["identity-fingerprint-sha256"] == peer.fingerprint == identity.fingerprint
        cert = x509.load_der_x509_certificate(identity.certificate)
        purposes = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert purposes == [IDENTITY_EKU]  # no serverAuth/clientAuth: useless for TLS, as TLS certs are for this
    assert "PRIVATE" not in paths.manifest.read_text()


def test_running_again_adds_missing_identities_and_touches_no_existing_file(tmp_path: Path):
    make_study(tmp_path, sites=["a"], hosts=["localhost"])
    paths = StudyPaths(tmp_path)
    files = [paths.site("a") / name for name in ("identity.key", "identity.crt", "node.key")]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    manifest = make_study(tmp_path, sites=["b"], hosts=["localhost"])
    assert all((p.read_bytes(), p.stat().st_mtime_ns) == seen for p, seen in before.items())
    assert manifest["study-id"] == "carefed-demo" and set(manifest["sites"]) == {"a", "b"}
    SiteIdentity.load(paths.site("b"))


def test_a_study_folder_keeps_one_study_id(tmp_path: Path):
    make_study(tmp_path, sites=["a"], hosts=["localhost"], study="lung-2026")
    assert make_study(tmp_path, sites=["b"], hosts=["localhost"])["study-id"] == "lung-2026"
    with pytest.raises(CertError, match="belongs to study 'lung-2026', not --study 'other'"):
        make_study(tmp_path, sites=["c"], hosts=["localhost"], study="other")
    with pytest.raises(CertError, match="study id '../x' is not allowed"):
        make_study(tmp_path / "new", sites=["c"], hosts=["localhost"], study="../x")


def test_a_moved_away_identity_certificate_is_renewed_for_the_same_key(tmp_path: Path):
    make_study(tmp_path, sites=["a"], hosts=["localhost"])
    folder = StudyPaths(tmp_path).site("a")
    key, old = (folder / "identity.key").read_bytes(), _identity_der(folder)
    (folder / "identity.crt").rename(tmp_path / "old-identity.crt")
    make_study(tmp_path, sites=[], hosts=["localhost"])
    assert (folder / "identity.key").read_bytes() == key and _identity_der(folder) != old
    assert SiteIdentity.load(folder).name == "a"


def test_an_identity_certificate_without_its_key_is_refused_rather_than_replaced(tmp_path: Path):
    make_study(tmp_path, sites=["a"], hosts=["localhost"])
    (StudyPaths(tmp_path).site("a") / "identity.key").unlink()
    with pytest.raises(CertError, match="identity.crt has no identity.key beside it"):
        make_study(tmp_path, sites=[], hosts=["localhost"])


def _reissue(tmp_path: Path, study: str) -> bytes:
    """A certificate for site a's key from the real study CA, as an attacker with the CA key could make it."""
    paths = StudyPaths(tmp_path)
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    now = dt.datetime.now(dt.UTC)
    key = serialization.load_pem_private_key((paths.site("a") / "identity.key").read_bytes(), None)
    _, cert = issue_identity(ca_key, ca_cert, "a", study, key=key, not_before=now - dt.timedelta(minutes=1),
                             not_after=now + dt.timedelta(days=1))
    return cert.public_bytes(serialization.Encoding.PEM)


def _flip_signature(tmp_path: Path) -> bytes:
    der = bytearray(_identity_der(StudyPaths(tmp_path).site("a")))
    der[-5] ^= 1  # inside the CA's signature
    return x509.load_der_x509_certificate(bytes(der)).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(("tamper", "message"), [
    (_flip_signature, "not issued by this study's CA"),
    (lambda tmp_path: _reissue(tmp_path, "another-study"), "certificate is for another study"),
    (lambda tmp_path: _reissue(tmp_path, "carefed-demo"), "is not the certificate sites.json lists"),
    (lambda tmp_path: b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "identity files are not PEM"),
])
def test_carefed_certs_check_passes_on_fresh_output_and_fails_on_a_tampered_identity(tmp_path: Path, tamper,
                                                                                      message: str):
    from typer.testing import CliRunner

    from simulations.cli import app

    runner = CliRunner()
    made = runner.invoke(app, ["certs", "--out", str(tmp_path), "--site", "a", "--site", "b"])
    assert made.exit_code == 0, made.output
    checked = runner.invoke(app, ["certs", "--out", str(tmp_path), "--check"])
    assert checked.exit_code == 0 and "2 site identities valid for study carefed-demo" in " ".join(
        checked.output.split())
    (StudyPaths(tmp_path).site("a") / "identity.crt").write_bytes(tamper(tmp_path))
    failed = runner.invoke(app, ["certs", "--out", str(tmp_path), "--check"])
    assert failed.exit_code == 2 and message in " ".join(failed.output.split()), failed.output


def test_a_sites_key_folder_check_covers_its_identity(tmp_path: Path):
    from common.deploy.certs import check_site_keys

    make_study(tmp_path, sites=["a"], hosts=["localhost"], study="lung-2026")
    folder = StudyPaths(tmp_path).site("a")
    report = check_site_keys(folder)
    assert report["identity-study-id"] == "lung-2026" and report["identity-name"] == "a"
    (folder / "identity.crt").write_bytes(_flip_signature(tmp_path))
    with pytest.raises(CertError, match="Peers would refuse this site"):
        check_site_keys(folder)
