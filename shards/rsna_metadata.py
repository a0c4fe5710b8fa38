"""RSNA Pneumonia Detection (stage 2) metadata: the label CSV (one row per box), the class CSV and
the DICOM headers -> one row per patient (polars).

The label is `Target` (`schema.RSNA_LABEL_NAMES`: Pneumonia); a positive patient's boxes
(x, y, width, height in pixels of the original image) go into the sample's metadata. There are
no public test labels: train / validate / test are drawn by patient with a seed, the way MGCA's
`preprocess_rsna_data` draws them (sklearn `train_test_split` twice with `random_state=seed`:
test+validate = ceil((v + t) * n) of the patients sorted by id, then validate = the first
ceil(v / (v + t) * that) of those), so the defaults (0.15 / 0.15, seed 0) give MGCA's 70/15/15
split of the same patients. View, sex and age come from each DICOM's header.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from cxrfast.shards.dicom import read_header
from cxrfast.shards.metadata_common import (
    ROW_COLUMNS,
    check_keys,
    check_rows,
    check_views_left,
    parse_views,
    read_csv,
    require_csv,
    row_where,
)
from cxrfast.shards.schema import RSNA_LABEL_NAMES

LABELS_CSV = "stage_2_train_labels.csv"
CLASS_CSV = "stage_2_detailed_class_info.csv"
IMAGE_DIR = "stage_2_train_images"
LABEL_COLUMNS: tuple[str, ...] = ("patientId", "x", "y", "width", "height", "Target")
CLASSES: tuple[str, ...] = ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal")
#: MGCA's RSNA split (mgca/preprocess/rsna.py: test_fac=0.15, twice): 70 / 15 / 15.
VALIDATE_FRACTION = 0.15
TEST_FRACTION = 0.15
_BOX = ("x", "y", "width", "height")


def input_tables(root: Path) -> dict[str, Path]:
    """The tables `read_rsna` reads (fingerprinted into the manifest): the label CSV and, when
    present, the class CSV."""
    root = Path(root)
    tables = {"labels": root / LABELS_CSV}
    return tables | ({"classes": root / CLASS_CSV} if (root / CLASS_CSV).is_file() else {})


def check_fractions(validate_fraction: float, test_fraction: float) -> None:
    """ValueError unless both are in [0, 1) with a sum below 1."""
    if not (0.0 <= validate_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and validate_fraction + test_fraction < 1.0):
        raise ValueError(f"--validate-fraction ({validate_fraction}) and --test-fraction ({test_fraction}) must be "
                         "in [0, 1) with a sum below 1")  # fmt: skip


def split_patients(patients: Sequence[str], *, validate_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """patientId -> train / validate / test, as MGCA's two sklearn `train_test_split` calls with
    `random_state=seed` draw them from the patients sorted by id (numpy's legacy RandomState, which
    sklearn uses, so no sklearn import is needed)."""
    check_fractions(validate_fraction, test_fraction)
    ids = sorted(patients)
    n = len(ids)
    held = validate_fraction + test_fraction
    n_held = math.ceil(held * n) if held > 0 else 0
    perm = np.random.RandomState(seed).permutation(n)
    hold = perm[:n_held]
    n_val = math.ceil(validate_fraction / held * n_held) if n_held else 0
    perm2 = np.random.RandomState(seed).permutation(n_held)
    split = dict.fromkeys(ids, "train")
    for i in hold[perm2[:n_val]]:
        split[ids[i]] = "validate"
    for i in hold[perm2[n_val:]]:
        split[ids[i]] = "test"
    return split


def _read_labels(path: Path) -> pl.DataFrame:
    """The label CSV checked row by row; ValueError naming the file, line and column."""
    df = read_csv(path, LABEL_COLUMNS)
    check_rows(df, path)
    df = df.with_row_index("_i")
    s = {c: pl.col(c).fill_null("").str.strip_chars() for c in LABEL_COLUMNS}
    bad = df.filter(s["patientId"] == "")
    if bad.height:
        raise ValueError(f"{path}: {row_where(bad['_i'][0])}: empty patientId")
    bad = df.filter(~s["Target"].is_in(["0", "1"]))
    if bad.height:
        raise ValueError(f"{path}: {row_where(bad['_i'][0])}: Target {(bad['Target'][0] or '')!r}; expected 0 or 1")
    pos = s["Target"] == "1"
    for c in _BOX:
        v = s[c].cast(pl.Float64, strict=False)
        bad = df.filter(pos & (v.is_null() | ~v.is_finite()))
        if bad.height:
            raise ValueError(f"{path}: {row_where(bad['_i'][0])}: column {c!r} holds {(bad[c][0] or '')!r} with Target 1; "
                             "expected a number (a box row)")  # fmt: skip
        bad = df.filter(~pos & (s[c] != ""))
        if bad.height:
            raise ValueError(f"{path}: {row_where(bad['_i'][0])}: column {c!r} holds {(bad[c][0] or '')!r} with Target 0; "
                             "expected an empty box")  # fmt: skip
    for c in ("width", "height"):
        bad = df.filter(pos & (s[c].cast(pl.Float64, strict=False) <= 0))
        if bad.height:
            raise ValueError(f"{path}: {row_where(bad['_i'][0])}: box {c} {bad[c][0]!r} must be > 0")
    return df.select(
        "_i",
        s["patientId"].alias("patientId"),
        s["Target"].cast(pl.Int8).alias("Target"),
        *(s[c].cast(pl.Float64, strict=False).alias(c) for c in _BOX),
    )


def _per_patient(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    """One row per patient: Target and the boxes (file order); ValueError for a patient with mixed
    Targets or more than one negative row."""
    g = df.group_by("patientId", maintain_order=True).agg(
        pl.col("_i").first(),
        pl.col("Target").min().alias("t_min"),
        pl.col("Target").max().alias("Target"),
        pl.len().alias("rows"),
        pl.struct(pl.lit(RSNA_LABEL_NAMES[0]).alias("label"), *_BOX).filter(pl.col("Target") == 1).alias("boxes"),
    )
    bad = g.filter(pl.col("t_min") != pl.col("Target"))
    if bad.height:
        raise ValueError(f"{path}: patient {bad['patientId'][0]!r} has rows with Target 0 and with Target 1")
    bad = g.filter((pl.col("Target") == 0) & (pl.col("rows") > 1))
    if bad.height:
        raise ValueError(f"{path}: patient {bad['patientId'][0]!r} has {bad['rows'][0]} rows with Target 0; "
                         "a negative patient has a single row with an empty box")  # fmt: skip
    return g.drop("t_min", "rows")


def _check_classes(path: Path, patients: pl.DataFrame, labels_path: Path) -> dict[str, int]:
    """stage_2_detailed_class_info.csv agrees with the labels: the same patients, one class each,
    'Lung Opacity' exactly for Target 1. Returns patients per class."""
    df = read_csv(path, ("patientId", "class")).with_row_index("_i")
    df = df.with_columns(pl.col("patientId").fill_null("").str.strip_chars(), pl.col("class").fill_null("").str.strip_chars())
    bad = df.filter(~pl.col("class").is_in(CLASSES))
    if bad.height:
        raise ValueError(f"{path}: {row_where(bad['_i'][0])}: class {bad['class'][0]!r}; expected one of {list(CLASSES)}")
    per = df.group_by("patientId", maintain_order=True).agg(pl.col("class").unique(maintain_order=True))
    bad = per.filter(pl.col("class").list.len() > 1)
    if bad.height:
        raise ValueError(f"{path}: patient {bad['patientId'][0]!r} has several classes {bad['class'][0].to_list()}")
    per = per.with_columns(pl.col("class").list.first())
    j = patients.join(per, on="patientId", how="full", coalesce=True)
    bad = j.filter(pl.col("class").is_null())
    if bad.height:
        raise ValueError(f"{path}: patient {bad['patientId'][0]!r} of {labels_path.name} has no class ({bad.height} such)")
    bad = j.filter(pl.col("Target").is_null())
    if bad.height:
        raise ValueError(f"{path}: patient {bad['patientId'][0]!r} is not in {labels_path.name} ({bad.height} such)")
    bad = j.filter((pl.col("Target") == 1) != (pl.col("class") == CLASSES[0]))
    if bad.height:
        raise ValueError(f"{path}: patient {bad['patientId'][0]!r} has class {bad['class'][0]!r} but Target "
                         f"{bad['Target'][0]} in {labels_path.name}; 'Lung Opacity' goes with Target 1")  # fmt: skip
    return {c: int((per["class"] == c).sum()) for c in CLASSES}


def read_rsna(
    root: Path,
    *,
    views: str | Sequence[str] = ("PA", "AP"),
    validate_fraction: float = VALIDATE_FRACTION,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
) -> tuple[pl.DataFrame, dict]:
    """One row per patient (ROW_COLUMNS + `boxes`) and counts. A DICOM whose header cannot be read
    (missing, corrupt) keeps its row with an empty view: the image stage skips it with the reason."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--root {root} is not a directory")
    labels_path = root / LABELS_CSV
    require_csv(labels_path, LABEL_COLUMNS)
    image_dir = root / IMAGE_DIR
    if not image_dir.is_dir():
        raise ValueError(f"{root}: no {IMAGE_DIR}/ folder (is --root the RSNA Pneumonia folder?)")
    rows = _read_labels(labels_path)
    patients = _per_patient(rows, labels_path)
    classes = _check_classes(root / CLASS_CSV, patients, labels_path) if (root / CLASS_CSV).is_file() else {}
    split = split_patients(patients["patientId"].to_list(), validate_fraction=validate_fraction,
                           test_fraction=test_fraction, seed=seed)  # fmt: skip
    headers = []
    for pid in tqdm(patients["patientId"].to_list(), desc="DICOM headers", unit="file", dynamic_ncols=True, leave=False):
        h = read_header(image_dir / f"{pid}.dcm")
        headers.append({"ok": h is not None, **(h or {"view": "", "sex": "", "age": None})})
    hdr = pl.DataFrame(headers, schema={"ok": pl.Boolean, "view": pl.Utf8, "sex": pl.Utf8, "age": pl.Int32})
    df = pl.concat([patients, hdr], how="horizontal").with_columns(
        pl.col("patientId").replace_strict(split, return_dtype=pl.Utf8).alias("split")
    )
    keep = parse_views(views)
    if keep is not None:  # an unreadable header keeps its row: the image stage records why it is skipped
        all_views = df["view"]
        df = df.filter(pl.col("view").is_in(list(keep)) | ~pl.col("ok"))
        check_views_left(df, keep, all_views, f"the DICOM headers under {image_dir}")
    box_dtype = pl.List(pl.Struct({"label": pl.Utf8, **dict.fromkeys(_BOX, pl.Float64)}))
    out = df.select(
        pl.col("patientId").alias("key"),
        pl.col("patientId").alias("subject_id"),
        pl.lit("").alias("study_id"),
        pl.col("patientId").alias("image_id"),
        "view",
        "split",
        pl.when(pl.col("sex").is_in(["M", "F"])).then(pl.col("sex")).otherwise(pl.lit("")).alias("sex"),
        "age",
        pl.format(f"{IMAGE_DIR}/{{}}.dcm", "patientId").alias("source_path"),
        pl.concat_list(pl.col("Target").cast(pl.Int8)).alias("labels"),
        pl.col("boxes").cast(box_dtype),
    ).sort("key")
    check_keys(out, labels_path)
    counts = {
        "patients_total": patients.height,
        "positive_patients": int((patients["Target"] == 1).sum()),
        "boxes": int(patients["boxes"].list.len().sum()),
        "unreadable_headers": int((~hdr["ok"]).sum()),
        **({"classes": classes} if classes else {}),
    }
    return out.select(*ROW_COLUMNS, "boxes"), counts
