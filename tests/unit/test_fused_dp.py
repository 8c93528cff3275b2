"""The fused DP-SGD path computes what Opacus's hooks compute: per-sample gradients, clipped sums, noise, steps."""

import copy
import logging
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from client import fused_dp
from client.fused_dp import ChunkSizes, FusedClipping, FusedPathError, choose_engine
from client.per_sample import Factored, NotLayerwise, by_vmap, layerwise, materialised
from client.trainer import train_locally, train_patient_level
from common.data.shift import ScannerShift
from common.data.site import SiteData
from common.models import build_model
from common.privacy import SitePrivacy

SIZES = ChunkSizes(64, 8)


def _cnn(seed: int = 0, image_size: int = 28) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", in_channels=1, num_classes=10, image_size=image_size)


def _batch(n: int, image_size: int = 28, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, image_size, image_size), generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def _opacus_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Opacus's per-sample gradients (hooks, "sum" reduction: each row is one example's own gradient)."""
    module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        nn.functional.cross_entropy(module(x), y, reduction="sum").backward()
    rows = {name: p.grad_sample.detach().clone() for name, p in model.named_parameters()}
    module.to_standard_module()
    return rows


def _opacus_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> dict[str, torch.Tensor]:
    rows = _opacus_rows(model, x, y)
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=len(y))
    for name, p in model.named_parameters():
        p.grad_sample = rows[name]
    optimizer.clip_and_accumulate()
    sums = {name: p.summed_grad.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        del p.grad_sample, p.summed_grad
    return sums


@pytest.mark.parametrize("name, image_size", [("cnn", 28), ("resnet18", 16)])
def test_layerwise_per_sample_gradients_are_opacus_grad_samples(name: str, image_size: int):
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=10, image_size=image_size)
    x, y = _batch(5, image_size)
    params = {n: p.detach() for n, p in model.named_parameters()}
    grads, losses = layerwise(model, (1, image_size, image_size))(params, {}, x, y)
    expected = _opacus_rows(model, x, y)
    assert set(grads) == set(expected)
    for key, rows in {k: materialised(g) for k, g in grads.items()}.items():
        torch.testing.assert_close(rows, expected[key], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses, nn.functional.cross_entropy(model(x), y, reduction="none").detach())


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5), out=st.integers(1, 6), inputs=st.integers(1, 6), positions=st.integers(1, 5))
def test_factored_norms_and_sums_are_those_of_the_materialised_gradients(n: int, out: int, inputs: int,
                                                                       positions: int):
    g = torch.Generator().manual_seed(n * 1000 + out * 100 + inputs * 10 + positions)
    factored = Factored(torch.randn(n, out, positions, generator=g, dtype=torch.float64),
                        torch.randn(n, inputs, positions, generator=g, dtype=torch.float64), (out, inputs))
    rows, weights = factored.rows(), torch.rand(n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(factored.squared_norms(), rows.flatten(1).square().sum(1))
    torch.testing.assert_close(factored.weighted_sum(weights), torch.einsum("i,i...", weights, rows))


def test_resnet18s_clipped_sum_with_ghost_norms_is_opacus_clip_and_accumulate():
    """ResNet's deeper convolutions keep their per-sample gradients factored (ghost norms); the eager graph, as the
    compiled one takes a minute to build."""
    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=1, num_classes=10, image_size=16)
    x, y = _batch(6, 16)
    fused = FusedClipping(model, (1, 16, 16), ChunkSizes(8, 8), patients=False, compiled=False)
    ours = fused.clipped_sum(fused_dp._Pending(x, y, None), 0.5)
    expected = _opacus_clipped_sum(model, x, y, 0.5)
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-6)


class _Scaled(nn.Module):
    """A weight outside Linear/Conv2d/GroupNorm: the layerwise algebra does not cover it, vmap does."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale


def test_a_model_outside_the_layerwise_algebra_gets_vmap_with_the_same_gradients():
    torch.manual_seed(0)
    model = _Scaled()
    with pytest.raises(NotLayerwise, match="scale"):
        layerwise(model, (1, 4, 4))
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    grads, _ = by_vmap(model)(params, {}, x, y)
    for i in range(6):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for key, p in model.named_parameters():
            torch.testing.assert_close(grads[key][i], p.grad, rtol=1e-5, atol=1e-7)
    fused = FusedClipping(model, (1, 4, 4), ChunkSizes(8, 8), patients=False, compiled=False)
    assert fused.how.startswith("vmap")


