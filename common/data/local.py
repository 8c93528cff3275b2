"""One hospital site's own images, loaded from disk at a deployed site.

Three layouts; `load_local_site` picks one from its arguments:

* ``csv-manifest``: `root` is a ``.csv`` file with the header ``path,label,patient_id`` (extra columns are
  ignored). Paths are relative to the CSV's folder, or absolute. Any image format Pillow reads is accepted.
* ``dicom``: `labels_csv` is given. `root` is a folder searched recursively for ``*.dcm`` files; `labels_csv` has
  the header ``sop_instance_uid,label``. The patient is the DICOM PatientID (0010,0020). Pixels get the modality
  LUT (RescaleSlope/RescaleIntercept), the first frame of a multi-frame image is used, MONOCHROME1 is inverted, and
  each image is min-max scaled to 0-255 (window/VOI settings are ignored). Label rows whose UID matches no readable
  file are allowed and counted as `labels_without_image`.
* ``class-folders``: `root` is a folder holding one folder per class, ``<root>/<class-name>/<file>`` with the
  extension .png, .jpg or .jpeg (any case). Only files directly inside a class folder are read. The patient id is
  the file name up to its first underscore: ``p0012_view1.png`` and ``p0012_view2.jpg`` are patient ``p0012``.

Every image needs its patient's id: a class-folder file name without the ``<patient>_`` prefix (no underscore, or
starting with one), a manifest row with an empty patient_id, or a DICOM file without PatientID is refused with a
MissingPatientIdError. Such an image would otherwise silently be a patient of its own, so one real patient could be
split into several and get only image-level protection under privacy-unit "patient". With the explicit opt-in
`images_without_patient_id=True` each such image is loaded as its own patient (id: its path relative to the data
folder) and counted in the summary as ``images-without-patient-id``.

Labels are the federation's integers 0..num_classes-1. With `class_names`, a folder name or label may be one of
those names (mapped to its position in the list; names take precedence) or an integer in range; without, it must
be an integer. Names starting with "." (hidden files and folders) are skipped everywhere. Files are read sorted by
path, so a dataset always loads in the same order. Every image is converted to the federation's format: uint8
(image_size, image_size, channels), grayscale via Pillow's "L" or colour via "RGB", resized bilinearly (stretched
to a square, not cropped); 16-bit and float images are min-max scaled to 0-255 first.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from common.data.sources import ImageSet
from common.errors import DataError

if TYPE_CHECKING:
    from pydicom import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DICOM_EXTENSION = ".dcm"
MANIFEST_COLUMNS = ("path", "label", "patient_id")
DICOM_LABEL_COLUMNS = ("sop_instance_uid", "label")
MAX_LISTED = 20  # problems listed one by one in an error message; the rest are counted
MAX_LISTED_WITHOUT_PATIENT = 5  # files without a patient id listed in the refusal; the rest are counted
SKIP_FLAG = "--skip-unreadable"
WITHOUT_PATIENT_FLAG = "--images-without-patient-id"
WITHOUT_PATIENT_NODE_CONFIG = "images-without-patient-id=true"


class MissingPatientIdError(DataError):
    """Images carry no patient id and the site did not opt in to loading each as a patient of its own: refused,
    because a real patient split into several would get only image-level protection under privacy-unit "patient"."""

    def __init__(self, problem: str, files: list[str], fix: str) -> None:
        self.files = files  # every offending file (or manifest line), not only those in the message
        super().__init__(
            f"{problem}:\n{_listing(files, MAX_LISTED_WITHOUT_PATIENT)}\nEach would count as a patient of its own, "
            "so one real patient's images could be split and get only image-level protection under "
            f"privacy-unit \"patient\". {fix}, or, if each of these images really is a different patient (or "
            f"image-level protection is acceptable for them), pass {WITHOUT_PATIENT_FLAG} (SuperNode node config: "
            f"{WITHOUT_PATIENT_NODE_CONFIG}) to load each as its own patient; they are then counted as "
            "images-without-patient-id."
        )


@dataclass(frozen=True)
class Unreadable:
    """A file that could not be decoded, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class LocalSiteData:
    """A site's images in the federation's format, with the patient and source file of each."""

    images: ImageSet  # uint8 (N, image_size, image_size, channels), int64 labels (N,)
    patient_ids: np.ndarray  # (N,) str
    files: list[str]
    unreadable: list[Unreadable]  # files skipped (only with skip_unreadable=True)
    layout: str  # "class-folders" | "csv-manifest" | "dicom"
    labels_without_image: int = 0
    images_without_patient_id: int = 0  # loaded as a patient of their own (only with images_without_patient_id=True)

    def summary(self) -> dict:
        """JSON-able overview: counts per class and per patient, and what was skipped."""
        labels, counts = np.unique(self.images.labels, return_counts=True)
        _, per_patient = np.unique(self.patient_ids, return_counts=True)
        return {
            "layout": self.layout,
            "images": len(self.images),
            "per_class": {int(label): int(count) for label, count in zip(labels, counts, strict=True)},
            "patients": int(per_patient.size),
            "images_per_patient": {
                "min": int(per_patient.min()) if per_patient.size else 0,
                "median": float(np.median(per_patient)) if per_patient.size else 0.0,
                "max": int(per_patient.max()) if per_patient.size else 0,
            },
            "unreadable": len(self.unreadable),
            "unreadable_files": [{"path": u.path, "reason": u.reason} for u in self.unreadable],
            "labels_without_image": self.labels_without_image,
            "images-without-patient-id": self.images_without_patient_id,
        }


