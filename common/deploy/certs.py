"""A study's keys and certificates: a study CA, the SuperLink's TLS certificate, and each site's node key.

    <out>/ca/ca.crt, ca.key              the study CA (ECDSA P-384); ca.key signs, then belongs offline
    <out>/superlink/server.crt, .key     TLS for the SuperLink, SANs = the names and addresses sites dial
    <out>/superlink/ca.crt               the CA, for `--ssl-ca-certfile`
    <out>/sites/<site>/node.key          the site's SuperNode authentication key (EC P-384, OpenSSH format,
                                         what `flower-supernode --auth-supernode-private-key` reads)
    <out>/sites/<site>/node.pub          its public key (OpenSSH), what the coordinator registers with
                                         `flwr supernode register <node.pub> <connection>` (Flower 1.42)
    <out>/sites/<site>/ca.crt            the CA, for `flower-supernode --root-certificates`
    <out>/sites/<site>/identity.key      the site's secure-aggregation identity key (Ed25519, PKCS#8 PEM): it signs
                                         the site's keys each round, so a coordinator cannot invent sites
    <out>/sites/<site>/identity.crt      its certificate from the study CA: CN = site, the study id in a critical
                                         extension, digitalSignature and the CareFed identity purpose only
                                         (profile: common/secagg/identity.py)
    <out>/sites.json                     study id, site names, key and identity-certificate fingerprints (SHA-256),
                                         certificate expiry

A study folder belongs to one study id (`--study`, recorded in sites.json). To renew a site's identity
certificate, move its identity.crt away and run again: the existing identity key is certified anew.

Private keys are written 0600 through os.open (never world-readable, not even for an instant) and are never
printed or logged; only fingerprints are. Existing keys are never overwritten: running again adds what is
missing (a new site, say) and reuses the CA. In Flower 1.42 node authentication is
`flower-superlink --enable-supernode-auth` plus `flwr supernode register`; the older
`--auth-list-public-keys` CSV is refused by the SuperLink.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import CareFedError
from common.secagg.identity import (
    IDENTITY_CERT_FILE,
    IDENTITY_KEY_FILE,
    IdentityError,
    IdentityRefused,
    IdentityVerifier,
    SiteIdentity,
    certificate_fingerprint,
    certificate_study_id,
    identity_key_pem,
    issue_identity,
    self_signed_ca,
)
from common.study import NAME as STUDY_NAME

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DEFAULT_STUDY = "carefed-demo"


class CertError(CareFedError):
    """Keys or certificates cannot be made or used as asked."""


@dataclass(frozen=True)
class StudyPaths:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink" / "server.key"

    @property
    def manifest(self) -> Path:
        return self.root / "sites.json"

    def site(self, name: str) -> Path:
        return self.root / "sites" / name


def make_study(out: Path, *, sites: list[str], hosts: list[str], days: int = 365,
               now: dt.datetime | None = None, study: str | None = None) -> dict:
    """Create what is missing under `out`; return the manifest written to sites.json (no secrets in it).
    `study` defaults to the id recorded in sites.json, else DEFAULT_STUDY."""
    for name in sites:
        if not SITE_NAME.match(name):
            raise CertError(f"site name '{name}' is not allowed: use lowercase letters, digits and '-' "
                            "(it becomes a folder name and the SuperNode's name)")
    if len(set(sites)) != len(sites):
        raise CertError("site names repeat; give each site once")
    if not hosts:
        raise CertError("give at least one --superlink-host (the DNS name or IP address sites connect to)")
    if days < 1:
        raise CertError(f"--days {days}: certificates must be valid for at least one day")
    now = now or dt.datetime.now(dt.UTC)
    paths = StudyPaths(out)
    study_id = _study_id(paths, study)
    ca_key, ca_cert = _ca(paths, days, now)
    if not paths.server_cert.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        cert = _server_certificate(key, ca_key, ca_cert, hosts, days, now)
        _write_private(paths.server_key, _pem_private(key))
        _write_public(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    _write_public(paths.root / "superlink" / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    manifest = {"study-id": study_id, "ca-fingerprint-sha256": _fingerprint(ca_cert.public_key()),
                "superlink": _cert_info(paths), "sites": {}}
    for name in sorted(set(_site_names(paths)) | set(sites)):
        folder = paths.site(name)
        manifest["sites"][name] = {**_node_key(paths, folder, ca_cert),
                                   **_identity(paths, folder, ca_key, ca_cert, study_id, days, now)}
    paths.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _site_names(paths: StudyPaths) -> list[str]:
    return sorted(p.name for p in (paths.root / "sites").iterdir()) if (paths.root / "sites").exists() else []


def _read_manifest(paths: StudyPaths) -> dict:
    if not paths.manifest.exists():
        return {}
    try:
        manifest = json.loads(paths.manifest.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CertError(f"{paths.manifest} is not valid JSON ({err}); restore it from a backup") from None
    if not isinstance(manifest, dict):
        raise CertError(f"{paths.manifest} is not a study manifest; restore it from a backup")
    return manifest


def _study_id(paths: StudyPaths, study: str | None) -> str:
    """One study folder, one study id: the one recorded in sites.json wins over the default, never over --study."""
    recorded = _read_manifest(paths).get("study-id")
    if study and recorded and study != recorded:
        raise CertError(f"{paths.root} belongs to study {recorded!r}, not --study {study!r}: a study folder has one "
                        "study id (use another --out for another study)")
    study_id = study or recorded or DEFAULT_STUDY
    if not isinstance(study_id, str) or not STUDY_NAME.match(study_id) or ".." in study_id:
        raise CertError(f"study id {study_id!r} is not allowed: letters, digits, '.', '_' and '-', up to 128")
    return study_id


def _node_key(paths: StudyPaths, folder: Path, ca_cert: x509.Certificate) -> dict:
    """The SuperNode's authentication key (made once), and the CA beside it."""
    if not (folder / "node.key").exists():
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(folder / "node.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        _write_public(folder / "node.pub", key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    _write_public(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    public = serialization.load_ssh_public_key((folder / "node.pub").read_bytes())
    return {"public-key": str((folder / "node.pub").relative_to(paths.root)),
            "fingerprint-sha256": _fingerprint(public)}


def _identity(paths: StudyPaths, folder: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
              study_id: str, days: int, now: dt.datetime) -> dict:
    """The site's identity key and certificate: made when missing, re-certified when only the certificate is."""
    key_path, cert_path = folder / IDENTITY_KEY_FILE, folder / IDENTITY_CERT_FILE
    if cert_path.exists() and not key_path.exists():
        raise CertError(f"{cert_path} has no {IDENTITY_KEY_FILE} beside it; restore the key, or move the certificate "
                        "away to enrol the site with a new identity")
    if not cert_path.exists():
        existing = _identity_key(key_path) if key_path.exists() else None
        key, cert = issue_identity(ca_key, ca_cert, folder.name, study_id, key=existing,
                                   not_before=now - dt.timedelta(minutes=5), not_after=now + dt.timedelta(days=days))
        if existing is None:
            _write_private(key_path, identity_key_pem(key))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    enrolled_in = _enrolled_study(cert_path)
    if enrolled_in != study_id:
        raise CertError(f"{cert_path} enrols {folder.name} in study {enrolled_in!r}, not {study_id!r}; this folder "
                        "mixes studies (use one --out per study)")
    der = _pem_certificate_der(cert_path)
    cert = x509.load_der_x509_certificate(der)
    return {"identity-certificate": str(cert_path.relative_to(paths.root)),
            "identity-fingerprint-sha256": certificate_fingerprint(der),
            "identity-expires": cert.not_valid_after_utc.isoformat()}


def _identity_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise CertError(f"{path} is not an unencrypted PEM private key; restore it or move it away") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CertError(f"{path} is not an Ed25519 key; restore it or move it away to enrol the site anew")
    return key


def _enrolled_study(cert_path: Path) -> str:
    """The study an identity certificate names (read, not yet trusted: check_identity verifies it)."""
    if not cert_path.is_file():
        raise CertError(f"{cert_path} not found; copy the site's whole sites/<site>/ folder from the coordinator")
    try:
        return certificate_study_id(_pem_certificate_der(cert_path))
    except IdentityRefused as err:
        raise CertError(f"{cert_path}: {err.detail}; move it away and run `carefed certs` again to re-certify the "
                        "site") from None


def _pem_certificate_der(path: Path) -> bytes:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)
    except ValueError:
        raise CertError(f"{path} is not a PEM certificate; move it away and run `carefed certs` again") from None


