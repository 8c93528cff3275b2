"""Per-site acquisition shift: each hospital's scanner has its own gain, offset, contrast curve and noise.

Parameters are drawn once per (seed, site) so a site always sees the same 'scanner'; strength 0 disables it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScannerShift:
    gain: float  # multiplies intensities
    offset: float  # added to intensities in [0, 1]
    gamma: float  # contrast curve x ** gamma
    noise_std: float  # additive Gaussian acquisition noise

    @classmethod
    def for_site(cls, site: int, seed: int, strength: float) -> ScannerShift:
        if strength == 0:
            return cls(1.0, 0.0, 1.0, 0.0)
        rng = np.random.default_rng([seed, site, 0x5CA7])
        return cls(
            gain=float(1 + strength * rng.uniform(-0.25, 0.25)),
            offset=float(strength * rng.uniform(-0.1, 0.1)),
            gamma=float(np.exp(strength * rng.uniform(-0.4, 0.4))),
            noise_std=float(strength * rng.uniform(0.0, 0.05)),
        )

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 images in, float32 images in [0, 1] out (same shape)."""
        x = images.astype(np.float32) / 255.0
        x = self.gain * np.power(x, self.gamma) + self.offset
        if self.noise_std:
            x = x + rng.normal(0.0, self.noise_std, size=x.shape).astype(np.float32)
        return np.clip(x, 0.0, 1.0, out=x)