@dataclass(frozen=True)
class _Item:
    path: Path
    label: int
    patient: str
    pixels: np.ndarray
    without_patient_id: bool = False  # `patient` is the image's own path: it carries no patient id


@dataclass(frozen=True)
class _Entry:
    """An image file to read, its label, and its patient (None: the file carries no patient id)."""

    path: Path
    label: int
    patient: str | None


def load_local_site(root: Path, *, image_size: int, channels: int, num_classes: int,
                    class_names: Sequence[str] | None = None, labels_csv: Path | None = None,
                    skip_unreadable: bool = False, images_without_patient_id: bool = False) -> LocalSiteData:
    """Load one site's images from a class-folder tree, a CSV manifest, or DICOM files with a labels CSV.

    Images without a patient id raise MissingPatientIdError unless `images_without_patient_id` opts in to loading
    each as a patient of its own (image-level protection only, even under privacy-unit "patient")."""
    _check_arguments(image_size, channels, num_classes, class_names)
    label_of = _label_parser(num_classes, class_names)
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DataError(f"site data not found: {root} does not exist. Pass the folder of class folders, the CSV "
                        "manifest, or the folder of .dcm files (with its labels CSV).")
    labels_without_image = 0
    if root.is_file() and root.suffix.lower() == ".csv":
        if labels_csv is not None:
            raise DataError(f"{root} is a CSV manifest, which carries its own labels; a labels CSV ({labels_csv}) "
                            "is only for a folder of DICOM files. Drop one of the two.")
        layout = "csv-manifest"
        items, unreadable = _manifest(root, label_of, image_size, channels, images_without_patient_id)
    elif labels_csv is not None:
        layout = "dicom"
        items, unreadable, labels_without_image = _dicom(root, Path(labels_csv).expanduser().resolve(), label_of,
                                                         image_size, channels, images_without_patient_id)
    elif root.is_dir():
        layout = "class-folders"
        items, unreadable = _class_folders(root, label_of, image_size, channels, images_without_patient_id)
    else:
        raise DataError(f"{root} is a file but not a .csv manifest. Pass the folder of class folders, a CSV "
                        "manifest (path,label,patient_id), or a folder of .dcm files with a labels CSV.")
    if unreadable and not skip_unreadable:
        raise DataError(
            f"{len(unreadable)} of {len(items) + len(unreadable)} image files could not be read:\n"
            + _listing([f"{u.path}: {u.reason}" for u in unreadable])
            + f"\nFix or remove these files, or pass {SKIP_FLAG} to load the site without them."
        )
    if not items:
        raise DataError(f"{root}: none of the {len(unreadable)} image files could be read, so the site has no data:\n"
                        + _listing([f"{u.path}: {u.reason}" for u in unreadable])
                        + "\nReplace them with valid image files.")
    images = np.stack([item.pixels for item in items])
    labels = np.array([item.label for item in items], dtype=np.int64)
    return LocalSiteData(
        images=ImageSet(images, labels),
        patient_ids=np.array([item.patient for item in items], dtype=str),
        files=[str(item.path) for item in items],
        unreadable=unreadable,
        layout=layout,
        labels_without_image=labels_without_image,
        images_without_patient_id=sum(item.without_patient_id for item in items),
    )


