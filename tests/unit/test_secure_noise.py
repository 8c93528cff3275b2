"""The CSPRNG noise source: its uniforms and Gaussians have the right law, never repeat, and drive Opacus's step."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer
from scipy import stats
from torch import nn

from common.privacy import secure_noise
from common.privacy.secure_noise import SecureNoise, SecureNoiseDPOptimizer

DRAWS = 1_000_000


@pytest.fixture
def fixed_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real AES-CTR stream under a fixed key, so the statistical tests are deterministic."""
    monkeypatch.setattr(secure_noise, "os", SimpleNamespace(urandom=lambda n: bytes(range(n))))


def test_normals_pass_a_kolmogorov_smirnov_test_against_the_standard_normal(fixed_key):
    normals = SecureNoise().standard_normal(DRAWS)
    assert normals.dtype == torch.float64 and normals.shape == (DRAWS,)
    assert stats.kstest(normals, "norm").pvalue > 0.01


def test_normals_have_the_standard_normals_moments(fixed_key):
    z = SecureNoise().standard_normal(DRAWS).numpy()
    assert abs(z.mean()) < 5e-3  # 5 standard errors (1e-3 each)
    assert z.var() == pytest.approx(1.0, abs=7e-3)  # sd of the sample variance: sqrt(2 / N) = 1.4e-3
    assert stats.skew(z) == pytest.approx(0.0, abs=1.3e-2)  # sd sqrt(6 / N)
    assert stats.kurtosis(z, fisher=False) == pytest.approx(3.0, abs=5e-2)  # sd sqrt(96 / N)


def test_uniforms_lie_in_the_unit_interval_on_the_53_bit_grid(fixed_key):
    u = SecureNoise().uniform(DRAWS).numpy()
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    assert np.array_equal(u * 2.0**53, np.floor(u * 2.0**53))
    assert stats.kstest(u, "uniform").pvalue > 0.01


def test_extreme_words_give_finite_normals_never_log_of_zero():
    source = SecureNoise()
    for word in (0, 2**64 - 1):
        source.words = lambda count, word=word: np.full(count, word, dtype=np.uint64)
        assert torch.isfinite(source.standard_normal(4)).all()


def test_two_sources_never_repeat_and_a_source_never_rereads_its_stream():
    first, second = SecureNoise(), SecureNoise()
    draws = [first.words(2**16).copy(), first.words(3).copy(), first.words(2**16).copy(), second.words(2**16).copy()]
    everything = np.concatenate(draws)
    assert len(np.unique(everything)) == len(everything)  # a 64-bit collision by chance: about 2^-34


def test_noise_takes_each_references_shape_dtype_and_device():
    references = [torch.zeros(3, 4, dtype=torch.float16), torch.zeros(5, dtype=torch.float64)]
    noise = SecureNoise().normal_like(references, std=2.0)
    assert [(n.shape, n.dtype, n.device) for n in noise] == [(r.shape, r.dtype, r.device) for r in references]


def _zero_gradient_step(optimizer_class, **kwargs) -> torch.Tensor:
    """The parameter change of one step on an empty Poisson batch: the noise alone, scaled as DP-SGD scales it."""
    model = nn.Linear(1000, 500)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = optimizer_class(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.3,
                                max_grad_norm=0.7, expected_batch_size=16, loss_reduction="mean", **kwargs)
    steps = []
    optimizer.attach_step_hook(steps.append)
    for p in model.parameters():
        p.grad_sample = torch.zeros((0, *p.shape))
    optimizer.step()
    assert steps == [optimizer]  # Opacus's accounting hook still runs once per step
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


def test_the_optimizers_noise_has_opacus_std_per_coordinate(fixed_key):
    """sigma * C / expected batch size on every coordinate, as Opacus's own DPOptimizer gives with torch's RNG."""
    expected = 1.3 * 0.7 / 16
    ours = _zero_gradient_step(SecureNoiseDPOptimizer, source=SecureNoise()).double()
    theirs = _zero_gradient_step(DPOptimizer, generator=torch.Generator().manual_seed(0)).double()
    for change in (ours, theirs):
        assert float(change.std()) == pytest.approx(expected, rel=1e-2)
        assert abs(float(change.mean())) < 5 * expected / len(change) ** 0.5
    assert stats.kstest(ours.numpy() / expected, "norm").pvalue > 0.01


def test_without_noise_the_secure_optimizer_is_opacus_dp_optimizer():
    """Clipping, summing and scaling are Opacus's: only the noise source differs."""
    torch.manual_seed(0)
    per_sample = [torch.randn(8, 3, 4), torch.randn(8, 3)]
    results = []
    for optimizer_class, extra in ((SecureNoiseDPOptimizer, {"source": SecureNoise()}), (DPOptimizer, {})):
        params = [nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(3))]
        optimizer = optimizer_class(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=0.5,
                                    expected_batch_size=8, **extra)
        for p, g in zip(params, per_sample, strict=True):
            p.grad_sample = g.clone()
        optimizer.step()
        results.append([p.detach().clone() for p in params])
    for ours, theirs in zip(*results, strict=True):
        assert torch.equal(ours, theirs)
