import numpy as np
import pytest

from common.data import load_site_data
from common.data.partition import partition_indices
from common.data.shift import ScannerShift
from common.data.site import MAX_IMAGES_PER_PATIENT, synthetic_patients
from common.errors import DataError

LABELS = np.repeat(np.arange(10), 200).astype(np.int64)


def _label_skew(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each site's label distribution and the global one."""
    overall = np.bincount(LABELS, minlength=10) / len(LABELS)
    return float(np.mean([0.5 * np.abs(np.bincount(LABELS[p], minlength=10) / len(p) - overall).sum()
                          for p in parts]))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_everything(scheme: str):
    parts = partition_indices(LABELS, num_sites=7, scheme=scheme, alpha=0.5, seed=3, min_site_images=20)
    joined = np.concatenate(parts)
    assert len(parts) == 7
    assert len(joined) == len(LABELS) == len(np.unique(joined))
    assert min(len(p) for p in parts) >= 20


def test_iid_sites_are_balanced_and_dirichlet_sites_are_skewed():
    iid = partition_indices(LABELS, num_sites=10, scheme="iid", alpha=0.5, seed=0, min_site_images=10)
    skewed = partition_indices(LABELS, num_sites=10, scheme="dirichlet", alpha=0.1, seed=0, min_site_images=10)
    assert max(len(p) for p in iid) - min(len(p) for p in iid) <= 1
    assert _label_skew(iid) < 0.1
    assert _label_skew(skewed) > 0.4


def test_partitions_are_deterministic_for_a_seed():
    a = partition_indices(LABELS, num_sites=5, scheme="dirichlet", alpha=0.5, seed=9, min_site_images=10)
    b = partition_indices(LABELS, num_sites=5, scheme="dirichlet", alpha=0.5, seed=9, min_site_images=10)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_too_many_sites_for_the_data_is_a_clear_error():
    with pytest.raises(DataError, match="cannot give 500 sites at least 20 images"):
        partition_indices(LABELS, num_sites=500, scheme="iid", alpha=0.5, seed=0, min_site_images=20)


def test_unreachable_dirichlet_minimum_is_a_clear_error():
    with pytest.raises(DataError, match="raise dirichlet-alpha"):
        partition_indices(LABELS, num_sites=50, scheme="dirichlet", alpha=0.01, seed=0, min_site_images=35)


def test_synthetic_patients_have_one_to_four_images():
    patients = synthetic_patients(500, np.random.default_rng(0))
    assert len(patients) == 500
    counts = np.bincount(patients)
    assert counts.min() >= 1 and counts.max() <= MAX_IMAGES_PER_PATIENT
    assert np.all(np.diff(patients) >= 0)


def test_site_split_keeps_each_patient_on_one_side(make_config):
    config = make_config(num_sites=4)
    data = load_site_data(config, 2)
    assert data.num_train > 0 and len(data.test_y) > 0
    assert 0.1 < len(data.test_y) / (data.num_train + len(data.test_y)) < 0.3
    assert data.train_x.shape[1:] == (1, 28, 28)
    assert float(data.train_x.min()) >= -1.0 and float(data.train_x.max()) <= 1.0
    # patient ids of the training side: every patient's images are all here (none went to the test side)
    sizes = np.bincount(data.train_patients)
    assert sizes.max() <= MAX_IMAGES_PER_PATIENT


def test_each_site_has_its_own_scanner(make_config):
    config = make_config(num_sites=4, site_shift=1.0)
    shifts = {load_site_data(config, s).shift for s in range(4)}
    assert len(shifts) == 4
    images = np.full((2, 4, 4, 1), 128, np.uint8)
    out = ScannerShift.for_site(0, 0, 1.0).apply(images, np.random.default_rng(0))
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out, 128 / 255)


def test_zero_shift_is_the_identity():
    images = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1)
    out = ScannerShift.for_site(3, 0, 0.0).apply(images, np.random.default_rng(0))
    np.testing.assert_allclose(out, images / 255.0, rtol=1e-6)


def test_unknown_site_is_refused(make_config):
    with pytest.raises(DataError, match="site 9 does not exist"):
        load_site_data(make_config(num_sites=4), 9)