class _Mixing(nn.Module):
    """Subtracts the batch mean: each sample's output depends on the others (as BatchNorm's would)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out - out.mean(0, keepdim=True)


def test_a_model_that_mixes_samples_never_gets_the_layerwise_algebra():
    torch.manual_seed(0)
    with pytest.raises(NotLayerwise, match="interact"):
        layerwise(_Mixing(), (1, 4, 4))
    fused = FusedClipping(_Mixing(), (1, 4, 4), ChunkSizes(8, 8), patients=False, compiled=False)
    assert fused.how.startswith("vmap")  # vmap differentiates each sample alone


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 50, 63, 64, 65, 79, 130])
@pytest.mark.parametrize("clip", [0.05, 1e3])
def test_the_compiled_clipped_sum_is_opacus_clip_and_accumulate(rows: int, clip: float):
    """Every batch size (one chunk, padded chunks, several shapes) and both regimes (every row clipped, none)."""
    model = _cnn()
    x, y = _batch(rows, seed=rows)
    fused = FusedClipping(model, (1, 28, 28), SIZES, patients=False, compiled=True)
    ours = fused.clipped_sum(fused_dp._Pending(x, y, None), clip)
    expected = _opacus_clipped_sum(model, x, y, clip)
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert fused.loss == pytest.approx(float(nn.functional.cross_entropy(model(x), y)), rel=1e-5)


def test_patients_are_clipped_as_units_in_the_compiled_path():
    model = _cnn()
    x, y = _batch(11)
    owner = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4])
    fused = FusedClipping(model, (1, 28, 28), ChunkSizes(8, 8), patients=True, compiled=True)
    ours = fused.clipped_sum(fused_dp._Pending(x, y, owner), 0.05)  # two chunks: patients 0-2, then 3-4
    rows = _opacus_rows(model, x, y)
    per_patient = {k: torch.zeros((5, *r.shape[1:])).index_add_(0, owner, r) for k, r in rows.items()}
    norms = torch.stack([g.flatten(1).norm(2, dim=1) for g in per_patient.values()], dim=1).norm(2, dim=1)
    factor = (0.05 / (norms + 1e-6)).clamp(max=1.0)
    for key, g in per_patient.items():
        torch.testing.assert_close(ours[key], torch.einsum("i,i...", factor, g), rtol=1e-4, atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(0, 600), large=st.sampled_from([8, 16, 24, 64, 256]))
def test_chunks_cover_each_row_once_with_little_padding(rows: int, large: int):
    sizes = ChunkSizes(large, 8)
    chunks = sizes.image_chunks(rows)
    covered = [r for start, stop, _ in chunks for r in range(start, stop)]
    assert covered == list(range(rows))
    assert all(size in (large, 8) and 0 < stop - start <= size for start, stop, size in chunks)
    padding = sum(size for *_, size in chunks) - rows
    assert padding < max(8, large / 4 + 8)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 8), min_size=1, max_size=40))
def test_patient_chunks_hold_whole_patients(sizes: list[int]):
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    chunks = fused_dp._patient_chunks(owner, 8)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(owner)
    for (start, stop, size, patients), following in zip(chunks, chunks[1:] + [None], strict=True):
        assert size == 8 and stop - start <= 8
        assert patients == len(set(owner[start:stop].tolist()))
        assert following is None or following[0] == stop and owner[stop - 1] != owner[stop]  # no patient split


def test_a_patient_larger_than_a_chunk_is_refused_by_name():
    with pytest.raises(FusedPathError, match="more than 8 images"):
        fused_dp._patient_chunks(torch.tensor([0] * 9 + [1]), 8)


def _site(n: int, patients: np.ndarray | None = None) -> SiteData:
    x, y = _batch(n, seed=n)
    return SiteData(0, x, y, np.arange(n) if patients is None else patients, x[:2], y[:2], ScannerShift(1, 0, 1, 0))


def _train(engine: str, make_config, data: SiteData, *, patients: bool = False,
           copies: int = 1) -> tuple[dict, SitePrivacy]:
    # five steps at q = 1/5 over 80 units: batches of 16 images, or of 16 patients of two images each
    config = make_config(batch_size=32 if patients else 16, local_epochs=1, dp_sgd_engine=engine,
                         privacy_unit="patient" if patients else "image", augmentations=copies)
    privacy = SitePrivacy(8.0, 1e-5, 1.1, 1 / 5, 5, 0.5, 3)
    train = train_patient_level if patients else train_locally
    update = train(_cnn(), data, config, privacy, torch.Generator().manual_seed(7))
    return update.delta, privacy


@pytest.mark.parametrize(("patients", "copies"), [(False, 1), (True, 1), (True, 2)])
def test_fused_training_is_opacus_training(make_config, patients: bool, copies: int):
    """Same sampling, same clipped sums, same noise draws, same steps in the accountant: the same model (also with
    augmentation multiplicity, each patient's gradient averaged over two shifted copies of its images)."""
    data = _site(80) if not patients else _site(160, np.repeat(np.arange(80), 2))
    fused, fused_privacy = _train("fused", make_config, data, patients=patients, copies=copies)
    hooks, hooks_privacy = _train("opacus", make_config, data, patients=patients, copies=copies)
    for key, value in hooks.items():
        torch.testing.assert_close(fused[key], value, rtol=1e-4, atol=2e-6)
    assert fused_privacy.history == hooks_privacy.history == [(1.1, 1 / 5, 5)]


def test_the_fused_step_adds_noise_of_the_calibrated_standard_deviation(make_config):
    config = make_config(batch_size=16, local_epochs=1, dp_sgd_engine="fused")
    data = _site(80)
    privacy = SitePrivacy(8.0, 1e-5, 1.3, 1 / 5, 5, 0.5, 3)
    noise: list[torch.Tensor] = []

    def observe(optimizer: DPOptimizer) -> None:
        step = optimizer.step

        def step_and_read(*args, **kwargs):
            result = step(*args, **kwargs)  # p.grad = (clipped sum + noise) / expected batch size
            noise.extend((p.grad * optimizer.expected_batch_size - p.summed_grad).flatten() for p in optimizer.params)
            return result

        optimizer.step = step_and_read

    train_locally(_cnn(), data, config, privacy, torch.Generator().manual_seed(1), audit=observe)
    draws = torch.cat(noise)
    assert len(draws) > 400_000
    assert float(draws.std()) == pytest.approx(1.3 * 0.5, rel=0.01)
    assert abs(float(draws.mean())) < 0.01


def test_the_engine_choice_is_automatic_and_logged(caplog):
    caplog.set_level(logging.INFO, logger="client.fused_dp")
    fused_dp._CHOSEN.clear()
    fused = choose_engine(_cnn(), "auto", image_shape=(1, 28, 28), sizes=SIZES, patients=False)
    assert fused is not None and fused.how == "layerwise"
    assert "fused, compiled, layerwise" in caplog.text
    assert choose_engine(_cnn(), "opacus", image_shape=(1, 28, 28), sizes=SIZES, patients=False) is None
    # a deployed ClientApp process trains one round and exits: compiling pays only for a long one
    short = choose_engine(_cnn(), "auto", image_shape=(1, 28, 28), sizes=SIZES, patients=False, steps=10,
                          fresh_process=True)
    long = choose_engine(_cnn(), "auto", image_shape=(1, 28, 28), sizes=SIZES, patients=False, steps=400,
                         fresh_process=True)
    assert short is None and long is not None


def test_resnet18_trains_with_dp_through_opacus_hooks(make_config):
    """torchvision's residual add is in place; Opacus's hooks refused it until the block was rewritten."""
    config = make_config(batch_size=4, local_epochs=1, model="resnet18")
    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=1, num_classes=10, image_size=16)
    x, y = _batch(8, 16)
    data = SiteData(0, x, y, np.arange(8), x[:2], y[:2], ScannerShift(1, 0, 1, 0))
    privacy = SitePrivacy(8.0, 1e-5, 1.1, 1 / 2, 2, 1.0, 3)
    update = train_locally(model, data, config, privacy, torch.Generator().manual_seed(0))
    assert update.steps == 2 and all(math.isfinite(float(d.abs().sum())) for d in update.delta.values())


def test_weight_standardised_convolutions_get_per_sample_gradients_through_the_standardisation():
    """model "cnn-ws": Opacus's hooks (the grad sampler common.models registers) and the fused path's vmap give
    each example's autograd gradient with respect to the raw weights; the layer algebra, which would treat the
    layer as a plain convolution, refuses it by name instead."""
    torch.manual_seed(0)
    model = build_model("cnn-ws", in_channels=1, num_classes=10, image_size=28)
    reference = copy.deepcopy(model)
    x, y = _batch(5, seed=3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    vmapped, _ = by_vmap(copy.deepcopy(model))(params, dict(model.named_buffers()), x, y)
    with pytest.raises(NotLayerwise, match="features.0"):
        layerwise(copy.deepcopy(model), (1, 28, 28))
    hooked = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        nn.functional.cross_entropy(hooked(x), y, reduction="sum").backward()
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1])
        autograd = torch.autograd.grad(loss, list(reference.parameters()))
        for (name, p), expected in zip(model.named_parameters(), autograd, strict=True):
            torch.testing.assert_close(p.grad_sample[i], expected, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(vmapped[name][i], expected, rtol=1e-4, atol=1e-6)
    hooked.to_standard_module()
