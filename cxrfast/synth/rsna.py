"""A synthetic RSNA Pneumonia Detection Challenge (stage 2) training set in the published layout.

    OUT/stage_2_train_labels.csv            patientId,x,y,width,height,Target
    OUT/stage_2_detailed_class_info.csv     patientId,class
    OUT/stage_2_train_images/{patientId}.dcm

As released: one label row per box (several for most positive patients, `x,y,width,height` in
pixels of the 1024x1024 image, written like `264.0`), a single row with an empty box and
Target 0 for every negative patient; the class file has one row per label row ("Lung Opacity",
"No Lung Opacity / Not Normal", "Normal"). The DICOMs are Secondary Capture images as the
challenge shipped them (1024x1024, 8-bit MONOCHROME2, JPEG Baseline, PatientAge without the
"Y" of the AS VR, ViewPosition PA/AP, "view: PA" as the series description), written with
pydicom. So that readers are tested on what other DICOM exports hold, a few are MONOCHROME1
(JPEG Baseline), a few 12-bit in 16 (uncompressed) with a rescale and a window
(WindowCenter/Width), and a few 12-bit MONOCHROME1 with a VOI LUT Sequence.

Each positive patient's opacity is drawn inside its boxes (the boxes are where the trace is);
"Not Normal" patients get another finding. Everything comes from `seed`: same seed, same bytes.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrfast import __version__
from cxrfast.shards.schema import LABEL_NAMES
from cxrfast.synth import labels as lab
from cxrfast.synth.radiograph import Anatomy, Pose, draw_radiograph, posed_box
from cxrfast.synth.writing import (
    atomic_write,
    csv_bytes,
    encode_image,
    prepare_folder,
    run_tasks,
    summary_line,
)

log = logging.getLogger(__name__)

LABELS_CSV = "stage_2_train_labels.csv"
CLASS_CSV = "stage_2_detailed_class_info.csv"
IMAGE_DIR = "stage_2_train_images"
LABEL_COLUMNS: tuple[str, ...] = ("patientId", "x", "y", "width", "height", "Target")
CLASS_COLUMNS: tuple[str, ...] = ("patientId", "class")
OPACITY, NOT_NORMAL, NORMAL = "Lung Opacity", "No Lung Opacity / Not Normal", "Normal"
#: The classes' shares of patients in stage 2 (6012 / 11821 / 8851 of 26684).
CLASS_RATES: dict[str, float] = {OPACITY: 0.225, NOT_NORMAL: 0.443, NORMAL: 0.332}
#: Boxes per positive patient (1 .. 4).
BOX_COUNT_P = (0.42, 0.55, 0.025, 0.005)
IMAGE_SIZE = 1024
#: Pixel encodings: "jpeg8" as released; the others exercise readers on other exports.
ENCODINGS = ("jpeg8", "mono1_jpeg8", "window16", "voilut16")
#: Share of patients with each non-default encoding (at least one each from 4 patients on).
ENCODING_FRACTIONS = {"mono1_jpeg8": 0.03, "window16": 0.03, "voilut16": 0.02}
_NOT_NORMAL_FINDINGS = ("Pleural Effusion", "Cardiomegaly", "Atelectasis", "Support Devices", "Lung Lesion", "Edema")


@dataclass(frozen=True, slots=True)
class RsnaImageTask:
    """One patient's DICOM to draw and write (picklable)."""

    path: Path
    patient_id: str
    anatomy: Anatomy
    labels: np.ndarray  # CheXpert order, for the renderer
    view: str
    seed: int
    pose: Pose
    sex: str
    age: int
    encoding: str
    opacities: tuple[tuple[float, float, float, float], ...] = field(default=())


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _window_from(img: np.ndarray) -> tuple[int, int]:
    lo, hi = np.percentile(img, [1, 99])
    return int(round((lo + hi) / 2)), max(2, int(round(hi - lo)))


