"""The one-run f-DP test (common.privacy.fdp_audit): its trade-off curves against closed forms, its error rate
against Monte Carlo of mechanisms that are exactly f-DP, and its power against ones that are not."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from common.privacy.fdp_audit import (
    NOISE_SCALES,
    OperatingPoint,
    family_epsilon,
    gaussian_profile,
    independent_points,
    rejects,
    trade_off,
)

GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.45)


def _gdp_type_two(mu: float, alpha: float) -> float:
    return float(stats.norm.cdf(stats.norm.ppf(1 - alpha) - mu))


@pytest.mark.parametrize("alpha", [1e-4, 1e-3, 0.01, 0.1, 0.5, 0.9])
def test_a_privacy_profile_read_as_a_trade_off_is_the_gaussian_curve(alpha: float):
    """mu-GDP's profile on a grid gives back f(alpha) = Phi(Phi^-1(1 - alpha) - mu); so does dp-accounting's PLD
    of one Gaussian mechanism with noise 1/mu (an independent route to the same curve)."""
    mu = 1.7
    assert gaussian_profile(mu, 1e-5).type_two(alpha) == pytest.approx(_gdp_type_two(mu, alpha), rel=1e-3, abs=1e-6)
    pld = trade_off([(1 / mu, 1.0, 1)], 1e-5)
    assert pld.type_two(alpha) == pytest.approx(_gdp_type_two(mu, alpha), rel=2e-2, abs=1e-4)
    assert pld.type_two(alpha) <= _gdp_type_two(mu, alpha) + 1e-9  # pessimistic: never claims more privacy


def _rejection_rate(mu_true: float, mu_claimed: float, m: int, significance: float, trials: int, seed: int) -> float:
    """Canaries present with probability 1/2, scores N(mu_true, 1) if present else N(0, 1): exactly mu_true-GDP
    per canary. The auditor guesses the top k for every k of the grid; a trial rejects if any k does."""
    rng = np.random.default_rng(seed)
    claim = gaussian_profile(mu_claimed, 1e-5)
    rejected = 0
    for _ in range(trials):
        present = rng.random(m) < 0.5
        order = np.argsort(-rng.normal(mu_true * present, 1.0))
        rejected += any(rejects(m, k, int(present[order[:k]].sum()), claim, significance / len(GRID))
                        for k in (int(f * m) for f in GRID))
    return rejected / trials


def test_a_mechanism_that_is_exactly_its_claim_is_rejected_at_most_at_the_significance():
    """At a generous significance (0.5, so that rejections are not vanishingly rare) the false rejections of a
    true claim stay below it, while a claim twice too private is rejected in most trials by the same auditor."""
    assert _rejection_rate(2.5, 2.5, 4000, 0.5, trials=60, seed=0) <= 0.5
    assert _rejection_rate(2.5, 1.25, 4000, 0.5, trials=30, seed=1) >= 0.9


def test_a_correct_claim_is_not_rejected_at_95_percent_and_a_tenfold_leak_is():
    assert _rejection_rate(1.7, 1.7, 4000, 0.05, trials=40, seed=2) == 0.0
    assert _rejection_rate(17.0, 1.7, 4000, 0.05, trials=10, seed=3) == 1.0


def test_perfect_guesses_at_more_canaries_reach_further():
    """The most the test can show grows with the number of canaries (and is finite: one run cannot prove all)."""
    history = [(1.68, 0.2, 150)]  # the default study's DP-SGD at epsilon 8
    ceilings = [family_epsilon(m, int(0.45 * m), int(0.45 * m), history, 1e-5, 0.05 / 14)[0]
                for m in (1000, 4000, 10000)]
    assert 0 < ceilings[0] < ceilings[1] < ceilings[2] < 20
    assert ceilings[1] > trade_off(history, 1e-5).epsilon  # 4,000 canaries can fail the claim of epsilon 8


def test_the_family_bound_is_monotone_and_zero_for_coin_flips():
    history = [(1.0, 0.1, 100)]
    weak, _ = family_epsilon(4000, 400, 300, history, 1e-5, 0.01)
    strong, scale = family_epsilon(4000, 400, 398, history, 1e-5, 0.01)
    assert 0 < weak < strong and scale in NOISE_SCALES
    assert family_epsilon(4000, 400, 200, history, 1e-5, 0.01) == (0.0, float("inf"))


def test_impossible_counts_are_refused():
    with pytest.raises(ValueError):
        rejects(100, 10, 11, gaussian_profile(1.0, 1e-5), 0.05)


def test_each_operating_point_has_one_sided_clopper_pearson_bounds_at_its_bonferroni_share():
    present = np.array([1.0] * 90 + [0.0] * 10)
    absent = np.array([1.0] * 3 + [0.0] * 97)
    points = independent_points(present, absent, [0.5, 2.0], 0.1)
    each = 0.1 / 4  # two thresholds, two bounds each
    assert points[0].false_positive_upper == pytest.approx(stats.beta.ppf(1 - each, 4, 97), rel=1e-12)
    assert points[0].true_positive_lower == pytest.approx(stats.beta.ppf(each, 90, 11), rel=1e-12)
    assert points[1].true_positive_lower == 0.0 and points[1].false_positive_upper == pytest.approx(
        1 - each ** (1 / 100), rel=1e-9)  # no positives at all: the exact tail


def test_a_point_on_the_curve_is_allowed_and_one_just_under_it_is_not():
    curve = gaussian_profile(1.0, 1e-5)
    alpha = 0.05
    beta = curve.type_two(alpha)
    assert not OperatingPoint(0.0, alpha, 1 - beta).below(curve)
    assert OperatingPoint(0.0, alpha, 1 - beta + 1e-3).below(curve)
    assert not OperatingPoint(0.0, alpha + 1e-3, 1 - beta).below(curve)  # a worse false-positive rate: allowed
