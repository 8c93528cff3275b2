"""Model zoo. Every model here is valid for Opacus: GroupNorm instead of BatchNorm, no in-place activations.

Server and clients build the model from the same config, so state-dict keys always agree.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.validators import ModuleValidator
from torch import nn

from common.errors import ConfigError
from common.study import MODELS

LOG = logging.getLogger(__name__)


class StandardizedConv2d(nn.Conv2d):
    """Weight standardisation (Qiao et al. 2019; De et al. 2022 pair it with GroupNorm for DP-SGD): each output
    filter is centred and scaled to unit variance before it is applied, so a noisy step cannot blow up a filter's
    scale. Its per-sample gradients go through the standardisation (`weight_gradient`): Opacus's hooks by the
    grad sampler registered below, the fused path by vmap (its layer algebra takes plain Conv2d only)."""

    EPS = 1e-5

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("StandardizedConv2d's grad sampler takes groups = 1 and numeric zero padding only")

    def standardized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(standardised weight, each filter's scale sqrt(var + eps))."""
        weight = self.weight
        mean = weight.mean(dim=(1, 2, 3), keepdim=True)
        scale = torch.sqrt(weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False) + self.EPS)
        return (weight - mean) / scale, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized()[0], self.bias)

    def weight_gradient(self, standardized_grads: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients (n, *weight.shape) with respect to the standardised weight -> with respect to the
        weight: layer norm's backward over each filter, (g - mean g - w^ mean(g w^)) / scale."""
        standardized, scale = (t.detach() for t in self.standardized())
        dims = (2, 3, 4)
        centred = standardized_grads - standardized_grads.mean(dim=dims, keepdim=True)
        return (centred - standardized * (standardized_grads * standardized).mean(dim=dims, keepdim=True)) / scale


def _standardized_conv_grad_sample(layer: StandardizedConv2d, activations: list[torch.Tensor],
                                   backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus grad sampler: the convolution's per-sample gradient (input columns x output gradient), then through
    the standardisation."""
    inputs = activations[0].to(backprops.dtype)
    columns = nn.functional.unfold(inputs, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                                   stride=layer.stride)
    outputs = backprops.flatten(2)
    grads = {layer.weight: layer.weight_gradient(
        torch.einsum("nol,npl->nop", outputs, columns).view(len(inputs), *layer.weight.shape))}
    if layer.bias is not None:
        grads[layer.bias] = outputs.sum(2)
    return grads


register_grad_sampler(StandardizedConv2d)(_standardized_conv_grad_sample)


class GroupNormCNN(nn.Module):
    """Two conv blocks + MLP head; about 0.1M parameters at 28x28. GroupNorm keeps per-sample gradients valid.
    `standardized`: weight-standardised convolutions (model "cnn-ws")."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, *, standardized: bool = False) -> None:
        super().__init__()
        conv = StandardizedConv2d if standardized else nn.Conv2d
        self.features = nn.Sequential(
            conv(in_channels, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),
            conv(16, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * side * side, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FixedScattering(nn.Module):
    """A 2D scattering transform (Mallat; kymatio's torch frontend) with J=2 and L=8 angles: 81 channels per input
    channel at a quarter of the resolution. Its filters are fixed and data-independent, so it has no parameters and
    nothing here is sent, aggregated or accounted: the filters are non-persistent buffers, out of the state dict."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.transform = copy.deepcopy(_scattering(image_size))  # a copy: each model moves its own to a device
        self.cache_key = ("scattering", SCATTERING_SCALES, SCATTERING_ANGLES, image_size)  # what fixes the filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.transform(x.contiguous())  # (N, C, 81, H/4, W/4)
        return features.flatten(1, 2)


SCATTERING_SCALES = 2
SCATTERING_ANGLES = 8
SCATTERING_CHANNELS = 81  # 1 + J L + L^2 J (J - 1) / 2 for J = 2, L = 8


@functools.cache  # building the filter bank takes ~60 ms; a site builds the study's model every round
def _scattering(image_size: int) -> nn.Module:
    # kymatio's top-level import pulls in its 3D code, which fails on scipy >= 1.15 (kymatio issue 1068); the 2D
    # frontend imports on its own.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    class Transform(ScatteringTorch2D):
        def register_single_filter(self, v, n):
            current_filter = torch.from_numpy(v).unsqueeze(-1)
            self.register_buffer("tensor" + str(n), current_filter, persistent=False)
            return current_filter

    return Transform(J=SCATTERING_SCALES, shape=(image_size, image_size), L=SCATTERING_ANGLES)


class ScatterNet(nn.Module):
    """Tramer and Boneh (2021), "Differentially private learning needs better features": fixed scattering features,
    GroupNorm without learned parameters (per image, so samples stay independent), and a linear classifier.

    `frontend` is the fixed, parameter-free part: `trained_part` computes it over a site's images (no gradient, no
    labels; cached by content in each process) and client.trainer trains `head` on the features, so DP-SGD clips
    and noises only the head's gradients, exactly what it would for head(frontend(x)): the frontend has no
    parameters."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        channels, side = in_channels * SCATTERING_CHANNELS, image_size // 2**SCATTERING_SCALES
        self.frontend = FixedScattering(image_size)
        self.head = nn.Sequential(nn.GroupNorm(27 * in_channels, channels, affine=False), nn.Flatten(),
                                  nn.Linear(channels * side * side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frontend(x))


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
    if name in ("cnn", "cnn-ws"):
        if image_size < 4:
            raise ConfigError("model", name, f"needs images of at least 4x4, got {image_size}", "Use larger images.")
        model: nn.Module = GroupNormCNN(in_channels, num_classes, image_size, standardized=name == "cnn-ws")
    elif name == "scatternet":
        if image_size % 2**SCATTERING_SCALES:
            raise ConfigError("model", name, f"needs images whose side is a multiple of 4, got {image_size}",
                              "Use 28x28 or 64x64 images, or the CNN.")
        model = ScatterNet(in_channels, num_classes, image_size)
    elif name == "resnet18":
        model = resnet18_groupnorm(in_channels, num_classes)
    else:
        raise ConfigError("model", name, "unknown model", f"Use one of {MODELS}.")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError("model", name, f"is not valid for Opacus: {errors}", f"Use one of {MODELS}.")
    return model


def trained_part(model: nn.Module, images: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """The part of `model` that has parameters, and its input for `images`. A model with a fixed, parameter-free
    `frontend` (ScatterNet) gets its features computed here (no gradient, no labels), to be reused across steps,
    epochs or rounds: head(features) is head(frontend(images)). Any other model is itself, on the images."""
    if not hasattr(model, "frontend"):
        return model, images
    return trained_module(model), _FEATURES.of(model.frontend, images, next(model.parameters()).device)


def trained_module(model: nn.Module) -> nn.Module:
    """The part of `model` that has parameters (ScatterNet's head; any other model itself)."""
    return model.head if hasattr(model, "frontend") else model


class FeatureCache:
    """Fixed features by the images' content. A site's images are the same every round, and a process (a Ray
    worker) serves the same sites round after round: computing their scattering once saves most of a round's
    work. Keyed by what fixes the frontend's filters (`cache_key`) and a SHA-256 of the images' bytes, shape and
    dtype, so a changed image is never served stale features; least recently used entries go first beyond
    `max_bytes`.

    A deployed site runs each message in a new process, where memory starts empty: with `keep_on_disk(folder)`
    features are also kept as files there (the site's state folder), which saves a deployed training task 5 s of
    its 14 s (py-spy on the loopback, three sites on two cores). They are derived from the site's images, so they
    are private to its account (0600 files); the most recently used are kept up to `MAX_DISK_BYTES`, and nothing
    is written that would leave under `MIN_FREE_BYTES` free (the ledger shares the disk). A file is keyed by the
    torch and kymatio versions too; one that cannot be read or does not fit the images is recomputed."""

    MAX_DISK_BYTES = 2 * 2**30
    MIN_FREE_BYTES = 1 * 2**30

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.folder: Path | None = None
        self._entries: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        self._lock = threading.Lock()

    def keep_on_disk(self, folder: Path | None) -> None:
        self.folder = folder

    def of(self, frontend: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        images = images.detach().contiguous()
        key = (frontend.cache_key, hashlib.sha256(images.cpu().numpy().tobytes()).hexdigest(),
               tuple(images.shape), str(images.dtype))
        with self._lock:  # sites may train in threads of one process
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        features = self._read(key, images)
        if features is None:
            with torch.no_grad():
                features = torch.cat([frontend(chunk.to(device)).to(images.device) for chunk in images.split(512)])
            self._write(key, features)
        with self._lock:
            self._entries[key] = features
            while sum(f.numel() * f.element_size() for f in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)
        return features

    def _file(self, key: tuple) -> Path | None:
        if self.folder is None:
            return None
        from importlib.metadata import version

        versioned = (key, torch.__version__, version("kymatio"))
        return self.folder / f"{hashlib.sha256(repr(versioned).encode()).hexdigest()}.pt"

    def _read(self, key: tuple, images: torch.Tensor) -> torch.Tensor | None:
        path = self._file(key)
        if path is None or not path.exists():
            return None
        try:
            features = torch.load(path, map_location="cpu", weights_only=True)
            os.utime(path)  # most recently used
        except Exception as err:  # noqa: BLE001 - any unreadable file (torn, foreign) is only a cache miss
            LOG.warning("the cached features %s could not be read (%s); computing them again", path, err)
            return None
        if not isinstance(features, torch.Tensor) or features.dtype != images.dtype \
                or len(features) != len(images):
            LOG.warning("the cached features %s do not fit these images; computing them again", path)
            return None
        return features.to(images.device)

    def _write(self, key: tuple, features: torch.Tensor) -> None:
        path = self._file(key)
        if path is None:
            return
        partial = path.with_suffix(f".{os.getpid()}.partial")
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            size = features.numel() * features.element_size()
            if shutil.disk_usage(path.parent).free - size < self.MIN_FREE_BYTES or size > self.MAX_DISK_BYTES:
                LOG.warning("the features (%d MiB) are not kept in %s: too little free space", size >> 20,
                            path.parent)
                return
            with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
                torch.save(features, out)
            os.replace(partial, path)  # whole or absent: a process killed mid-write leaves no torn file
            self._evict(path.parent)
        except Exception as err:  # noqa: BLE001 - a full or read-only disk: the features are used, only not kept
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            LOG.warning("the features could not be kept in %s (%s)", path.parent, err)

    def _evict(self, folder: Path) -> None:
        """Least recently used files first, down to MAX_DISK_BYTES; a partial file of a process that died too."""
        entries = []
        for file in folder.glob("*.pt"):
            with contextlib.suppress(OSError):  # another process may have evicted it meanwhile
                stat = file.stat()
                entries.append((stat.st_mtime, stat.st_size, file))
        total = 0
        for _, size, file in sorted(entries, reverse=True):
            total += size
            if total > self.MAX_DISK_BYTES:
                file.unlink(missing_ok=True)
        for partial in folder.glob("*.partial"):
            with contextlib.suppress(OSError):
                if time.time() - partial.stat().st_mtime > 3600:
                    partial.unlink()


_FEATURES = FeatureCache(max_bytes=256 * 2**20)


def keep_features_on_disk(folder: Path | None) -> None:
    """Also keep fixed features as files in `folder` (a deployed site's state folder), in this process."""
    _FEATURES.keep_on_disk(folder)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
