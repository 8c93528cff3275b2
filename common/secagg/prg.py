"""Keystreams: AES-CTR read as little-endian uint32 words, written into preallocated buffers.

Seeds are 32 bytes; the counter starts at zero (each seed is used for exactly one stream). A MaskStream keys
AES-256 with the seed itself by default, as the DP noise source and the rounding randomness use it; the
secure-aggregation masks (`apply_masks`) use AES-128 (MASK_KEY_BYTES) under SHA-256 of the whole seed. Their seeds come
from X25519 + HKDF-SHA256 (pairwise) or os.urandom (self masks), and the protocol's keys and signatures
(X25519, Ed25519, P-256) are at the 128-bit level: AES-128 matches it, and is 1.9x faster here, which is most of
the server's unmasking time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
MASK_KEY_BYTES = 16  # AES-128 for masks (see above)
MASK_KEY_DOMAIN = b"carefed/secagg/mask-key/v1"
ZERO_COUNTER = bytes(16)
WORDS_PER_BLOCK = 4  # one 16-byte AES block is four uint32 words: the counter of word w's block is w // 4
_BLOCK_SLACK_WORDS = 4  # update_into needs len(data) + block_size - 1 bytes of room


class MaskStream:
    """Reusable buffers for one vector length, so adding many masks allocates nothing."""

    def __init__(self, length: int, key_bytes: int = SEED_BYTES) -> None:
        self.length = length
        self.key_bytes = key_bytes
        self._zeros = _zeros(4 * length)
        self._scratch = np.empty(length + _BLOCK_SLACK_WORDS, dtype=np.uint32)

    def keystream(self, seed: bytes, counter: bytes = ZERO_COUNTER) -> np.ndarray:
        """The first `length` words of the stream (a view into scratch: use before the next call)."""
        if len(seed) != SEED_BYTES:
            raise ValueError(f"mask seeds are {SEED_BYTES} bytes, got {len(seed)}")
        encryptor = Cipher(algorithms.AES(_aes_key(seed, self.key_bytes)), modes.CTR(counter)).encryptor()
        written = encryptor.update_into(self._zeros, self._scratch.view(np.uint8))
        assert written == 4 * self.length
        return self._scratch[: self.length]

    def add(self, acc: np.ndarray, seed: bytes) -> None:
        """acc += PRG(seed) in Z_2^32."""
        np.add(acc, self.keystream(seed), out=acc)

    def subtract(self, acc: np.ndarray, seed: bytes) -> None:
        """acc -= PRG(seed) in Z_2^32."""
        np.subtract(acc, self.keystream(seed), out=acc)


def _aes_key(seed: bytes, key_bytes: int) -> bytes:
    """The seed itself for AES-256; for a shorter key, SHA-256 of the whole seed (domain-separated), truncated, so
    every bit of the seed matters (a seed changed in any byte gives an unrelated mask)."""
    if key_bytes == SEED_BYTES:
        return seed
    return hashlib.sha256(MASK_KEY_DOMAIN + seed).digest()[:key_bytes]


@lru_cache(maxsize=4)
def _zeros(size: int) -> memoryview:
    """AES-CTR encrypts zeros into the keystream: one read-only buffer per size, shared by every stream (a fresh
    one per stream would fault its pages in each time)."""
    zeros = np.zeros(size, dtype=np.uint8)
    zeros.flags.writeable = False
    return memoryview(zeros)


def keystream_words(seed: bytes, length: int) -> np.ndarray:
    """A fresh copy of PRG(seed) as `length` uint32 words."""
    return MaskStream(length).keystream(seed).copy()


def counter_at(word: int) -> bytes:
    """The CTR counter block where the stream's `word`-th word begins (word a multiple of WORDS_PER_BLOCK).
    OpenSSL increments the whole 128-bit big-endian counter, so block b of a stream started at 0 has counter b."""
    if word % WORDS_PER_BLOCK:
        raise ValueError(f"a stream can be resumed only at a block boundary, not at word {word}")
    return (word // WORDS_PER_BLOCK).to_bytes(16, "big")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def apply_masks(acc: np.ndarray, add: Sequence[bytes], subtract: Sequence[bytes], workers: int | None = None) -> None:
    """acc += sum MASK(a) - sum MASK(s) in Z_2^32 (AES-128-CTR masks), over `workers` threads (default: every core).

    The keystreams are independent and AES-CTR can start at any block, so each thread takes a contiguous slice
    of the vector and regenerates that slice of every stream; OpenSSL releases the GIL while it encrypts. No
    extra copy of the vector is made."""
    in_slices(acc, lambda part, offset: _apply_slice(part, offset, add, subtract), workers)


def in_slices(acc: np.ndarray, work: Callable[[np.ndarray, int], None], workers: int | None = None) -> None:
    """work(slice, offset) over contiguous, block-aligned slices of `acc`, one thread each (numpy and OpenSSL
    release the GIL); slices of less than 64K words are not worth a thread."""
    workers = max(1, min(workers or available_cores(), acc.size // 65_536 + 1))
    if workers == 1:
        work(acc, 0)
        return
    step = -(-acc.size // workers)
    step += -step % WORDS_PER_BLOCK
    with ThreadPoolExecutor(workers) as pool:
        for done in [pool.submit(work, acc[start:start + step], start) for start in range(0, acc.size, step)]:
            done.result()


def _apply_slice(acc: np.ndarray, offset: int, add: Sequence[bytes], subtract: Sequence[bytes]) -> None:
    stream, counter = MaskStream(acc.size, MASK_KEY_BYTES), counter_at(offset)
    for seed in add:
        np.add(acc, stream.keystream(seed, counter), out=acc)
    for seed in subtract:
        np.subtract(acc, stream.keystream(seed, counter), out=acc)
