"""Tests of an f-DP claim from canaries: the accountant's whole trade-off curve, not one (epsilon, delta) pair.

A site's DP-SGD is (epsilon, delta(epsilon))-DP for every epsilon at once (its privacy profile, from dp-accounting's
privacy-loss distribution, pessimistic), hence f-DP with
    f(alpha) = sup_eps max(0, 1 - delta(eps) - e^eps alpha, e^-eps (1 - delta(eps) - alpha))   (Dong, Roth & Su 2022).
The profile is taken on a finite grid of epsilons, which only weakens f (a slightly more private-looking claim is
harder to reject), so a correct implementation is rejected with probability at most the significance.

Two tests, for two hypotheses:
- `rejects`, one run, no assumption (Mahloujifar, Melis & Chaudhuri, ICML 2025, "Auditing f-Differential Privacy
  in One Run"; an independent implementation of their recursion, checked against Monte Carlo in
  tests/unit/test_fdp_audit.py): m canaries each present with probability 1/2, k guessed present, v right. If
  P[>= v right] >= tau under any f-DP mechanism, the masses of right and wrong guesses on the events {>= i right}
  obey a chain of inequalities from i = v down to 0 that must end at total mass k/m; when the least mass it allows
  exceeds k/m, the claim is rejected at level tau. Valid whatever the mechanism does, hence weak: at epsilon 8 it
  shows about half.
- `independent_points`: when the canaries' observations are independent draws of the mechanism with and without
  each canary (true of Dirac canaries in a correct DP-SGD: client.canaries), every threshold fixed without them
  gives Clopper-Pearson bounds on a test's error rates, and a point below f rejects the claim. This is the test of
  "the implementation does what its accountant assumes"; it is as tight as auditing with many training runs.

The empirical epsilon reported next to a verdict needs a family of claims to search: the same DP-SGD (sampling rate
and steps) with its noise scaled by s. The bound is the largest epsilon of a member the canaries reject (the least
noisy one), from the optimistic PLD so that it is not overstated; that is an assumption about the shape of the
leak, which the verdicts do not make (they test the accountant's own curve, pessimistic).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from dp_accounting.pld import privacy_loss_distribution
from scipy import stats

History = Sequence[tuple[float, float, int]]

DISCRETISATION = 1e-3  # pessimistic: every delta(eps) it gives is an upper bound
PROFILE_POINTS = 2000
PROFILE_FLOOR_DELTA = 1e-12  # the profile's grid reaches the epsilon where delta(eps) falls to this
PROFILE_MAX_EPSILON = 700.0  # e^eps stays finite in float64
NOISE_SCALES = tuple(2.0 ** (j / 16) for j in range(-48, 33))  # the family searched: noise x 1/8 .. x 4


@dataclass(frozen=True)
class TradeOff:
    """A privacy profile delta(eps) on a grid, read as a trade-off function; `epsilon` at the audit's delta."""

    epsilons: np.ndarray
    deltas: np.ndarray
    epsilon: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "_up", np.exp(self.epsilons))
        object.__setattr__(self, "_down", np.exp(-self.epsilons))

    def type_two(self, alpha: float) -> float:
        """f(alpha): the least type-II error of any test with type-I error alpha."""
        slack = 1.0 - self.deltas
        best = np.maximum(slack - self._up * alpha, self._down * (slack - alpha)).max()  # type: ignore[attr-defined]
        return max(0.0, float(best))

    def least_absent(self, present: float) -> float:
        """A set of outputs with probability `present` with a canary has probability at least f(1 - present)
        without it (symmetric f)."""
        return self.type_two(1.0 - present)


def gaussian_profile(mu: float, delta: float, points: int = PROFILE_POINTS) -> TradeOff:
    """mu-GDP's exact privacy profile (Dong, Roth & Su, Corollary 2.13): a reference for tests and comparisons."""
    epsilons = np.linspace(0.0, mu * mu / 2 + 10 * mu, points)
    deltas = stats.norm.cdf(-epsilons / mu + mu / 2) - np.exp(epsilons) * stats.norm.cdf(-epsilons / mu - mu / 2)
    eps_at = float(np.interp(-delta, -deltas, epsilons)) if deltas[-1] < delta else math.inf
    return TradeOff(epsilons, np.maximum(deltas, 0.0), eps_at)


def trade_off(history: History, delta: float, noise_scale: float = 1.0) -> TradeOff:
    """The trade-off curve of a DP-SGD history (Opacus's (noise, sample rate, steps) entries) with its noise
    multiplied by `noise_scale`."""
    return _trade_off(_scaled(history, noise_scale), delta)


def _scaled(history: History, noise_scale: float) -> tuple[tuple[float, float, int], ...]:
    return tuple((float(s) * noise_scale, float(q), int(n)) for s, q, n in history)


def _pld(history: tuple[tuple[float, float, int], ...], pessimistic: bool
         ) -> privacy_loss_distribution.PrivacyLossDistribution:
    pld = None
    for sigma, rate, steps in history:
        one = privacy_loss_distribution.from_gaussian_mechanism(
            sigma, sampling_prob=rate, value_discretization_interval=DISCRETISATION,
            pessimistic_estimate=pessimistic, use_connect_dots=pessimistic).self_compose(steps)
        pld = one if pld is None else pld.compose(one)
    if pld is None:
        raise ValueError("an empty history claims perfect privacy; there is nothing to audit")
    return pld


