"""Folders of real image files for a local rehearsal of a deployment: one site's share of the embedded data.

Each site gets `<out>/<site-name>/<label>/p<patient>_<n>.png`, the layout `carefed site check` and a SuperNode's
`data` node config read (patients from the file names). Pixels are the embedded digits with the site's scanner
shift applied, as in simulation, so a deployed rehearsal and a simulation of the same study train on the same images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from common.config import RunConfig
from common.data.site import load_site_data, to_pixels


def write_site_folders(config: RunConfig, out: Path, names: list[str]) -> dict[str, int]:
    """Write site k's training and local-test images for k, name in enumerate(names); return images per site."""
    counts = {}
    config = config.replace(num_sites=len(names))
    for site, name in enumerate(names):
        data = load_site_data(config, site)
        pixels = np.concatenate([to_pixels(data.train_x), to_pixels(data.test_x)])
        labels = np.concatenate([data.train_y.numpy(), data.test_y.numpy()])
        first_test_patient = int(data.train_patients.max()) + 1 if len(data.train_patients) else 0
        patients = np.concatenate([data.train_patients, first_test_patient + np.arange(len(data.test_y))])
        for n, (image, label, patient) in enumerate(zip(pixels, labels, patients, strict=True)):
            folder = out / name / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
            picture.save(folder / f"p{int(patient):05d}_{n:05d}.png")
        counts[name] = len(labels)
    return counts
