"""One-run audit of an f-DP claim (Mahloujifar, Melis & Chaudhuri, ICML 2025, "Auditing f-Differential Privacy in
One Run"), for the white-box canary game.

Steinke et al.'s one-run bound tests a single (epsilon, delta) pair, so whatever the canaries show it cannot certify
more than about 4.8 at delta 1e-5. Testing the mechanism's whole trade-off curve f instead uses what the accountant
really claims: a site's DP-SGD is (epsilon, delta(epsilon))-DP for every epsilon at once (its privacy profile, from
dp-accounting's privacy-loss distribution, pessimistic), hence f-DP with
    f(alpha) = sup_eps max(0, 1 - delta(eps) - e^eps alpha, e^-eps (1 - delta(eps) - alpha))   (Dong, Roth & Su 2022).
The profile is taken on a finite grid of epsilons, which only weakens f (a valid, slightly more private-looking claim
is harder to reject), so a correct implementation is rejected with probability at most the significance.

The test: m canaries each present with probability 1/2, the auditor guesses "present" for k of them and v are right.
If P[>= v right] >= tau under an f-DP mechanism, the masses of right and wrong guesses on the events {>= i right}
satisfy a chain of inequalities from i = v down to 0 that must end at total mass k/m; when the least mass the chain
allows exceeds k/m, the claim is rejected at level tau (the paper's "audit_rh_with_cap" recursion; an independent
implementation, checked against Monte Carlo in tests/unit/test_fdp_audit.py).

The empirical epsilon reported next to the verdict needs a family of claims to search: here the same DP-SGD
(sampling rate and steps) with its noise scaled by s. The bound is the epsilon of the noisiest member the canaries
reject; that is an assumption about the shape of the leak. The pass/fail verdict makes no such assumption: it tests
the accountant's own curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from dp_accounting.pld import privacy_loss_distribution

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
    from scipy import stats

    epsilons = np.linspace(0.0, mu * mu / 2 + 10 * mu, points)
    deltas = stats.norm.cdf(-epsilons / mu + mu / 2) - np.exp(epsilons) * stats.norm.cdf(-epsilons / mu - mu / 2)
    eps_at = float(np.interp(-delta, -deltas, epsilons)) if deltas[-1] < delta else math.inf
    return TradeOff(epsilons, np.maximum(deltas, 0.0), eps_at)


def trade_off(history: History, delta: float, noise_scale: float = 1.0) -> TradeOff:
    """The trade-off curve of a DP-SGD history (Opacus's (noise, sample rate, steps) entries) with its noise
    multiplied by `noise_scale`."""
    return _trade_off(tuple((float(s) * noise_scale, float(q), int(n)) for s, q, n in history), delta)


@lru_cache(maxsize=256)
def _trade_off(history: tuple[tuple[float, float, int], ...], delta: float) -> TradeOff:
    pld = None
    for sigma, rate, steps in history:
        one = privacy_loss_distribution.from_gaussian_mechanism(
            sigma, sampling_prob=rate, value_discretization_interval=DISCRETISATION).self_compose(steps)
        pld = one if pld is None else pld.compose(one)
    if pld is None:
        raise ValueError("an empty history claims perfect privacy; there is nothing to audit")
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
    """(epsilon, noise scale) of the noisiest member of the family (the history's noise x s, s in NOISE_SCALES)
    that this outcome rejects; (0, inf) when it rejects none. Rejection only gets easier as s grows, so a binary
    search over the grid finds it; rounding to the grid only lowers the bound."""
    if not rejects(m, guesses, correct, trade_off(history, delta, NOISE_SCALES[-1]), significance):
        return 0.0, math.inf
    low, high = -1, len(NOISE_SCALES) - 1  # NOISE_SCALES[high] is rejected; [low] is not (or off the grid)
    while high - low > 1:
        middle = (low + high) // 2
        if rejects(m, guesses, correct, trade_off(history, delta, NOISE_SCALES[middle]), significance):
            high = middle
        else:
            low = middle
    scale = NOISE_SCALES[high]
    return trade_off(history, delta, scale).epsilon, scale
