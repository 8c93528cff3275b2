"""White-box gradient canaries: a site audits its own DP-SGD, as it runs, from the model iterates it releases.

The game (Steinke, Nasr & Jagielski 2023, one run, white-box; Nasr et al. 2023, Dirac canaries): m canaries, each a
per-sample gradient that is zero except at one coordinate of its own, where it is `AMPLITUDE` times the clipping
bound C (so clipping must cut it to C). Each canary is in the site's data with probability 1/2, and an included
canary is Poisson-sampled into every step at the site's sampling rate, exactly like an image. The canary rows enter
Opacus's optimizer before it clips: the site's real clipping, summing, noise (its own generator or its AES-CTR
source) and scaling handle them, and the site's real accountant accounts the steps. Nothing here changes what the
optimizer does; it only adds rows and watches the weights.

Scoring uses the iterates (the weights after every step): SGD with momentum is inverted to the privatised gradient
g_t at each canary's coordinate, g_t * B / C, and what the step's real images added there (their clipped sum, read
from the optimizer as it clips them; the site knows its own data) is taken away, leaving x_t = 1 when the canary was
in the step, plus noise of standard deviation sigma. That is a post-processing of what is released plus the site's
own data, so it leaks nothing the release does not. In a correct DP-SGD each canary's x_1..x_T is then an
independent draw of the subsampled Gaussian mechanism the accountant analyses (fresh noise on every coordinate at
every step; its own Poisson sampling), present or absent: the m canaries are m runs of the mechanism in one
training. Two statistics: the Neyman-Pearson statistic of that mechanism, sum_t log(1 - q + q exp((x_t - 1/2) /
sigma^2)), and the same on x_t minus its median over the steps (noise that repeats from step to step cancels
there). A third of the canaries choose thresholds (quantiles of their absent members' statistics); on the others,
Clopper-Pearson bounds on each threshold's error rates test the accountant's own trade-off curve and bound epsilon
(common.privacy.fdp_audit, common.privacy.membership.whitebox_bound). The one-run f-DP test, which assumes nothing
about the implementation, is reported beside it.

What this checks: the optimizer's clipping, noise and scaling (on one coordinate per canary) and the accountant's
arithmetic over the steps taken. What it does not: the per-sample gradients of real images, the data loader's
sampling (canaries are sampled here, at the accountant's rate), per-layer clipping (a one-coordinate canary is cut
to C either way), or noise correlated across coordinates.

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
ROWS_BUDGET = 2**24  # canary values clipped per call (each row is model-sized): 64 MB of float32


class Breakage(Enum):
    """Deliberately broken DP-SGD (tests and the audit's power check only)."""

    NONE = "none"
    NOISE_TENTH = "noise-tenth"  # noise drawn with a tenth of the noise multiplier the accountant is told
    NO_CLIPPING = "no-clipping"  # per-sample gradients summed unclipped
    REPEATED_NOISE = "repeated-noise"  # the noise generator re-seeded identically before every step (in simulation
    # the image sampler shares it, so the same images are drawn every step too)
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
    seed: int
    observations: list[np.ndarray] = field(default_factory=list)  # x_t per step: (m,) each

    @classmethod
    def draw(cls, model: nn.Module, count: int, *, sample_rate: float, max_grad_norm: float, momentum: float,
             learning_rate: float, seed: int) -> DiracCanaries:
        size = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if not 0 < count <= size:
            raise ValueError(f"need 1 to {size} canaries (one coordinate each), got {count}")
        rng = np.random.default_rng(seed)
        return cls(np.sort(rng.choice(size, count, replace=False)), rng.random(count) < 0.5, sample_rate,
                   max_grad_norm, momentum, learning_rate, torch.Generator().manual_seed(seed + 1), seed)

    def attach(self, optimizer: DPOptimizer, breakage: Breakage = Breakage.NONE) -> None:
        """Add the sampled canaries' rows before the optimizer clips; read the weights after each step."""
        _check_plain_sgd(optimizer)
        params = list(optimizer.params)
        rows_per_call = max(1, ROWS_BUDGET // int(sum(p.numel() for p in params)))
        bounds = np.cumsum([0] + [p.numel() for p in params])
        owner = np.searchsorted(bounds, self.coordinates, side="right") - 1
        local = self.coordinates - bounds[owner]
        members = np.flatnonzero(self.included)
        state = {"before": self._weights(params), "velocity": np.zeros(len(self.coordinates)),
                 "data": np.zeros(len(self.coordinates))}
        clip, step = optimizer.clip_and_accumulate, optimizer.step

        def clip_with_canaries() -> None:
            before = self._summed(params)
            clip()  # the step's real rows first; what they add at the canaries' coordinates is the site's own data
            state["data"] += self._summed(params) - before
            chosen = members[(torch.rand(len(members), generator=self.generator, dtype=torch.float64)
                              < self.sample_rate).numpy()]
            # then the sampled canaries, a bounded block of rows at a time: Opacus adds each call's clipped rows
            # to the same summed gradient, so the result is one clipped sum, as if they were one batch
            for start in range(0, len(chosen), rows_per_call):
                block = chosen[start:start + rows_per_call]
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
            privatised = gradient * optimizer.expected_batch_size / self.max_grad_norm
            self.observations.append(privatised - state["data"] / self.max_grad_norm)  # canary + noise only
            state["before"], state["velocity"], state["data"] = after, velocity, np.zeros(len(self.coordinates))
            return result

        optimizer.clip_and_accumulate = clip_with_canaries  # type: ignore[method-assign]
        optimizer.step = step_and_observe  # type: ignore[method-assign]
        break_optimizer(optimizer, breakage)

    def _weights(self, params: list[torch.Tensor]) -> np.ndarray:
        """The canaries' coordinates of the weights, in float64."""
        return self._at([p.detach() for p in params])

    def _summed(self, params: list[torch.Tensor]) -> np.ndarray:
        """The canaries' coordinates of Opacus's clipped sum so far this step (0 before any row)."""
        return self._at([torch.zeros_like(p) if getattr(p, "summed_grad", None) is None else p.summed_grad.detach()
                         for p in params])

    def _at(self, tensors: list[torch.Tensor]) -> np.ndarray:
        flat = torch.cat([t.reshape(-1) for t in tensors]).cpu().numpy()
        return flat[self.coordinates].astype(np.float64)

    def scores(self, noise_multiplier: float) -> dict[str, np.ndarray]:
        """The statistics per canary over every observed step (`statistics`)."""
        return statistics(np.stack(self.observations), self.sample_rate, noise_multiplier)


def statistics(x: np.ndarray, sample_rate: float, noise_multiplier: float) -> dict[str, np.ndarray]:
    """Two statistics per canary from its (steps, m) observations: the correct mechanism's likelihood ratio, and the
    same on x_t minus its median over the steps (noise that repeats from step to step cancels there)."""
    return {"likelihood-ratio": _likelihood_ratio(x, sample_rate, noise_multiplier),
            "centred-likelihood-ratio": _likelihood_ratio(x - np.median(x, axis=0), sample_rate, noise_multiplier)}


def _likelihood_ratio(x: np.ndarray, q: float, noise_multiplier: float) -> np.ndarray:
    variance = max(noise_multiplier, 1e-6) ** 2
    return np.logaddexp(math.log1p(-q), math.log(q) + (x - 0.5) / variance).sum(axis=0)


def _check_plain_sgd(optimizer: DPOptimizer) -> None:
    """The iterates are inverted as SGD with momentum at a constant step: anything else would leave a data-dependent
    term in what the canaries observe."""
    for group in optimizer.original_optimizer.param_groups:
        if group.get("weight_decay") or group.get("dampening") or group.get("nesterov") or group.get("maximize"):
            raise CareFedError("the white-box game inverts plain SGD with momentum; this optimizer has weight decay, "
                               "dampening, Nesterov or maximize set")


def break_optimizer(optimizer: DPOptimizer, breakage: Breakage) -> None:
    """Apply a test-only fault to a real DPOptimizer (the accountant's hook still sees the declared settings)."""
    if breakage is Breakage.NOISE_TENTH:
        declared = optimizer.noise_multiplier
        _around(optimizer, "add_noise", lambda: setattr(optimizer, "noise_multiplier", declared / 10),
                lambda: setattr(optimizer, "noise_multiplier", declared))
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
                "one_run_epsilon": b.one_run_epsilon, "rejects_claim": b.rejects_claim,
                "false_positive_upper": b.false_positive_upper, "true_positive_lower": b.true_positive_lower,
                "canaries": b.canaries, "ceiling": b.ceiling, "confidence": b.confidence, "score": b.score,
                "consistent": self.consistent, "seconds": self.seconds}


def whitebox_problem(game: DiracCanaries, planned: list[tuple[float, float, int]], delta: float,
                     confidence: float = 0.95) -> str:
    """Why a game with these canaries could not fail this DP-SGD plan ("" when it could)."""
    ceiling = whitebox_ceiling(game.included, game.seed, planned, delta, confidence=confidence)
    claimed = trade_off(planned, delta).epsilon
    if ceiling <= claimed:
        return (f"{len(game.included)} white-box canaries can show at most epsilon {ceiling:.2f} for this study's "
                f"DP-SGD, so they could not fail an implementation at epsilon {claimed:.2f}: use more canaries or a "
                "lower audit epsilon")
    return ""


def play(config: RunConfig, data: SiteData, *, canaries: int, breakage: Breakage = Breakage.NONE, seed: int = 0,
         secure_noise: bool = False, require_power: bool = True, confidence: float = 0.95) -> GameResult:
    """Train the site's model for the study's planned rounds with its own DP-SGD (noise calibrated as the site
    calibrates it) and `canaries` Dirac canaries; test the accountant's claim against the iterates at
    `confidence`. Refused when the game could not fail at this epsilon, unless `require_power` is off (to measure
    tightness)."""
    if config.privacy_unit != "image" or not config.dp:
        raise CareFedError("the white-box game audits image-level DP-SGD; this study is "
                           f"{'not private' if not config.dp else 'patient-level'}")
    if canaries < 2:
        raise CareFedError("white-box canaries must be >= 2")
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = global_model(config)  # the federation's model, as the site trains it
    privacy = calibrate_site(config, data, data.site)
    try:
        game = DiracCanaries.draw(model, canaries, sample_rate=privacy.sample_rate,
                                  max_grad_norm=privacy.max_grad_norm, momentum=config.momentum,
                                  learning_rate=config.step_size, seed=seed)
    except ValueError as err:
        raise CareFedError(str(err)) from None
    planned = [(privacy.noise_multiplier, privacy.sample_rate, privacy.steps_per_round * config.planned_rounds)]
    problem = whitebox_problem(game, planned, privacy.delta, confidence) if require_power else ""
    if problem:
        raise CareFedError(problem)
    generator = torch.Generator().manual_seed(seed + 2)
    claimed_history: list[tuple[float, float, int]] = []
    for _ in range(config.planned_rounds):
        before = list(privacy.history)
        train_locally(model, data, config, privacy, generator, secure_noise=secure_noise,
                      audit=lambda optimizer: game.attach(optimizer, breakage))
        forgets = breakage is Breakage.ACCOUNTANT_FORGETS  # a reset accountant: this round's steps only
        claimed_history = _only_new(privacy.history, before) if forgets else list(privacy.history)
    claimed = SitePrivacy(**{**vars(privacy), "history": claimed_history}).epsilon()
    bound = whitebox_bound(game.scores(privacy.noise_multiplier), game.included, game.seed, claimed_history,
                           privacy.delta, confidence)
    return GameResult(breakage.value, config.planned_rounds, len(game.observations), privacy.noise_multiplier,
                      privacy.sample_rate, claimed, privacy.delta, bound, time.perf_counter() - started)


def _only_new(history: list[tuple[float, float, int]], before: list[tuple[float, float, int]]
              ) -> list[tuple[float, float, int]]:
    steps = sum(n for _, _, n in history) - sum(n for _, _, n in before)
    sigma, rate, _ = history[-1]
    return [(sigma, rate, steps)]
