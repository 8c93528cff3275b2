"""DP-SGD mechanics: the patient-level step is the clipped, noised, per-patient mean it claims to be."""

import numpy as np
import pytest
import torch
from torch import nn

from client.trainer import patient_index, train_patient_level
from common.data.shift import ScannerShift
from common.data.site import SiteData
from common.models import build_model
from common.privacy import SitePrivacy


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