def _check_arguments(image_size: int, channels: int, num_classes: int, class_names: Sequence[str] | None) -> None:
    if channels not in (1, 3):
        raise DataError(f"channels={channels}: images are loaded as 1 (grayscale) or 3 (RGB) channels; pass the "
                        "channel count the federation's model expects.")
    if image_size < 8:
        raise DataError(f"image_size={image_size} is too small; pass the federation's image size (e.g. 28), >= 8.")
    if num_classes < 2:
        raise DataError(f"num_classes={num_classes}: pass the federation's class count (>= 2); a site's own data "
                        "cannot infer it, since its labels must mean the same as every other site's.")
    if class_names is not None:
        names = [str(name).strip() for name in class_names]
        if len(names) != num_classes:
            raise DataError(f"{len(names)} class names {names} given for num_classes={num_classes}; list exactly "
                            "one name per class, in label order (the first is label 0).")
        if len(set(names)) != len(names) or "" in names:
            raise DataError(f"class names {names} must be distinct and non-empty.")


def _label_parser(num_classes: int, class_names: Sequence[str] | None) -> Callable[..., int]:
    """A function mapping a label text (a class name or an integer) to 0..num_classes-1, or raising DataError."""
    names = {str(name).strip(): index for index, name in enumerate(class_names or ())}
    valid = f"integers 0-{num_classes - 1}"
    if names:
        valid = f"the class names {list(names)} or {valid}"

    def label_of(text: str, where: str, fix: str = "Fix the label") -> int:
        text = text.strip()
        if text in names:
            return names[text]
        try:
            value = int(text)
        except ValueError:
            value = -1
        if 0 <= value < num_classes:
            return value
        hint = "" if names else " If the labels are class names, pass the class names in label order."
        raise DataError(f"{where}: unknown label {text!r}. Valid labels are {valid}. {fix}.{hint}")

    return label_of


def _listing(lines: list[str], limit: int = MAX_LISTED) -> str:
    shown = [f"  {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  ... and {len(lines) - limit} more")
    return "\n".join(shown)


def _reason(err: Exception) -> str:
    text = " ".join(str(err).split()) or "no details"
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(err).__name__}: {text}"


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


# --- layouts ------------------------------------------------------------------------------------------------------


def _class_folders(root: Path, label_of: Callable[..., int], image_size: int, channels: int,
                   images_without_patient_id: bool) -> tuple[list[_Item], list[Unreadable]]:
    entries: list[_Entry] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p)):
        files = sorted(p for p in folder.iterdir() if _is_image_file(p))
        if not files:
            continue
        label = label_of(folder.name, f"class folder {folder}", "Rename the folder")
        entries.extend(_Entry(file, label, _patient_from_name(file.name)) for file in files)
    if not entries:
        loose = sum(1 for p in root.iterdir() if _is_image_file(p))
        hint = (f" {loose} image(s) lie directly in {root}: move each into a folder named after its class."
                if loose else "")
        raise DataError(f"no images found in {root}: looked for <root>/<class-name>/<file> with the extensions "
                        f"{', '.join(IMAGE_EXTENSIONS)} (any case).{hint} Put each class's images in a folder named "
                        "after the class, or pass a CSV manifest (path,label,patient_id).")
    without = [str(entry.path.relative_to(root)) for entry in entries if entry.patient is None]
    if without and not images_without_patient_id:
        raise MissingPatientIdError(
            f"{len(without)} of {len(entries)} image file(s) in {root} carry no patient id (the file name up to its "
            "first underscore, as in p0012_view1.png)", without,
            "Rename each to <patient>_<n>.png (e.g. p0012_1.png, the same <patient> for all images of one patient), "
            "or list the images in a CSV manifest with a patient_id column (path,label,patient_id)")
    return _read_pictures(entries, image_size, channels, root)


