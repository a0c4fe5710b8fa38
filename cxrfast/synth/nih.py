"""A synthetic NIH ChestX-ray14 dataset in the published layout.

    OUT/Data_Entry_2017.csv        (or Data_Entry_2017_v2020.csv with data_entry="v2020")
    OUT/BBox_List_2017.csv
    OUT/train_val_list.txt, OUT/test_list.txt
    OUT/images/00000001_000.png                  layout "flat" (the NIH download, unpacked)
    OUT/images_001/images/00000001_000.png       layout "kaggle" (images_001 ... images_012)

`Data_Entry_2017.csv` has the release's header, `OriginalImage[Width,Height]` and
`OriginalImagePixelSpacing[x,y]` each naming two columns, and (the 2017 file only) a trailing
comma on every line; `Finding Labels` is `A|B|...` or `No Finding`. The images are 1024x1024
8-bit PNGs, a few of them RGBA (as in the release). The official split is by patient, one image
name per line; the bounding boxes (`Image Index,Finding Label,Bbox [x,y,w,h],,,`, the header
naming 6 columns plus 3 empty ones, labels spelt as in the release: `Infiltrate`) cover a few
test images.

Findings are drawn with the CheXpert-order renderer where one corresponds (NIH_TRACE);
Emphysema, Fibrosis and Hernia leave no trace. Boxes lie on the finding's lung (Cardiomegaly:
the heart) but not exactly on the drawn trace. Everything comes from `seed`; each image has its
own seed, so the output does not depend on `workers`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cxrfast import __version__
from cxrfast.shards.schema import LABEL_NAMES, NIH_LABEL_NAMES
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

DATA_ENTRY = {"2017": "Data_Entry_2017.csv", "v2020": "Data_Entry_2017_v2020.csv"}
#: The header as released: two of its names each span two columns.
DATA_ENTRY_COLUMNS: tuple[str, ...] = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position",
    "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
)  # fmt: skip
BBOX_CSV = "BBox_List_2017.csv"
BBOX_COLUMNS: tuple[str, ...] = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", "")
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
LAYOUTS = ("flat", "kaggle")
IMAGE_SIZE = 1024
#: Kaggle's mirror spreads the sorted images over this many folders images_001 ... images_012.
KAGGLE_FOLDERS = 12

#: Share of images with each finding in the release (No Finding: 53.8%).
NIH_RATES: dict[str, float] = {
    "Atelectasis": 0.103, "Cardiomegaly": 0.025, "Effusion": 0.119, "Infiltration": 0.177, "Mass": 0.052,
    "Nodule": 0.056, "Pneumonia": 0.013, "Pneumothorax": 0.047, "Consolidation": 0.042, "Edema": 0.021,
    "Emphysema": 0.022, "Fibrosis": 0.015, "Pleural_Thickening": 0.030, "Hernia": 0.002,
}  # fmt: skip
NO_FINDING_RATE = 0.538
#: NIH finding -> the CheXpert observation whose trace the renderer draws for it.
NIH_TRACE: dict[str, str] = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
    "Infiltration": "Lung Opacity", "Mass": "Lung Lesion", "Nodule": "Lung Lesion", "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation", "Edema": "Edema",
    "Pleural_Thickening": "Pleural Other",
}  # fmt: skip
#: Findings with boxes in BBox_List_2017.csv, and how the release spells them there.
BBOX_NAMES: dict[str, str] = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Effusion", "Infiltration": "Infiltrate",
    "Mass": "Mass", "Nodule": "Nodule", "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax",
}  # fmt: skip
#: Share of test patients (the release: ~23% of images, by patient); share of images that are RGBA.
TEST_FRACTION = 0.2
RGBA_FRACTION = 0.01
#: Share of test images with a boxed finding that get boxes (at least one image).
BOXED_FRACTION = 0.3


@dataclass(frozen=True, slots=True)
class NihImageTask:
    """One NIH image to draw and write (picklable)."""

    path: Path
    anatomy: Anatomy
    labels: np.ndarray  # CheXpert order, for the renderer
    view: str
    seed: int
    sides: dict[str, str]
    pose: Pose
    rgba: bool


def write_nih_image(task: NihImageTask) -> int:
    """Draw a 1024x1024 image, as 8-bit gray (or RGBA, gray in every colour, opaque) PNG."""
    img = draw_radiograph(task.anatomy, task.labels, task.view, (IMAGE_SIZE, IMAGE_SIZE), seed=task.seed,
                          sides=task.sides, pose=task.pose)  # fmt: skip
    if task.rgba:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGRA)
    return atomic_write(task.path, encode_image(img, ".png"))


def sample_findings(rng: np.random.Generator) -> list[str]:
    """One image's NIH findings in NIH's order; [] is No Finding."""
    if rng.random() < NO_FINDING_RATE:
        return []
    sick = 1.0 - NO_FINDING_RATE
    found = [n for n in NIH_LABEL_NAMES if rng.random() < NIH_RATES[n] / sick * 0.6]
    if not found:
        w = np.array([NIH_RATES[n] for n in NIH_LABEL_NAMES])
        found = [str(rng.choice(NIH_LABEL_NAMES, p=w / w.sum()))]
    return found


def finding_labels(findings: list[str]) -> str:
    """The `Finding Labels` cell: `A|B` or `No Finding`."""
    return "|".join(findings) if findings else "No Finding"


def trace_labels(findings: list[str]) -> np.ndarray:
    """NIH findings -> the renderer's 14 CheXpert-order codes (NaN blank)."""
    v = np.full(len(LABEL_NAMES), lab.BLANK)
    if not findings:
        v[LABEL_NAMES.index("No Finding")] = 1.0
    for f in findings:
        if f in NIH_TRACE:
            v[LABEL_NAMES.index(NIH_TRACE[f])] = 1.0
    return v


