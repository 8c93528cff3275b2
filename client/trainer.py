"""Local training at one site: DP-SGD with Opacus (Poisson sampling, per-sample clipping, Gaussian noise).

Returns the model delta; the caller decides how it leaves the site.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.augmentation import augmented_copies, features_shape
from client.fused_dp import ChunkSizes, FusedClipping, choose_engine
from common.config import RunConfig
from common.data import SiteData
from common.models import count_parameters, trained_module, trained_part
from common.privacy import SitePrivacy
from common.privacy.secure_noise import SecureNoise, SecureNoiseDPOptimizer

Uniforms = Callable[[int], torch.Tensor]  # count -> float64 uniforms on [0, 1), on the CPU


class CalibrationMismatchError(RuntimeError):
    """The site's data no longer matches what its noise was calibrated for (a different sampling rate)."""


@dataclass
class LocalUpdate:
    delta: dict[str, torch.Tensor]  # trained weights minus the global weights, per state-dict key
    num_examples: int
    train_loss: float
    steps: int


@dataclass(frozen=True)
class PoissonSampler:
    """`steps` batches per pass, each example in each batch independently with probability `sample_rate`.

    Opacus's sampler makes int(1 / sample_rate) batches, which is one short when 1 / (1 / k) rounds below k
    (k = 93, 99, 105, ...); the accountant is told exactly `steps` steps at `sample_rate`, so we take exactly those.
    """

    num_examples: int
    sample_rate: float
    steps: int
    uniforms: Uniforms

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(self.steps):
            yield torch.nonzero(self.uniforms(self.num_examples) < self.sample_rate).flatten()


def train_locally(model: nn.Module, data: SiteData, config: RunConfig, privacy: SitePrivacy | None,
                  generator: torch.Generator, *, secure_noise: bool = False, fresh_process: bool = False,
                  audit: Callable[[DPOptimizer], None] | None = None) -> LocalUpdate:
    """Train `model` (holding the global weights) on the site's data; update `privacy`'s history in place.

    With `privacy`, this is DP-SGD whose PRV accountant is loaded with the site's whole history, so its epsilon is
    composed over every round so far. `generator` drives Poisson sampling and the noise, reproducibly; with
    `secure_noise` both come from a fresh AES-CTR stream instead (deployed sites), and `generator` drives only the
    augmentation's shifts (augmentations > 1), which need no secrecy: each unit's clipped gradient is bounded by C
    whatever the shifts.
    `audit` sees the round's optimizer before its first step (white-box canaries, client.canaries).
    `fresh_process`: this process exits after the round (client.fused_dp.choose_engine weighs compiling by it).
    """
    if privacy is None:
        return _train_without_dp(model, data, config, generator)
    global_weights = _weights(model)
    copies = config.augmentations
    trained, data = _on_features(model, data, copies)
    uniforms, secure = _randomness(generator, secure_noise)
    steps = _batches_per_epoch(data.num_train, config.batch_size, privacy)
    _check_epochs(config.local_epochs, steps, privacy)
    sampler = PoissonSampler(data.num_train, privacy.sample_rate, steps, uniforms)
    accountant = privacy.accountant()
    fused = choose_engine(trained, config.dp_sgd_engine, image_shape=input_shape(model, data, copies),
                          patients=copies > 1, sizes=ChunkSizes.for_study(config.batch_size * copies,
                                                                          count_parameters(trained),
                                                                          largest_unit=copies),
                          steps=privacy.steps_per_round, fresh_process=fresh_process)
    losses = []
    with _private(trained, "mean" if copies == 1 else "sum", hooks=fused is None) as module:
        optimizer = _dp_optimizer(trained, config, privacy, data.num_train, generator, secure)
        if fused is not None:
            fused.attach(optimizer)
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=privacy.sample_rate))
        if audit is not None:
            audit(optimizer)
        for _ in range(config.local_epochs):
            for rows in sampler:
                if copies == 1:
                    losses.append(_image_step(module, optimizer, data, rows, fused))
                    continue
                images = list(rows.split(1))  # each image its own unit, K copies of it
                losses.append(_grouped_step(module, optimizer, _grouped(model, data, images, copies, generator),
                                            fused))
    privacy.record_steps(accountant.state_dict())
    kept = [loss for loss in losses if loss is not None]
    return LocalUpdate(_delta(model, global_weights), data.num_train, sum(kept) / max(len(kept), 1), len(losses))


