"""Statistics of empirical privacy audits: membership-inference ROC, offline LiRA scores, one-run epsilon bounds
((epsilon, delta) here; f-DP in common.privacy.fdp_audit).

Pure numpy/scipy; the training and scoring that feed these live with the audit runner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from common.privacy.fdp_audit import (
    History,
    OperatingPoint,
    family_epsilon,
    independent_points,
    least_noisy_rejected,
    trade_off,
)


@dataclass(frozen=True)
class RocSummary:
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    members: int
    non_members: int
    fpr: list[float]
    tpr: list[float]

    @property
    def fpr_resolution(self) -> float:
        """The smallest non-zero FPR this many non-members can show: TPR at a lower FPR means at FPR 0."""
        return 1.0 / self.non_members


def roc(scores_members: np.ndarray, scores_non_members: np.ndarray) -> RocSummary:
    """ROC of 'higher score = member'. AUC by the rank statistic; TPR at fixed FPR (no interpolation upward)."""
    members = np.asarray(scores_members, dtype=np.float64)
    others = np.asarray(scores_non_members, dtype=np.float64)
    if members.size == 0 or others.size == 0:
        raise ValueError("need both members and non-members to compute a ROC curve")
    if np.isnan(members).any() or np.isnan(others).any():
        raise ValueError("attack scores contain NaN; a model produced non-finite outputs")
    auc = float(stats.mannwhitneyu(members, others, alternative="two-sided").statistic / (members.size * others.size))
    thresholds = np.unique(np.concatenate([members, others]))[::-1]
    tpr = np.array([0.0] + [float((members >= t).mean()) for t in thresholds])
    fpr = np.array([0.0] + [float((others >= t).mean()) for t in thresholds])

    def tpr_at(max_fpr: float) -> float:
        return float(tpr[fpr <= max_fpr + 1e-12].max())

    return RocSummary(auc, tpr_at(0.01), tpr_at(0.001), int(members.size), int(others.size),
                      fpr.tolist(), tpr.tolist())


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's statistic log(p_y / (1 - p_y)) = z_y - logsumexp of the other logits: exact even where the softmax
    rounds p_y to 1 (which would make it infinite)."""
    z = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(labels))
    others = z.copy()
    others[rows, labels] = -np.inf
    return z[rows, labels] - special.logsumexp(others, axis=1)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example loss -log p_y, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    return special.logsumexp(z, axis=1) - z[np.arange(len(labels)), labels]


def lira_offline_scores(target: np.ndarray, shadow_out: np.ndarray) -> np.ndarray:
    """Offline LiRA (Carlini et al. 2022): how far above the OUT distribution each example's confidence lies.

    `target`: (n,) the target model's logit confidence per example; `shadow_out`: (k, n) the same under k shadow
    models that never saw these examples. Score = one-sided Gaussian log-likelihood test against OUT, with a
    global variance (more stable than per-example with few shadows, as the paper recommends).
    """
    mean = shadow_out.mean(axis=0)
    std = max(float(shadow_out.std(axis=0, ddof=1).mean()), 1e-6) if shadow_out.shape[0] > 1 else 1.0
    return stats.norm.logcdf(target, loc=mean, scale=std)


def one_run_p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P-value of `correct` right guesses out of `guesses` if the training is (epsilon, delta)-DP.

    Steinke, Nasr & Jagielski (2023), one training run: m canaries each included with probability 1/2. Under
    (epsilon, delta)-DP the count of correct guesses is dominated by Binomial(guesses, e^eps / (1 + e^eps)) up to
    a term 2 m delta * max_i P[correct - i <= Binomial < correct] / i.
    """
    if not 0 <= correct <= guesses <= m:
        raise ValueError("need 0 <= correct <= guesses <= m")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(correct - 1, guesses, q))
    if correct == 0:
        return min(1.0, tail)
    # mass_i = P[correct - i <= Binomial < correct], for i = 1..correct, in one vectorised pass
    below = stats.binom.cdf(np.arange(correct - 1, -1, -1), guesses, q)  # P[B <= correct - i], i = 1..correct
    masses = below - np.concatenate([below[1:], [0.0]])  # P[B = correct - i]
    worst = float(np.max(np.cumsum(masses) / np.arange(1, correct + 1)))
    return min(1.0, tail + 2 * m * delta * worst)


def one_run_epsilon_lower_bound(m: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon rejected at `confidence`: training is not (epsilon, delta)-DP for any smaller epsilon."""
    alpha = 1 - confidence
    if one_run_p_value(m, guesses, correct, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(m, guesses, correct, high, delta) < alpha:
        low, high = high, high * 2
        if high > 1e3:
            return math.inf
    for _ in range(50):
        mid = (low + high) / 2
        if one_run_p_value(m, guesses, correct, mid, delta) < alpha:
            low = mid
        else:
            high = mid
    return low


WHITEBOX_GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.45)  # fixed in advance, all below the ~1/2 present
TUNING_FRACTION = 1 / 3  # canaries that only choose the thresholds; the others test them
THRESHOLD_RATES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)  # quantiles of the absent tuning canaries' scores


