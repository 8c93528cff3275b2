"""What one site holds: its training images (with patient ids) and a local test split."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import RunConfig
from common.data.partition import partition_indices, resampled_indices
from common.data.shift import ScannerShift
from common.data.sources import DataSource, ImageSet, load_source
from common.errors import DataError
from common.models import build_model

MAX_IMAGES_PER_PATIENT = 4  # synthetic patients for data without patient ids: 1-4 images each


@dataclass(frozen=True)
class SiteData:
    site: int
    train_x: torch.Tensor  # float32 (N, C, H, W), normalised to [-1, 1]
    train_y: torch.Tensor  # int64 (N,)
    train_patients: np.ndarray  # int64 (N,) patient id of each training image
    test_x: torch.Tensor
    test_y: torch.Tensor
    shift: ScannerShift
    fingerprint: str = ""  # SHA-256 identifying the dataset (its files, or a simulated site's recipe)

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """float [0, 1] NHWC -> normalised NCHW tensor (also used for the global test set)."""
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    return torch.from_numpy((np.ascontiguousarray(images.transpose(0, 3, 1, 2)) - 0.5) / 0.5)


def to_pixels(tensor: torch.Tensor) -> np.ndarray:
    """Normalised NCHW tensor -> uint8 NHWC pixels: the inverse of to_tensor (up to rounding)."""
    return np.clip(np.round((tensor.numpy().transpose(0, 2, 3, 1) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def synthetic_patients(num_images: int, rng: np.random.Generator) -> np.ndarray:
    """Group images into patients of 1..MAX_IMAGES_PER_PATIENT images (ids 0, 1, ...)."""
    sizes = rng.integers(1, MAX_IMAGES_PER_PATIENT + 1, size=num_images)
    return np.repeat(np.arange(num_images), sizes)[:num_images].astype(np.int64)


def load_source_for(config: RunConfig) -> DataSource:
    return load_source(config.data, global_test_size=config.global_test_size, seed=config.seed,
                       num_classes=config.num_classes)


def global_model(config: RunConfig, source: DataSource | None = None) -> torch.nn.Module:
    """The federation's model (freshly initialised) for this config's architecture, images and classes."""
    source = source or load_source_for(config)
    channels, height, _ = source.image_shape
    return build_model(config.model, in_channels=channels, num_classes=source.num_classes, image_size=height)


@dataclass(frozen=True)
class Canaries:
    """Mislabelled images for the one-run audit: canary i belongs to site i mod num_sites and is in its training
    data iff included[i] (a fair coin per canary, from the run seed). A model only fits a wrong label it was
    trained on, so each canary's loss says whether it was in, unless DP hides it."""

    images: ImageSet
    site: np.ndarray
    included: np.ndarray


def canary_pixels(canaries: Canaries, which: np.ndarray, shift: ScannerShift) -> np.ndarray:
    """Canaries as their site's scanner renders them, without acquisition noise, so the auditor scores exactly
    the image that was (or would have been) trained on."""
    return dataclasses.replace(shift, noise_std=0.0).apply(canaries.images.images[which], np.random.default_rng(0))


def canaries_for(config: RunConfig) -> Canaries:
    source = load_source_for(config)
    m = config.canaries
    if not 0 < m <= len(source.test):
        raise DataError(f"canaries={m} must be between 1 and {len(source.test)}: they are images of the global "
                        "test set (which no site trains on) given a wrong label")
    rng = np.random.default_rng([config.seed, 0xCA4A])
    pool = source.test.subset(rng.permutation(len(source.test))[:m])
    wrong = (pool.labels + rng.integers(1, source.num_classes, size=m)) % source.num_classes
    return Canaries(ImageSet(pool.images, wrong), np.arange(m) % config.num_sites, rng.random(m) < 0.5)


def site_indices(config: RunConfig, source: DataSource, site: int) -> np.ndarray:
    """Which pool images site `site` holds."""
    config = resolve_partitioning(config)
    if config.partitioning == "resample":
        return resampled_indices(source.train.labels, site=site, seed=config.seed, median=config.site_size_median,
                                 spread=config.site_size_spread, alpha=config.dirichlet_alpha,
                                 min_site_images=config.min_site_images)
    return partition_indices(source.train.labels, num_sites=config.num_sites, scheme=config.partitioning,
                             alpha=config.dirichlet_alpha, seed=config.seed,
                             min_site_images=config.min_site_images)[site]


def resolve_partitioning(config: RunConfig) -> RunConfig:
    """'auto' becomes 'iid' while the pool gives every site min-site-images disjoint images, else 'resample'."""
    if config.partitioning != "auto":
        return config
    pool = len(load_source_for(config).train)
    return config.replace(partitioning="iid" if pool >= config.num_sites * config.min_site_images else "resample")


def check_partitions(config: RunConfig, source: DataSource) -> None:
    """Fail early if the federation cannot be partitioned (disjoint schemes); resampled sites always can."""
    if config.partitioning in ("iid", "dirichlet"):
        partition_indices(source.train.labels, num_sites=config.num_sites, scheme=config.partitioning,
                          alpha=config.dirichlet_alpha, seed=config.seed, min_site_images=config.min_site_images)


