"""Split a labelled pool across sites with flwr-datasets partitioners (IID or Dirichlet label skew).

Only indices are computed for all sites (cheap: one int per image); a site's images are materialised when
that site is asked to train, so a thousand idle sites cost almost nothing.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np

from common.errors import DataError


def partition_indices(labels: np.ndarray, *, num_sites: int, scheme: str, alpha: float, seed: int,
                      min_site_images: int) -> list[np.ndarray]:
    """Indices into `labels` for each site, every site holding at least `min_site_images`."""
    return list(_cached_partition(labels.tobytes(), num_sites, scheme, alpha, seed, min_site_images))


@lru_cache(maxsize=4)
def _cached_partition(label_bytes: bytes, num_sites: int, scheme: str, alpha: float, seed: int,
                      min_site_images: int) -> tuple[np.ndarray, ...]:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    labels = np.frombuffer(label_bytes, dtype=np.int64)
    if num_sites * min_site_images > len(labels):
        raise DataError(
            f"{len(labels)} training images cannot give {num_sites} sites at least {min_site_images} images "
            "each; use fewer sites, a larger dataset or a smaller min-site-images."
        )
    table = Dataset.from_dict({"label": labels, "index": np.arange(len(labels))})
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_sites)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_sites, partition_by="label", alpha=alpha,
            min_partition_size=min_site_images, self_balancing=True, seed=seed,
        )
    else:
        raise DataError(f"unknown partitioning {scheme!r}; use 'iid' or 'dirichlet'.")
    if scheme == "iid":
        # IidPartitioner splits in order; shuffle once, deterministically, so sites are not label-sorted.
        table = table.shuffle(seed=seed)
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flwr-datasets warns on every Dirichlet resampling try
            parts = tuple(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
                          for i in range(num_sites))
    except ValueError as err:
        raise DataError(
            f"partitioning {len(labels)} images into {num_sites} sites ({scheme}, alpha={alpha}) failed: {err} "
            f"Every site needs at least {min_site_images} images: raise dirichlet-alpha, use fewer sites or "
            "lower min-site-images."
        ) from err
    for site, part in enumerate(parts):
        if len(part) < min_site_images:
            raise DataError(
                f"site {site} received {len(part)} images (< min-site-images={min_site_images}) from the "
                f"{scheme} partition of {len(labels)} images over {num_sites} sites; use fewer sites."
            )
    return parts


def resampled_indices(labels: np.ndarray, *, site: int, seed: int, median: int, spread: float, alpha: float,
                      min_site_images: int) -> np.ndarray:
    """One virtual site drawn from a shared pool, built only when that site is needed (O(1) memory in sites).

    Size: log-normal around `median` (many small clinics, a few large hospitals), at least `min_site_images`.
    Case mix: class proportions from Dirichlet(alpha) (large alpha: close to the pool's mix). Images are distinct
    within a site; different virtual sites may share pool images, which is what makes a thousand sites possible
    on a small pool (declared wherever this scheme is used).
    """
    rng = np.random.default_rng([seed, site, 0x5123])
    size = int(round(median * np.exp(spread * rng.standard_normal())))
    size = int(np.clip(size, min_site_images, len(labels)))
    classes = np.unique(labels)
    proportions = rng.dirichlet(np.full(len(classes), alpha))
    by_class = [np.flatnonzero(labels == c) for c in classes]
    counts = rng.multinomial(size, proportions)
    picked = []
    for pool, count in zip(by_class, counts, strict=True):
        picked.append(rng.choice(pool, size=min(count, len(pool)), replace=False))
    chosen = np.concatenate(picked)
    if len(chosen) < min_site_images:  # tiny alpha piled the draw onto a small class: top up from the rest
        rest = np.setdiff1d(np.arange(len(labels)), chosen)
        chosen = np.concatenate([chosen, rng.choice(rest, size=min_site_images - len(chosen), replace=False)])
    return np.sort(chosen)