def rsna_dataset(img: np.ndarray, *, encoding: str, patient_id: str, view: str = "PA", sex: str = "M", age: int = 50):
    """The pydicom Dataset of `img` (uint8 for the *jpeg8 encodings, 12-bit values in uint16 for the
    *16 ones; bright = attenuating) with the challenge's attributes, stored as `encoding` says."""
    from pydicom import config
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage

    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    bits = 8 if encoding.endswith("8") else 16
    if img.dtype != (np.uint8 if bits == 8 else np.uint16):
        raise ValueError(f"encoding {encoding!r} needs {'uint8' if bits == 8 else 'uint16'} pixels, got {img.dtype}")
    mono1 = encoding in ("mono1_jpeg8", "voilut16")
    pid = patient_id
    sop = _uid(pid, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = JPEGBaseline8Bit if bits == 8 else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {view}"
    ds.PatientName = pid
    ds.PatientID = pid
    ds.PatientBirthDate = ""
    ds.PatientSex = sex
    with config.disable_value_validation():
        ds.PatientAge = str(age)  # as released: no "Y" (not a valid AS value)
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyInstanceUID = _uid(pid, "study")
    ds.SeriesInstanceUID = _uid(pid, "series")
    ds.StudyID = ""
    ds.SeriesNumber = "1"
    ds.InstanceNumber = "1"
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.PixelSpacing = ["0.143", "0.143"]
    ds.PixelRepresentation = 0
    if bits == 8:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        stored = 255 - img if mono1 else img
        ds.PixelData = encapsulate([encode_image(np.ascontiguousarray(stored), ".jpg")])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        if encoding == "window16":  # a rescale to "output units" and a window in them
            intercept = -1000
            center, width = _window_from(img)
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = str(intercept), "1", "US"
            ds.WindowCenter, ds.WindowWidth = str(center + intercept), str(width)
            stored = img
        else:  # MONOCHROME1 with a VOI LUT Sequence (a sigmoid over the stored range, 12-bit out)
            stored = (4095 - img.astype(np.int32)).astype(np.uint16)
            center, width = _window_from(stored)
            width = max(2, round(0.6 * width))  # steeper than the 1-99% range: a contrast curve
            x = np.arange(4096, dtype=np.float64)
            curve = 4095.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
            item = Dataset()
            item.LUTDescriptor = [4096, 0, 12]
            item.LUTExplanation = "SIGMOID"
            item.LUTData = np.rint(curve).astype("<u2").tobytes()
            item["LUTData"].VR = "OW"
            ds.VOILUTSequence = Sequence([item])
        ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
        ds["PixelData"].VR = "OW"
    return ds


def encode_dicom(ds) -> bytes:
    """A pydicom Dataset -> the bytes of its DICOM file (preamble, file meta; deterministic)."""
    from pydicom import config, dcmwrite

    buf = io.BytesIO()
    with config.disable_value_validation():  # PatientAge as released is not a valid AS value
        dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def dicom_bytes(task: RsnaImageTask) -> bytes:
    """The DICOM file of one patient (Secondary Capture; JPEG Baseline or Explicit VR Little Endian)."""
    bits = 8 if task.encoding.endswith("8") else 16
    img = draw_radiograph(task.anatomy, task.labels, task.view, (IMAGE_SIZE, IMAGE_SIZE), seed=task.seed, pose=task.pose,
                          bits=bits, opacities=task.opacities)  # fmt: skip
    ds = rsna_dataset(img, encoding=task.encoding, patient_id=task.patient_id, view=task.view, sex=task.sex, age=task.age)
    return encode_dicom(ds)


def write_rsna_image(task: RsnaImageTask) -> int:
    return atomic_write(task.path, dicom_bytes(task))


def _lung_box(a: Anatomy, s: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A normalised box (before the pose) in the lung on side s (-1: the image's left)."""
    w, h = rng.uniform(0.13, 0.22), rng.uniform(0.16, 0.34)
    inner, outer = a.medi_half_width + 0.04, a.lung_half_width - 0.01
    x_in = rng.uniform(inner, max(inner, outer - w))  # inner edge's distance from the midline
    x0 = a.cx + x_in if s > 0 else a.cx - x_in - w
    bottom = min(a.dome_left, a.dome_right) + 0.02
    y0 = rng.uniform(a.lung_top + 0.12, max(a.lung_top + 0.12, bottom - h))
    x0, y0 = float(np.clip(x0, 0.01, 0.99 - w)), float(np.clip(y0, 0.01, 0.99 - h))
    return x0, y0, x0 + w, y0 + h


def _patient_id(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def make_rsna(out: Path, *, patients: int, seed: int = 0, workers: int = 1, overwrite: bool = False) -> dict:
    """Write a synthetic RSNA Pneumonia stage-2 training set under `out` with `patients` DICOMs.

    From 2 patients on there is at least one negative and one positive patient with two or more
    boxes; from 4 on, every encoding of ENCODINGS. Returns a summary: images, patients, per class,
    boxes, per encoding, bytes, seconds.
    """
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    t0 = time.perf_counter()
    out = Path(out)
    params = {"dataset": "rsna-pneumonia-stage2", "patients": patients, "seed": seed, "generator": f"cxrfast {__version__}"}
    prepare_folder(out, params, [out / IMAGE_DIR, out / LABELS_CSV, out / CLASS_CSV], overwrite=overwrite)

    rng = np.random.default_rng([seed, 400])
    classes = list(rng.choice(list(CLASS_RATES), size=patients, p=list(CLASS_RATES.values())))
    n_boxes = [int(rng.choice([1, 2, 3, 4], p=BOX_COUNT_P)) if c == OPACITY else 0 for c in classes]
    if patients >= 2:
        if not any(n >= 2 for n in n_boxes):
            classes[0], n_boxes[0] = OPACITY, 2
        if all(c == OPACITY for c in classes):
            classes[-1], n_boxes[-1] = NORMAL, 0
    encodings = ["jpeg8"] * patients
    if patients >= 4:
        order = iter(rng.permutation(patients).tolist())
        for enc, frac in ENCODING_FRACTIONS.items():
            for _ in range(max(1, round(frac * patients))):
                encodings[next(order)] = enc

    tasks: list[RsnaImageTask] = []
    label_rows: list[list[object]] = []
    class_rows: list[list[object]] = []
    for i in range(patients):
        pid = _patient_id(rng)
        view = "PA" if rng.random() < 0.54 else "AP"
        sex = "F" if rng.random() < 0.43 else "M"
        age = int(rng.integers(1, 93))
        anatomy = Anatomy.sample(np.random.default_rng([seed, 401, i]), female=sex == "F")
        pose = Pose.sample(np.random.default_rng([seed, 402, i]), view)
        trace = np.full(len(LABEL_NAMES), lab.BLANK)
        if classes[i] == NORMAL:
            trace[LABEL_NAMES.index("No Finding")] = 1.0
        elif classes[i] == NOT_NORMAL:
            for name in rng.choice(_NOT_NORMAL_FINDINGS, size=int(rng.integers(1, 3)), replace=False):
                trace[LABEL_NAMES.index(str(name))] = 1.0
        sides = (-1, 1) if n_boxes[i] >= 2 else (int(rng.choice([-1, 1])),)
        boxes = tuple(_lung_box(anatomy, sides[k % len(sides)], rng) for k in range(n_boxes[i]))
        img_seed = int(np.random.SeedSequence([seed, 403, i]).generate_state(1)[0])
        tasks.append(RsnaImageTask(out / IMAGE_DIR / f"{pid}.dcm", pid, anatomy, trace, view, img_seed, pose, sex, age,
                                   encodings[i], boxes))  # fmt: skip
        if boxes:
            for b in boxes:
                x0, y0, x1, y1 = (float(round(v)) for v in posed_box(b, pose, (IMAGE_SIZE, IMAGE_SIZE)))
                label_rows.append([pid, x0, y0, x1 - x0, y1 - y0, 1])
                class_rows.append([pid, classes[i]])
        else:
            label_rows.append([pid, "", "", "", "", 0])
            class_rows.append([pid, classes[i]])

    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    nbytes = run_tasks(write_rsna_image, tasks, workers=workers, desc="synth rsna")
    nbytes += atomic_write(out / LABELS_CSV, csv_bytes(LABEL_COLUMNS, label_rows))
    nbytes += atomic_write(out / CLASS_CSV, csv_bytes(CLASS_COLUMNS, class_rows))
    summary = {
        "dataset": "rsna",
        "out": str(out),
        "images": patients,
        "studies": patients,
        "patients": patients,
        "classes": {c: classes.count(c) for c in CLASS_RATES},
        "boxes": sum(n_boxes),
        "encodings": {e: encodings.count(e) for e in ENCODINGS},
        "bytes": nbytes,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.debug(summary_line(summary))
    return summary
