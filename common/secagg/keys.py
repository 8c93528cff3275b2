"""Key agreement and key derivation: X25519 + HKDF-SHA256, bound to the session id and to the purpose."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.secagg.errors import AbortReason, SecAggAbort

PUBLIC_KEY_BYTES = 32
PRIVATE_KEY_BYTES = 32


def node_bytes(node_id: int) -> bytes:
    return node_id.to_bytes(8, "big")


def new_key_pair() -> tuple[X25519PrivateKey, bytes]:
    private = X25519PrivateKey.generate()
    return private, public_bytes(private)


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    if len(raw) != PRIVATE_KEY_BYTES:
        raise SecAggAbort(AbortReason.RECONSTRUCTION_FAILED, f"private key of {len(raw)} bytes")
    return X25519PrivateKey.from_private_bytes(raw)


def check_public_key(raw: bytes) -> None:
    if not isinstance(raw, bytes) or len(raw) != PUBLIC_KEY_BYTES:
        raise SecAggAbort(AbortReason.BAD_KEY, f"expected {PUBLIC_KEY_BYTES} bytes")
    X25519PublicKey.from_public_bytes(raw)


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 shared secret; refuses low-order peer keys (an all-zero secret would make masks public)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:  # cryptography refuses all-zero shared secrets itself
        raise SecAggAbort(AbortReason.BAD_KEY, str(err)) from err
    if shared == bytes(len(shared)):
        raise SecAggAbort(AbortReason.BAD_KEY, "all-zero X25519 shared secret")
    return shared


def derive(shared_secret: bytes, session_id: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=session_id, info=info).derive(shared_secret)


def share_encryption_key(private: X25519PrivateKey, peer_public: bytes, session_id: bytes, sender: int,
                         receiver: int) -> bytes:
    """AEAD key for shares sent from `sender` to `receiver` (both ends derive the same key)."""
    return derive(agree(private, peer_public), session_id, b"carefed/share" + node_bytes(sender) + node_bytes(receiver))


def pairwise_mask_seed(private: X25519PrivateKey, peer_public: bytes, session_id: bytes, a: int, b: int) -> bytes:
    """The seed of the pairwise mask between clients a and b (symmetric in a, b)."""
    low, high = sorted((a, b))
    return derive(agree(private, peer_public), session_id, b"carefed/mask" + node_bytes(low) + node_bytes(high))
