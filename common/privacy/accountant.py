"""A site's privacy for the whole run: calibrated once, composed over every step, never reset.

Flower creates a fresh ClientApp call for every round (in simulation, on whichever Ray actor is free), so no
Python object can live from one round to the next. What must persist is the accountant's state: Opacus's
`accountant.state_dict()` is exactly its history of (noise_multiplier, sample_rate, steps). `SitePrivacy` holds
that history (kept in the node's Context.state between rounds) and loads it into the round's PrivacyEngine
before training, so the engine's accountant composes over all rounds, as one long-lived engine would.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import opacus
from opacus.accountants import PRVAccountant, RDPAccountant

from common.errors import ConfigError
from common.privacy.independent import pld_epsilon
from common.privacy.memo import on_disk

ACCOUNTANT = "prv"
CALIBRATION_TOLERANCE = 0.01
MAX_CALIBRATION_EPSILON = 100.0  # no site policy allows more per study (common.policy.MAX_STUDY_EPSILON is 30)
SIGMA_LIMIT, SIGMA_FLOOR = 1e4, 0.05


@lru_cache(maxsize=1024)
@on_disk(f"calibrate-noise-multiplier/opacus-{opacus.__version__}/prv/tolerance-{CALIBRATION_TOLERANCE}")
def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise (within 0.01 in epsilon) whose PRV epsilon after `steps` steps is <= target.

    Bounded in time and memory for any target a site policy allows: the PRV accountant's cost grows with the
    epsilon it evaluates (Opacus's own search starts near sigma 0, where a target of 1000 took minutes and GBs),
    so the search is bracketed with the cheap RDP bound and PRV is only evaluated where RDP's epsilon is at most
    a few times the target. The sigma returned always has PRV epsilon <= target. Pure and cached."""
    if steps < 1 or not 0 < sample_rate <= 1 or not 0 < target_epsilon <= MAX_CALIBRATION_EPSILON:
        raise ConfigError("privacy", f"epsilon={target_epsilon}, steps={steps}, sample-rate={sample_rate}",
                          "cannot calibrate noise", f"Use an epsilon in (0, {MAX_CALIBRATION_EPSILON:g}], "
                          "and check local-epochs, batch-size and the site's data size.")
    history = lambda sigma: ((sigma, sample_rate, steps),)  # noqa: E731
    high = 0.25
    while _rdp_epsilon(history(high), delta) > target_epsilon or prv_epsilon(history(high), delta) > target_epsilon:
        high *= 2
        if high > SIGMA_LIMIT:
            raise ConfigError("target-epsilon", target_epsilon, f"needs noise above {SIGMA_LIMIT:g}",
                              "Use a larger epsilon or delta, fewer rounds or a smaller batch size.")
    low = high / 2
    while low > SIGMA_FLOOR and _rdp_epsilon(history(low), delta) <= 4 * target_epsilon \
            and prv_epsilon(history(low), delta) <= target_epsilon:
        high, low = low, low / 2
    for _ in range(40):
        if prv_epsilon(history(high), delta) >= target_epsilon - CALIBRATION_TOLERANCE or high / low < 1.0001:
            break
        middle = (low + high) / 2
        if prv_epsilon(history(middle), delta) <= target_epsilon:
            high = middle
        else:
            low = middle
    return float(high)


def _rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():  # a bracket only: a loose bound at the edge of the alpha range is fine
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(accountant.get_epsilon(delta))


