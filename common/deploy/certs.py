"""A study's keys and certificates: a study CA, the SuperLink's TLS certificate, and each site's node key.

    <out>/ca/ca.crt, ca.key              the study CA (ECDSA P-384); ca.key signs, then belongs offline
    <out>/superlink/server.crt, .key     TLS for the SuperLink, SANs = the names and addresses sites dial
    <out>/superlink/ca.crt               the CA, for `--ssl-ca-certfile`
    <out>/sites/<site>/node.key          the site's SuperNode authentication key (EC P-384, OpenSSH format,
                                         what `flower-supernode --auth-supernode-private-key` reads)
    <out>/sites/<site>/node.pub          its public key (OpenSSH), what the coordinator registers with
                                         `flwr supernode register <node.pub> <connection>` (Flower 1.42)
    <out>/sites/<site>/ca.crt            the CA, for `flower-supernode --root-certificates`
    <out>/sites.json                     site names, key fingerprints (SHA-256), certificate expiry

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
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import CareFedError

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


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

    def site(self, name: str) -> Path:
        return self.root / "sites" / name


def make_study(out: Path, *, sites: list[str], hosts: list[str], days: int = 365,
               now: dt.datetime | None = None) -> dict:
    """Create what is missing under `out`; return the manifest written to sites.json (no secrets in it)."""
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
    ca_key, ca_cert = _ca(paths, days, now)
    if not paths.server_cert.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        cert = _server_certificate(key, ca_key, ca_cert, hosts, days, now)
        _write_private(paths.server_key, _pem_private(key))
        _write_public(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    _write_public(paths.root / "superlink" / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    manifest = {"ca-fingerprint-sha256": _fingerprint(ca_cert.public_key()), "superlink": _cert_info(paths),
                "sites": {}}
    existing = sorted(p.name for p in (paths.root / "sites").iterdir()) if (paths.root / "sites").exists() else []
    for name in sorted(set(existing) | set(sites)):
        folder = paths.site(name)
        if not (folder / "node.key").exists():
            key = ec.generate_private_key(ec.SECP384R1())
            _write_private(folder / "node.key", key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
            _write_public(folder / "node.pub", key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
        _write_public(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
        public = serialization.load_ssh_public_key((folder / "node.pub").read_bytes())
        manifest["sites"][name] = {"public-key": str((folder / "node.pub").relative_to(paths.root)),
                                   "fingerprint-sha256": _fingerprint(public)}
    (paths.root / "sites.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


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
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CareFed study"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "CareFed study CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
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
    return {"ca-expires": ca_cert.not_valid_after_utc.isoformat(), "node-key-fingerprint-sha256":
            _fingerprint(private.public_key())}
