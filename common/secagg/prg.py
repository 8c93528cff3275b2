"""Masks: an AES-256-CTR keystream read as little-endian uint32 words, written into preallocated buffers.

A 32-byte seed is the AES-256 key; the counter starts at zero (each seed is used for exactly one stream).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
ZERO_COUNTER = bytes(16)
_BLOCK_SLACK_WORDS = 4  # update_into needs len(data) + block_size - 1 bytes of room


class MaskStream:
    """Reusable buffers for one vector length, so adding many masks allocates nothing."""

    def __init__(self, length: int) -> None:
        self.length = length
        self._zeros = memoryview(np.zeros(4 * length, dtype=np.uint8))
        self._scratch = np.empty(length + _BLOCK_SLACK_WORDS, dtype=np.uint32)

    def keystream(self, seed: bytes, counter: bytes = ZERO_COUNTER) -> np.ndarray:
        """The first `length` words of the stream (a view into scratch: use before the next call)."""
        if len(seed) != SEED_BYTES:
            raise ValueError(f"mask seeds are {SEED_BYTES} bytes, got {len(seed)}")
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()
        written = encryptor.update_into(self._zeros, self._scratch.view(np.uint8))
        assert written == 4 * self.length
        return self._scratch[: self.length]

    def add(self, acc: np.ndarray, seed: bytes) -> None:
        """acc += PRG(seed) in Z_2^32."""
        np.add(acc, self.keystream(seed), out=acc)

    def subtract(self, acc: np.ndarray, seed: bytes) -> None:
        """acc -= PRG(seed) in Z_2^32."""
        np.subtract(acc, self.keystream(seed), out=acc)


def keystream_words(seed: bytes, length: int) -> np.ndarray:
    """A fresh copy of PRG(seed) as `length` uint32 words."""
    return MaskStream(length).keystream(seed).copy()