def train_patient_level(model: nn.Module, data: SiteData, config: RunConfig, privacy: SitePrivacy,
                        generator: torch.Generator, *, secure_noise: bool = False,
                        fresh_process: bool = False) -> LocalUpdate:
    """Patient-level DP-SGD: Poisson-sample patients, clip each patient's summed gradient, add noise.

    Per-image gradients (client.fused_dp, or Opacus's GradSampleModule) are summed per patient before clipping,
    and Opacus's DPOptimizer noises the sum, so the unit of clipping, sampling and accounting is the patient. The
    accountant is the same run-long PRV history as at image level, now over patient-sampling steps.
    `secure_noise` and `fresh_process` as in train_locally.
    """
    _, images_of = patient_index(data.train_patients)
    _batches_per_epoch(len(images_of), patients_per_batch(config, data), privacy)
    global_weights = _weights(model)
    copies = config.augmentations
    trained, data = _on_features(model, data, copies)
    uniforms, secure = _randomness(generator, secure_noise)
    sampler = PoissonSampler(len(images_of), privacy.sample_rate, privacy.steps_per_round, uniforms)
    accountant = privacy.accountant()
    largest = max((len(images) for images in images_of), default=1)
    fused = choose_engine(trained, config.dp_sgd_engine, image_shape=input_shape(model, data, copies), patients=True,
                          sizes=ChunkSizes.for_study(config.batch_size * copies, count_parameters(trained),
                                                     largest_unit=largest * copies),
                          steps=privacy.steps_per_round, fresh_process=fresh_process)
    with _private(trained, "sum", hooks=fused is None) as module:
        optimizer = _dp_optimizer(trained, config, privacy, len(images_of), generator, secure)
        if fused is not None:
            fused.attach(optimizer)
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=privacy.sample_rate))
        for chosen in sampler:
            patients = [images_of[int(c)] for c in chosen]
            _grouped_step(module, optimizer, _grouped(model, data, patients, copies, generator), fused)
    privacy.record_steps(accountant.state_dict())
    return LocalUpdate(_delta(model, global_weights), data.num_train, float("nan"), len(sampler))


def noise_generator_on(device: torch.device, generator: torch.Generator) -> torch.Generator:
    """Opacus draws noise on the parameters' device; sampling stays on the CPU generator, which seeds this one."""
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def expected_batch_size(num_units: int, sample_rate: float) -> int:
    """The mean Poisson batch (n * q, rounded): DP-SGD divides the noised sum by it, not by the drawn batch size."""
    return max(1, round(num_units * sample_rate))


