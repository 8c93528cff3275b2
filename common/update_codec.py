"""A site's model update as one flat float vector: flatten, bound (L2 clip), and restore.

The explicit L2 bound is what makes a fixed-point encoding for secure aggregation safe; it is applied in plain
mode too, so both modes aggregate exactly the same updates. Clipping is post-processing of a DP output, so it
costs no privacy; it is counted (and, under secure aggregation, only the count over the cohort is revealed).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def flatten(delta: Mapping[str, np.ndarray]) -> np.ndarray:
    """Concatenate the arrays in key order as float64."""
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in delta.values()])


def unflatten(vector: np.ndarray, template: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Split a flat vector back into arrays shaped and typed like `template`."""
    out, start = {}, 0
    for key, ref in template.items():
        size = int(np.prod(ref.shape))
        out[key] = vector[start : start + size].reshape(ref.shape).astype(ref.dtype)
        start += size
    if start != vector.size:
        raise ValueError(f"vector has {vector.size} values, the model {start}")
    return out


def clip_l2(vector: np.ndarray, bound: float) -> tuple[np.ndarray, bool]:
    """Scale `vector` down to L2 norm `bound` if it is longer; report whether it was."""
    norm = float(np.linalg.norm(vector))
    if norm <= bound:
        return vector, False
    return vector * (bound / norm), True
