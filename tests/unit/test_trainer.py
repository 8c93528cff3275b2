"""DP-SGD mechanics: the patient-level step is the clipped, noised, per-patient mean it claims to be."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.augmentation import max_shift, random_shifts
from client.trainer import CalibrationMismatchError, patient_index, train_locally, train_patient_level
from common.data.shift import ScannerShift
from common.data.site import SiteData
from common.models import build_model
from common.privacy import SitePrivacy, accountant


def _site(patients: list[int]) -> SiteData:
    g = torch.Generator().manual_seed(0)
    n = len(patients)
    x = torch.rand((n, 1, 28, 28), generator=g) * 2 - 1
    y = torch.randint(0, 10, (n,), generator=g)
    return SiteData(0, x, y, np.array(patients), x[:2], y[:2], ScannerShift(1, 0, 1, 0))


def test_patient_index_groups_rows_by_patient():
    numbers, rows = patient_index(np.array([7, 3, 7, 9, 3, 7]))
    assert numbers.tolist() == [1, 0, 1, 2, 0, 1]
    assert [r.tolist() for r in rows] == [[1, 4], [0, 2, 5], [3]]


def test_without_noise_or_clipping_a_patient_step_is_the_mean_patient_gradient(make_config):
    config = make_config(learning_rate=0.5, momentum=0.0, local_epochs=1)
    data = _site([0, 0, 0, 1, 2, 2])  # 3 patients
    torch.manual_seed(1)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=28)
    reference = build_model("cnn", in_channels=1, num_classes=10, image_size=28)
    reference.load_state_dict(model.state_dict())
    privacy = SitePrivacy(target_epsilon=1e9, delta=1e-5, noise_multiplier=1e-12, sample_rate=1.0,
                          steps_per_round=1, max_grad_norm=1e3, planned_rounds=1)  # noise std 1e-9
    config = config.replace(batch_size=6)  # one step per epoch: every patient, every step
    update = train_patient_level(model, data, config, privacy, torch.Generator().manual_seed(0))

    loss = nn.functional.cross_entropy(reference(data.train_x), data.train_y, reduction="sum") / 3  # 3 patients
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    for (name, _), grad in zip(reference.named_parameters(), grads, strict=True):
        torch.testing.assert_close(update.delta[name], -0.5 * grad, rtol=1e-4, atol=1e-6)
    assert privacy.history == [(1e-12, 1.0, 1)]


def test_each_patient_is_clipped_as_one_unit(make_config):
    """Six copies of one image, patients of 4, 1 and 1 images, tiny clip bound C: every patient's summed gradient is
    clipped to C and they all point the same way, so the step is exactly lr * C (clipping per image would
    give the 4-image patient 4C, and the step would be 2 lr C)."""
    config = make_config(learning_rate=1.0, momentum=0.0, batch_size=6)
    data = _site([0, 0, 0, 0, 1, 2])
    same = SiteData(0, data.train_x[:1].repeat(6, 1, 1, 1), data.train_y[:1].repeat(6), data.train_patients,
                    data.test_x, data.test_y, data.shift)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=28)
    privacy = SitePrivacy(1e9, 1e-5, 1e-12, 1.0, 1, 1e-3, 1)
    update = train_patient_level(model, same, config, privacy, torch.Generator().manual_seed(0))
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in update.delta.values()))
    assert float(norm) == pytest.approx(1e-3, rel=1e-3)


def _tiny_site(n: int) -> SiteData:
    """n 2x2 images: a model of 4 inputs keeps hundreds of DP-SGD steps fast."""
    g = torch.Generator().manual_seed(n)
    x = torch.rand((n, 1, 2, 2), generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return SiteData(0, x, y, np.arange(n), x[:2], y[:2], ScannerShift(1, 0, 1, 0))


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def _privacy_for(n: int, batch_size: int, local_epochs: int) -> SitePrivacy:
    """SitePrivacy.calibrate's sampling rate and steps, with a fixed noise (calibrating each size takes seconds)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accountant, "calibrate_noise_multiplier", lambda **_: 1.1)
        return SitePrivacy.calibrate(target_epsilon=8.0, delta=1e-5, num_examples=n, batch_size=batch_size,
                                     local_epochs=local_epochs, planned_rounds=3, max_grad_norm=1.0)


