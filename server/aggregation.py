"""FedAvg over model deltas, weighted by each site's number of training examples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Weights = dict[str, np.ndarray]


def weighted_mean_delta(updates: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> Weights:
    """sum_k n_k * delta_k / sum_k n_k, key by key (float64 accumulation, float32 result)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    keys = list(updates[0][0])
    for delta, num_examples in updates:
        if list(delta) != keys:
            raise ValueError(f"update keys {sorted(delta)} differ from {sorted(keys)}")
        if num_examples <= 0:
            raise ValueError(f"an update reports {num_examples} examples; weights must be positive")
    total = float(sum(n for _, n in updates))
    return {
        key: (sum(np.asarray(delta[key], dtype=np.float64) * n for delta, n in updates) / total).astype(np.float32)
        for key in keys
    }


def apply_delta(weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Weights:
    if set(weights) != set(delta):
        raise ValueError("delta and weights have different keys")
    return {key: (weights[key] + delta[key]).astype(weights[key].dtype) for key in weights}
