"""A synthetic CheXpert v1.0 (or v1.0-small) dataset in the published layout.

    OUT/CheXpert-v1.0-small/train.csv
    OUT/CheXpert-v1.0-small/valid.csv
    OUT/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg
    OUT/CheXpert-v1.0-small/valid/patient00015/study1/view1_frontal.jpg

Columns: Path, Sex, Age, Frontal/Lateral, AP/PA, then the 14 labels in CheXpert's order;
`Path` is relative to OUT (the folder holding the dataset folder). train.csv has 1.0 / 0.0 /
-1.0 / blank; valid.csv, like the radiologist-labelled official one, only 1.0 and 0.0. Valid
patients are numbered after the train patients (as the official valid set starts at
patient64541). The small version has a 320-pixel short side; the full one about 2000-2600.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrfast import __version__
from cxrfast.shards.schema import LABEL_NAMES
from cxrfast.synth import labels as lab
from cxrfast.synth.radiograph import Anatomy, Pose
from cxrfast.synth.writing import ImageTask, prepare_folder, run_tasks, summary_line, write_csv, write_image

log = logging.getLogger(__name__)

CSV_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABEL_NAMES)
#: Share of patients in valid.csv (at least one when there are 2 or more patients).
VALID_FRACTION = 0.2


def dataset_folder(small: bool) -> str:
    return "CheXpert-v1.0-small" if small else "CheXpert-v1.0"


@dataclass(frozen=True, slots=True)
class _Row:
    path: str
    sex: str
    age: int
    frontal: bool
    ap_pa: str
    labels: np.ndarray
    task: ImageTask


def _size(rng: np.random.Generator, frontal: bool, small: bool) -> tuple[int, int]:
    short = 320 if small else int(rng.integers(2000, 2600))
    long = round(short * rng.uniform(1.05, 1.3))
    portrait = (not frontal) or rng.random() < 0.8
    return (long, short) if portrait else (short, long)


def make_chexpert(
    out: Path,
    *,
    patients: int,
    seed: int = 0,
    small: bool = True,
    workers: int = 1,
    overwrite: bool = False,
) -> dict:
    """Write `out/CheXpert-v1.0-small/` (or `CheXpert-v1.0/` with small=False).

    Returns a summary: images, studies, patients, images per csv, bytes written, seconds.
    """
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    t0 = time.perf_counter()
    out = Path(out)
    name = dataset_folder(small)
    root = out / name
    params = {"dataset": name, "patients": patients, "seed": seed, "generator": f"cxrfast {__version__}"}
    prepare_folder(root, params, [root / "train", root / "valid", root / "train.csv", root / "valid.csv"],
                   overwrite=overwrite)  # fmt: skip

    rng = np.random.default_rng([seed, 100])
    n_valid = max(1, round(VALID_FRACTION * patients)) if patients >= 2 else 0
    n_train = patients - n_valid
    rows: dict[str, list[_Row]] = {"train": [], "valid": []}
    n_studies = img_index = 0
    for p in range(patients):
        split = "train" if p < n_train else "valid"
        patient = f"patient{p + 1:05d}"
        r = rng.random()
        sex = "Unknown" if r < 0.01 else ("Female" if r < 0.45 else "Male")
        age = int(rng.integers(18, 91))
        anatomy = Anatomy.sample(np.random.default_rng([seed, 101, p]), female=sex == "Female")
        n = 1 if split == "valid" else int(min(rng.geometric(0.4), 6))
        for s in range(n):
            labels = lab.sample_labels(rng, "chexpert")
            if split == "valid":
                labels = lab.resolve_certain(labels, rng)
            sides = lab.sample_sides(labels, rng)
            study_anatomy = anatomy.restudied(np.random.default_rng([seed, 102, n_studies]))
            frontal_view = str(rng.choice(["AP", "PA"], p=[0.8, 0.2]))
            r = rng.random()
            kinds = ["frontal"] if r < 0.72 else (["frontal", "lateral"] if r < 0.95 else ["frontal", "frontal"])
            if r < 0.03:
                kinds = ["lateral"]
            for v, kind in enumerate(kinds, start=1):
                frontal = kind == "frontal"
                view = frontal_view if frontal else "LATERAL"
                rel = f"{name}/{split}/{patient}/study{s + 1}/view{v}_{kind}.jpg"
                task = ImageTask(
                    path=out / rel,
                    anatomy=study_anatomy,
                    labels=labels,
                    view=view,
                    shape=_size(rng, frontal, small),
                    seed=int(np.random.SeedSequence([seed, 103, img_index]).generate_state(1)[0]),
                    sides=sides,
                    pose=Pose.sample(np.random.default_rng([seed, 104, img_index]), view),
                    bits=8,
                )
                rows[split].append(_Row(rel, sex, age + s // 2, frontal, frontal_view if frontal else "", labels, task))
                img_index += 1
            n_studies += 1

    tasks = [r.task for split_rows in rows.values() for r in split_rows]
    for t in tasks:
        t.path.parent.mkdir(parents=True, exist_ok=True)
    nbytes = run_tasks(write_image, tasks, workers=workers, desc=f"synth {name}")
    for split, split_rows in rows.items():
        csv_rows = [
            [r.path, r.sex, r.age, "Frontal" if r.frontal else "Lateral", r.ap_pa, *(lab.format_label(v) for v in r.labels)]
            for r in split_rows
        ]
        nbytes += write_csv(root / f"{split}.csv", CSV_COLUMNS, csv_rows)

    summary = {
        "dataset": "chexpert",
        "out": str(root),
        "images": len(tasks),
        "studies": n_studies,
        "patients": patients,
        "images_per_split": {k: len(v) for k, v in rows.items()},
        "bytes": nbytes,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.debug(summary_line(summary))
    return summary