@st.composite
def _site_sizes(draw: st.DrawFn) -> tuple[int, int]:
    """Sizes n at batch size B, often with ceil(n / B) in {93, 99, 105}, where 1 / (1 / k) rounds below k."""
    batch_size = draw(st.sampled_from([16, 64]))
    batches = draw(st.one_of(st.sampled_from([93, 99, 105]), st.integers(1, 130)))
    return (batches - 1) * batch_size + draw(st.integers(1, batch_size)), batch_size


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=_site_sizes(), local_epochs=st.integers(1, 2), secure_noise=st.booleans())
@example(size=(5952, 64), local_epochs=1, secure_noise=False)  # 93 batches: Opacus's loader made 92
def test_every_site_size_takes_and_accounts_exactly_the_calibrated_steps(make_config, size, local_epochs,
                                                                         secure_noise):
    n, batch_size = size
    config = make_config(batch_size=batch_size, local_epochs=local_epochs)
    privacy = _privacy_for(n, batch_size, local_epochs)
    data = _tiny_site(n)
    for server_round in (1, 2):
        update = train_locally(_tiny_model(), data, config, privacy, torch.Generator().manual_seed(server_round),
                               secure_noise=secure_noise)
        assert update.steps == privacy.steps_per_round
        assert privacy.history == [(1.1, 1.0 / math.ceil(n / batch_size), server_round * privacy.steps_per_round)]


def test_a_step_with_everyone_sampled_is_make_privates_step(make_config):
    """At q = 1 and negligible noise our DP-SGD step equals the one Opacus's make_private builds: per-example
    clipping (the bound bites), summed, divided by the expected batch size."""
    n, clip = 24, 0.05
    data = _tiny_site(n)
    config = make_config(batch_size=n, local_epochs=1, learning_rate=0.5, momentum=0.0)
    privacy = SitePrivacy(1e9, 1e-5, 1e-12, 1.0, 1, clip, 1)
    ours = _tiny_model()
    train_locally(ours, data, config, privacy, torch.Generator().manual_seed(0))

    reference = _tiny_model()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="prv")
    module, optimizer, loader = engine.make_private(
        module=reference, optimizer=torch.optim.SGD(reference.parameters(), lr=0.5),
        data_loader=DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=n), noise_multiplier=1e-12,
        max_grad_norm=clip, poisson_sampling=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for x, y in loader:
            nn.functional.cross_entropy(module(x), y).backward()
            optimizer.step()
    for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
    assert privacy.history == [(1e-12, 1.0, 1)] and engine.accountant.history == [(1e-12, 1.0, 1)]


def test_seeded_training_reproduces_and_secure_noise_ignores_the_generator(make_config):
    config = make_config(batch_size=16, local_epochs=1)
    data = _tiny_site(200)

    def delta(generator: torch.Generator, secure_noise: bool) -> torch.Tensor:
        update = train_locally(_tiny_model(), data, config, _privacy_for(200, 16, 1), generator,
                               secure_noise=secure_noise)
        return torch.cat([d.flatten() for d in update.delta.values()])

    assert torch.equal(delta(torch.Generator().manual_seed(3), False), delta(torch.Generator().manual_seed(3), False))
    generator = torch.Generator().manual_seed(3)
    untouched = generator.get_state().clone()
    first = delta(generator, True)
    assert torch.equal(generator.get_state(), untouched)  # sampling and noise came from the CSPRNG
    assert not torch.equal(first, delta(generator, True))


@pytest.mark.parametrize("model_name", ["cnn", "scatternet"])
def test_patient_level_with_secure_noise_accounts_its_steps_and_leaves_the_generator_alone(make_config,
                                                                                          model_name: str):
    config = make_config(batch_size=4, local_epochs=1)
    data = _site([0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 7, 7])  # 8 patients, 1.5 images each: 3 patients per batch
    privacy = SitePrivacy(8.0, 1e-5, 1.1, 1 / 3, 3, 1.0, 2)  # calibrate_site: ceil(8 patients / 3) steps
    generator = torch.Generator().manual_seed(0)
    untouched = generator.get_state().clone()
    model = build_model(model_name, in_channels=1, num_classes=10, image_size=28)
    update = train_patient_level(model, data, config, privacy, generator, secure_noise=True)
    assert update.steps == 3 and privacy.history == [(1.1, 1 / 3, 3)]
    assert update.delta.keys() == model.state_dict().keys() and any(d.abs().sum() > 0 for d in update.delta.values())
    assert torch.equal(generator.get_state(), untouched)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_a_site_whose_data_changed_is_refused_before_any_step(make_config):
    config = make_config(batch_size=64, local_epochs=1)
    privacy = _privacy_for(5952, 64, 1)  # calibrated for 93 batches
    with pytest.raises(CalibrationMismatchError, match=r"6000 units \(94 batches of 64\)"):
        train_locally(_tiny_model(), _tiny_site(6000), config, privacy, torch.Generator().manual_seed(0))
    assert privacy.history == []


def test_a_round_with_other_local_epochs_than_calibrated_is_refused(make_config):
    privacy = _privacy_for(640, 64, 2)
    with pytest.raises(CalibrationMismatchError, match="calibrated for 20 steps per round, not 3 epochs of 10"):
        train_locally(_tiny_model(), _tiny_site(640), make_config(batch_size=64, local_epochs=3), privacy,
                      torch.Generator().manual_seed(0))
    assert privacy.history == []