def _ca(paths: StudyPaths, days: int, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if paths.ca_key.exists() != paths.ca_cert.exists():
        raise CertError(f"{paths.ca_key.parent} has only one of ca.key and ca.crt; restore the other or start a "
                        "new study folder (a CA cannot be half-replaced)")
    if paths.ca_key.exists():
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise CertError(f"{paths.ca_key} does not belong to {paths.ca_cert}")
        return key, cert
    key = ec.generate_private_key(ec.SECP384R1())
    cert = self_signed_ca(key, "CareFed study", "CareFed study CA", now, days, hashes.SHA384())
    _write_private(paths.ca_key, _pem_private(key))
    _write_public(paths.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _server_certificate(key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
                        ca_cert: x509.Certificate, hosts: list[str], days: int, now: dt.datetime) -> x509.Certificate:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))


def _cert_info(paths: StudyPaths) -> dict:
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {"certificate": str(paths.server_cert.relative_to(paths.root)),
            "names": [str(v) for v in sans.get_values_for_type(x509.DNSName)]
            + [str(v) for v in sans.get_values_for_type(x509.IPAddress)],
            "expires": cert.not_valid_after_utc.isoformat()}


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    """Create with 0600 from the start; refuse to replace an existing key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CertError(f"{path} exists; keys are never overwritten (move it away to replace it)") from None
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)  # in case a umask or ACL widened it


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(path.suffix + ".tmp")
    temp.write_bytes(data)
    os.chmod(temp, 0o644)
    temp.replace(path)


def check_tls_files(*, ca: Path, cert: Path | None = None, key: Path | None = None,
                    now: dt.datetime | None = None) -> x509.Certificate:
    """Clear errors for the usual TLS mistakes, before a process is started with these files; returns the CA."""
    now = now or dt.datetime.now(dt.UTC)
    for label, path in (("CA certificate", ca), ("certificate", cert), ("private key", key)):
        if path is not None and not path.is_file():
            raise CertError(f"{label} file {path} not found; run `carefed certs` or check the path")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
    except ValueError:
        raise CertError(f"{ca} is not a PEM certificate; point at the study's ca.crt") from None
    if cert is None:
        return ca_cert
    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    except ValueError:
        raise CertError(f"{cert} is not a PEM certificate") from None
    if leaf.not_valid_after_utc < now:
        raise CertError(f"{cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d}; make a new one with `carefed "
                        "certs` (move the old superlink/ folder away first)")
    if leaf.not_valid_before_utc > now:
        raise CertError(f"{cert} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check the clock")
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError) as err:
        raise CertError(f"{cert} was not issued by the CA in {ca} ({type(err).__name__}); use the study's CA and "
                        "the certificate it signed") from None
    if key is not None:
        try:
            private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        except (ValueError, TypeError):
            raise CertError(f"{key} is not an unencrypted PEM private key") from None
        if private.public_key() != leaf.public_key():
            raise CertError(f"{key} does not match {cert}: the key and certificate come from different runs of "
                            "`carefed certs`")
    return ca_cert


def check_site_keys(folder: Path, *, now: dt.datetime | None = None) -> dict:
    """A site's key folder (from `carefed certs`): the study CA and the node key Flower will load, with clear errors."""
    ca, key = folder / "ca.crt", folder / "node.key"
    ca_cert = check_tls_files(ca=ca, now=now)
    if not key.is_file():
        raise CertError(f"node key {key} not found; copy this site's sites/<site>/ folder from the coordinator")
    mode = key.stat().st_mode & 0o777
    if mode & 0o077:
        raise CertError(f"{key} is readable by others (mode {mode:o}); run `chmod 600 {key}`")
    try:
        private = serialization.load_ssh_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise CertError(f"{key} is not an unencrypted OpenSSH private key (what flower-supernode reads)") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key} is not an elliptic-curve key; Flower's node authentication needs a NIST curve")
    now = now or dt.datetime.now(dt.UTC)
    if ca_cert.not_valid_after_utc < now:
        raise CertError(f"the study CA {ca} expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; ask the coordinator "
                        "for the study's current ca.crt")
    report = {"ca-expires": ca_cert.not_valid_after_utc.isoformat(), "node-key-fingerprint-sha256":
              _fingerprint(private.public_key())}
    if (folder / IDENTITY_KEY_FILE).exists() or (folder / IDENTITY_CERT_FILE).exists():
        report |= check_identity(folder, _verifier(ca, _enrolled_study(folder / IDENTITY_CERT_FILE), now))
    return report


