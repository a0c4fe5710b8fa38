"""A synthetic MIMIC-CXR-JPG 2.0.0 tree (+ mimic-cxr-reports.zip) in the published layout.

    OUT/files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg
    OUT/mimic-cxr-2.0.0-metadata.csv.gz   dicom_id, subject_id, study_id, ..., Rows, Columns, ...
    OUT/mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split
    OUT/mimic-cxr-2.0.0-chexpert.csv.gz   subject_id, study_id, 14 labels in alphabetical order
    OUT/mimic-cxr-2.0.0-negbio.csv.gz     the same columns, NegBio's labels
    OUT/mimic-cxr-reports.zip             files/p10/p10000032/s50414267.txt

As in the real release, a few studies have no report (and so no row in the label files),
ViewPosition is blank for some images, splits are assigned by subject, and each subject has
several studies whose dates increase. Subjects, studies and images are drawn from `seed`
alone; each image has its own seed, so the output does not depend on `workers`.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrfast import __version__
from cxrfast.shards.schema import LABEL_NAMES
from cxrfast.synth import labels as lab
from cxrfast.synth.radiograph import Anatomy, Pose
from cxrfast.synth.reports import sample_style, write_report
from cxrfast.synth.writing import (
    ImageTask,
    prepare_folder,
    run_tasks,
    summary_line,
    write_csv,
    write_image,
    write_zip,
)

log = logging.getLogger(__name__)

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"
NEGBIO_CSV = "mimic-cxr-2.0.0-negbio.csv.gz"
REPORTS_ZIP = "mimic-cxr-reports.zip"
METADATA_COLUMNS: tuple[str, ...] = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)  # fmt: skip
SPLIT_COLUMNS: tuple[str, ...] = ("dicom_id", "study_id", "subject_id", "split")
#: MIMIC's label files list the 14 labels alphabetically (not in CheXpert's order).
LABEL_COLUMNS: tuple[str, ...] = ("subject_id", "study_id", *sorted(LABEL_NAMES))
IMAGE_FORMATS = {"jpg": ".jpg", "png16": ".png"}

_VIEW_CODE = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}
#: Share of test / validate subjects (with at least one subject each when there are 3 or more).
SPLIT_FRACTIONS = {"test": 0.05, "validate": 0.05}


@dataclass(slots=True)
class Image:
    dicom_id: str
    view: str  # the drawn view
    view_position: str  # the metadata's ViewPosition ("" for some images, as in the release)
    rows: int
    columns: int
    seed: int
    pose: Pose


@dataclass(slots=True)
class Study:
    study_id: int
    date: dt.date
    time: float
    procedure: str
    orientation: str
    labels: np.ndarray  # CheXpert order, NaN = blank
    negbio: np.ndarray
    sides: dict[str, str]
    anatomy: Anatomy
    report_style: str | None  # None: no report
    images: list[Image] = field(default_factory=list)


@dataclass(slots=True)
class Subject:
    subject_id: int
    female: bool
    split: str
    studies: list[Study] = field(default_factory=list)


def _dicom_id(rng: np.random.Generator) -> str:
    h = rng.bytes(20).hex()
    return "-".join(h[i : i + 8] for i in range(0, 40, 8))


def _image_size(rng: np.random.Generator, view: str, size_range: tuple[int, int]) -> tuple[int, int]:
    lo, hi = size_range
    a, b = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    portrait = rng.random() < (0.55 if view == "AP" else 0.85)
    rows, cols = (max(a, b), min(a, b)) if portrait else (min(a, b), max(a, b))
    return rows, cols


def _study_views(rng: np.random.Generator) -> tuple[str, str, list[str]]:
    """(procedure description, patient orientation, drawn views) of one study."""
    r = rng.random()
    if r < 0.45:
        lateral = "LL" if rng.random() < 0.3 else "LATERAL"
        views = ["PA", lateral]
        if rng.random() < 0.1:
            views.append(str(rng.choice(["PA", lateral])))
        proc = "CHEST (PRE-OP PA & LAT)" if rng.random() < 0.08 else "CHEST (PA AND LAT)"
        return proc, "Erect", views
    if r < 0.9:
        views = ["AP"] * (2 if rng.random() < 0.12 else 1)
        proc = "CHEST (PORTABLE AP)" if rng.random() < 0.85 else "DX CHEST PORT LINE/TUBE PLCMT 1 EXAM"
        orient = str(rng.choice(["Erect", "Recumbent", ""], p=[0.55, 0.3, 0.15]))
        return proc, orient, views
    view = str(rng.choice(["PA", "AP"]))
    return "CHEST (SINGLE VIEW)", "Erect", [view]


def plan_mimic(studies: int, seed: int, size_range: tuple[int, int]) -> list[Subject]:
    """Subjects, studies and images (ids, views, sizes, labels, report styles); no pixels yet."""
    if studies < 1:
        raise ValueError(f"studies must be >= 1, got {studies}")
    lo, hi = size_range
    if not 64 <= lo <= hi:
        raise ValueError(f"size_range must be (min, max) with 64 <= min <= max, got {size_range}")
    rng = np.random.default_rng([seed, 0])
    # studies per subject: geometric, capped so that there are at least 3 subjects
    cap = max(1, studies // 3) if studies >= 3 else 1
    counts: list[int] = []
    while sum(counts) < studies:
        counts.append(min(int(rng.geometric(0.3)), cap, studies - sum(counts)))
    n_subj = len(counts)
    subject_ids = np.sort(rng.choice(10_000_000, n_subj, replace=False) + 10_000_000)
    study_ids = rng.choice(10_000_000, studies, replace=False) + 50_000_000
    order = rng.permutation(n_subj)
    split_of = ["train"] * n_subj
    if n_subj >= 3:
        k = 0
        for name, frac in SPLIT_FRACTIONS.items():
            for _ in range(max(1, round(frac * n_subj))):
                split_of[order[k]] = name
                k += 1
    # report styles, with the awkward cases guaranteed to occur in any dataset of >= 10 studies
    styles: list[str | None] = [sample_style(rng) if rng.random() >= 0.02 else None for _ in range(studies)]
    if studies >= 10:
        forced = [None, "impression_only", "findings_only", "findings_and_impression", "impression_no_colon"]
        for idx, style in zip(rng.permutation(studies)[: len(forced)], forced, strict=True):
            styles[idx] = style

    subjects: list[Subject] = []
    s_index = img_index = 0
    for j, n in enumerate(counts):
        female = bool(rng.random() < 0.48)
        subj = Subject(int(subject_ids[j]), female, split_of[j])
        anatomy = Anatomy.sample(np.random.default_rng([seed, 1, j]), female=female)
        day = dt.date(int(rng.integers(2110, 2200)), int(rng.integers(1, 13)), int(rng.integers(1, 29)))
        for _ in range(n):
            labels = lab.sample_labels(rng, "mimic")
            proc, orient, views = _study_views(rng)
            t = int(rng.integers(0, 24)) * 10000 + int(rng.integers(0, 60)) * 100 + int(rng.integers(0, 60))
            study = Study(
                study_id=int(study_ids[s_index]),
                date=day,
                time=round(t + float(rng.integers(0, 1000)) / 1000, 3),
                procedure=proc,
                orientation=orient,
                labels=labels,
                negbio=lab.negbio_variant(labels, rng),
                sides=lab.sample_sides(labels, rng),
                anatomy=anatomy.restudied(np.random.default_rng([seed, 2, s_index])),
                report_style=styles[s_index],
            )
            for view in views:
                rows, cols = _image_size(rng, view, size_range)
                study.images.append(
                    Image(
                        dicom_id=_dicom_id(rng),
                        view=view,
                        view_position="" if rng.random() < 0.04 else view,
                        rows=rows,
                        columns=cols,
                        seed=int(np.random.SeedSequence([seed, 3, img_index]).generate_state(1)[0]),
                        pose=Pose.sample(np.random.default_rng([seed, 4, img_index]), view),
                    )
                )
                img_index += 1
            subj.studies.append(study)
            s_index += 1
            day += dt.timedelta(days=int(rng.integers(1, 400)))
        subjects.append(subj)
    return subjects


def study_dir(subject_id: int, study_id: int) -> str:
    """`files/p10/p10000032/s50414267` (relative to the dataset root)."""
    p = f"p{subject_id}"
    return f"files/{p[:3]}/{p}/s{study_id}"


def _label_row(subject_id: int, study_id: int, values: np.ndarray) -> list[object]:
    by_name = dict(zip(LABEL_NAMES, values, strict=True))
    return [subject_id, study_id, *(lab.format_label(by_name[n]) for n in LABEL_COLUMNS[2:])]


def make_mimic(
    out: Path,
    *,
    studies: int,
    seed: int = 0,
    size_range: tuple[int, int] = (2000, 3000),
    image_format: str = "jpg",
    workers: int = 1,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic MIMIC-CXR-JPG 2.0.0 tree and `mimic-cxr-reports.zip` under `out`.

    image_format: "jpg" (8-bit JPEG, as published) or "png16" (16-bit PNG `{dicom_id}.png`).
    Returns a summary: images, studies, subjects, reports, studies without report, images per
    split, bytes written, seconds.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {tuple(IMAGE_FORMATS)}, got {image_format!r}")
    t0 = time.perf_counter()
    out = Path(out)
    suffix = IMAGE_FORMATS[image_format]
    params = {"dataset": "mimic-cxr-jpg-2.0.0", "studies": studies, "seed": seed, "size_range": list(size_range),
              "image_format": image_format, "generator": f"cxrfast {__version__}"}  # fmt: skip
    subjects = plan_mimic(studies, seed, tuple(size_range))
    owned = [out / "files", *(out / n for n in (METADATA_CSV, SPLIT_CSV, CHEXPERT_CSV, NEGBIO_CSV, REPORTS_ZIP))]
    prepare_folder(out, params, owned, overwrite=overwrite)

    tasks: list[ImageTask] = []
    meta_rows, split_rows, chex_rows, negbio_rows = [], [], [], []
    reports: dict[str, bytes] = {}
    for subj in subjects:
        for st in subj.studies:
            folder = out / study_dir(subj.subject_id, st.study_id)
            folder.mkdir(parents=True, exist_ok=True)
            for im in st.images:
                tasks.append(ImageTask(folder / f"{im.dicom_id}{suffix}", st.anatomy, st.labels, im.view,
                                        (im.rows, im.columns), im.seed, st.sides, im.pose,
                                        16 if image_format == "png16" else 8))  # fmt: skip
                vp = im.view_position
                meta_rows.append([im.dicom_id, subj.subject_id, st.study_id, st.procedure, vp, im.rows, im.columns,
                                  st.date.strftime("%Y%m%d"), str(st.time),
                                  st.procedure, _VIEW_CODE.get(vp, ""), st.orientation])  # fmt: skip
                split_rows.append([im.dicom_id, st.study_id, subj.subject_id, subj.split])
            if st.report_style is None:
                continue
            rng = np.random.default_rng([seed, 5, st.study_id])
            text = write_report(st.labels, st.sides, examination=st.procedure, views=[i.view for i in st.images],
                                style=st.report_style, rng=rng)  # fmt: skip
            reports[study_dir(subj.subject_id, st.study_id) + ".txt"] = text.encode("utf-8")
            chex_rows.append(_label_row(subj.subject_id, st.study_id, st.labels))
            negbio_rows.append(_label_row(subj.subject_id, st.study_id, st.negbio))

    nbytes = run_tasks(write_image, tasks, workers=workers, desc="synth mimic")
    key = lambda r: (r[1], r[2], r[0])  # noqa: E731  subject, study, dicom
    nbytes += write_csv(out / METADATA_CSV, METADATA_COLUMNS, sorted(meta_rows, key=key))
    nbytes += write_csv(out / SPLIT_CSV, SPLIT_COLUMNS, sorted(split_rows, key=lambda r: (r[2], r[1], r[0])))
    nbytes += write_csv(out / CHEXPERT_CSV, LABEL_COLUMNS, sorted(chex_rows, key=lambda r: (r[0], r[1])))
    nbytes += write_csv(out / NEGBIO_CSV, LABEL_COLUMNS, sorted(negbio_rows, key=lambda r: (r[0], r[1])))
    nbytes += write_zip(out / REPORTS_ZIP, reports)

    n_studies = sum(len(s.studies) for s in subjects)
    per_split = {name: sum(r[3] == name for r in split_rows) for name in ("train", "validate", "test")}
    summary = {
        "dataset": "mimic",
        "out": str(out),
        "images": len(tasks),
        "studies": n_studies,
        "subjects": len(subjects),
        "reports": len(reports),
        "studies_without_report": n_studies - len(reports),
        "images_per_split": per_split,
        "image_format": image_format,
        "bytes": nbytes,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.debug(summary_line(summary))
    return summary
