"""A site's own data on disk (class folders, CSV manifest, DICOM), written as real files and loaded back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from common.data.local import MissingPatientIdError, load_local_site
from common.errors import DataError

CLASSES = ["normal", "pneumonia", "covid"]


def write_picture(path: Path, *, size: tuple[int, int] = (40, 32), color: tuple[int, int, int] = (200, 40, 10),
                  mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    image.convert(mode).save(path)
    return path


def write_dicom(path: Path, pixels: np.ndarray, *, patient: str | None = "pat-1", photometric: str = "MONOCHROME2",
                slope: float = 1.0, intercept: float = 0.0) -> str:
    """A minimal uncompressed 16-bit DICOM; `pixels` is (H, W) or (frames, H, W). Returns its SOP Instance UID."""
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    if patient is not None:
        ds.PatientID = patient
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return uid


def write_labels(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("sop_instance_uid,label\n" + "".join(f"{uid},{label}\n" for uid, label in rows))
    return path


def gradient(size: int = 16) -> np.ndarray:
    """Columns 0, 100, 200, ...: min-max scaling maps column c to round(c * 255 / (size - 1))."""
    return np.tile(np.arange(size, dtype=np.uint16) * 100, (size, 1))


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    write_picture(root / "normal" / "p0001_view1.png")
    write_picture(root / "normal" / "p0001_view2.JPG", size=(30, 60))
    write_picture(root / "normal" / "p0009_scan.png", size=(20, 20), mode="L")
    write_picture(root / "pneumonia" / "p0002_a.jpeg", size=(64, 48))
    write_picture(root / "pneumonia" / "p0003_a.PNG", color=(255, 0, 0))
    write_picture(root / "covid" / "p0001_late.png", size=(33, 41), mode="L")
    (root / "covid" / "notes.txt").write_text("not an image")
    (root / "covid" / ".hidden.png").write_bytes(b"junk")
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_class_folders_map_names_and_parse_patients(class_tree: Path, channels: int):
    data = load_local_site(class_tree, image_size=16, channels=channels, num_classes=3, class_names=CLASSES)
    assert data.layout == "class-folders"
    assert data.images.images.shape == (6, 16, 16, channels)
    assert data.images.images.dtype == np.uint8
    assert data.images.labels.dtype == np.int64
    assert data.files == sorted(data.files)
    names = [Path(f).name for f in data.files]
    assert names == ["p0001_late.png", "p0001_view1.png", "p0001_view2.JPG", "p0009_scan.png", "p0002_a.jpeg",
                     "p0003_a.PNG"]
    assert data.images.labels.tolist() == [2, 0, 0, 0, 1, 1]
    assert data.patient_ids.tolist() == ["p0001", "p0001", "p0001", "p0009", "p0002", "p0003"]
    red = data.images.images[names.index("p0003_a.PNG")]
    expected = [76] if channels == 1 else [255, 0, 0]  # Pillow's "L" weights red by 0.299
    assert (red.reshape(-1, channels) == expected).all()
    summary = data.summary()
    json.dumps(summary)
    assert summary["per_class"] == {0: 3, 1: 2, 2: 1}
    assert summary["patients"] == 4
    assert summary["images_per_patient"] == {"min": 1, "median": 1.0, "max": 3}
    assert summary["unreadable"] == 0 and summary["unreadable_files"] == []
    assert summary["images-without-patient-id"] == 0


def test_class_folder_files_without_a_patient_prefix_are_refused_naming_them_and_the_fixes(class_tree: Path):
    write_picture(class_tree / "normal" / "scan9.png")  # no underscore
    write_picture(class_tree / "covid" / "_late.png")  # starts with one: no patient before it
    for n in range(6):
        write_picture(class_tree / "pneumonia" / f"img{n}.jpg")
    for skip_unreadable in (False, True):  # a readable file without a patient id is not "unreadable"
        with pytest.raises(MissingPatientIdError) as caught:
            load_local_site(class_tree, image_size=8, channels=1, num_classes=3, class_names=CLASSES,
                            skip_unreadable=skip_unreadable)
    error = caught.value
    assert isinstance(error, DataError)  # the CLI's exit 2 and the ClientApp's data error handling apply
    assert sorted(error.files) == sorted(["normal/scan9.png", "covid/_late.png"]
                                         + [f"pneumonia/img{n}.jpg" for n in range(6)])
    message = str(error)
    assert "8 of 14 image file(s)" in message and "carry no patient id" in message
    assert "covid/_late.png" in message and "normal/scan9.png" in message and "... and 3 more" in message
    assert "<patient>_<n>.png" in message and "patient_id" in message and "--images-without-patient-id" in message
    assert "image-level protection" in message


def test_the_opt_in_loads_each_file_without_a_patient_id_as_its_own_patient_and_counts_it(class_tree: Path):
    write_picture(class_tree / "normal" / "p0012.png")  # not patient p0012: the prefix needs its underscore
    write_picture(class_tree / "covid" / "p0012.png")  # same name in another class: still a different image
    data = load_local_site(class_tree, image_size=8, channels=1, num_classes=3, class_names=CLASSES,
                           images_without_patient_id=True)
    assert len(data.images) == 8 and data.images_without_patient_id == 2
    by_name = dict(zip((str(Path(f).relative_to(class_tree)) for f in data.files), data.patient_ids.tolist(),
                       strict=True))
    assert by_name["normal/p0012.png"] == "normal/p0012.png" and by_name["covid/p0012.png"] == "covid/p0012.png"
    assert by_name["normal/p0001_view1.png"] == "p0001"  # files with a prefix are grouped as before
    summary = data.summary()
    assert summary["images-without-patient-id"] == 2 and summary["patients"] == 6
    # the opt-in changes nothing for a site whose files all carry a patient id
    (class_tree / "normal" / "p0012.png").unlink()
    (class_tree / "covid" / "p0012.png").unlink()
    data = load_local_site(class_tree, image_size=8, channels=1, num_classes=3, class_names=CLASSES,
                           images_without_patient_id=True)
    assert data.images_without_patient_id == 0 and data.summary()["patients"] == 4


def test_integer_folder_names_need_no_class_names(tmp_path: Path):
    for label in ("0", "1", "2"):
        write_picture(tmp_path / label / f"p{label}_x.png")
    data = load_local_site(tmp_path, image_size=8, channels=3, num_classes=3)
    assert data.images.labels.tolist() == [0, 1, 2]
    # with class names, integer folder names in range still work
    data = load_local_site(tmp_path, image_size=8, channels=3, num_classes=3, class_names=CLASSES)
    assert data.images.labels.tolist() == [0, 1, 2]


def test_unknown_folder_label_names_value_folder_and_valid_labels(class_tree: Path):
    with pytest.raises(DataError, match=r"class folder .*covid.*unknown label 'covid'.*integers 0-2"):
        load_local_site(class_tree, image_size=8, channels=1, num_classes=3)
    write_picture(class_tree / "3" / "p9_x.png")
    with pytest.raises(DataError, match=r"unknown label '3'.*\['normal', 'pneumonia', 'covid'\] or integers 0-2"):
        load_local_site(class_tree, image_size=8, channels=1, num_classes=3, class_names=CLASSES)


def test_missing_root_and_empty_folder(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        load_local_site(tmp_path / "nope", image_size=8, channels=1, num_classes=2)
    (tmp_path / "empty" / "normal").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images found.*\.png, \.jpg, \.jpeg"):
        load_local_site(tmp_path / "empty", image_size=8, channels=1, num_classes=2)
    write_picture(tmp_path / "empty" / "p1_loose.png")
    with pytest.raises(DataError, match="1 image.* lie directly in"):
        load_local_site(tmp_path / "empty", image_size=8, channels=1, num_classes=2)


def test_corrupt_image_fails_naming_it_or_is_skipped_and_reported(class_tree: Path):
    corrupt = class_tree / "covid" / "p0004_bad.png"
    corrupt.write_bytes(np.random.default_rng(0).bytes(300))
    truncated = class_tree / "normal" / "p0005_cut.png"
    write_picture(truncated, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:80])
    with pytest.raises(DataError, match="2 of 8 image files could not be read") as caught:
        load_local_site(class_tree, image_size=8, channels=1, num_classes=3, class_names=CLASSES)
    message = str(caught.value)
    assert str(corrupt) in message and str(truncated) in message and "--skip-unreadable" in message
    data = load_local_site(class_tree, image_size=8, channels=1, num_classes=3, class_names=CLASSES,
                           skip_unreadable=True)
    assert len(data.images) == 6
    assert sorted(u.path for u in data.unreadable) == sorted([str(corrupt), str(truncated)])
    summary = data.summary()
    assert summary["unreadable"] == 2
    assert {entry["path"] for entry in summary["unreadable_files"]} == {str(corrupt), str(truncated)}
    assert all(entry["reason"] for entry in summary["unreadable_files"])


def test_nothing_readable_is_an_error_even_when_skipping(tmp_path: Path):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "p1_a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="none of the 1 image files could be read"):
        load_local_site(tmp_path, image_size=8, channels=1, num_classes=2, skip_unreadable=True)


def test_long_unreadable_lists_are_cut_off(tmp_path: Path):
    for i in range(23):
        (tmp_path / "1").mkdir(exist_ok=True)
        (tmp_path / "1" / f"p{i:02d}_0.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"\.\.\. and 3 more"):
        load_local_site(tmp_path, image_size=8, channels=1, num_classes=2)


def test_csv_manifest_with_relative_and_absolute_paths(tmp_path: Path):
    write_picture(tmp_path / "imgs" / "a.png", size=(50, 20))
    write_picture(tmp_path / "imgs" / "b.jpg")
    elsewhere = write_picture(tmp_path / "other" / "c.png", mode="L")
    manifest = tmp_path / "imgs" / "manifest.csv"
    manifest.write_text(
        "path,label,patient_id,site_note\n"
        "b.jpg,covid,P-2,x\n"
        f"{elsewhere},1,P-1,\n"
        "a.png,normal,P-1,y\n"
    )
    data = load_local_site(manifest, image_size=12, channels=3, num_classes=3, class_names=CLASSES)
    assert data.layout == "csv-manifest"
    assert data.images.images.shape == (3, 12, 12, 3)
    assert [Path(f).name for f in data.files] == ["a.png", "b.jpg", "c.png"]  # sorted by path
    assert data.images.labels.tolist() == [0, 2, 1]
    assert data.patient_ids.tolist() == ["P-1", "P-2", "P-1"]
    assert data.summary()["images_per_patient"] == {"min": 1, "median": 1.5, "max": 2}


def test_csv_manifest_errors(tmp_path: Path):
    write_picture(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,0\n")
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['patient_id'\]"):
        load_local_site(manifest, image_size=8, channels=1, num_classes=2)
    manifest.write_text("path,label,patient_id\na.png,0,p1\ngone.png,1,p2\n")
    with pytest.raises(DataError, match=r"(?s)do not exist.*line 3: .*gone\.png"):
        load_local_site(manifest, image_size=8, channels=1, num_classes=2)
    manifest.write_text("path,label,patient_id\na.png,tumour,p1\n")
    with pytest.raises(DataError, match=r"m\.csv: line 2: unknown label 'tumour'.*integers 0-1"):
        load_local_site(manifest, image_size=8, channels=1, num_classes=2)


def test_manifest_rows_with_an_empty_patient_id_are_refused_unless_opted_in(tmp_path: Path):
    for name in ("a.png", "b.png", "c.png"):
        write_picture(tmp_path / name)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,patient_id\na.png,0,P-1\nb.png,1,\nc.png,1,  \n")
    with pytest.raises(MissingPatientIdError) as caught:
        load_local_site(manifest, image_size=8, channels=1, num_classes=2, skip_unreadable=True)
    assert caught.value.files == ["line 3: b.png", "line 4: c.png"]
    message = str(caught.value)
    assert "2 of 3 row(s) have an empty patient_id" in message and "--images-without-patient-id" in message
    data = load_local_site(manifest, image_size=8, channels=1, num_classes=2, images_without_patient_id=True)
    assert data.patient_ids.tolist() == ["P-1", "b.png", "c.png"]
    assert data.summary()["images-without-patient-id"] == 2 and data.summary()["patients"] == 3


def test_dicom_pixels_rescale_invert_and_first_frame(tmp_path: Path):
    root = tmp_path / "dicom"
    ramp = gradient()
    plain = write_dicom(root / "a" / "plain.dcm", ramp, patient="P1", slope=2.0, intercept=-1000.0)
    mono1 = write_dicom(root / "a" / "mono1.dcm", ramp, patient="P1", photometric="MONOCHROME1")
    flipped = write_dicom(root / "b" / "nested" / "flipped.DCM", ramp, patient="P2", slope=-1.0)
    frames = write_dicom(root / "b" / "frames.dcm", np.stack([ramp, np.full_like(ramp, 7)]), patient="P3")
    labels = write_labels(tmp_path / "labels.csv", [(plain, "normal"), (mono1, "1"), (flipped, "covid"),
                                                    (frames, "normal"), (generate_uid(), "normal")])
    data = load_local_site(root, labels_csv=labels, image_size=16, channels=1, num_classes=3, class_names=CLASSES)
    assert data.layout == "dicom"
    assert data.images.images.shape == (4, 16, 16, 1) and data.images.images.dtype == np.uint8
    by_name = {Path(f).name: i for i, f in enumerate(data.files)}
    assert list(by_name) == ["mono1.dcm", "plain.dcm", "frames.dcm", "flipped.DCM"]  # sorted by path
    assert data.patient_ids.tolist() == ["P1", "P1", "P3", "P2"]
    assert data.images.labels.tolist() == [1, 0, 0, 2]
    assert data.labels_without_image == 1
    expected = np.rint(np.arange(16) * 17.0).astype(np.uint8)  # 0, 17, ..., 255
    row = data.images.images[:, 0, :, 0]
    assert row[by_name["plain.dcm"]].tolist() == expected.tolist()
    assert row[by_name["mono1.dcm"]].tolist() == (255 - expected).tolist()
    assert row[by_name["flipped.DCM"]].tolist() == (255 - expected).tolist()  # negative slope reverses
    assert row[by_name["frames.dcm"]].tolist() == expected.tolist()  # frame 0, not the constant frame 1
    # resizing keeps a gradient monotone, and MONOCHROME1 stays its mirror image
    small = load_local_site(root, labels_csv=labels, image_size=9, channels=3, num_classes=3, class_names=CLASSES)
    assert small.images.images.shape == (4, 9, 9, 3)
    plain_row = small.images.images[by_name["plain.dcm"], 4, :, 0].astype(int)
    mono1_row = small.images.images[by_name["mono1.dcm"], 4, :, 0].astype(int)
    assert (np.diff(plain_row) > 0).all()
    assert np.abs(plain_row + mono1_row - 255).max() <= 1
    assert small.summary()["labels_without_image"] == 1


def test_dicom_without_label_row_is_an_error(tmp_path: Path):
    labelled = write_dicom(tmp_path / "d" / "a.dcm", gradient())
    orphan = write_dicom(tmp_path / "d" / "b.dcm", gradient())
    labels = write_labels(tmp_path / "labels.csv", [(labelled, "0")])
    with pytest.raises(DataError, match=f"b.dcm: no label for SOP Instance UID {orphan} in labels.csv"):
        load_local_site(tmp_path / "d", labels_csv=labels, image_size=8, channels=1, num_classes=2)


def test_dicom_labels_csv_columns_and_unknown_label(tmp_path: Path):
    uid = write_dicom(tmp_path / "d" / "a.dcm", gradient())
    labels = tmp_path / "labels.csv"
    labels.write_text(f"uid,label\n{uid},0\n")
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['sop_instance_uid'\]"):
        load_local_site(tmp_path / "d", labels_csv=labels, image_size=8, channels=1, num_classes=2)
    write_labels(labels, [(uid, "5")])
    with pytest.raises(DataError, match=f"SOP Instance UID {uid}.*unknown label '5'"):
        load_local_site(tmp_path / "d", labels_csv=labels, image_size=8, channels=1, num_classes=2)


def test_truncated_or_non_dicom_files_are_unreadable(tmp_path: Path):
    root = tmp_path / "d"
    good = write_dicom(root / "a.dcm", gradient())
    cut = write_dicom(root / "b.dcm", gradient(64))
    (root / "d.dcm").write_bytes(b"definitely not DICOM" * 20)
    truncated = root / "b.dcm"
    truncated.write_bytes(truncated.read_bytes()[:-3000])
    labels = write_labels(tmp_path / "labels.csv", [(good, "0"), (cut, "1")])
    with pytest.raises(DataError, match="2 of 3 image files could not be read") as caught:
        load_local_site(root, labels_csv=labels, image_size=8, channels=1, num_classes=2)
    assert str(truncated) in str(caught.value) and "--skip-unreadable" in str(caught.value)
    data = load_local_site(root, labels_csv=labels, image_size=8, channels=1, num_classes=2, skip_unreadable=True)
    assert len(data.images) == 1 and data.patient_ids.tolist() == ["pat-1"]
    reasons = {Path(u.path).name: u.reason for u in data.unreadable}
    assert set(reasons) == {"b.dcm", "d.dcm"}
    assert "not a DICOM file" in reasons["d.dcm"]
    assert data.summary()["unreadable"] == 2
    assert data.labels_without_image == 1  # the unreadable file's label row matches no loaded image


def test_dicom_without_patient_id_is_refused_unless_opted_in(tmp_path: Path):
    root = tmp_path / "d"
    named = write_dicom(root / "a.dcm", gradient(), patient="P1")
    anonymous = write_dicom(root / "scans" / "c.dcm", gradient(), patient=None)
    blank = write_dicom(root / "e.dcm", gradient(), patient="  ")
    labels = write_labels(tmp_path / "labels.csv", [(named, "0"), (anonymous, "1"), (blank, "1")])
    for skip_unreadable in (False, True):  # a readable file without a PatientID is not "unreadable"
        with pytest.raises(MissingPatientIdError) as caught:
            load_local_site(root, labels_csv=labels, image_size=8, channels=1, num_classes=2,
                            skip_unreadable=skip_unreadable)
    assert sorted(caught.value.files) == ["e.dcm", "scans/c.dcm"]
    message = str(caught.value)
    assert "2 of 3 DICOM file(s)" in message and "no PatientID (0010,0020)" in message
    assert "--images-without-patient-id" in message
    data = load_local_site(root, labels_csv=labels, image_size=8, channels=1, num_classes=2,
                           images_without_patient_id=True)
    assert [Path(f).name for f in data.files] == ["a.dcm", "e.dcm", "c.dcm"]
    assert data.patient_ids.tolist() == ["P1", "e.dcm", "scans/c.dcm"]
    assert data.images_without_patient_id == 2 and data.unreadable == []
    assert data.summary()["images-without-patient-id"] == 2


def test_bad_arguments(tmp_path: Path):
    write_picture(tmp_path / "0" / "a.png")
    with pytest.raises(DataError, match="channels=2"):
        load_local_site(tmp_path, image_size=8, channels=2, num_classes=2)
    with pytest.raises(DataError, match="2 class names"):
        load_local_site(tmp_path, image_size=8, channels=1, num_classes=3, class_names=["a", "b"])
