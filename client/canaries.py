"""White-box gradient canaries: a site audits its own DP-SGD, as it runs, from the model iterates it releases.

The game (Steinke, Nasr & Jagielski 2023, one run, white-box; Nasr et al. 2023, Dirac canaries): m canaries, each a
per-sample gradient that is zero except at one coordinate of its own, where it is `AMPLITUDE` times the clipping
bound C (so clipping must cut it to C). Each canary is in the site's data with probability 1/2, and an included
canary is Poisson-sampled into every step at the site's sampling rate, exactly like an image. The canary rows enter
Opacus's optimizer before it clips: the site's real clipping, summing, noise (its own generator or its AES-CTR
source) and scaling handle them, and the site's real accountant accounts the steps. Nothing here changes what the
optimizer does; it only adds rows and watches the weights.

Scoring uses only the iterates (the weights after every step): SGD with momentum is inverted to the privatised
gradient g_t at each canary's coordinate, x_t = g_t * B / C (1 when the canary was in the step, plus noise of
standard deviation sigma). Two scores: the Neyman-Pearson statistic of the correct mechanism,
sum_t log(1 - q + q exp((x_t - 1/2) / sigma^2)), and the same on x_t minus its median over the steps (noise that
repeats from step to step cancels there). The
highest-scoring canaries are guessed "in"; the count of right guesses tests the accountant's own trade-off curve
(the f-DP one-run test, common.privacy.fdp_audit) and bounds epsilon, with the confidence split over both scores and
every guess count (common.privacy.membership.whitebox_bound).

`Breakage` holds the test-only faults the audit must catch; production code never selects one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from client.site import calibrate_site
from client.trainer import train_locally
from common.config import RunConfig
from common.data.site import SiteData, global_model
from common.errors import CareFedError
from common.privacy.accountant import SitePrivacy
from common.privacy.fdp_audit import trade_off
from common.privacy.membership import WhiteBoxBound, whitebox_bound, whitebox_ceiling

AMPLITUDE = 100.0  # a canary's norm before clipping, in units of C: an optimizer that does not clip lets 100x through
REPEATED_NOISE_SEED = 20_231_130
ROWS_PER_CALL = 256  # canary rows clipped per call (each row is model-sized)


class Breakage(Enum):
    """Deliberately broken DP-SGD (tests and the audit's power check only)."""

    NONE = "none"
    NOISE_TENTH = "noise-tenth"  # noise drawn with a tenth of the noise multiplier the accountant is told
    NO_CLIPPING = "no-clipping"  # per-sample gradients summed unclipped
    REPEATED_NOISE = "repeated-noise"  # the noise generator re-seeded identically before every step
    ACCOUNTANT_FORGETS = "accountant-forgets"  # the epsilon claimed after each round covers that round only


@dataclass
class DiracCanaries:
    """m canaries on distinct coordinates of the trainable parameters; `included` is the secret the game guesses."""

    coordinates: np.ndarray  # flat indices into the concatenated trainable parameters
    included: np.ndarray  # bool per canary
    sample_rate: float
    max_grad_norm: float
    momentum: float
    learning_rate: float
    generator: torch.Generator
    observations: list[np.ndarray] = field(default_factory=list)  # x_t per step: (m,) each

    @classmethod
    def draw(cls, model: nn.Module, count: int, *, sample_rate: float, max_grad_norm: float, momentum: float,
             learning_rate: float, seed: int) -> DiracCanaries:
        size = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if not 0 < count <= size:
            raise ValueError(f"need 1 to {size} canaries (one coordinate each), got {count}")
        rng = np.random.default_rng(seed)
        return cls(np.sort(rng.choice(size, count, replace=False)), rng.random(count) < 0.5, sample_rate,
                   max_grad_norm, momentum, learning_rate, torch.Generator().manual_seed(seed + 1))

    def attach(self, optimizer: DPOptimizer, breakage: Breakage = Breakage.NONE) -> None:
        """Add the sampled canaries' rows before the optimizer clips; read the weights after each step."""
        params = list(optimizer.params)
        bounds = np.cumsum([0] + [p.numel() for p in params])
        owner = np.searchsorted(bounds, self.coordinates, side="right") - 1
        local = self.coordinates - bounds[owner]
        members = np.flatnonzero(self.included)
        state = {"before": self._weights(params), "velocity": np.zeros(len(self.coordinates))}
        clip, step = optimizer.clip_and_accumulate, optimizer.step

        def clip_with_canaries() -> None:
            clip()  # the step's real rows first
            chosen = members[(torch.rand(len(members), generator=self.generator, dtype=torch.float64)
                              < self.sample_rate).numpy()]
            # then the sampled canaries, a bounded block of rows at a time: Opacus adds each call's clipped rows
            # to the same summed gradient, so the result is one clipped sum, as if they were one batch
            for start in range(0, len(chosen), ROWS_PER_CALL):
                block = chosen[start:start + ROWS_PER_CALL]
                for k, p in enumerate(params):
                    rows = torch.zeros((len(block), p.numel()), dtype=p.dtype, device=p.device)
                    mine = np.flatnonzero(owner[block] == k)
                    rows[mine, torch.from_numpy(local[block][mine])] = AMPLITUDE * self.max_grad_norm
                    p.grad_sample = rows.view(len(block), *p.shape)
                clip()

        def step_and_observe(*args: object, **kwargs: object) -> object:
            result = step(*args, **kwargs)
            after = self._weights(params)
            velocity = (state["before"] - after) / self.learning_rate  # SGD: w -= lr * v, v = momentum * v + g
            gradient = velocity - self.momentum * state["velocity"]
            self.observations.append(gradient * optimizer.expected_batch_size / self.max_grad_norm)
            state["before"], state["velocity"] = after, velocity
            return result

        optimizer.clip_and_accumulate = clip_with_canaries  # type: ignore[method-assign]
        optimizer.step = step_and_observe  # type: ignore[method-assign]
        break_optimizer(optimizer, breakage)

    def _weights(self, params: list[torch.Tensor]) -> np.ndarray:
        """The canaries' coordinates of the weights, in float64."""
        flat = torch.cat([p.detach().reshape(-1) for p in params]).cpu().numpy()
        return flat[self.coordinates].astype(np.float64)

    def scores(self, noise_multiplier: float) -> dict[str, np.ndarray]:
        """Two statistics per canary over every observed step: the correct mechanism's likelihood ratio, and the
        same on x_t minus its median over the steps (noise that repeats from step to step cancels there)."""
        x = np.stack(self.observations)  # (steps, m)
        return {"likelihood-ratio": self._likelihood_ratio(x, noise_multiplier),
                "centred-likelihood-ratio": self._likelihood_ratio(x - np.median(x, axis=0), noise_multiplier)}

    def _likelihood_ratio(self, x: np.ndarray, noise_multiplier: float) -> np.ndarray:
        q, variance = self.sample_rate, max(noise_multiplier, 1e-6) ** 2
        return np.logaddexp(math.log1p(-q), math.log(q) + (x - 0.5) / variance).sum(axis=0)


def break_optimizer(optimizer: DPOptimizer, breakage: Breakage) -> None:
    """Apply a test-only fault to a real DPOptimizer (the accountant's hook still sees the declared settings)."""
    if breakage is Breakage.NOISE_TENTH:
        _around(optimizer, "add_noise", lambda: setattr(optimizer, "noise_multiplier", optimizer.noise_multiplier / 10),
                lambda: setattr(optimizer, "noise_multiplier", optimizer.noise_multiplier * 10))
    elif breakage is Breakage.NO_CLIPPING:
        saved = optimizer.max_grad_norm
        _around(optimizer, "clip_and_accumulate", lambda: setattr(optimizer, "max_grad_norm", math.inf),
                lambda: setattr(optimizer, "max_grad_norm", saved))
    elif breakage is Breakage.REPEATED_NOISE:
        _around(optimizer, "add_noise", lambda: _reseed(optimizer), lambda: None)


def _around(optimizer: DPOptimizer, name: str, before: Callable[[], None], after: Callable[[], None]) -> None:
    inner = getattr(optimizer, name)

    def wrapped(*args: object, **kwargs: object) -> object:
        before()
        try:
            return inner(*args, **kwargs)
        finally:
            after()

    setattr(optimizer, name, wrapped)


def _reseed(optimizer: DPOptimizer) -> None:
    source = getattr(optimizer, "source", None)
    if source is not None:  # the AES-CTR source: back to its first block
        source._next_block = 0
    else:
        optimizer.generator.manual_seed(REPEATED_NOISE_SEED)


@dataclass(frozen=True)
class GameResult:
    """One white-box game at one site: what the accountant claims and what the canaries show."""

    breakage: str
    rounds: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    claimed_epsilon: float  # the site's accountant after every round (PRV), as its ledger would record it
    delta: float
    bound: WhiteBoxBound
    seconds: float

    @property
    def consistent(self) -> bool:
        """False when the canaries reject the accountant's own trade-off curve: the implementation is broken."""
        return not self.bound.rejects_claim

    def to_json(self) -> dict[str, object]:
        b = self.bound
        return {"breakage": self.breakage, "rounds": self.rounds, "steps": self.steps,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "claimed_epsilon": self.claimed_epsilon, "delta": self.delta, "epsilon_lower_bound": b.epsilon,
                "bound_over_claimed": b.epsilon / self.claimed_epsilon if self.claimed_epsilon else None,
                "steinke_epsilon": b.steinke_epsilon, "rejects_claim": b.rejects_claim,
                "canaries": b.canaries, "guesses": b.guesses, "correct": b.correct, "ceiling": b.ceiling,
                "confidence": b.confidence, "score": b.score, "consistent": self.consistent, "seconds": self.seconds}


def whitebox_problem(canaries: int, planned: list[tuple[float, float, int]], delta: float) -> str:
    """Why a game with this many canaries could not fail this DP-SGD plan ("" when it could)."""
    ceiling, claimed = whitebox_ceiling(canaries, planned, delta), trade_off(planned, delta).epsilon
    if ceiling <= claimed:
        return (f"{canaries} white-box canaries can show at most epsilon {ceiling:.2f} for this study's DP-SGD, so "
                f"they could not fail an implementation at epsilon {claimed:.2f}: use more canaries or a lower audit "
                "epsilon")
    return ""


def play(config: RunConfig, data: SiteData, *, canaries: int, breakage: Breakage = Breakage.NONE, seed: int = 0,
         secure_noise: bool = False, require_power: bool = True) -> GameResult:
    """Train the site's model for the study's planned rounds with its own DP-SGD (noise calibrated as the site
    calibrates it) and `canaries` Dirac canaries; test the accountant's claim against the iterates. Refused when
    the game could not fail at this epsilon, unless `require_power` is off (to measure tightness)."""
    if config.privacy_unit != "image" or not config.dp:
        raise CareFedError("the white-box game audits image-level DP-SGD; this study is "
                           f"{'not private' if not config.dp else 'patient-level'}")
    if canaries < 1:
        raise CareFedError("white-box canaries must be >= 1")
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = global_model(config)  # the federation's model, as the site trains it
    privacy = calibrate_site(config, data, data.site)
    planned = [(privacy.noise_multiplier, privacy.sample_rate, privacy.steps_per_round * config.planned_rounds)]
    problem = whitebox_problem(canaries, planned, privacy.delta) if require_power else ""
    if problem:
        raise CareFedError(problem)
    game = DiracCanaries.draw(model, canaries, sample_rate=privacy.sample_rate, max_grad_norm=privacy.max_grad_norm,
                              momentum=config.momentum, learning_rate=config.step_size, seed=seed)
    generator = torch.Generator().manual_seed(seed + 2)
    claimed_history: list[tuple[float, float, int]] = []
    for _ in range(config.planned_rounds):
        before = list(privacy.history)
        train_locally(model, data, config, privacy, generator, secure_noise=secure_noise,
                      audit=lambda optimizer: game.attach(optimizer, breakage))
        forgets = breakage is Breakage.ACCOUNTANT_FORGETS  # a reset accountant: this round's steps only
        claimed_history = _only_new(privacy.history, before) if forgets else list(privacy.history)
    claimed = SitePrivacy(**{**vars(privacy), "history": claimed_history}).epsilon()
    bound = whitebox_bound(game.scores(privacy.noise_multiplier), game.included, claimed_history, privacy.delta)
    return GameResult(breakage.value, config.planned_rounds, len(game.observations), privacy.noise_multiplier,
                      privacy.sample_rate, claimed, privacy.delta, bound, time.perf_counter() - started)


def _only_new(history: list[tuple[float, float, int]], before: list[tuple[float, float, int]]
              ) -> list[tuple[float, float, int]]:
    steps = sum(n for _, _, n in history) - sum(n for _, _, n in before)
    sigma, rate, _ = history[-1]
    return [(sigma, rate, steps)]
