"""Enrolled site identities: the study CA certifies each site's Ed25519 key, and sites sign what they advertise.

A dishonest coordinator could invent sites (Sybil) to fill a cohort and unmask one real site's update. Every site
therefore verifies each peer's advertisement against the study CA it holds: the certificate must come from that CA,
name one site of this study, be an identity certificate (never a TLS one), and sign this exact advertisement.

The identity certificate profile, defined here once (`carefed certs` and `enrol_virtual_sites` issue it,
`IdentityVerifier` checks it):

    subject              CN = the site's name (exactly one CN)
    public key           Ed25519
    issuer               the study CA: ECDSA P-384 (`carefed certs`) or P-256 (throwaway simulation CAs)
    basic constraints    CA:FALSE, critical
    key usage            digitalSignature only, critical
    extended key usage   IDENTITY_EKU only, critical: TLS stacks refuse it, and TLS certificates
                         (serverAuth) or CA certificates lack it, so neither can stand in for the other
    study id             STUDY_ID_EXTENSION, critical, a DER UTF8String: the one study this identity signs for
    validity             notBefore .. notAfter, checked on every verification

The OIDs live under 2.25.<UUID> (ITU-T X.667: an arc anyone may mint from a random UUID, no registration).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID, ObjectIdentifier

from common.errors import CareFedError
from common.secagg.errors import AbortReason, SecAggAbort
from common.study import NAME as STUDY_NAME

_ARC = "2.25.282329052719526852494583987885731042720"
IDENTITY_EKU = ObjectIdentifier(_ARC + ".1")  # "CareFed secure-aggregation site identity"
STUDY_ID_EXTENSION = ObjectIdentifier(_ARC + ".2")  # the study id, DER UTF8String
ADVERTISE_DOMAIN = b"carefed/advertise/v2"
IDENTITY_KEY_FILE = "identity.key"
IDENTITY_CERT_FILE = "identity.crt"
CA_CERT_FILE = "ca.crt"
MAX_CERT_BYTES = 8192  # identity certificates are ~500 bytes; refuse anything that could only be a nuisance
_SIGNATURE_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_CA_CURVES = (ec.SECP256R1, ec.SECP384R1)
_KNOWN_EXTENSIONS = {x509.BasicConstraints.oid, x509.KeyUsage.oid, x509.ExtendedKeyUsage.oid, STUDY_ID_EXTENSION,
                     x509.SubjectKeyIdentifier.oid, x509.AuthorityKeyIdentifier.oid}


class IdentityError(CareFedError):
    """This site's own identity files or its study CA cannot be used (local set-up, not a peer's fault)."""


class IdentityProblem(StrEnum):
    MALFORMED = "not a well-formed DER X.509 certificate"
    UNKNOWN_CA = "not issued by this study's CA"
    EXPIRED = "certificate has expired"
    NOT_YET_VALID = "certificate is not yet valid"
    WRONG_USAGE = "not a CareFed identity certificate (key usage, extended key usage, constraints)"
    WRONG_STUDY = "certificate is for another study"
    WRONG_KEY_TYPE = "the certified key is not Ed25519"
    BAD_SIGNATURE = "the advertisement's signature does not verify"
    DUPLICATE_IDENTITY = "one site identity is claimed by two node ids (Sybil attempt)"


class IdentityRefused(SecAggAbort):
    """A peer's identity or signature is refused; `problem` says which check failed. The round aborts."""

    def __init__(self, problem: IdentityProblem, detail: str = "") -> None:
        duplicate = problem is IdentityProblem.DUPLICATE_IDENTITY
        super().__init__(AbortReason.DUPLICATE_ID if duplicate else AbortReason.BAD_SIGNATURE,
                         problem.value + (f": {detail}" if detail else ""))
        self.problem = problem


@dataclass(frozen=True)
class VerifiedPeer:
    name: str  # the site's name (certificate CN)
    public_key_bytes: bytes  # raw Ed25519 public key, 32 bytes
    fingerprint: str  # SHA-256 of the certificate DER, hex (as listed in sites.json)


@dataclass(frozen=True)
class _Verified:
    peer: VerifiedPeer
    key: Ed25519PublicKey
    not_before: dt.datetime
    not_after: dt.datetime


def certificate_fingerprint(cert_der: bytes) -> str:
    return hashlib.sha256(cert_der).hexdigest()