@dataclass
class SitePrivacy:
    """One site's (epsilon, delta) budget, its calibrated DP-SGD parameters and its accountant history."""

    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    max_grad_norm: float
    planned_rounds: int
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @classmethod
    def calibrate(cls, *, target_epsilon: float, delta: float, num_examples: int, batch_size: int,
                  local_epochs: int, planned_rounds: int, max_grad_norm: float) -> SitePrivacy:
        """Calibrate noise once for the whole planned run, with the sampling rate Opacus will use."""
        batches_per_epoch = math.ceil(num_examples / batch_size)  # len(DataLoader), as Opacus sees it
        sample_rate = 1.0 / batches_per_epoch
        steps_per_round = local_epochs * batches_per_epoch
        sigma = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                                           steps=steps_per_round * planned_rounds)
        return cls(target_epsilon, delta, sigma, sample_rate, steps_per_round, max_grad_norm, planned_rounds)

    @property
    def steps_total(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def accountant(self, extra_steps: int = 0) -> PRVAccountant:
        """A PRV accountant holding the whole history (plus `extra_steps` hypothetical steps)."""
        history = list(self.history)
        if extra_steps:
            history = _merge(history, (self.noise_multiplier, self.sample_rate, extra_steps))
        accountant = PRVAccountant()
        accountant.load_state_dict({"history": history, "mechanism": ACCOUNTANT})
        return accountant

    def epsilon(self) -> float:
        """PRV epsilon spent so far over the whole run (0 before the first step)."""
        return prv_epsilon(tuple(self.history), self.delta) if self.history else 0.0

    def epsilon_after_next_round(self) -> float:
        return prv_epsilon(tuple(self.accountant(self.steps_per_round).history), self.delta)

    def can_afford_next_round(self) -> bool:
        return self.epsilon_after_next_round() <= self.target_epsilon

    def independent_epsilon(self) -> float:
        """The same history through dp-accounting's PLD accountant."""
        return pld_epsilon(self.history, self.delta)

    def record_steps(self, accountant_state: dict[str, Any]) -> None:
        """Adopt the history of the round's engine accountant; it must extend ours, never rewrite it."""
        history = [(float(s), float(q), int(n)) for s, q, n in accountant_state["history"]]
        if not _extends(history, self.history):
            raise RuntimeError("the accountant history shrank or was rewritten; refusing to lose privacy spend")
        self.history = history

    def to_record(self) -> dict[str, Any]:
        """Flat, Flower-ConfigRecord-compatible form (lists of scalars)."""
        return {
            "target-epsilon": self.target_epsilon, "delta": self.delta, "noise-multiplier": self.noise_multiplier,
            "sample-rate": self.sample_rate, "steps-per-round": self.steps_per_round,
            "max-grad-norm": self.max_grad_norm, "planned-rounds": self.planned_rounds,
            "history-noise": [float(s) for s, _, _ in self.history],
            "history-rate": [float(q) for _, q, _ in self.history],
            "history-steps": [int(n) for _, _, n in self.history],
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SitePrivacy:
        history = list(zip(record["history-noise"], record["history-rate"], record["history-steps"], strict=True))
        return cls(float(record["target-epsilon"]), float(record["delta"]), float(record["noise-multiplier"]),
                   float(record["sample-rate"]), int(record["steps-per-round"]), float(record["max-grad-norm"]),
                   int(record["planned-rounds"]), [(float(s), float(q), int(n)) for s, q, n in history])


def prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Opacus PRV epsilon of a history (pure, so cached: sites of equal size share their numbers)."""
    return _prv_epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta))


@lru_cache(maxsize=4096)
@on_disk(f"prv-epsilon/opacus-{opacus.__version__}/{ACCOUNTANT}")
def _prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    accountant = PRVAccountant()
    accountant.load_state_dict({"history": list(history), "mechanism": ACCOUNTANT})
    return float(accountant.get_epsilon(delta))


def _merge(history: list[tuple[float, float, int]], entry: tuple[float, float, int]) -> list[tuple[float, float, int]]:
    """Append like Opacus's accountant.step does: same (sigma, q) as the last entry extends its step count."""
    if history and history[-1][:2] == entry[:2]:
        return [*history[:-1], (entry[0], entry[1], history[-1][2] + entry[2])]
    return [*history, entry]


def _extends(new: list[tuple[float, float, int]], old: list[tuple[float, float, int]]) -> bool:
    """True if `new` is `old` with steps appended (the last old entry may have grown)."""
    if not old:
        return True
    if len(new) < len(old) or new[: len(old) - 1] != old[:-1]:
        return False
    grown = new[len(old) - 1]
    return grown[:2] == old[-1][:2] and grown[2] >= old[-1][2]
