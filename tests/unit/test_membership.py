"""Statistics of the empirical audits."""

import math

import numpy as np
import pytest

from common.privacy.fdp_audit import trade_off
from common.privacy.membership import (
    cross_entropy,
    lira_offline_scores,
    logit_confidence,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    roc,
    tuning_canaries,
    tuning_thresholds,
    whitebox_bound,
)


def test_roc_of_separated_and_identical_scores():
    perfect = roc(np.array([5.0, 6.0, 7.0]), np.array([0.0, 1.0]))
    assert perfect.auc == 1.0 and perfect.tpr_at_1pct_fpr == 1.0
    chance = roc(np.zeros(50), np.zeros(50))
    assert chance.auc == 0.5 and chance.tpr_at_1pct_fpr == 0.0
    with pytest.raises(ValueError, match="NaN"):
        roc(np.array([np.nan]), np.array([0.0]))


def test_logit_confidence_is_finite_where_the_softmax_saturates():
    logits = np.array([[60.0, 0.0, 0.0], [0.0, 1.0, 2.0]], dtype=np.float32)
    conf = logit_confidence(logits, np.array([0, 2]))
    assert np.all(np.isfinite(conf))
    assert conf[0] == pytest.approx(60 - math.log(2), rel=1e-9)
    p = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    assert conf[1] == pytest.approx(math.log(p[2] / (1 - p[2])))
    assert cross_entropy(logits, np.array([0, 2]))[1] == pytest.approx(-math.log(p[2]))


def test_lira_scores_rank_examples_above_their_out_distribution_higher():
    shadow = np.array([[0.0, 0.0], [0.2, 0.2], [-0.2, -0.2]])
    scores = lira_offline_scores(np.array([3.0, 0.0]), shadow)
    assert scores[0] > scores[1]


def test_one_run_bound_is_zero_for_coin_flips_and_grows_with_correct_guesses():
    assert one_run_epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    weak = one_run_epsilon_lower_bound(1000, 200, 140, 1e-5)
    strong = one_run_epsilon_lower_bound(1000, 200, 190, 1e-5)
    assert 0 < weak < strong
    # at the bound the observation is just barely significant
    assert one_run_p_value(1000, 200, 190, strong, 1e-5) == pytest.approx(0.05, abs=1e-3)


def test_perfect_guessing_is_capped_by_the_number_of_guesses():
    """All 100 right: with delta = 0 the bound is where q^100 = 0.05, i.e. log(q / (1 - q))."""
    bound = one_run_epsilon_lower_bound(1000, 100, 100, 0.0)
    q = 0.05 ** (1 / 100)
    assert bound == pytest.approx(math.log(q / (1 - q)), rel=1e-6)


def _p_value_by_the_definition(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Steinke, Nasr & Jagielski (2023), Theorem 3.1's p-value written out term by term (no vectorisation)."""
    q = math.exp(epsilon) / (1 + math.exp(epsilon))
    pmf = [math.comb(guesses, j) * q**j * (1 - q) ** (guesses - j) for j in range(guesses + 1)]
    tail = sum(pmf[correct:])
    worst = max((sum(pmf[correct - i:correct]) / i for i in range(1, correct + 1)), default=0.0)
    return min(1.0, tail + 2 * m * delta * worst)


@pytest.mark.parametrize(("m", "guesses", "correct", "epsilon", "delta"),
                         [(1000, 100, 90, 1.0, 1e-5), (1000, 100, 60, 0.5, 1e-3), (50, 20, 20, 2.0, 0.0),
                          (500, 200, 0, 1.0, 1e-5), (2000, 400, 399, 4.0, 1e-5)])
def test_one_run_p_value_matches_the_theorem_written_out(m, guesses, correct, epsilon, delta):
    assert one_run_p_value(m, guesses, correct, epsilon, delta) == pytest.approx(
        _p_value_by_the_definition(m, guesses, correct, epsilon, delta), rel=1e-9, abs=1e-12)


def test_whitebox_bound_nears_its_ceiling_only_when_the_scores_separate():
    """Scores that separate perfectly reach the ceiling and reject the claim; coin flips show nothing."""
    rng = np.random.default_rng(0)
    included = rng.random(4000) < 0.5
    claimed = [(1.68, 0.2, 150)]  # the default study's DP-SGD at epsilon 8
    perfect = whitebox_bound({"s": included.astype(float) + rng.random(4000) * 0.1}, included, 0, claimed, 1e-5)
    # at the ceiling (perfect separation through the same thresholds; the ceiling is the least of 20 orderings)
    assert perfect.epsilon >= 0.8 * perfect.ceiling and perfect.rejects_claim
    assert perfect.epsilon > perfect.one_run_epsilon > 8  # the one-run test, too, can fail this claim
    blind = whitebox_bound({"s": rng.random(4000), "t": rng.random(4000)}, included, 0, claimed, 1e-5)
    assert blind.epsilon < 0.5 and not blind.rejects_claim and blind.one_run_epsilon < 0.5


def _simulated_game(noise: float, m: int, seed: int, sigma: float = 1.15, rate: float = 0.2, steps: int = 50):
    """Dirac canaries' observations in a DP-SGD whose noise is `noise` (the accountant assumes `sigma`): each step,
    1 for a present canary Poisson-sampled into it, plus Gaussian noise; exactly what client.canaries observes."""
    from client.canaries import statistics

    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    x = ((rng.random((steps, m)) < rate) & included) + noise * rng.normal(size=(steps, m))
    return statistics(x, rate, sigma), included


def test_a_correct_mechanism_is_not_rejected_and_its_bound_comes_close_to_the_accountant():
    claimed = [(1.15, 0.2, 50)]  # epsilon 8 over 5 rounds of the default study
    accountant = trade_off(claimed, 1e-5).epsilon
    results = [whitebox_bound(*_simulated_game(1.15, 4000, seed), seed, claimed, 1e-5) for seed in range(12)]
    assert sum(r.rejects_claim for r in results) <= 1  # at most 5% in expectation
    ratios = sorted(r.epsilon / accountant for r in results)
    assert 0.7 < ratios[len(ratios) // 2] < 1  # the median run shows most of what the accountant claims


def test_half_the_noise_is_rejected_every_time():
    claimed = [(1.15, 0.2, 50)]
    assert all(whitebox_bound(*_simulated_game(0.575, 4000, seed), seed, claimed, 1e-5).rejects_claim
               for seed in range(3))


def test_thresholds_come_only_from_the_absent_tuning_canaries():
    rng = np.random.default_rng(5)
    included = rng.random(3000) < 0.5
    tuning = tuning_canaries(3000, 7)
    values = rng.normal(size=3000)
    before = tuning_thresholds(values, included, tuning)
    moved = values.copy()
    moved[~tuning] += 100.0  # every testing canary
    moved[tuning & included] -= 100.0  # and the present tuning ones
    assert tuning_thresholds(moved, included, tuning) == before
    assert 0.25 < tuning.mean() < 0.42 and len(before) == 7