# --- what gets signed -------------------------------------------------------------------------------------------

def advertisement_payload(study_id: str, run_id: str, server_round: int, node_id: int, c_pk: bytes, s_pk: bytes,
                          config_hash: bytes) -> bytes:
    """The bytes a site signs for one round's keys: every field length-prefixed, so no two field lists collide."""
    fields = [ADVERTISE_DOMAIN, _text(study_id), _text(run_id), _uint64(server_round), _uint64(node_id),
              _blob(c_pk), _blob(s_pk), _blob(config_hash)]
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def _text(value: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"expected a str, got {type(value).__name__}")
    return value.encode("utf-8")


def _uint64(value: int) -> bytes:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
        raise ValueError(f"{value!r} is not an unsigned 64-bit integer")
    return value.to_bytes(8, "big")


def _blob(value: bytes) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value


# --- this site's identity ---------------------------------------------------------------------------------------

class SiteIdentity:
    """This site's enrolled identity: the Ed25519 key (never printed) and its certificate (DER)."""

    def __init__(self, key: Ed25519PrivateKey, certificate: bytes, name: str) -> None:
        self._key = key
        self.certificate = certificate
        self.name = name

    def __repr__(self) -> str:
        return f"SiteIdentity(name={self.name!r}, fingerprint={self.fingerprint[:16]}...)"

    @property
    def fingerprint(self) -> str:
        return certificate_fingerprint(self.certificate)

    @classmethod
    def load(cls, folder: Path) -> SiteIdentity:
        """Read <folder>/identity.key (0600, PKCS#8 PEM) and identity.crt (PEM) as `carefed certs` wrote them."""
        key_path, cert_path = Path(folder) / IDENTITY_KEY_FILE, Path(folder) / IDENTITY_CERT_FILE
        for path in (key_path, cert_path):
            if not path.is_file():
                raise IdentityError(f"{path} not found; copy this site's sites/<site>/ folder from the coordinator "
                                    "(`carefed certs` makes it)")
        mode = key_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise IdentityError(f"{key_path} is readable by others (mode {mode:o}); run `chmod 600 {key_path}`")
        key, certificate, name = _identity(key_path.read_bytes(), cert_path.read_bytes(), str(folder))
        return cls(key, certificate, name)

    def sign(self, payload: bytes) -> bytes:
        return self._key.sign(payload)


