"""Local training at one site: DP-SGD with Opacus (Poisson sampling, per-sample clipping, Gaussian noise).

Returns the model delta; the caller decides how it leaves the site.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import RunConfig
from common.data import SiteData
from common.privacy import SitePrivacy
from common.privacy.accountant import ACCOUNTANT


@dataclass
class LocalUpdate:
    delta: dict[str, torch.Tensor]  # trained weights minus the global weights, per state-dict key
    num_examples: int
    train_loss: float
    steps: int


def train_locally(model: nn.Module, data: SiteData, config: RunConfig, privacy: SitePrivacy | None,
                  generator: torch.Generator) -> LocalUpdate:
    """Train `model` (holding the global weights) on the site's data; update `privacy`'s history in place.

    With `privacy`, this is DP-SGD: a PrivacyEngine whose PRV accountant is loaded with the site's whole history,
    so its epsilon is composed over every round so far. `generator` drives Poisson sampling and the noise.
    """
    device = next(model.parameters()).device  # the caller put the model on the site's CPU or GPU
    global_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=config.batch_size,
                        shuffle=privacy is None, generator=generator)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=config.step_size,
                                                       momentum=config.momentum)
    model.train()
    module: nn.Module = model
    engine = None
    if privacy is not None:
        with warnings.catch_warnings():  # "Secure RNG turned off": see client.site.noise_generator
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=ACCOUNTANT)
        engine.accountant.load_state_dict(privacy.accountant().state_dict())
        module, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm, poisson_sampling=True,
            noise_generator=noise_generator_on(device, generator),
        )
        if abs(1.0 / len(loader) - privacy.sample_rate) > 1e-12:
            raise RuntimeError(f"Opacus samples at rate {1.0 / len(loader)} but noise was calibrated for "
                               f"{privacy.sample_rate}; the site's data size changed during the run")
    losses, steps = [], 0
    with warnings.catch_warnings():  # Opacus's hooks on the first layer trigger a harmless torch warning
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(config.local_epochs):
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                if len(y) == 0:  # Poisson sampling can draw an empty batch: still a (noise-only) DP step
                    _noise_only_step(module, optimizer)
                else:
                    loss = nn.functional.cross_entropy(module(x), y)
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
                steps += 1
    if privacy is not None and engine is not None:
        privacy.record_steps(engine.accountant.state_dict())
        if isinstance(module, AbstractGradSampleModule):
            module.to_standard_module()  # remove Opacus's hooks so the model can be trained again
    delta = {k: (v.detach() - global_weights[k]).cpu() for k, v in model.state_dict().items()}
    return LocalUpdate(delta, len(data.train_y), sum(losses) / max(len(losses), 1), steps)


def train_patient_level(model: nn.Module, data: SiteData, config: RunConfig, privacy: SitePrivacy,
                        generator: torch.Generator) -> LocalUpdate:
    """Patient-level DP-SGD: Poisson-sample patients, clip each patient's summed gradient, add noise.

    Opacus computes per-image gradients (GradSampleModule); we sum them per patient before its DPOptimizer clips
    and noises, so the unit of clipping, sampling and accounting is the patient. The accountant is the same
    run-long PRV history as at image level, now over patient-sampling steps.
    """
    patients, images_of = patient_index(data.train_patients)
    num_patients = len(images_of)
    device = next(model.parameters()).device
    if abs(1.0 / math.ceil(num_patients / patients_per_batch(config, data)) - privacy.sample_rate) > 1e-12:
        raise RuntimeError("the site's patients changed during the run; its noise was calibrated for others")
    global_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    module = GradSampleModule(model, loss_reduction="sum")
    base = torch.optim.SGD(model.parameters(), lr=config.step_size, momentum=config.momentum)
    expected = num_patients * privacy.sample_rate
    optimizer = DPOptimizer(base, noise_multiplier=privacy.noise_multiplier, max_grad_norm=privacy.max_grad_norm,
                            expected_batch_size=max(1, round(expected)), loss_reduction="mean",
                            generator=noise_generator_on(device, generator))
    accountant = privacy.accountant()
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=privacy.sample_rate))
    steps = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(privacy.steps_per_round):
            optimizer.zero_grad(set_to_none=True)
            chosen = torch.nonzero(torch.rand(num_patients, generator=generator) < privacy.sample_rate).flatten()
            if len(chosen) == 0:
                _noise_only_step(module, optimizer)
            else:
                rows = torch.cat([images_of[int(c)] for c in chosen])
                x, y = data.train_x[rows].to(device), data.train_y[rows].to(device)
                loss = nn.functional.cross_entropy(module(x), y, reduction="sum")
                loss.backward()
                owner = torch.searchsorted(chosen, patients[rows]).to(device)  # batch-local patient of each image
                for p in module.parameters():
                    if p.requires_grad and p.grad_sample is not None:
                        per_patient = torch.zeros((len(chosen), *p.shape), dtype=p.grad_sample.dtype, device=device)
                        p.grad_sample = per_patient.index_add_(0, owner, p.grad_sample)
                optimizer.step()
            steps += 1
    module.to_standard_module()
    privacy.record_steps(accountant.state_dict())
    delta = {k: (v.detach() - global_weights[k]).cpu() for k, v in model.state_dict().items()}
    return LocalUpdate(delta, len(data.train_y), float("nan"), steps)


def noise_generator_on(device: torch.device, generator: torch.Generator) -> torch.Generator:
    """Opacus draws noise on the parameters' device; sampling stays on the CPU generator, which seeds this one."""
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


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


def _noise_only_step(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """An empty Poisson batch: zero per-sample gradients, so the step adds only calibrated noise."""
    for p in module.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
