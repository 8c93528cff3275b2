"""Fixed-point encoding of real vectors into Z_2^32 so that masked sums decode exactly.

Each client's values are bounded by an explicit `value_bound` (the update's L2 clip times its weight cap); the
scale is chosen so the sum of `cohort_size` encoded values can never overflow a signed 32-bit integer. Values
beyond the bound are an error here, never silently clipped: the caller clips (and reports it) beforehand.
Rounding is stochastic (unbiased), with randomness from AES-CTR under a fresh os.urandom seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from common.secagg.errors import AbortReason, SecAggAbort
from common.secagg.prg import keystream_words

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class FixedPoint:
    scale: float  # encoded = round(value * scale)
    value_bound: float  # |value| <= value_bound for every coordinate of every client
    cohort_size: int

    @classmethod
    def for_cohort(cls, value_bound: float, cohort_size: int) -> FixedPoint:
        """The largest scale with cohort_size * (value_bound * scale + 1) <= 2^31 - 1 (no overflow, ever)."""
        if not value_bound > 0 or cohort_size < 1:
            raise ValueError(f"need a positive bound and cohort, got {value_bound}, {cohort_size}")
        scale = (INT32_MAX // cohort_size - 1) / value_bound
        if scale < 1:
            raise ValueError(f"bound {value_bound} with {cohort_size} clients leaves no precision in 32 bits")
        return cls(scale, value_bound, cohort_size)

    @property
    def resolution(self) -> float:
        """Worst-case rounding error of one client's coordinate."""
        return 1.0 / self.scale

    def encode(self, values: np.ndarray, rounding_seed: bytes | None = None, multiplier: float = 1.0) -> np.ndarray:
        """multiplier * values (float) -> uint32 (two's complement of the stochastically rounded fixed point).

        Few passes over the data: a masked update is as large as the model, and this runs on every site.
        """
        scaled = np.multiply(values, multiplier * self.scale, dtype=np.float64)
        worst_scaled = max(float(scaled.max()), -float(scaled.min())) if scaled.size else 0.0
        worst = worst_scaled / self.scale
        if not np.isfinite(worst):
            raise SecAggAbort(AbortReason.BAD_INPUT, "update contains NaN or infinity")
        # Compared where it is computed: value * scale can exceed bound * scale by a rounding ulp for a value exactly
        # at the bound. The slack (1e-9 relative, < 0.01 of a unit) still rounds to at most the headroom's +1.
        if worst_scaled > self.value_bound * self.scale * (1 + 1e-9):
            raise SecAggAbort(AbortReason.BAD_INPUT,
                              f"|value| {worst:.6g} exceeds the declared bound {self.value_bound:.6g}")
        rounded = np.floor(scaled)
        fraction = np.subtract(scaled, rounded, out=scaled)  # in [0, 1), exact
        np.multiply(fraction, 2.0**32, out=fraction)  # exact (a power of two); compared with uint32 words below
        uniform = keystream_words(rounding_seed or os.urandom(32), scaled.size)
        rounded += fraction > uniform  # round up with probability equal to the fractional part
        # |rounded| < 2^31 by the scale's construction: int32, then the same bits read as uint32
        return rounded.astype(np.int32).view(np.uint32)

    def decode_sum(self, total: np.ndarray) -> np.ndarray:
        """Sum of encoded vectors (uint32, mod 2^32) -> sum of the real values (float64)."""
        return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64) / self.scale