@functools.lru_cache(maxsize=16)
def _identity(key_pem: bytes, cert_pem: bytes, folder: str) -> tuple[Ed25519PrivateKey, bytes, str]:
    """The key, certificate DER and name from the identity files' bytes: parsed once per process (a simulation's
    worker hosts many sites; the files are read, and their mode checked, every time)."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, TypeError) as err:
        raise IdentityError(f"{folder}: identity files are not PEM ({err})") from None
    if not isinstance(key, Ed25519PrivateKey) or key.public_key() != cert.public_key():
        raise IdentityError(f"{folder}: {IDENTITY_KEY_FILE} is not the Ed25519 key certified by {IDENTITY_CERT_FILE}")
    try:
        name = _common_name(cert)
    except IdentityRefused as err:
        raise IdentityError(f"{folder}/{IDENTITY_CERT_FILE}: {err.detail}") from None
    return key, cert.public_bytes(serialization.Encoding.DER), name


# --- checking peers ---------------------------------------------------------------------------------------------

# Certificates that passed the checks in this process, by (study CA, study id, certificate DER): a site checks the
# same peers at every stage of every round, and in a simulation a worker process hosts many sites. Only passes are
# kept (a refusal is checked again), and the validity window is checked at every use.
_CHECKED: dict[tuple[bytes, str, bytes], _Verified] = {}
CHECKED_MAX = 8192

class IdentityVerifier:
    """Checks peers' identity certificates against one study CA and study id; remembers certificates it verified."""

    def __init__(self, ca_certificate: bytes, study_id: str, now: dt.datetime | None = None) -> None:
        self._ca = _load_ca(ca_certificate)
        self._ca_der = self._ca.public_bytes(serialization.Encoding.DER)
        self.study_id = study_id
        self.now = now  # a fixed clock (tests, audits of past rounds); None: the system clock at each check
        self._verified: dict[bytes, _Verified] = {}

    @classmethod
    def for_site(cls, folder: Path, study_id: str, now: dt.datetime | None = None) -> IdentityVerifier:
        """The verifier for a site folder from `carefed certs` (its ca.crt is the study CA)."""
        path = Path(folder) / CA_CERT_FILE
        if not path.is_file():
            raise IdentityError(f"study CA {path} not found; copy it from the coordinator's sites/<site>/ folder")
        return cls(path.read_bytes(), study_id, now)

    def verify_certificate(self, cert_der: bytes) -> VerifiedPeer:
        return self._entry(cert_der).peer

    def verify_advertisement(self, cert_der: bytes, signature: bytes, payload: bytes) -> VerifiedPeer:
        """The certificate is a valid identity of this study and its key signed exactly `payload`."""
        entry = self._entry(cert_der)
        try:
            entry.key.verify(bytes(signature), payload)
        except (InvalidSignature, TypeError, ValueError):
            raise IdentityRefused(IdentityProblem.BAD_SIGNATURE, f"site {entry.peer.name!r}") from None
        return entry.peer

    def verify_cohort(self, adverts: Mapping[int, tuple[bytes, bytes, bytes]]) -> dict[int, VerifiedPeer]:
        """node id -> (certificate DER, signature, payload) for one stage: each verified, no identity used twice."""
        peers = {node: self.verify_advertisement(*advert) for node, advert in adverts.items()}
        refuse_duplicate_identities(peers)
        return peers

    def _entry(self, cert_der: bytes) -> _Verified:
        entry = self._verified.get(cert_der) if isinstance(cert_der, bytes) else None
        if entry is None:
            key = (self._ca_der, self.study_id, cert_der) if isinstance(cert_der, bytes) else None
            entry = _CHECKED.get(key) if key else None
            if entry is None:
                entry = self._check(cert_der)
                if key and len(_CHECKED) < CHECKED_MAX:
                    _CHECKED[key] = entry
            self._verified[cert_der] = entry
        self._check_window(entry)  # the clock moves: checked on every use, cached or not
        return entry

    def _now_utc(self) -> dt.datetime:
        return self.now or dt.datetime.now(dt.UTC)

    def _check_window(self, entry: _Verified) -> None:
        now, name = self._now_utc(), entry.peer.name
        if now < max(entry.not_before, self._ca.not_valid_before_utc):
            raise IdentityRefused(IdentityProblem.NOT_YET_VALID, f"site {name!r} (valid from "
                                  f"{entry.not_before:%Y-%m-%d %H:%M} UTC; check the clocks)")
        if now > min(entry.not_after, self._ca.not_valid_after_utc):
            raise IdentityRefused(IdentityProblem.EXPIRED, f"site {name!r} (expired {entry.not_after:%Y-%m-%d}, "
                                  f"study CA until {self._ca.not_valid_after_utc:%Y-%m-%d})")

    def _check(self, cert_der: bytes) -> _Verified:
        cert = _parse(cert_der)
        _check_issued_by(cert, self._ca)
        _check_usage(cert)
        name = _common_name(cert)
        study = _study_id(cert)
        if study != self.study_id:
            raise IdentityRefused(IdentityProblem.WRONG_STUDY, f"site {name!r} is enrolled in study {study!r}, "
                                  f"not {self.study_id!r}")
        key = cert.public_key()
        if not isinstance(key, Ed25519PublicKey):
            raise IdentityRefused(IdentityProblem.WRONG_KEY_TYPE, f"site {name!r} has a {type(key).__name__}")
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        peer = VerifiedPeer(name, raw, certificate_fingerprint(cert_der))
        return _Verified(peer, key, cert.not_valid_before_utc, cert.not_valid_after_utc)


def consistency_payload(session: bytes, server_round: int, survivors: Sequence[int]) -> bytes:
    """What each site signs before revealing any share: this session's survivor set (ids sorted, length-prefixed)."""
    return b"".join([_text("carefed/consistency/v1"), _blob(session), _uint64(server_round),
                     *(_uint64(u) for u in sorted(survivors))])


