"""Model zoo. Every model here is valid for Opacus: GroupNorm instead of BatchNorm, no in-place activations.

Server and clients build the model from the same config, so state-dict keys always agree.
"""

from __future__ import annotations

import functools

import torch
from opacus.validators import ModuleValidator
from torch import nn

from common.errors import ConfigError


class GroupNormCNN(nn.Module):
    """Two conv blocks + MLP head; about 0.1M parameters at 28x28. GroupNorm keeps per-sample gradients valid."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * side * side, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@functools.cache  # one class, built on first use: torchvision is imported only for ResNet
def _residual_block_class() -> type[nn.Module]:
    from torchvision.models.resnet import BasicBlock

    class ResidualBlock(BasicBlock):
        """torchvision's BasicBlock without its in-place shortcut add (`out += identity`), which Opacus's backward
        hooks refuse (the hooked output is a view modified in place). Same submodules, so the same state dict."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    return ResidualBlock


def resnet18_groupnorm(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision ResNet-18 (random init; no weights are downloaded), made Opacus-valid."""
    from torchvision.models import resnet18
    from torchvision.models.resnet import BasicBlock

    model = resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model = ModuleValidator.fix(model)  # BatchNorm -> GroupNorm
    block = _residual_block_class()
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # in-place ops break Opacus's backward hooks
        if type(module) is BasicBlock:
            module.__class__ = block
    return model


def build_model(name: str, *, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build a model by name and check it is Opacus-valid; raise ConfigError otherwise."""
    if name == "cnn":
        if image_size < 4:
            raise ConfigError("model", name, f"needs images of at least 4x4, got {image_size}", "Use larger images.")
        model: nn.Module = GroupNormCNN(in_channels, num_classes, image_size)
    elif name == "resnet18":
        model = resnet18_groupnorm(in_channels, num_classes)
    else:
        raise ConfigError("model", name, "unknown model", "Use 'cnn' or 'resnet18'.")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError("model", name, f"is not valid for Opacus: {errors}", "Use 'cnn' or 'resnet18'.")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