class _EndToEnd(nn.Module):
    """A ScatterNet seen as one network (no `frontend` attribute): Opacus's hooks train it on the images."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.scattering, self.classifier = model.frontend, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.scattering(x))


@pytest.mark.parametrize("engine", ["fused", "opacus"])
def test_scatternet_trains_its_head_on_features_exactly_as_end_to_end_dp_sgd(make_config, engine: str):
    """Features computed once per round are the same function of the images as the whole network: the update, the
    noise and the accounted steps equal Opacus's per-sample clipping over head(frontend(image))."""
    n, batch = 48, 16
    site = _site(list(range(n)))
    config = make_config(batch_size=batch, local_epochs=1, dp_sgd_engine=engine)
    torch.manual_seed(1)
    ours = build_model("scatternet", in_channels=1, num_classes=10, image_size=28)
    reference = _EndToEnd(build_model("scatternet", in_channels=1, num_classes=10, image_size=28))
    reference.load_state_dict({k.replace("head.", "classifier."): v for k, v in ours.state_dict().items()})
    mine, theirs = _privacy_for(n, batch, 1), _privacy_for(n, batch, 1)
    update = train_locally(ours, site, config, mine, torch.Generator().manual_seed(4))
    expected = train_locally(reference, site, config.replace(dp_sgd_engine="opacus"), theirs,
                             torch.Generator().manual_seed(4))
    assert sorted(update.delta) == ["head.2.bias", "head.2.weight"]
    for key, value in update.delta.items():
        torch.testing.assert_close(value, expected.delta[key.replace("head.", "classifier.")], rtol=1e-4, atol=1e-6)
    assert mine.history == theirs.history and update.steps == expected.steps == math.ceil(n / batch)


@pytest.mark.parametrize("engine", ["fused", "opacus"])
def test_augmentation_multiplicity_clips_each_images_mean_gradient_over_its_copies(make_config, engine: str):
    """K = 3 shifted copies per image: the step is lr x sum_i clip_C(mean_k grad(copy_k of image i)) / B, computed
    here by autograd from the same random draws (sampling, then shifts), and the accountant gets exactly the steps
    it would without augmentation (the clipped unit is still one image)."""
    n, copies, bound = 6, 3, 0.05
    site = _site(list(range(n)))
    config = make_config(learning_rate=1.0, momentum=0.0, batch_size=n, local_epochs=1, augmentations=copies,
                         dp_sgd_engine=engine)
    torch.manual_seed(2)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=28)
    reference = build_model("cnn", in_channels=1, num_classes=10, image_size=28)
    reference.load_state_dict(model.state_dict())
    privacy = SitePrivacy(1e9, 1e-5, 1e-12, 1.0, 1, bound, 1)  # every image each step; noise std 5e-14
    update = train_locally(model, site, config, privacy, torch.Generator().manual_seed(3))

    draws = torch.Generator().manual_seed(3)
    torch.rand(n, generator=draws, dtype=torch.float64)  # the sampler's uniforms come first
    shifted = random_shifts(site.train_x.repeat_interleave(copies, 0), max_shift(28), draws)
    expected = {name: torch.zeros_like(p) for name, p in reference.named_parameters()}
    for image in range(n):
        rows = slice(image * copies, (image + 1) * copies)
        loss = nn.functional.cross_entropy(reference(shifted[rows]), site.train_y[image].repeat(copies))
        grads = torch.autograd.grad(loss, list(reference.parameters()))  # the mean over the copies
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        assert float(norm) > bound  # so clipping the mean (not each copy) is what the step shows
        for (name, _), grad in zip(reference.named_parameters(), grads, strict=True):
            expected[name] += grad * min(1.0, bound / (float(norm) + 1e-6))
    for name, total in expected.items():
        torch.testing.assert_close(update.delta[name], -total / n, rtol=1e-4, atol=1e-7)
    assert privacy.history == [(1e-12, 1.0, 1)]


def test_augmented_copies_are_shifts_within_the_bound_with_the_border_replicated():
    images = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    shifted = random_shifts(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    for original, moved in zip(images, shifted, strict=True):
        padded = nn.functional.pad(original[None], (2, 2, 2, 2), mode="replicate")[0]
        offsets = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(padded[:, dy : dy + 28, dx : dx + 28], moved)]
        assert len(offsets) == 1


def test_the_non_private_baseline_trains_on_the_same_augmented_copies(make_config, monkeypatch):
    """Without DP too, `augmentations` = K means each batch is K shifted copies of its images (the comparison with
    a private run of the same recipe stays like for like)."""
    import client.augmentation

    seen: list[int] = []
    shifts = client.augmentation.random_shifts
    monkeypatch.setattr(client.augmentation, "random_shifts",
                        lambda images, shift, generator: seen.append(len(images)) or shifts(images, shift, generator))
    config = make_config(dp=False, batch_size=8, local_epochs=1, augmentations=3)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=28)
    update = train_locally(model, _site(list(range(16))), config, None, torch.Generator().manual_seed(0))
    assert seen == [24, 24] and update.steps == 2 and math.isfinite(update.train_loss)
