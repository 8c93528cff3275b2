"""Bad input at the CLI: a specific message, exit code 2, and no run folder."""

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import carefed as _carefed
from tests.conftest import write_medmnist_npz


def _broken_files(tmp: Path) -> dict[str, Path]:
    corrupt = tmp / "corrupt.npz"
    corrupt.write_bytes(b"not an npz at all")
    wrong_keys = tmp / "keys.npz"
    np.savez(wrong_keys, images=np.zeros((3, 28, 28), np.uint8))
    out_of_range = write_medmnist_npz(tmp / "range.npz", num_classes=3,
                                      test_labels=np.full((40, 1), 7, np.uint8))
    return {"corrupt": corrupt, "keys": wrong_keys, "range": out_of_range}


@pytest.mark.parametrize(("args", "message"), [
    (["--epsilon", "0"], "target-epsilon' = 0.0: must be a positive"),
    (["--epsilon", "-1"], "target-epsilon' = -1.0"),
    (["--delta", "2"], "target-delta' = 2.0"),
    (["--data", "missing.npz"], "data file not found"),
    (["--data", "{corrupt}"], "not a readable .npz"),
    (["--data", "{keys}"], "lacks the key"),
    (["--data", "{range}", "--sites", "2"], None),  # labels beyond num-classes: see below
    (["--sites", "400", "--partitioning", "iid"], "cannot give 400 sites at least 20 images"),
    (["--partitioning", "dirichlet", "--alpha", "0.001", "--sites", "60"], "raise dirichlet-alpha"),
    (["--scenario", "nope.toml"], "file not found"),
    (["--sites", "abc"], "Invalid value"),
])
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(tmp_path: Path, args: list[str],
                                                                   message: str | None):
    files = _broken_files(tmp_path)
    args = [a.format(**files) for a in args]
    if message is None:  # num-classes 3 declared, labels are 7
        args += ["--run-name", "x"]
        message = "out of range"
        (tmp_path / "s.toml").write_text("[config]\nnum-classes = 3\n")
        args += ["--scenario", str(tmp_path / "s.toml")]
    result = _carefed("simulate", *args, "--output", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "runs").exists()


def test_existing_run_folder_is_never_overwritten(tmp_path: Path):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "metrics.json").write_text("{}")
    result = _carefed("simulate", "--run-name", "taken", "--output", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2
    assert "already exists" in result.stderr
    assert (tmp_path / "runs" / "taken" / "metrics.json").read_text() == "{}"


def test_audit_of_something_that_is_not_a_run_exits_2(tmp_path: Path):
    result = _carefed("audit", str(tmp_path / "missing"), cwd=tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = _carefed("audit", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "no ledger.sqlite" in " ".join(result.stderr.split())
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database " * 100)
    result = _carefed("audit", str(junk), "--site", cwd=tmp_path)
    assert result.returncode == 2 and "not a CareFed privacy ledger" in " ".join(result.stderr.split())
