"""An accountant independent of Opacus: Google's dp-accounting, over the same sampled-Gaussian history.

A history is Opacus's: a list of (noise_multiplier, sample_rate, steps), each entry `steps` Poisson-subsampled
Gaussian mechanisms composed in order.
"""

from __future__ import annotations

from collections.abc import Sequence

from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

History = Sequence[tuple[float, float, int]]

PLD_DISCRETIZATION = 1e-4  # reproduces the reference 2.382 (sigma 1.1, q 256/60000, 14,062 steps, delta 1e-5)


def _events(history: History) -> list[dp_event.DpEvent]:
    return [
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier)), int(steps)
        )
        for noise_multiplier, sample_rate, steps in history
    ]


def pld_epsilon(history: History, delta: float) -> float:
    """Epsilon from dp-accounting's privacy-loss-distribution accountant (tight, pessimistic discretisation)."""
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