def signature_valid(public_key: bytes, signature: bytes, payload: bytes) -> bool:
    """An Ed25519 signature by a key already verified against the study CA (see IdentityVerifier)."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, payload)
        return True
    except (InvalidSignature, TypeError, ValueError):
        return False


def refuse_duplicate_identities(peers: Mapping[int, VerifiedPeer]) -> None:
    """One site, one node id per round: a certificate, name or key claimed by two node ids is a Sybil attempt."""
    for attribute in ("fingerprint", "name", "public_key_bytes"):
        seen: dict[object, int] = {}
        for node, peer in sorted(peers.items()):
            value = getattr(peer, attribute)
            if value in seen:
                raise IdentityRefused(IdentityProblem.DUPLICATE_IDENTITY,
                                      f"site {peer.name!r} for node ids {seen[value]} and {node}")
            seen[value] = node


def certificate_study_id(cert_der: bytes) -> str:
    """The study an identity certificate names (unverified: for reports; use IdentityVerifier to trust it)."""
    return _study_id(_parse(cert_der))


def _parse(cert_der: bytes) -> x509.Certificate:
    if not isinstance(cert_der, bytes) or not 0 < len(cert_der) <= MAX_CERT_BYTES:
        raise IdentityRefused(IdentityProblem.MALFORMED, "expected 1 to 8192 bytes of DER")
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        _ = cert.extensions  # parse them now: duplicate or garbled extensions are malformed, not a usage question
    except (ValueError, x509.DuplicateExtension) as err:
        raise IdentityRefused(IdentityProblem.MALFORMED, str(err)[:200]) from None
    return cert


def _check_issued_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    if not isinstance(cert.signature_hash_algorithm, _SIGNATURE_HASHES):
        raise IdentityRefused(IdentityProblem.UNKNOWN_CA, "signature hash is not SHA-256/384/512")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        raise IdentityRefused(IdentityProblem.UNKNOWN_CA, f"issuer {cert.issuer.rfc4514_string()!r}") from None


def _check_usage(cert: x509.Certificate) -> None:
    extensions = {ext.oid: ext for ext in cert.extensions}
    unknown = [ext.oid.dotted_string for ext in cert.extensions if ext.critical and ext.oid not in _KNOWN_EXTENSIONS]
    constraints = extensions.get(x509.BasicConstraints.oid)
    usage = extensions.get(x509.KeyUsage.oid)
    purposes = extensions.get(x509.ExtendedKeyUsage.oid)
    problems = [
        (unknown, f"unknown critical extensions {unknown}"),
        (constraints is not None and constraints.value.ca, "a CA certificate"),
        (usage is None or not _signing_only(usage.value), "key usage is not digitalSignature only"),
        (purposes is None or list(purposes.value) != [IDENTITY_EKU],
         "extended key usage is not the CareFed identity purpose alone"),
        (STUDY_ID_EXTENSION not in extensions, "no study id extension"),
    ]
    for failed, what in problems:
        if failed:
            raise IdentityRefused(IdentityProblem.WRONG_USAGE, what)


def _signing_only(usage: x509.KeyUsage) -> bool:
    others = (usage.content_commitment, usage.key_encipherment, usage.data_encipherment, usage.key_agreement,
              usage.key_cert_sign, usage.crl_sign)
    return usage.digital_signature and not any(others)


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str) or not names[0].value:
        raise IdentityRefused(IdentityProblem.WRONG_USAGE, "subject must carry exactly one CN (the site's name)")
    return names[0].value


def _study_id(cert: x509.Certificate) -> str:
    try:
        ext = cert.extensions.get_extension_for_oid(STUDY_ID_EXTENSION)
        return _utf8_string_from_der(ext.value.value)
    except (x509.ExtensionNotFound, ValueError, AttributeError):
        raise IdentityRefused(IdentityProblem.WRONG_USAGE, "no readable study id extension") from None


def _utf8_string_to_der(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 255:
        raise ValueError("study id longer than 255 bytes")
    return b"\x0c" + (bytes([len(raw)]) if len(raw) < 128 else b"\x81" + bytes([len(raw)])) + raw


def _utf8_string_from_der(der: bytes) -> str:
    if len(der) < 2 or der[0] != 0x0C:
        raise ValueError("not a UTF8String")
    length, start = der[1], 2
    if length == 0x81:
        length, start = (der[2] if len(der) > 2 else -1), 3
        if length < 128:
            raise ValueError("not DER (long form for a short length)")
    elif length >= 0x80:
        raise ValueError("UTF8String length form not supported")
    if len(der) != start + length:
        raise ValueError("UTF8String length does not match")
    return der[start:].decode("utf-8")


def _load_ca(data: bytes) -> x509.Certificate:
    if not isinstance(data, bytes):
        raise IdentityError(f"the study CA certificate must be bytes, not {type(data).__name__}")
    return _ca_certificate(data)


@functools.lru_cache(maxsize=16)
def _ca_certificate(data: bytes) -> x509.Certificate:
    """Parsed and checked once per process (a frozen certificate); a bad one raises every time."""
    try:
        ca = (x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----BEGIN")
              else x509.load_der_x509_certificate(data))
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except (ValueError, TypeError, AttributeError, x509.ExtensionNotFound, x509.DuplicateExtension) as err:
        raise IdentityError(f"the study CA certificate cannot be used ({err}); give the study's ca.crt") from None
    key = ca.public_key()
    if not (constraints.ca and usage.key_cert_sign and isinstance(key, ec.EllipticCurvePublicKey)
            and isinstance(key.curve, _CA_CURVES)):
        raise IdentityError("the study CA must be a CA certificate (CA:TRUE, keyCertSign) with an ECDSA P-256 or "
                            "P-384 key; give the study's ca.crt from `carefed certs`")
    return ca


# --- issuing ----------------------------------------------------------------------------------------------------

def issue_identity(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, site: str, study_id: str, *,
                   not_before: dt.datetime, not_after: dt.datetime,
                   key: Ed25519PrivateKey | None = None) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """A new (or, for renewal, the given) Ed25519 identity key and its certificate under the study CA."""
    if not STUDY_NAME.match(study_id) or ".." in study_id:
        raise IdentityError(f"study id {study_id!r} is not valid (letters, digits, '.', '_', '-'; up to 128)")
    key = key or Ed25519PrivateKey.generate()
    not_after = min(not_after, ca_cert.not_valid_after_utc)  # never outlive the CA that vouches for it
    digest = hashes.SHA384() if isinstance(ca_key.curve, ec.SECP384R1) else hashes.SHA256()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([IDENTITY_EKU]), critical=True)
            .add_extension(x509.UnrecognizedExtension(STUDY_ID_EXTENSION, _utf8_string_to_der(study_id)),
                           critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, digest))
    return key, cert


def identity_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --- simulation: a throwaway study CA per run -------------------------------------------------------------------

@dataclass(frozen=True)
class VirtualEnrolment:
    ca_cert: Path  # the run's study CA (its private key was never written anywhere)
    site_folders: tuple[Path, ...]  # site k's identity.key, identity.crt and ca.crt live in site_folders[k]


def enrol_virtual_sites(num_sites: int, study_id: str, folder: Path, *, days: int = 7) -> VirtualEnrolment:
    """A throwaway ECDSA P-256 CA (fast to verify) and one Ed25519 identity per virtual site, site-<k>/ under
    `folder`; the CA key is dropped afterwards, so no one can enrol more sites into this run."""
    if num_sites < 1:
        raise IdentityError(f"num_sites = {num_sites}: enrol at least one site")
    now = dt.datetime.now(dt.UTC)
    ca_key, ca_cert = _throwaway_ca(study_id, now, days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    folder = Path(folder)
    _create(folder / CA_CERT_FILE, ca_pem, 0o644)
    sites = []
    for k in range(num_sites):
        site = folder / f"site-{k}"
        key, cert = issue_identity(ca_key, ca_cert, f"site-{k}", study_id, not_before=now - dt.timedelta(minutes=5),
                                   not_after=now + dt.timedelta(days=days))
        _create(site / IDENTITY_KEY_FILE, identity_key_pem(key), 0o600)
        _create(site / IDENTITY_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _create(site / CA_CERT_FILE, ca_pem, 0o644)
        sites.append(site)
    return VirtualEnrolment(folder / CA_CERT_FILE, tuple(sites))


def _throwaway_ca(study_id: str, now: dt.datetime, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, self_signed_ca(key, "CareFed simulation", f"CareFed simulation CA for {study_id}"[:64], now, days,
                               hashes.SHA256())


def self_signed_ca(key: ec.EllipticCurvePrivateKey, organisation: str, common_name: str, now: dt.datetime,
                   days: int, digest: hashes.HashAlgorithm) -> x509.Certificate:
    """A CA certificate that signs certificates only (no TLS, no other use), valid from five minutes ago."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, digest))


def _create(path: Path, data: bytes, mode: int) -> None:
    """Create a new file with its final mode from the start (O_EXCL: an existing file is never replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise IdentityError(f"{path} exists; enrol virtual sites into a fresh folder") from None
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, mode)