def patient_index(patient_ids: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Contiguous patient numbers per image, and each patient's image rows."""
    unique, inverse = np.unique(patient_ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
    rows = [torch.from_numpy(order[bounds[i] : bounds[i + 1]]) for i in range(len(unique))]
    return torch.from_numpy(inverse), rows


def patients_per_batch(config: RunConfig, data: SiteData) -> int:
    """Expected patients per step: batch-size images' worth of patients at this site's mean images per patient."""
    num_patients = len(np.unique(data.train_patients))
    return max(1, round(config.batch_size * num_patients / max(data.num_train, 1)))


def _train_without_dp(model: nn.Module, data: SiteData, config: RunConfig,
                      generator: torch.Generator) -> LocalUpdate:
    """The non-private baseline: shuffled fixed-size batches, plain SGD (on `augmentations` shifted copies of each
    image, the loss their mean, as the private path does)."""
    device = next(model.parameters()).device
    global_weights = _weights(model)
    copies = config.augmentations
    trained, data = _on_features(model, data, copies)
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=config.batch_size, shuffle=True,
                        generator=generator)
    optimizer = torch.optim.SGD(trained.parameters(), lr=config.step_size, momentum=config.momentum)
    trained.train()
    losses = []
    for _ in range(config.local_epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            x, y = x.to(device), y.to(device)
            if copies > 1:
                x, y, _ = augmented_copies(model, x, y, torch.arange(len(y), device=device), copies, generator)
            loss = nn.functional.cross_entropy(trained(x), y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return LocalUpdate(_delta(model, global_weights), data.num_train, sum(losses) / max(len(losses), 1),
                       len(losses))


def _on_features(model: nn.Module, data: SiteData, copies: int = 1) -> tuple[nn.Module, SiteData]:
    """What training updates, and the training inputs it sees (common.models.trained_part: ScatterNet's head on
    features computed once per round). Augmented copies (`copies` > 1) differ every step: their features are
    computed per step (client.augmentation), and the images stay as they are here."""
    if copies > 1:
        return trained_module(model), data
    trained, inputs = trained_part(model, data.train_x)
    return trained, data if inputs is data.train_x else replace(data, train_x=inputs)


def input_shape(model: nn.Module, data: SiteData, copies: int) -> tuple[int, ...]:
    """The shape of one input of the trained part, as `_on_features` left `data`."""
    image_shape = tuple(data.train_x.shape[1:])
    return features_shape(model, image_shape) if copies > 1 else image_shape


def _batches_per_epoch(num_units: int, units_per_batch: int, privacy: SitePrivacy) -> int:
    """ceil(n / B), the steps per epoch SitePrivacy.calibrate accounted for; refuse if its rate no longer fits."""
    batches = math.ceil(num_units / units_per_batch)
    if abs(1.0 / batches - privacy.sample_rate) > 1e-12:
        raise CalibrationMismatchError(
            f"the site now samples from {num_units} units ({batches} batches of {units_per_batch}), but its noise "
            f"was calibrated for sample rate {privacy.sample_rate} (1/{round(1 / privacy.sample_rate)}): its data "
            "changed during the run; restore the data it started with, or start a new run to recalibrate")
    return batches


def _check_epochs(local_epochs: int, steps_per_epoch: int, privacy: SitePrivacy) -> None:
    """The round takes exactly the steps the accountant was calibrated for, or none at all."""
    if privacy.steps_per_round != local_epochs * steps_per_epoch:
        raise CalibrationMismatchError(f"the site's noise was calibrated for {privacy.steps_per_round} steps per "
                                       f"round, not {local_epochs} epochs of {steps_per_epoch}: local-epochs "
                                       "changed during the run; keep the run's config or start a new run")


def _randomness(generator: torch.Generator, secure_noise: bool) -> tuple[Uniforms, SecureNoise | None]:
    """Sampling uniforms (53-bit float64, so P(u < q) is q to 2^-53) and, when secure, the CSPRNG behind them."""
    if secure_noise:
        secure = SecureNoise()
        return secure.uniform, secure
    return (lambda count: torch.rand(count, generator=generator, dtype=torch.float64)), None


def _dp_optimizer(model: nn.Module, config: RunConfig, privacy: SitePrivacy, num_units: int,
                  generator: torch.Generator, secure: SecureNoise | None) -> DPOptimizer:
    """Opacus's DPOptimizer over SGD, as make_private builds it ("mean" loss), with noise from `secure` if given."""
    base = torch.optim.SGD(model.parameters(), lr=config.step_size, momentum=config.momentum)
    settings = {"noise_multiplier": privacy.noise_multiplier, "max_grad_norm": privacy.max_grad_norm,
                "expected_batch_size": expected_batch_size(num_units, privacy.sample_rate), "loss_reduction": "mean"}
    if secure is not None:
        return SecureNoiseDPOptimizer(base, source=secure, **settings)
    device = next(model.parameters()).device
    return DPOptimizer(base, generator=noise_generator_on(device, generator), **settings)


@contextmanager
def _private(model: nn.Module, loss_reduction: str, *, hooks: bool) -> Iterator[nn.Module]:
    """`model` with Opacus's per-sample-gradient hooks (if `hooks`; the fused path needs none), removed afterwards
    (even on error) so it can train again."""
    model.train()
    if not hooks:
        try:
            yield model
        finally:  # as Opacus's to_standard_module: no per-sample state stays on the weights
            for p in model.parameters():
                for attribute in ("grad_sample", "summed_grad"):
                    if hasattr(p, attribute):
                        delattr(p, attribute)
        return
    module = GradSampleModule(model, batch_first=True, loss_reduction=loss_reduction)
    try:
        with warnings.catch_warnings():  # Opacus's hooks on the first layer trigger a harmless torch warning
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield module
    finally:
        module.to_standard_module()


def _image_step(module: nn.Module, optimizer: DPOptimizer, data: SiteData, rows: torch.Tensor,
                fused: FusedClipping | None) -> float | None:
    """One DP-SGD step on the sampled images; its (non-private, local) loss, or None for a noise-only step."""
    optimizer.zero_grad(set_to_none=True)
    if len(rows) == 0:  # Poisson sampling can draw an empty batch: still a (noise-only) DP step
        _noise_only_step(module, optimizer)
        return None
    device = next(module.parameters()).device
    x, y = data.train_x[rows].to(device, non_blocking=True), data.train_y[rows].to(device, non_blocking=True)
    if fused is not None:  # the optimizer's clip_and_accumulate computes the clipped sum of the staged batch
        fused.stage(x, y)
        optimizer.step()
        return fused.loss
    loss = nn.functional.cross_entropy(module(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@dataclass(frozen=True)
class _Grouped:
    """A step's rows grouped into units (the sampled patients, or each sampled image's augmented copies): a unit's
    gradient is `scale` x the sum of its rows' gradients, and that is what is clipped."""

    x: torch.Tensor
    y: torch.Tensor
    owner: torch.Tensor  # the unit of each row, 0..units-1, non-decreasing
    scale: float


def _grouped(model: nn.Module, data: SiteData, units: list[torch.Tensor], copies: int,
             generator: torch.Generator) -> _Grouped | None:
    """The rows of the sampled `units` (each a tensor of image rows), with `copies` augmented copies of each image
    when copies > 1 (their gradients averaged: scale 1 / copies); None for an empty batch."""
    if not units:
        return None
    device = next(model.parameters()).device
    rows = torch.cat(units)
    owner = torch.repeat_interleave(torch.arange(len(units)), torch.tensor([len(u) for u in units])).to(device)
    x, y = data.train_x[rows].to(device), data.train_y[rows].to(device)
    if copies == 1:
        return _Grouped(x, y, owner, 1.0)
    return _Grouped(*augmented_copies(model, x, y, owner, copies, generator), 1.0 / copies)


def _grouped_step(module: nn.Module, optimizer: DPOptimizer, batch: _Grouped | None,
                  fused: FusedClipping | None) -> float | None:
    """One DP-SGD step over grouped rows: each unit's per-row gradients summed (times `scale`) into one sample
    before clipping; its mean per-row loss (local, never released), or None for a noise-only step."""
    optimizer.zero_grad(set_to_none=True)
    if batch is None:
        _noise_only_step(module, optimizer)
        return None
    if fused is not None:
        fused.stage(batch.x, batch.y, batch.owner, batch.scale)
        optimizer.step()
        return fused.loss
    loss = nn.functional.cross_entropy(module(batch.x), batch.y, reduction="sum") * batch.scale
    loss.backward()
    units = int(batch.owner[-1]) + 1
    for p in module.parameters():
        if p.requires_grad and p.grad_sample is not None:
            per_unit = torch.zeros((units, *p.shape), dtype=p.grad_sample.dtype, device=p.grad_sample.device)
            p.grad_sample = per_unit.index_add_(0, batch.owner, p.grad_sample)
    optimizer.step()
    return float(loss.detach()) / (len(batch.y) * batch.scale)


def _noise_only_step(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """An empty Poisson batch: zero per-sample gradients, so the step adds only calibrated noise."""
    for p in module.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _delta(model: nn.Module, global_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.detach() - global_weights[k]).cpu() for k, v in model.state_dict().items()}
