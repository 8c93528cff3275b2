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
from common.data.site import load_site_data


def write_site_folders(config: RunConfig, out: Path, names: list[str]) -> dict[str, int]:
    """Write site k's training and local-test images for k, name in enumerate(names); return images per site."""
    counts = {}
    config = config.replace(num_sites=len(names))
    for site, name in enumerate(names):
        data = load_site_data(config, site)
        images = np.concatenate([data.train_x.numpy(), data.test_x.numpy()])
        labels = np.concatenate([data.train_y.numpy(), data.test_y.numpy()])
        first_test_patient = int(data.train_patients.max()) + 1 if len(data.train_patients) else 0
        patients = np.concatenate([data.train_patients, first_test_patient + np.arange(len(data.test_y))])
        pixels = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)  # back from [-1, 1]
        for n, (image, label, patient) in enumerate(zip(pixels, labels, patients, strict=True)):
            folder = out / name / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            channels = image.shape[0]
            array = image[0] if channels == 1 else np.transpose(image, (1, 2, 0))
            Image.fromarray(array).save(folder / f"p{int(patient):05d}_{n:05d}.png")
        counts[name] = len(labels)
    return counts