def load_site_data(config: RunConfig, site: int) -> SiteData:
    """Materialise one site's data: its partition, its patients, its scanner, its train/test split."""
    if not 0 <= site < config.num_sites:
        raise DataError(f"site {site} does not exist in a federation of {config.num_sites} sites.")
    source = load_source_for(config)
    images: ImageSet = source.train.subset(site_indices(config, source, site))
    rng = np.random.default_rng([config.seed, site, 0x517E])
    order = rng.permutation(len(images))
    images = images.subset(order)
    patients = synthetic_patients(len(images), rng)
    # Split by patient so no patient has images on both sides of the local train/test split.
    patient_ids = np.unique(patients)
    num_test_patients = int(round(len(patient_ids) * config.local_test_fraction))
    if num_test_patients < 1 or num_test_patients >= len(patient_ids):
        raise DataError(
            f"site {site} has {len(images)} images from {len(patient_ids)} patients: too few to keep a local "
            f"test split of {config.local_test_fraction:.0%}; use fewer sites or a larger dataset."
        )
    test_patients = rng.choice(patient_ids, size=num_test_patients, replace=False)
    is_test = np.isin(patients, test_patients)
    shift = ScannerShift.for_site(site, config.seed, config.site_shift)
    pixels = shift.apply(images.images, rng)
    train_x, train_y, train_patients = pixels[~is_test], images.labels[~is_test], patients[~is_test]
    if config.canaries:
        canaries = canaries_for(config)
        mine = np.flatnonzero((canaries.site == site) & canaries.included)
        train_x = np.concatenate([train_x, canary_pixels(canaries, mine, shift)])
        train_y = np.concatenate([train_y, canaries.images.labels[mine]])
        first = int(patients.max()) + 1 if patients.size else 0
        train_patients = np.concatenate([train_patients, first + np.arange(len(mine))])  # one patient each
    return SiteData(
        site=site,
        train_x=to_tensor(train_x),
        train_y=torch.from_numpy(train_y),
        train_patients=train_patients,
        test_x=to_tensor(pixels[is_test]),
        test_y=torch.from_numpy(images.labels[is_test]),
        shift=shift,
        fingerprint=hashlib.sha256(f"simulated/{config.data}/{config.seed}/{config.partitioning}/{config.num_sites}/"
                                   f"{site}/{config.canaries}".encode()).hexdigest(),
    )


@dataclass(frozen=True)
class LocalDataSpec:
    """Where a deployed site's own images are (from its SuperNode's node config), and how to read them."""

    path: str
    labels_csv: str = ""
    class_names: str = ""  # comma-separated, in label order
    skip_unreadable: bool = False
    images_without_patient_id: bool = False  # opt-in: each image without a patient id is a patient of its own


def load_deployed_site_data(config: RunConfig, site: int, spec: LocalDataSpec, *, image_size: int, channels: int,
                            num_classes: int) -> tuple[SiteData, dict]:
    """A partner site's own images as SiteData: real patient ids, a stable patient-level train/test split, no
    simulated scanner shift. The image format and classes come from the study; the site never loads the
    coordinator's data. Also returns the loader's summary (counts, patients, unreadable files)."""
    local = _load_local_cached(spec, image_size, channels, num_classes)
    unique, patients = np.unique(local.patient_ids, return_inverse=True)
    # The split must not change between rounds (its noise is calibrated for the training set) and must not depend
    # on anything the server sends: seed it from the site's own file list.
    digest = np.frombuffer(hashlib.sha256("\n".join(local.files).encode()).digest()[:8], dtype=np.uint64)[0]
    rng = np.random.default_rng(int(digest))
    num_test = int(round(len(unique) * config.local_test_fraction))
    if num_test < 1 or num_test >= len(unique):
        raise DataError(f"site {site} has {len(local.images)} images from {len(unique)} patients: too few to keep a "
                        f"local test split of {config.local_test_fraction:.0%} of the patients; add data")
    is_test = np.isin(patients, rng.choice(len(unique), size=num_test, replace=False))
    pixels, labels = local.images.images, local.images.labels
    data = SiteData(site=site, train_x=to_tensor(pixels[~is_test]), train_y=torch.from_numpy(labels[~is_test]),
                    train_patients=patients[~is_test].astype(np.int64), test_x=to_tensor(pixels[is_test]),
                    test_y=torch.from_numpy(labels[is_test]), shift=ScannerShift.for_site(site, 0, 0.0),
                    fingerprint=files_fingerprint(tuple(local.files)))
    return data, {**local.summary(), "fingerprint": data.fingerprint}


@functools.lru_cache(maxsize=4)
def files_fingerprint(files: tuple[str, ...]) -> str:
    """SHA-256 over every file's path and contents: the identity of a deployed site's dataset in its ledger."""
    digest = hashlib.sha256(b"carefed/dataset/v1")
    for name in sorted(files):
        digest.update(name.encode() + b"\0")
        try:
            digest.update(hashlib.sha256(Path(name).read_bytes()).digest())
        except OSError:
            digest.update(b"unreadable")
    return digest.hexdigest()


@functools.lru_cache(maxsize=2)
def _load_local_cached(spec: LocalDataSpec, image_size: int, channels: int, num_classes: int):
    from common.data.local import load_local_site

    names = [n.strip() for n in spec.class_names.split(",")] if spec.class_names.strip() else None
    return load_local_site(Path(spec.path).expanduser(), image_size=image_size, channels=channels,
                           num_classes=num_classes, class_names=names,
                           labels_csv=Path(spec.labels_csv).expanduser() if spec.labels_csv else None,
                           skip_unreadable=spec.skip_unreadable,
                           images_without_patient_id=spec.images_without_patient_id)
