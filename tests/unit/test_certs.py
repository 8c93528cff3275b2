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