@dataclass(frozen=True)
class WhiteBoxBound:
    """What the white-box canaries show, each claim at `confidence` over every statistic, threshold and guess count.

    The verdict and `epsilon` treat the canaries as independent draws of the mechanism, which they are when the
    implementation is correct (the hypothesis tested; see client.canaries). The one-run test behind
    `one_run_epsilon` needs no such assumption; both epsilons assume the leak has the family's shape."""

    rejects_claim: bool  # some operating point lies below the accountant's own trade-off curve
    epsilon: float  # the largest epsilon of a DP-SGD of the claimed kind (noise x s) that the canaries reject
    one_run_epsilon: float  # the same from the one-run f-DP test (Mahloujifar et al. 2025)
    false_positive_upper: float  # at an operating point that rejects the member giving `epsilon`
    true_positive_lower: float
    ceiling: float  # what `epsilon` reaches when the scores separate perfectly (5th percentile over ties)
    canaries: int
    confidence: float
    score: str = ""


def tuning_canaries(m: int, seed: int) -> np.ndarray:
    """Which canaries choose the thresholds (drawn independently of everything the game observes)."""
    return np.random.default_rng([seed, 0x70E]).random(m) < TUNING_FRACTION


def tuning_thresholds(values: np.ndarray, included: np.ndarray, tuning: np.ndarray) -> list[float]:
    """Quantiles of the absent tuning canaries' statistics at THRESHOLD_RATES: nothing from a testing canary."""
    absent = np.asarray(values)[tuning & ~included]
    return [float(t) for t in np.quantile(absent, [1 - rate for rate in THRESHOLD_RATES])] if absent.size else []


def whitebox_ceiling(included: np.ndarray, seed: int, history: History, delta: float, statistics: int = 2,
                     confidence: float = 0.95, draws: int = 20) -> float:
    """What `whitebox_bound` shows for this DP-SGD history when every present canary scores above every absent
    one, through the real threshold procedure (absent testing canaries can still land above a threshold drawn from
    the absent tuning ones): the least over `draws` orderings of the absent canaries (about the 5th percentile)."""
    included = np.asarray(included, dtype=bool)
    tuning, rng = tuning_canaries(len(included), seed), np.random.default_rng([seed, 0xCE1])
    significance = (1 - confidence) / statistics
    return min(_points_bound(included + 0.5 * rng.random(len(included)), included, tuning, history, delta,
                             significance)[0] for _ in range(draws))


def whitebox_bound(scores: dict[str, np.ndarray], included: np.ndarray, seed: int, claimed: History, delta: float,
                   confidence: float = 0.95) -> WhiteBoxBound:
    """Test the accountant's claimed history (its trade-off curve) with each statistic: thresholds from the tuning
    canaries, counts on the testing ones (the significance split over statistics). Also the one-run f-DP bound on
    all canaries, guessing the top k for k in a grid fixed in advance."""
    included = np.asarray(included, dtype=bool)
    tuning = tuning_canaries(len(included), seed)
    significance = (1 - confidence) / len(scores)
    curve = trade_off(claimed, delta)
    rejected, best, one_run = False, (0.0, 1.0, 0.0, ""), 0.0
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        epsilon, point, points = _points_bound(values, included, tuning, claimed, delta, significance)
        rejected = rejected or any(p.below(curve) for p in points)
        if epsilon > best[0] and point is not None:
            best = (epsilon, point.false_positive_upper, point.true_positive_lower, name)
        one_run = max(one_run, _one_run_epsilon(values, included, claimed, delta, significance))
    ceiling = whitebox_ceiling(included, seed, claimed, delta, len(scores), confidence)
    return WhiteBoxBound(rejected, best[0], one_run, best[1], best[2], ceiling, len(included), confidence, best[3])


def _points_bound(values: np.ndarray, included: np.ndarray, tuning: np.ndarray, claimed: History, delta: float,
                  significance: float) -> tuple[float, OperatingPoint | None, list[OperatingPoint]]:
    """The family bound of one statistic, an operating point that gives it, and all its operating points."""
    test, present = values[~tuning], included[~tuning]
    points = independent_points(test[present], test[~present], tuning_thresholds(values, included, tuning),
                                significance)
    epsilon, scale = least_noisy_rejected(claimed, delta, lambda c: any(p.below(c) for p in points))
    if not points or math.isinf(scale):
        return epsilon, None, points
    member = trade_off(claimed, delta, scale)
    return epsilon, next(p for p in points if p.below(member)), points


def _one_run_epsilon(values: np.ndarray, included: np.ndarray, claimed: History, delta: float,
                     significance: float) -> float:
    m, order = len(included), np.argsort(-values, kind="stable")
    each = significance / len(WHITEBOX_GUESS_FRACTIONS)
    return max(family_epsilon(m, k, int(included[order[:k]].sum()), claimed, delta, each)[0]
               for k in (max(1, int(f * m)) for f in WHITEBOX_GUESS_FRACTIONS))