def check_study(out: Path, *, study: str | None = None, now: dt.datetime | None = None) -> dict:
    """`carefed certs --check`: the SuperLink's TLS files, then every site's identity against the CA and study."""
    paths = StudyPaths(out)
    check_tls_files(ca=paths.ca_cert, cert=paths.server_cert, key=paths.server_key, now=now)
    study_id = _study_id(paths, study)
    verifier = _verifier(paths.ca_cert, study_id, now)
    listed = _read_manifest(paths).get("sites", {})
    sites = {}
    for name in _site_names(paths):
        sites[name] = check_identity(paths.site(name), verifier)
        recorded = listed.get(name, {}).get("identity-fingerprint-sha256")
        if recorded and recorded != sites[name]["identity-fingerprint-sha256"]:
            raise CertError(f"{paths.site(name) / IDENTITY_CERT_FILE} is not the certificate sites.json lists for "
                            f"{name}; it was replaced after `carefed certs` wrote it")
    return {"study-id": study_id, "sites": sites}


def _verifier(ca: Path, study_id: str, now: dt.datetime | None) -> IdentityVerifier:
    try:
        return IdentityVerifier(ca.read_bytes(), study_id, now)
    except IdentityError as err:
        raise CertError(f"{ca}: {err}") from None


def check_identity(folder: Path, verifier: IdentityVerifier) -> dict:
    """A site's identity key and certificate as its peers will check them (CA, study, usage, validity)."""
    identity = SiteIdentity.load(folder)  # presence, mode 0600, key matches certificate
    try:
        peer = verifier.verify_certificate(identity.certificate)
    except IdentityRefused as err:
        raise CertError(f"{folder / IDENTITY_CERT_FILE}: {err.detail}. Peers would refuse this site; move the "
                        "certificate away and run `carefed certs` again to re-certify it") from None
    if peer.name != folder.name:
        raise CertError(f"{folder / IDENTITY_CERT_FILE} names site {peer.name!r}, not {folder.name!r}")
    expires = x509.load_der_x509_certificate(identity.certificate).not_valid_after_utc
    return {"identity-name": peer.name, "identity-study-id": verifier.study_id,
            "identity-fingerprint-sha256": peer.fingerprint, "identity-expires": expires.isoformat()}