def _finding_box(finding: str, a: Anatomy, sides: dict[str, str], rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A normalised box (before the pose) where `finding` lies: the heart for Cardiomegaly, else
    part of the finding's lung."""
    if finding == "Cardiomegaly":
        hw, hh = a.heart_half_width * 1.35, a.heart_half_height * 1.1
        x = a.cx + a.heart_offset
        return x - hw, a.dome_left - 2 * hh, x + hw, a.dome_left + 0.02
    side = sides.get(NIH_TRACE[finding], "right")
    s = -1 if side == "right" else 1 if side == "left" else int(rng.choice([-1, 1]))
    inner, outer = a.medi_half_width + 0.03, a.lung_half_width
    w = rng.uniform(0.06, 0.16) if finding in ("Mass", "Nodule") else rng.uniform(0.12, 0.22)
    h = rng.uniform(0.06, 0.14) if finding in ("Mass", "Nodule") else rng.uniform(0.12, 0.3)
    x0 = a.cx + s * rng.uniform(inner, max(inner, outer - w)) - (w if s < 0 else 0.0)
    y0 = rng.uniform(a.lung_top + 0.05, max(a.lung_top + 0.05, min(a.dome_left, a.dome_right) - h))
    x0, y0 = float(np.clip(x0, 0.0, 1.0 - w)), float(np.clip(y0, 0.0, 1.0 - h))
    return x0, y0, x0 + w, y0 + h


def _kaggle_folder(i: int, n: int) -> str:
    """The Kaggle folder of the i-th of n sorted images: contiguous, nearly equal chunks."""
    folders = min(KAGGLE_FOLDERS, n)
    return f"images_{i * folders // n + 1:03d}/images"


def make_nih(
    out: Path,
    *,
    images: int,
    seed: int = 0,
    layout: str = "flat",
    data_entry: str = "2017",
    workers: int = 1,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic NIH ChestX-ray14 tree under `out` with `images` images.

    layout: "flat" (`images/`) or "kaggle" (`images_001/images/` ...); data_entry: "2017"
    (`Data_Entry_2017.csv`, trailing commas) or "v2020" (`Data_Entry_2017_v2020.csv`).
    Returns a summary: images, patients, images per list, RGBA images, boxes, bytes, seconds.
    """
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if data_entry not in DATA_ENTRY:
        raise ValueError(f"data_entry must be one of {tuple(DATA_ENTRY)}, got {data_entry!r}")
    t0 = time.perf_counter()
    out = Path(out)
    params = {"dataset": "nih-chestxray14", "images": images, "seed": seed, "layout": layout, "data_entry": data_entry,
              "generator": f"cxrfast {__version__}"}  # fmt: skip
    owned = [out / "images", *sorted(out.glob("images_[0-9][0-9][0-9]")),
             *(out / n for n in (*DATA_ENTRY.values(), BBOX_CSV, TRAIN_VAL_LIST, TEST_LIST))]  # fmt: skip
    prepare_folder(out, params, owned, overwrite=overwrite)

    rng = np.random.default_rng([seed, 300])
    # patients with 1..8 follow-ups each, until `images` images
    counts: list[int] = []
    while sum(counts) < images:
        counts.append(min(int(rng.geometric(0.4)), 8, images - sum(counts)))
    n_pat = len(counts)
    n_test = max(1, round(TEST_FRACTION * n_pat)) if n_pat >= 2 else 0
    test_patients = set((rng.permutation(n_pat)[:n_test] + 1).tolist())
    first_test = min(test_patients, default=0)
    n_rgba = max(1, round(RGBA_FRACTION * images)) if images >= 4 else 0
    rgba = set(rng.permutation(images)[:n_rgba].tolist())

    rows: list[list[object]] = []
    tasks: list[NihImageTask] = []
    box_rows: list[list[object]] = []
    candidates: list[tuple[str, list[str], Anatomy, dict[str, str], Pose]] = []
    lists: dict[str, list[str]] = {TRAIN_VAL_LIST: [], TEST_LIST: []}
    names = [f"{p + 1:08d}_{f:03d}.png" for p, n in enumerate(counts) for f in range(n)]  # sorted, as the release
    k = 0
    for p, n in enumerate(counts):
        pid = p + 1
        sex = "F" if rng.random() < 0.44 else "M"
        age = int(rng.integers(1, 90))
        anatomy = Anatomy.sample(np.random.default_rng([seed, 301, pid]), female=sex == "F")
        for f in range(n):
            name = names[k]
            findings = sample_findings(rng)
            if pid == first_test and f == 0 and not any(x in BBOX_NAMES for x in findings):  # one boxed image at least
                findings = [n for n in NIH_LABEL_NAMES if n in findings or n == "Effusion"]
            trace = trace_labels(findings)
            sides = lab.sample_sides(trace, rng)
            view = "PA" if rng.random() < 0.6 else "AP"
            img_seed = int(np.random.SeedSequence([seed, 302, k]).generate_state(1)[0])
            pose = Pose.sample(np.random.default_rng([seed, 303, k]), view)
            study_anatomy = anatomy.restudied(np.random.default_rng([seed, 304, k]))
            folder = "images" if layout == "flat" else _kaggle_folder(k, images)
            tasks.append(NihImageTask(out / folder / name, study_anatomy, trace, view, img_seed, sides, pose, k in rgba))
            width, height = int(rng.integers(2000, 3057)), int(rng.integers(2000, 3057))
            spacing = float(rng.choice([0.143, 0.139, 0.168, 0.171]))
            row: list[object] = [name, finding_labels(findings), f, pid, age + f // 3, sex, view, width, height, spacing, spacing]
            rows.append(row + ([""] if data_entry == "2017" else []))
            lists[TEST_LIST if pid in test_patients else TRAIN_VAL_LIST].append(name)
            boxed = [x for x in findings if x in BBOX_NAMES]
            if pid in test_patients and boxed:
                candidates.append((name, boxed[:2], study_anatomy, sides, pose))
            k += 1
    # boxes on a share of the test images with a boxed finding (at least one such image)
    n_boxed = max(1, round(BOXED_FRACTION * len(candidates))) if candidates else 0
    for i in sorted(rng.permutation(len(candidates))[:n_boxed].tolist()):
        name, boxed, study_anatomy, sides, pose = candidates[i]
        for finding in boxed:
            b = posed_box(_finding_box(finding, study_anatomy, sides, rng), pose, (IMAGE_SIZE, IMAGE_SIZE))
            x0, y0, x1, y1 = (round(v, 9) for v in b)
            box_rows.append([name, BBOX_NAMES[finding], x0, y0, round(x1 - x0, 9), round(y1 - y0, 9), "", "", ""])

    for t in tasks:
        t.path.parent.mkdir(parents=True, exist_ok=True)
    nbytes = run_tasks(write_nih_image, tasks, workers=workers, desc="synth nih")
    header = list(DATA_ENTRY_COLUMNS) + ([""] if data_entry == "2017" else [])
    nbytes += atomic_write(out / DATA_ENTRY[data_entry], csv_bytes(header, rows))
    nbytes += atomic_write(out / BBOX_CSV, csv_bytes(BBOX_COLUMNS, box_rows))
    for list_name, members in lists.items():
        nbytes += atomic_write(out / list_name, "".join(m + "\n" for m in sorted(members)).encode())

    summary = {
        "dataset": "nih",
        "out": str(out),
        "images": images,
        "studies": images,
        "patients": n_pat,
        "images_per_split": {"train_val": len(lists[TRAIN_VAL_LIST]), "test": len(lists[TEST_LIST])},
        "rgba": len(rgba),
        "boxes": len(box_rows),
        "layout": layout,
        "bytes": nbytes,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.debug(summary_line(summary))
    return summary