def _is_image_file(path: Path) -> bool:
    return path.is_file() and _visible(path) and path.suffix.lower() in IMAGE_EXTENSIONS


def _patient_from_name(name: str) -> str | None:
    """The patient id a class-folder file name carries (up to its first underscore), or None."""
    prefix, underscore, _ = name.partition("_")
    return prefix if underscore and prefix else None


def _own_patient(path: Path, base: Path) -> str:
    """The patient id of an image that carries none: its path relative to the data folder (unique per file)."""
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def _manifest(manifest: Path, label_of: Callable[..., int], image_size: int, channels: int,
              images_without_patient_id: bool) -> tuple[list[_Item], list[Unreadable]]:
    rows = _read_csv(manifest, MANIFEST_COLUMNS, "a CSV manifest")
    entries: list[_Entry] = []
    missing: list[str] = []
    without: list[str] = []
    first_row: dict[Path, int] = {}
    for line, row in rows:
        where = f"{manifest}: line {line}"
        text = row["path"].strip()
        if not text:
            raise DataError(f"{where} has an empty path; give each image's path (relative to {manifest.parent}).")
        path = Path(text).expanduser()
        path = (path if path.is_absolute() else manifest.parent / path).resolve()
        label = label_of(row["label"], where)
        patient = row["patient_id"].strip() or None
        if patient is None:
            without.append(f"line {line}: {text}")
        if path in first_row:
            raise DataError(f"{where} lists {path} again (first at line {first_row[path]}); list each image once.")
        first_row[path] = line
        if not path.is_file():
            missing.append(f"line {line}: {path}")
        entries.append(_Entry(path, label, patient))
    if without and not images_without_patient_id:
        raise MissingPatientIdError(f"{manifest}: {len(without)} of {len(entries)} row(s) have an empty patient_id",
                                    without, "Give every row its patient's id (the same id for all images of one "
                                    "patient)")
    if missing:
        raise DataError(f"{manifest}: {len(missing)} listed image file(s) do not exist:\n{_listing(missing)}\n"
                        f"Fix the paths (relative paths are resolved from {manifest.parent}) or remove those rows.")
    if not entries:
        raise DataError(f"no images found: {manifest} has a header but no rows. Add one row per image.")
    return _read_pictures(sorted(entries, key=lambda entry: str(entry.path)), image_size, channels, manifest.parent)


def _dicom(root: Path, labels_csv: Path, label_of: Callable[..., int], image_size: int, channels: int,
           images_without_patient_id: bool) -> tuple[list[_Item], list[Unreadable], int]:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as err:
        raise DataError(f"reading DICOM files needs pydicom, which is not installed ({err}); "
                        "install it with `pip install pydicom`.") from err

    if not root.is_dir():
        raise DataError(f"{root} is not a folder; with a labels CSV, pass the folder holding the .dcm files.")
    if not labels_csv.is_file():
        raise DataError(f"labels CSV not found: {labels_csv}. Pass a CSV with the header sop_instance_uid,label.")
    label_rows: dict[str, tuple[int, str]] = {}
    for line, row in _read_csv(labels_csv, DICOM_LABEL_COLUMNS, "a DICOM labels CSV"):
        uid, label = row["sop_instance_uid"].strip(), row["label"].strip()
        if uid in label_rows and label_rows[uid][1] != label:
            raise DataError(f"{labels_csv}: line {line} labels SOP Instance UID {uid} {label!r}, but line "
                            f"{label_rows[uid][0]} labels it {label_rows[uid][1]!r}; keep one label per image.")
        label_rows.setdefault(uid, (line, label))
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == DICOM_EXTENSION
                   and all(_visible(Path(part)) for part in p.relative_to(root).parts))
    if not files:
        raise DataError(f"no images found: no {DICOM_EXTENSION} files (any case) under {root} (searched recursively). "
                        "Pass the folder that holds the site's DICOM files.")
    items: list[_Item] = []
    unreadable: list[Unreadable] = []
    unlabelled: list[str] = []
    without: list[str] = []
    matched: set[str] = set()
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            unreadable.append(Unreadable(str(path), "not a DICOM file (no 'DICM' file header)"))
            continue
        except Exception as err:  # truncated or malformed files raise many different errors
            unreadable.append(Unreadable(str(path), _reason(err)))
            continue
        if "PixelData" not in ds:
            unreadable.append(Unreadable(str(path), "no pixel data (7FE0,0010): the file is truncated or not an image"))
            continue
        uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        patient = str(ds.get("PatientID", "") or "").strip()
        if not uid:
            unreadable.append(Unreadable(str(path), "no SOP Instance UID (0008,0018) in the DICOM header"))
            continue
        if not patient:
            without.append(str(path.relative_to(root)))
            if not images_without_patient_id:
                continue  # refused below, once every file has been looked at
        if uid not in label_rows:
            unlabelled.append(f"{path}: no label for SOP Instance UID {uid} in {labels_csv.name}")
            continue
        line, text = label_rows[uid]
        label = label_of(text, f"{labels_csv}: line {line} (SOP Instance UID {uid})")
        try:
            pixels = _conform(Image.fromarray(_dicom_pixels(ds)), image_size, channels)
        except Exception as err:  # e.g. compressed pixel data without its decoder plugin, wrong pixel data length
            unreadable.append(Unreadable(str(path), _reason(err)))
            continue
        matched.add(uid)
        items.append(_Item(path, label, patient or _own_patient(path, root), pixels, without_patient_id=not patient))
    if without and not images_without_patient_id:
        raise MissingPatientIdError(
            f"{len(without)} of {len(files)} DICOM file(s) under {root} have no PatientID (0010,0020)", without,
            f"Set each file's PatientID (the same id for all images of one patient) or move those files out of {root}")
    if unlabelled:
        raise DataError(f"{len(unlabelled)} DICOM file(s) have no label:\n{_listing(unlabelled)}\nAdd a row "
                        f"(sop_instance_uid,label) for each to {labels_csv}, or move those files out of {root}.")
    return items, unreadable, len(set(label_rows) - matched)


