"""Poisson sampling: exactly the calibrated number of batches, each example independently at rate q."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from client.trainer import PoissonSampler
from common.privacy import secure_noise
from common.privacy.secure_noise import SecureNoise


def _torch_uniforms():
    generator = torch.Generator().manual_seed(0)
    return lambda count: torch.rand(count, generator=generator, dtype=torch.float64)


def _secure_uniforms(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(secure_noise, "os", SimpleNamespace(urandom=lambda n: bytes(range(n))))  # deterministic
    source = SecureNoise()
    return source.uniform


@pytest.mark.parametrize("batches", [93, 99, 105, 1, 7])
def test_the_sampler_yields_exactly_the_calibrated_batches(batches: int):
    """1 / (1 / 93) is 92.99...: Opacus's sampler made 92 batches here; ours makes the 93 that were accounted."""
    sampler = PoissonSampler(64 * batches, 1.0 / batches, batches, _torch_uniforms())
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == batches
    for rows in drawn:
        assert rows.dtype == torch.int64 and rows.dim() == 1
        assert torch.equal(rows, torch.unique(rows))  # distinct, sorted
        assert len(rows) == 0 or 0 <= rows.min() <= rows.max() < 64 * batches


@pytest.mark.parametrize("source", ["torch", "secure"])
def test_each_example_is_included_independently_at_rate_q(source: str, monkeypatch: pytest.MonkeyPatch):
    n, q, steps = 40, 0.1, 20_000
    uniforms = _torch_uniforms() if source == "torch" else _secure_uniforms(monkeypatch)
    included = np.zeros((steps, n), dtype=bool)
    for step, rows in enumerate(PoissonSampler(n, q, steps, uniforms)):
        included[step, rows.numpy()] = True
    per_example = included.mean(axis=0)
    assert np.abs(per_example - q).max() < 5 * (q * (1 - q) / steps) ** 0.5  # each example at rate q
    sizes = included.sum(axis=1)
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.05)  # Binomial(n, q): independent inclusions
    pairs = (included[:, 0] & included[:, 1]).mean()
    assert pairs == pytest.approx(q * q, abs=5 * (q * q / steps) ** 0.5)  # no two examples move together
