"""Statistics of empirical privacy audits: membership-inference ROC, offline LiRA scores, one-run epsilon bounds
((epsilon, delta) here; f-DP in common.privacy.fdp_audit).

Pure numpy/scipy; the training and scoring that feed these live with the audit runner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from common.privacy.fdp_audit import History, family_epsilon, rejects, trade_off


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


@dataclass(frozen=True)
class WhiteBoxBound:
    """What the white-box canaries show, at `confidence` over every statistic and guess count (Bonferroni)."""

    rejects_claim: bool  # the outcome is too good for the accountant's own trade-off curve (f-DP one-run test)
    epsilon: float  # epsilon of the noisiest DP-SGD of the claimed kind (noise x s) the canaries reject
    steinke_epsilon: float  # the (epsilon, delta) bound of Steinke et al.: no assumption on the leak's shape
    guesses: int  # at the statistic and guess count that gave `epsilon`
    correct: int
    ceiling: float  # the most `epsilon` can reach with this many canaries: every guess right
    canaries: int
    confidence: float
    score: str = ""


def whitebox_ceiling(canaries: int, history: History, delta: float, statistics: int = 2,
                     confidence: float = 0.95) -> float:
    """The largest epsilon `whitebox_bound` can show for this DP-SGD history with this many canaries (every guess
    right at the best guess count). An implementation leaking more than this cannot be told from one leaking this."""
    significance = (1 - confidence) / (statistics * len(WHITEBOX_GUESS_FRACTIONS))
    return max(family_epsilon(canaries, k, k, history, delta, significance)[0]
               for k in {max(1, int(f * canaries)) for f in WHITEBOX_GUESS_FRACTIONS})


def whitebox_bound(scores: dict[str, np.ndarray], included: np.ndarray, claimed: History, delta: float,
                   confidence: float = 0.95) -> WhiteBoxBound:
    """For each statistic and each k in a grid fixed in advance, guess "present" for the k highest scores and test
    the accountant's claimed history (its trade-off curve) at significance (1 - confidence) / (statistics x grid)."""
    m = len(included)
    significance = (1 - confidence) / (len(scores) * len(WHITEBOX_GUESS_FRACTIONS))
    curve = trade_off(claimed, delta)
    rejected, best, steinke = False, (0.0, 0, 0, ""), 0.0
    for name, values in scores.items():
        order = np.argsort(-np.asarray(values), kind="stable")
        for fraction in WHITEBOX_GUESS_FRACTIONS:
            k = max(1, int(fraction * m))
            correct = int(np.asarray(included)[order[:k]].sum())
            rejected = rejected or rejects(m, k, correct, curve, significance)
            epsilon, _ = family_epsilon(m, k, correct, claimed, delta, significance)
            if epsilon > best[0]:
                best = (epsilon, k, correct, name)
            steinke = max(steinke, one_run_epsilon_lower_bound(m, k, correct, delta, 1 - significance))
    return WhiteBoxBound(rejected, best[0], steinke, best[1], best[2],
                         whitebox_ceiling(m, claimed, delta, len(scores), confidence), m, confidence, best[3])
