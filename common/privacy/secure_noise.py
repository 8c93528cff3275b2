"""DP-SGD randomness from a cryptographically secure stream: AES-256-CTR under a fresh key from the OS.

torch's generator is a Mersenne Twister: anyone who sees enough of its output can recover its state and predict
the rest, and a 64-bit seed can be searched. A deployed site's Poisson sampling and Gaussian noise must be
unpredictable, so they come from this source (Opacus's own secure_mode needs torchcsprng, which no longer installs
with current torch). Simulations keep the seeded torch generator so experiments reproduce.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from common.secagg.prg import SEED_BYTES, MaskStream

MANTISSA_BITS = 53  # a float64 holds a uniform on a 2^-53 grid exactly
_UNIT = 2.0**-MANTISSA_BITS
_BLOCK_BYTES = 16
_MAX_CACHED_LENGTHS = 8


class SecureNoise:
    """One AES-256-CTR keystream under a key drawn from os.urandom; every draw reads counter blocks never read before.

    The key never leaves the object, so neither the server nor a later reader of the site's outputs can replay it.
    """

    def __init__(self) -> None:
        self._key = os.urandom(SEED_BYTES)
        self._next_block = 0
        self._streams: dict[int, MaskStream] = {}  # buffers per draw size: a site draws the same sizes every step

    def words(self, count: int) -> np.ndarray:
        """`count` fresh uniformly random uint64 words (valid until the next draw)."""
        stream = self._stream(2 * count)
        counter = self._next_block.to_bytes(_BLOCK_BYTES, "big")  # OpenSSL's CTR counts over all 128 bits
        self._next_block += math.ceil(8 * count / _BLOCK_BYTES)
        if self._next_block >= 2**128:  # pragma: no cover - 2^132 bytes of noise
            raise OverflowError("AES-CTR counter exhausted: make a new SecureNoise")
        return stream.keystream(self._key, counter).view(np.uint64)

    def uniform(self, count: int) -> torch.Tensor:
        """Uniforms on [0, 1) in float64 (top 53 bits of each word): P(u < q) is q to within 2^-53."""
        return self._top_bits(count).to(torch.float64) * _UNIT

    def standard_normal(self, count: int) -> torch.Tensor:
        """N(0, 1) draws in float64 by Box-Muller; the radius uses u in (0, 1], so log(0) cannot occur."""
        pairs = (count + 1) // 2
        top = self._top_bits(2 * pairs)
        radius = torch.sqrt(-2.0 * torch.log((top[:pairs] + 1).to(torch.float64) * _UNIT))
        angle = top[pairs:].to(torch.float64) * (2.0 * math.pi * _UNIT)
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]

    def normal_like(self, references: Sequence[torch.Tensor], std: float) -> list[torch.Tensor]:
        """std * N(0, 1) noise shaped like each reference, in its dtype and on its device, from one keystream read."""
        noise = std * self.standard_normal(sum(r.numel() for r in references))
        chunks = noise.split([r.numel() for r in references])
        return [c.view(r.shape).to(dtype=r.dtype, device=r.device) for c, r in zip(chunks, references, strict=True)]

    def _top_bits(self, count: int) -> torch.Tensor:
        """The top 53 bits of `count` fresh words as int64: torch's vectorised float64 maths beats numpy's 2.5x."""
        words = torch.from_numpy(self.words(count).view(np.int64))
        return (words >> (64 - MANTISSA_BITS)) & ((1 << MANTISSA_BITS) - 1)  # the mask undoes the sign extension

    def _stream(self, length: int) -> MaskStream:
        if length not in self._streams:
            if len(self._streams) >= _MAX_CACHED_LENGTHS:
                self._streams.clear()
            self._streams[length] = MaskStream(length)
        return self._streams[length]


class SecureNoiseDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer (clip, sum, noise, scale, account) with the Gaussian noise drawn from a SecureNoise."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, source: SecureNoise, **kwargs: Any) -> None:
        super().__init__(optimizer, generator=None, secure_mode=False, **kwargs)
        self.source = source

    def add_noise(self) -> None:
        """As DPOptimizer.add_noise: p.grad = clipped sum + N(0, (noise_multiplier * C)^2) on each coordinate."""
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        std = self.noise_multiplier * self.max_grad_norm
        noises = self.source.normal_like([p.summed_grad for p in self.params], std)
        for p, noise in zip(self.params, noises, strict=True):
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)
