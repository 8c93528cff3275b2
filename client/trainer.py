"""Local training at one site: DP-SGD with Opacus (Poisson sampling, per-sample clipping, Gaussian noise).

Returns the model delta; the caller decides how it leaves the site.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
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
    global_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=config.batch_size,
                        shuffle=privacy is None, generator=generator)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate,
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
            max_grad_norm=privacy.max_grad_norm, poisson_sampling=True, noise_generator=generator,
        )
        if abs(1.0 / len(loader) - privacy.sample_rate) > 1e-12:
            raise RuntimeError(f"Opacus samples at rate {1.0 / len(loader)} but noise was calibrated for "
                               f"{privacy.sample_rate}; the site's data size changed during the run")
    losses, steps = [], 0
    with warnings.catch_warnings():  # Opacus's hooks on the first layer trigger a harmless torch warning
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(config.local_epochs):
            for x, y in loader:
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
    delta = {k: (v.detach() - global_weights[k]) for k, v in model.state_dict().items()}
    return LocalUpdate(delta, len(data.train_y), sum(losses) / max(len(losses), 1), steps)


def _noise_only_step(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """An empty Poisson batch: zero per-sample gradients, so the step adds only calibrated noise."""
    for p in module.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
    optimizer.step()
