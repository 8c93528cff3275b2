import numpy as np
import pytest

from common.data import load_site_data
from common.data.partition import partition_indices, resampled_indices
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


def _resampled(site: int, **kw) -> np.ndarray:
    args = {"seed": 0, "median": 200, "spread": 1.0, "alpha": 1.0, "min_site_images": 20} | kw
    return resampled_indices(LABELS, site=site, **args)


def test_resampled_sites_are_reproducible_distinct_within_a_site_and_never_below_the_floor():
    for site in range(50):
        chosen = _resampled(site)
        assert np.array_equal(chosen, _resampled(site))  # built lazily, identically each time it is needed
        assert len(chosen) == len(np.unique(chosen)) >= 20
        assert chosen.max() < len(LABELS)
    assert not np.array_equal(_resampled(1), _resampled(2))
    assert not np.array_equal(_resampled(1), _resampled(1, seed=1))


def test_resampled_sizes_are_log_normal_around_the_median():
    sizes = np.array([len(_resampled(site)) for site in range(400)])
    assert 170 <= np.median(sizes) <= 235
    assert sizes.max() > 4 * np.median(sizes)  # a few large hospitals ...
    assert (sizes < np.median(sizes) / 2).mean() > 0.15  # ... and many small clinics
    flat = {len(_resampled(site, spread=0.0)) for site in range(20)}
    assert flat == {200}


def test_small_alpha_skews_the_case_mix():
    def skew(alpha: float) -> float:
        return _label_skew([_resampled(site, alpha=alpha, spread=0.0) for site in range(40)])

    assert skew(0.1) > 0.5 > 0.15 > skew(100.0)


def test_a_federation_too_large_for_disjoint_sites_is_resampled_on_auto(make_config):
    from common.data.site import resolve_partitioning

    assert resolve_partitioning(make_config(num_sites=10)).partitioning == "iid"
    assert resolve_partitioning(make_config(num_sites=1000)).partitioning == "resample"
    site = load_site_data(make_config(num_sites=1000, partitioning="resample"), 999)
    assert len(site.train_y) + len(site.test_y) >= 20
