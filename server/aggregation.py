"""FedAvg over model deltas, weighted by each site's number of training examples.

Both aggregation modes produce the same two sums, sum_k n_k * delta_k and sum_k n_k: plain mode adds the sites'
updates here; secure aggregation hands over the unmasked sums and never sees a single update.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from common.config import SERVER_OPTIMIZERS
from common.update_codec import flatten, unflatten

Weights = dict[str, np.ndarray]


@dataclass
class DeltaSum:
    weighted_delta: np.ndarray | None = None  # sum_k n_k * delta_k, flat float64
    weight: int = 0  # sum_k n_k
    clipped: int = 0  # how many of the summed updates hit the L2 bound
    contributors: int = 0
    sites: list[int] = field(default_factory=list)

    def add(self, delta: np.ndarray, num_examples: int, clipped: bool) -> None:
        if num_examples <= 0:
            raise ValueError(f"an update reports {num_examples} examples; weights must be positive")
        term = np.asarray(delta, dtype=np.float64) * num_examples
        if self.weighted_delta is None:
            self.weighted_delta = term
        elif term.shape != self.weighted_delta.shape:
            raise ValueError(f"update of {term.size} values, expected {self.weighted_delta.size}")
        else:
            self.weighted_delta += term
        self.weight += num_examples
        self.clipped += int(clipped)
        self.contributors += 1

    def mean(self) -> np.ndarray:
        if self.weighted_delta is None or self.weight <= 0:
            raise ValueError("no updates to aggregate")
        return self.weighted_delta / self.weight


def check_aggregate(total: DeltaSum, max_weight: int, update_bound: float, rounding: float = 0.0) -> None:
    """Abort unless an unmasked sum is one its contributors could have sent: 0 < total weight <= contributors x
    max weight, clipped updates <= contributors, and |sum n_k delta_k| <= total weight x the update bound (each
    delta is clipped to the bound) plus the fixed-point rounding (`rounding`: the L2 bound on the sum's rounding
    error). A site that adds 2^31 to a coordinate, or a shifted self-mask share, lands far outside these."""
    from common.secagg.errors import AbortReason, SecAggAbort

    n = total.contributors
    if not 0 < total.weight <= n * max_weight:
        raise SecAggAbort(AbortReason.IMPOSSIBLE_AGGREGATE, "the total weight is not possible for the contributors")
    if not 0 <= total.clipped <= n:
        raise SecAggAbort(AbortReason.IMPOSSIBLE_AGGREGATE, "the clip count is not possible for the contributors")
    norm = float(np.linalg.norm(total.weighted_delta)) if total.weighted_delta is not None else 0.0
    if not np.isfinite(norm) or norm > total.weight * update_bound * (1 + 1e-9) + rounding:
        raise SecAggAbort(AbortReason.IMPOSSIBLE_AGGREGATE, "the sum's norm exceeds what the contributors' "
                                                            "clipped updates allow")


def apply_mean_delta(weights: Mapping[str, np.ndarray], mean_delta: np.ndarray) -> Weights:
    """weights + mean delta, key by key, keeping each array's dtype."""
    flat = flatten(weights) + mean_delta
    return unflatten(flat, weights)


@dataclass
class ServerOptimizer:
    """The server's step on the round's mean update (Reddi et al. 2021, "Adaptive Federated Optimization"): FedAvg
    adds it, FedAvgM adds a momentum of it, FedAdam an Adam step of it. It sees only the secure sum's mean, a
    function of what the sites released under DP: post-processing, so no site's epsilon changes."""

    kind: str = "fedavg"
    learning_rate: float = 1.0
    momentum: float = 0.0  # FedAvgM's beta; FedAdam's beta1
    second_moment: float = 0.99  # FedAdam's beta2
    adaptivity: float = 1e-3  # FedAdam's tau: larger is closer to FedAvgM
    state: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self, weights: Mapping[str, np.ndarray], mean_delta: np.ndarray) -> Weights:
        delta = np.asarray(mean_delta, dtype=np.float64)
        if self.kind == "fedavg":
            update = delta
        elif self.kind == "fedavgm":
            update = self.state["velocity"] = self.momentum * self.state.get("velocity", 0.0) + delta
        elif self.kind == "fedadam":
            first = self.state["first"] = self.momentum * self.state.get("first", 0.0) + (1 - self.momentum) * delta
            second = self.state["second"] = (self.second_moment * self.state.get("second", 0.0)
                                             + (1 - self.second_moment) * delta**2)
            update = first / (np.sqrt(second) + self.adaptivity)
        else:
            raise ValueError(f"unknown server optimizer {self.kind!r}; use one of {SERVER_OPTIMIZERS}")
        return apply_mean_delta(weights, self.learning_rate * update)


@dataclass
class ModelAverage:
    """An exponential moving average of the global model over rounds (parameter averaging; De et al. 2022 on why
    it helps DP-SGD): after round t, sum_s decay^(t-s) w_s / sum_s decay^(t-s), the bias-corrected EMA of the
    models w_1..w_t. It is a function of the released models only: post-processing, no site's epsilon changes.
    The sites keep training the global model; the average is scored beside it and saved with it."""

    decay: float
    state: dict[str, np.ndarray] = field(default_factory=dict)  # "sum": the decayed sum, "weight": its total weight

    def update(self, weights: Mapping[str, np.ndarray]) -> Weights:
        flat = flatten(weights)
        self.state["sum"] = self.decay * self.state.get("sum", 0.0) + flat
        self.state["weight"] = np.asarray(self.decay * float(self.state.get("weight", 0.0)) + 1.0)
        return unflatten(self.state["sum"] / self.state["weight"], weights)
