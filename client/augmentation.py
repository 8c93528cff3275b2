"""Augmentation multiplicity (De et al. 2022, "Unlocking high-accuracy differentially private image classification
through scale"): each sampled unit's gradient is the mean of its gradients on K randomly shifted copies, taken
before clipping. The clipped quantity is still one per image (or patient) with norm at most C, so the sensitivity,
the noise and the accountant are exactly those without it; K only changes what the clipped gradient estimates.
"""

from __future__ import annotations

import torch
from torch import nn


def max_shift(image_size: int) -> int:
    """Shifts of up to 1/14 of the side (2 pixels at 28x28, 4 at 64x64): the crop-after-padding of the paper."""
    return max(1, image_size // 14)


def random_shifts(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image translated by its own (dy, dx) in [-shift, shift]^2, the border replicated (a scan's background
    continues; zero would be a dark frame after normalisation). No flips: laterality matters in medical images."""
    n, channels, height, width = images.shape
    device = images.device
    padded = nn.functional.pad(images, (shift, shift, shift, shift), mode="replicate")
    dy, dx = (torch.randint(0, 2 * shift + 1, (n,), generator=generator).to(device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(height, device=device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width, device=device))[:, None, None, :]
    # every index advanced, so the result is laid out (N, C, H, W) with standard strides: Opacus's hooks compute
    # wrong per-sample gradients for the CNN on a permuted view whose strides differ only on the size-1 channel dim
    return padded[torch.arange(n, device=device)[:, None, None, None],
                  torch.arange(channels, device=device)[None, :, None, None], rows, cols]


def augmented_copies(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor,
                     copies: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, owner) for `copies` shifted copies of each image, adjacent so that each owner's rows stay contiguous,
    passed through the model's fixed frontend if it has one (ScatterNet: the shifted images' features; no
    gradient, no labels)."""
    x = random_shifts(images.repeat_interleave(copies, 0), max_shift(images.shape[-1]), generator)
    frontend = getattr(model, "frontend", None)
    if frontend is not None:
        with torch.no_grad():
            x = frontend(x)
    return x, labels.repeat_interleave(copies), owner.repeat_interleave(copies)


def features_shape(model: nn.Module, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one input to the model's trained part: the image, or its fixed features."""
    frontend = getattr(model, "frontend", None)
    if frontend is None:
        return image_shape
    with torch.no_grad():
        return tuple(frontend(torch.zeros((1, *image_shape), device=next(model.parameters()).device)).shape[1:])
