"""An accountant independent of Opacus: Google's dp-accounting, over the same sampled-Gaussian history.

A history is Opacus's: a list of (noise_multiplier, sample_rate, steps), each entry `steps` Poisson-subsampled
Gaussian mechanisms composed in order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from importlib.metadata import version

import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution, privacy_loss_mechanism
from dp_accounting.rdp import rdp_privacy_accountant

from common.privacy.memo import on_disk

History = Sequence[tuple[float, float, int]]

PLD_DISCRETIZATION = 1e-4  # reproduces the reference 2.382 (sigma 1.1, q 256/60000, 14,062 steps, delta 1e-5)
PATIENT_DISCRETIZATION = 1e-3  # mixtures are costlier; still a pessimistic (upper) estimate


def _events(history: History) -> list[dp_event.DpEvent]:
    return [
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier)), int(steps)
        )
        for noise_multiplier, sample_rate, steps in history
    ]


def pld_epsilon(history: History, delta: float) -> float:
    """Epsilon from dp-accounting's privacy-loss-distribution accountant (tight, pessimistic discretisation)."""
    return _pld_epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta))


@lru_cache(maxsize=4096)
@on_disk(f"pld-epsilon/dp-accounting-{version('dp-accounting')}/discretization-{PLD_DISCRETIZATION}")
def _pld_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    if not history:
        return 0.0
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for event in _events(history):
        accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def rdp_epsilon(history: History, delta: float) -> float:
    """Epsilon from dp-accounting's RDP accountant (looser upper bound; for comparison only)."""
    if not history:
        return 0.0
    accountant = rdp_privacy_accountant.RdpAccountant()
    for event in _events(history):
        accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def patient_level_epsilon(history: History, delta: float, images_per_patient: int) -> float:
    """Patient-level epsilon of image-level DP-SGD, for a patient with `images_per_patient` images.

    With Poisson sampling at rate q, each of the patient's k images joins a step independently, so the
    patient's contribution to a step's clipped sum has sensitivity j * C with j ~ Binomial(k, q): a mixture of
    Gaussians (dp-accounting's MixtureOfGaussiansDpEvent), composed over every step. Exact up to PLD
    discretisation, and far tighter than the group-privacy bound (k * epsilon at a blown-up delta).
    """
    if images_per_patient < 1:
        raise ValueError("a patient has at least one image")
    if not history:
        return 0.0
    if images_per_patient == 1:
        return pld_epsilon(history, delta)
    if any(float(s) <= 0 and float(q) > 0 and int(n) > 0 for s, q, n in history):
        return math.inf  # a noiseless step that can see the patient: no guarantee (dp-accounting's answer too)
    composed = privacy_loss_distribution.identity(PATIENT_DISCRETIZATION)
    for noise_multiplier, sample_rate, steps in history:
        mechanism = _patient_mechanism(float(noise_multiplier), float(sample_rate), images_per_patient)
        composed = composed.compose(mechanism.self_compose(int(steps)))
    return float(composed.get_epsilon_for_delta(delta))


@lru_cache(maxsize=64)
def _patient_mechanism(noise_multiplier: float, sample_rate: float, images_per_patient: int):
    """One step's privacy-loss distribution for a patient (what dp-accounting's PLDAccountant builds for a
    MixtureOfGaussiansDpEvent, then self-composes). The costly part, and the same for every round of a run: a site
    audit reuses it across the run's entries instead of rebuilding it per entry."""
    from scipy.stats import binom

    k = images_per_patient
    probs = [float(binom.pmf(j, k, sample_rate)) for j in range(k + 1)]

    def one_side(adjacency: privacy_loss_mechanism.AdjacencyType):  # from_mixture_gaussian_mechanism's own steps
        loss = _MixtureGaussianLoss(noise_multiplier, list(range(k + 1)), probs, pessimistic_estimate=True,
                                    log_mass_truncation_bound=-50, adjacency_type=adjacency)
        return privacy_loss_distribution._create_pld_pmf_from_monotone_privacy_loss(
            loss, pessimistic_estimate=True, value_discretization_interval=PATIENT_DISCRETIZATION,
            use_connect_dots=True)

    return privacy_loss_distribution.PrivacyLossDistribution(
        one_side(privacy_loss_mechanism.AdjacencyType.REMOVE), one_side(privacy_loss_mechanism.AdjacencyType.ADD))


class _MixtureGaussianLoss(privacy_loss_mechanism.MixtureGaussianPrivacyLoss):
    """dp-accounting's mixture-of-Gaussians privacy loss with its inversion vectorised: the library bisects every
    privacy loss of the discretisation grid by recursion in Python (730,000 calls, 23 s for a patient with four
    images); here every loss takes the same bisection steps at once, to the same midpoints and the same floating-point
    privacy losses, so the result is the library's to the bit (tests/unit/test_audit.py compares the two)."""

    def _inverse_privacy_losses_with_range(self, privacy_losses, bounds, precision=1e-6):
        losses = np.asarray(privacy_losses, dtype=float)
        low, high = np.full(losses.shape, float(bounds[0])), np.full(losses.shape, float(bounds[1]))
        while (searching := np.flatnonzero(high - low > precision)).size:
            mid = (low[searching] + high[searching]) / 2
            if np.any((mid == low[searching]) | (mid == high[searching])):
                # bounds so far out that floats are coarser than `precision` (an absurd noise multiplier): the
                # search cannot narrow; the library's recursion then fails as it always did, instead of a hang here
                return super()._inverse_privacy_losses_with_range(privacy_losses, bounds, precision)
            split = self._privacy_losses(mid)
            below = losses[searching] < split  # the library's branch: its loss lies right of mid
            low[searching[below]], high[searching[~below]] = mid[below], mid[~below]
        return np.floor(high / precision) * precision

    def _privacy_losses(self, xs: np.ndarray) -> np.ndarray:
        """privacy_loss at each x, computed as the library computes one (same operations, same order)."""
        x_loss = np.multiply.outer(xs, self.sensitivities) / self._variance
        if self.adjacency_type == privacy_loss_mechanism.AdjacencyType.ADD:
            return -np.logaddexp.reduce(self._precompute_privacy_loss_constants + x_loss, axis=1)
        return np.logaddexp.reduce(self._precompute_privacy_loss_constants - x_loss, axis=1)
