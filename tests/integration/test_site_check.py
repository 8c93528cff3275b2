"""`carefed site check` on real files, as a partner site runs it before joining."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import carefed as _carefed


def _site_folder(root: Path, per_class: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for label in range(3):
        (root / str(label)).mkdir(parents=True)
        for n in range(per_class):
            pixels = rng.integers(0, 256, (32, 32), dtype=np.uint8)
            Image.fromarray(pixels).save(root / str(label) / f"p{label}{n // 2:03d}_{n}.png")  # 2 images a patient
    return root


def test_site_check_reports_counts_patients_and_the_planned_privacy(tmp_path: Path):
    data = _site_folder(tmp_path / "images")
    result = _carefed("site", "check", "--data", str(data), "--epsilon", "3", "--rounds", "4", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["per_class"] == {"0": 40, "1": 40, "2": 40} and report["patients"] == 60
    assert report["images_per_patient"] == {"min": 2, "median": 2.0, "max": 2}
    assert report["images-without-patient-id"] == 0
    assert report["train-images"] + report["local-test-images"] == 120
    plan = report["privacy"]
    assert plan["unit"] == "image" and plan["budget"] == 3.0 and len(plan["epsilon-after-round"]) == 4
    assert plan["epsilon-after-round"] == sorted(plan["epsilon-after-round"])  # composed, never reset
    assert 2.9 <= plan["epsilon-after-round"][-1] <= 3.0


def test_corrupt_images_are_named_and_skipped_only_when_asked(tmp_path: Path):
    data = _site_folder(tmp_path / "images")
    broken = data / "1" / "p999_0.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))  # a PNG signature and nothing readable after it
    refused = _carefed("site", "check", "--data", str(data), cwd=tmp_path)
    assert refused.returncode == 2
    message = " ".join(refused.stderr.split())
    assert "p999_0.png" in message and "--skip-unreadable" in message
    skipped = _carefed("site", "check", "--data", str(data), "--skip-unreadable", "--json", cwd=tmp_path)
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    report = json.loads(skipped.stdout)
    assert report["unreadable"] == 1 and report["unreadable_files"][0]["path"].endswith("p999_0.png")
    assert report["images"] == 120


def test_a_missing_folder_and_an_unknown_label_are_clear_errors(tmp_path: Path):
    missing = _carefed("site", "check", "--data", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2 and "nowhere" in missing.stderr
    data = _site_folder(tmp_path / "images")
    (data / "0").rename(data / "pneumonia")
    unknown = _carefed("site", "check", "--data", str(data), cwd=tmp_path)
    assert unknown.returncode == 2 and "pneumonia" in " ".join(unknown.stderr.split())


def test_the_sites_keys_are_checked_with_its_data(tmp_path: Path):
    from common.deploy.certs import StudyPaths, make_study

    make_study(tmp_path / "study", sites=["a"], hosts=["localhost"])
    keys = StudyPaths(tmp_path / "study").site("a")
    (keys / "node.key").unlink()
    data = _site_folder(tmp_path / "images")
    result = _carefed("site", "check", "--data", str(data), "--keys", str(keys), cwd=tmp_path)
    assert result.returncode == 2
    assert "node.key not found; copy this site's sites/<site>/ folder" in " ".join(result.stderr.split())


def _without_patient_prefix(data: Path, count: int) -> None:
    rng = np.random.default_rng(1)
    for n in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(data / "1" / f"scan{n}.png")


def test_images_without_a_patient_id_are_refused_naming_them_and_the_fixes(tmp_path: Path):
    data = _site_folder(tmp_path / "images")
    _without_patient_prefix(data, 3)
    refused = _carefed("site", "check", "--data", str(data), "--skip-unreadable", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stdout == ""  # no report for a site that is refused
    message = " ".join(refused.stderr.split())
    assert "3 of 123 image file(s)" in message and "carry no patient id" in message
    assert all(f"1/scan{n}.png" in message for n in range(3))
    assert "<patient>_<n>.png" in message and "patient_id column" in message
    assert "--images-without-patient-id" in message


def test_the_opt_in_is_counted_and_the_report_says_those_images_get_only_image_level_protection(tmp_path: Path):
    data = _site_folder(tmp_path / "images")
    _without_patient_prefix(data, 3)
    opted_in = _carefed("site", "check", "--data", str(data), "--images-without-patient-id", "--json", cwd=tmp_path)
    assert opted_in.returncode == 0, opted_in.stderr[-2000:]
    report = json.loads(opted_in.stdout)
    assert report["images-without-patient-id"] == 3
    assert report["images"] == 123 and report["patients"] == 63  # each such image is a patient of its own
    scenario = tmp_path / "patient-level.toml"
    scenario.write_text('[config]\nprivacy-unit = "patient"\n')
    text = _carefed("site", "check", "--data", str(data), "--images-without-patient-id", "--scenario", str(scenario),
                    "--rounds", "2", cwd=tmp_path)
    assert text.returncode == 0, text.stderr[-2000:]
    out = " ".join(text.stdout.split())
    assert "3 image(s) have no patient id and were loaded as one patient each" in out
    assert "privacy unit is 'patient'" in out and "protected only as single images, even at patient level" in out
    assert "Privacy (patient-level" in out


@pytest.mark.long
def test_a_site_audits_its_own_dp_sgd_with_white_box_canaries_on_its_own_images(tmp_path: Path):
    data = _site_folder(tmp_path / "images")
    result = _carefed("site", "check", "--data", str(data), "--rounds", "4", "--whitebox", "1000", "--json",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    game, plan = report["whitebox"], report["privacy"]
    assert game["consistent"] and game["canaries"] == 1000 and game["rounds"] == 4
    # the game trained this site's planned run (its sampling, its steps, its noise for its budget) and had the
    # power to fail it
    assert game["sample_rate"] == plan["sample-rate"] and game["steps"] == 4 * plan["steps-per-round"]
    assert game["noise_multiplier"] == pytest.approx(plan["noise-multiplier"])
    assert game["claimed_epsilon"] == pytest.approx(plan["budget"], abs=0.05)
    assert game["ceiling"] > game["claimed_epsilon"]
    assert game["epsilon_lower_bound"] > 0  # the canaries went through the site's AES-CTR noise path and were seen

    too_few = _carefed("site", "check", "--data", str(data), "--whitebox", "20", cwd=tmp_path)
    assert too_few.returncode == 2 and "could not fail" in too_few.stderr