@lru_cache(maxsize=256)
def _trade_off(history: tuple[tuple[float, float, int], ...], delta: float) -> TradeOff:
    pld = _pld(history, pessimistic=True)
    top = min(PROFILE_MAX_EPSILON, max(1.0, float(pld.get_epsilon_for_delta(PROFILE_FLOOR_DELTA))))
    epsilons = np.linspace(0.0, top, PROFILE_POINTS)
    deltas = np.asarray(pld.get_delta_for_epsilon(epsilons), dtype=np.float64)
    return TradeOff(epsilons, deltas, float(pld.get_epsilon_for_delta(delta)))


def rejects(m: int, guesses: int, correct: int, curve: TradeOff, significance: float) -> bool:
    """True when `correct` right guesses out of `guesses` among `m` canaries has probability below `significance`
    under every mechanism that is f-DP for this curve."""
    if not 0 <= correct <= guesses <= m:
        raise ValueError("need 0 <= correct <= guesses <= m")
    right = significance * correct / m  # mass of right guesses on {>= correct right}
    wrong = significance * (guesses - correct) / m
    for i in range(correct - 1, -1, -1):  # down the events {>= i right}; each step adds the least mass f allows
        more_wrong = max(wrong, curve.least_absent(right))
        if more_wrong == wrong:
            break  # a fixed point: nothing changes further down
        right = min(right + i / (guesses - i) * (more_wrong - wrong), 1.0)
        wrong = more_wrong
    return right + wrong > guesses / m


def family_epsilon(m: int, guesses: int, correct: int, history: History, delta: float, significance: float
                   ) -> tuple[float, float]:
    """One run: (epsilon, noise scale) of the least noisy member of the family (the history's noise x s, s in
    NOISE_SCALES) that this outcome rejects; (0, inf) when it rejects none."""
    return least_noisy_rejected(history, delta, lambda curve: rejects(m, guesses, correct, curve, significance))


def least_noisy_rejected(history: History, delta: float, rejected: Callable[[TradeOff], bool]
                         ) -> tuple[float, float]:
    """(epsilon, noise scale) of the least noisy family member `rejected` rejects, i.e. the largest epsilon it
    rules out; (0, inf) when it rejects none. Rejection only gets easier as the noise grows (a noisier mechanism
    is a post-processing of a less noisy one), so a binary search over the grid finds it; rounding to the grid
    only lowers the bound. The epsilon is the optimistic PLD's, so a lower bound is never overstated."""
    if not rejected(trade_off(history, delta, NOISE_SCALES[-1])):
        return 0.0, math.inf
    low, high = -1, len(NOISE_SCALES) - 1  # NOISE_SCALES[high] is rejected; [low] is not (or off the grid)
    while high - low > 1:
        middle = (low + high) // 2
        if rejected(trade_off(history, delta, NOISE_SCALES[middle])):
            high = middle
        else:
            low = middle
    scale = NOISE_SCALES[high]
    return optimistic_epsilon(history, delta, scale), scale


def optimistic_epsilon(history: History, delta: float, noise_scale: float = 1.0) -> float:
    """Epsilon at `delta` from the optimistic PLD: never above the mechanism's true epsilon (for lower bounds)."""
    return _optimistic_epsilon(_scaled(history, noise_scale), delta)


@lru_cache(maxsize=256)
def _optimistic_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    return float(_pld(history, pessimistic=False).get_epsilon_for_delta(delta))


@dataclass(frozen=True)
class OperatingPoint:
    """One threshold's counts with their Clopper-Pearson bounds (each one-sided at the given significance)."""

    threshold: float
    false_positive_upper: float
    true_positive_lower: float

    @classmethod
    def of(cls, present: np.ndarray, absent: np.ndarray, threshold: float, significance: float) -> OperatingPoint:
        false_positives, true_positives = int((absent > threshold).sum()), int((present > threshold).sum())
        upper = 1.0 if false_positives >= len(absent) else float(
            stats.beta.ppf(1 - significance, false_positives + 1, len(absent) - false_positives))
        lower = 0.0 if true_positives == 0 else float(
            stats.beta.ppf(significance, true_positives, len(present) - true_positives + 1))
        return cls(threshold, upper, lower)

    def below(self, curve: TradeOff) -> bool:
        """The curve allows no test this good: type-II error 1 - TPR under f(FPR)."""
        return 1.0 - self.true_positive_lower < curve.type_two(self.false_positive_upper)


def independent_points(present: np.ndarray, absent: np.ndarray, thresholds: Sequence[float], significance: float
                       ) -> list[OperatingPoint]:
    """Scores of canaries that are independent draws of the mechanism with (present) and without (absent) them.
    `thresholds` must be fixed without looking at these scores; the significance is split over them and over the
    two bounds of each."""
    each = significance / (2 * len(thresholds))
    return [OperatingPoint.of(np.asarray(present), np.asarray(absent), t, each) for t in thresholds]