def _read_csv(path: Path, required: Sequence[str], what: str) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV (with their line numbers), keyed by lower-cased header names; checks the required columns."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip().lower() for name in next(reader, [])]
            missing = [name for name in required if name not in header]
            if missing:
                raise DataError(f"{path} lacks the column(s) {missing}; found {header}. {what.capitalize()} needs "
                                f"the header {','.join(required)} (extra columns are allowed).")
            rows = []
            for values in reader:
                if not any(value.strip() for value in values):
                    continue
                if len(values) < len(header):
                    values = values + [""] * (len(header) - len(values))
                rows.append((reader.line_num, dict(zip(header, values, strict=False))))
            return rows
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); save it as a UTF-8 CSV.") from err
    except csv.Error as err:
        raise DataError(f"{path} is not a valid CSV file ({err}); it should be {what}.") from err


# --- pixels -------------------------------------------------------------------------------------------------------


def _read_pictures(entries: list[_Entry], image_size: int, channels: int,
                   base: Path) -> tuple[list[_Item], list[Unreadable]]:
    """Decode each entry's file; an entry without a patient id becomes its own patient (id relative to `base`)."""
    items: list[_Item] = []
    unreadable: list[Unreadable] = []
    for entry in entries:
        try:
            with Image.open(entry.path) as image:
                image.load()
                pixels = _conform(ImageOps.exif_transpose(image), image_size, channels)
        except Exception as err:  # Pillow raises many error types for corrupt or truncated files
            unreadable.append(Unreadable(str(entry.path), _reason(err)))
            continue
        patient = entry.patient or _own_patient(entry.path, base)
        items.append(_Item(entry.path, entry.label, patient, pixels, without_patient_id=entry.patient is None))
    return items, unreadable


def _conform(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """Any Pillow image -> uint8 (image_size, image_size, channels)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = Image.fromarray(_min_max_uint8(np.asarray(image)))
    image = image.convert("L" if channels == 1 else "RGB")
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[..., None] if channels == 1 else pixels


def _min_max_uint8(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float64))
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _dicom_pixels(ds: Dataset) -> np.ndarray:
    """A DICOM dataset's first frame as uint8 (H, W) or (H, W, 3): modality LUT, min-max, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut

    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        pixels = apply_modality_lut(pixels, ds)
    pixels = _min_max_uint8(pixels)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        pixels = 255 - pixels
    return pixels
