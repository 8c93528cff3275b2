"""Shared fixtures. Tests use the real parts: Flower's simulation engine, Opacus, files on disk."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from common.config import RunConfig, resolve  # noqa: E402


@pytest.fixture
def make_config(tmp_path: Path):
    """A RunConfig from pyproject defaults plus overrides, writing runs under tmp_path."""

    def _make(**overrides: Any) -> RunConfig:
        values = {"output-dir": str(tmp_path / "runs"), "run-name": "test-run"}
        values.update({k.replace("_", "-"): v for k, v in overrides.items()})
        return resolve(overrides=values)

    return _make


@pytest.fixture
def flower_task_identity():
    """Flower's Message needs the task identity its runtime sets; in-process grids and mods run without one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def write_medmnist_npz(path: Path, *, n_train: int = 120, n_test: int = 40, size: int = 28, channels: int = 1,
                       num_classes: int = 3, seed: int = 0, **replace: np.ndarray) -> Path:
    """A small file in MedMNIST's official layout (labels shaped (N, 1)); `replace` swaps or adds arrays."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels == 1 else (size, size, channels)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_test), ("test", n_test)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, num_classes, size=(n, 1)).astype(np.uint8)
    arrays.update(replace)
    np.savez_compressed(path, **arrays)
    return path


def carefed(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed `carefed` console script, as a user would."""
    cli = Path(sys.executable).parent / "carefed"
    return subprocess.run([str(cli), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Three small hospitals' image folders (80 images each, one or two DP steps per epoch), once per module."""
    from common.deploy.demo_data import write_site_folders

    root = tmp_path_factory.mktemp("hospital-images")
    small = resolve(overrides={"partitioning": "resample", "site-size-median": 80, "site-size-spread": 0.0})
    write_site_folders(small, root, ["site-0", "site-1", "site-2"])
    return root


@pytest.fixture(autouse=True)
def _no_deployed_caches_after_a_test():
    """A test that runs the ClientApp in-process with a deployed site's node config switches on the disk caches of
    a deployed task process (client.site.keep_derived_on_disk) and may defer work past its reply: process-wide
    settings, undone after every test so that none leaks into the next."""
    yield
    if "common.privacy.memo" in sys.modules:  # only what a test imported: no test pays for importing torch here
        sys.modules["common.privacy.memo"].keep_in(None)
    if "common.models" in sys.modules:
        sys.modules["common.models"].keep_features_on_disk(None)
    if "client.after_reply" in sys.modules:
        sys.modules["client.after_reply"]._jobs = None
