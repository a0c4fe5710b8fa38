"""NIH ChestX-ray14 metadata: the Data_Entry CSV, the official split lists, the bounding-box list
and the image folders -> one row per image (polars).

Labels come from `Finding Labels` by name in NIH's order (`schema.NIH_LABEL_NAMES`): 1 for
each listed finding, 0 for the others (`No Finding`: all 0; NIH has no uncertain or
not-mentioned codes). `test_list.txt` becomes `test`; `validate` is held out of
`train_val_list.txt` by patient with a seed (or given as a list of images). Images are found
under `images/` (the NIH download) or `images_NNN/images/` (the Kaggle mirror), whichever the
root holds; an image in neither is skipped as `missing_image`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from cxrfast.shards.metadata_common import (
    ROW_COLUMNS,
    check_keys,
    check_rows,
    check_unique,
    check_views_left,
    parse_views,
    require_csv,
    row_where,
)
from cxrfast.shards.schema import NIH_LABEL_NAMES

log = logging.getLogger(__name__)

#: Data_Entry file names, preferred first (v2020 corrects ages and a few labels).
DATA_ENTRY_CSVS: tuple[str, ...] = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
DATA_ENTRY_COLUMNS: tuple[str, ...] = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position",
)  # fmt: skip
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
BBOX_CSV = "BBox_List_2017.csv"
NO_FINDING = "No Finding"
#: How BBox_List_2017.csv spells findings that Data_Entry spells otherwise.
BBOX_ALIASES = {"Infiltrate": "Infiltration"}
_KAGGLE_DIR = re.compile(r"^images_\d{3}$")
_AGE = re.compile(r"^(\d{1,3})[Yy]?$")
_BOX = ("x", "y", "width", "height")


def input_tables(root: Path) -> dict[str, Path]:
    """The tables `read_nih` reads (fingerprinted into the manifest): the Data_Entry CSV it picks,
    the split lists and, when present, the box list."""
    root = Path(root)
    tables = {"data_entry": _data_entry(root), "train_val_list": root / TRAIN_VAL_LIST, "test_list": root / TEST_LIST}
    for p in tables.values():
        if not p.is_file():
            raise ValueError(f"missing {p.name} in {root}")
    return tables | ({"bbox_list": root / BBOX_CSV} if (root / BBOX_CSV).is_file() else {})


def _data_entry(root: Path) -> Path:
    for name in DATA_ENTRY_CSVS:
        if (root / name).is_file():
            return root / name
    raise ValueError(f"{root}: no {' or '.join(DATA_ENTRY_CSVS)} (is --root the NIH ChestX-ray14 folder?)")


def _read_data_entry(path: Path) -> pl.DataFrame:
    """The CSV's columns we use, as strings; errors name the file and what is wrong with the header."""
    columns = require_csv(path, DATA_ENTRY_COLUMNS)
    try:
        # every column is read (not only ours), so that a row with more fields than the header fails
        return pl.read_csv(path, infer_schema_length=0).select(DATA_ENTRY_COLUMNS)
    except pl.exceptions.ComputeError as e:
        if "more fields" in str(e):
            raise ValueError(
                f"{path}: a row has more fields than the header's {len(columns)} names. As released, the header "
                "spells OriginalImage[Width,Height] and OriginalImagePixelSpacing[x,y] unquoted, each naming two "
                f"columns (and Data_Entry_2017.csv ends every line with a comma); has the header been edited? ({e})"
            ) from None
        raise ValueError(f"cannot read CSV {path}: {e}") from None


def _label_codes(df: pl.DataFrame, path: Path) -> pl.Expr:
    """Check `Finding Labels` (ValueError naming the file, line and name) and return the expression
    building the list[i8] `labels` column in NIH's order."""
    cell = pl.col("Finding Labels").fill_null("").str.strip_chars()
    names = df.select(pl.int_range(pl.len()).alias("_i"), cell.str.split("|").alias("_n")).explode("_n")
    names = names.with_columns(pl.col("_n").str.strip_chars())
    known = [*NIH_LABEL_NAMES, NO_FINDING]
    bad = names.filter(~pl.col("_n").is_in(known))
    if bad.height:
        i, name = bad.row(0)
        raise ValueError(
            f"{path}: {row_where(i)} (Image Index {df['Image Index'][i]!r}): unknown finding {name!r} in Finding Labels "
            f"{df['Finding Labels'][i]!r}; expected 'No Finding' or names from {list(NIH_LABEL_NAMES)} joined by '|'"
        )
    mixed = names.group_by("_i").agg((pl.col("_n") == NO_FINDING).any().alias("nf"), pl.len().alias("n"))
    mixed = mixed.filter(pl.col("nf") & (pl.col("n") > 1)).sort("_i")
    if mixed.height:
        i = mixed["_i"][0]
        raise ValueError(
            f"{path}: {row_where(i)} (Image Index {df['Image Index'][i]!r}): Finding Labels {df['Finding Labels'][i]!r} "
            "combines 'No Finding' with findings"
        )
    parts = cell.str.split("|").list.eval(pl.element().str.strip_chars())
    return pl.concat_list([parts.list.contains(n).cast(pl.Int8) for n in NIH_LABEL_NAMES]).alias("labels")


def _read_list(path: Path) -> list[str]:
    """Image names, one per line (the first whitespace-separated token, so a list that adds label
    columns after the name works too); ValueError naming the file for a missing file or duplicates."""
    if not path.is_file():
        raise ValueError(f"missing split list {path}")
    names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise ValueError(f"{path}: {n!r} is listed twice (lines {seen[n] + 1} and {i + 1})")
        seen[n] = i
    return names


def _check_listed(names: list[str], path: Path, known: pl.Series, csv: Path) -> None:
    have = set(known.to_list())
    missing = [n for n in names if n not in have]
    if missing:
        line = names.index(missing[0]) + 1
        raise ValueError(f"{path}: line {line} lists {missing[0]!r}, which is not in {csv.name} ({len(missing)} such)")


def find_images(root: Path) -> tuple[dict[str, str], str]:
    """Image name -> path relative to root, from `images/` and/or `images_NNN/images/`, and the
    layout found ("flat", "kaggle" or "flat+kaggle"). ValueError naming both layouts when neither
    is there. A name in both layouts is taken from `images/` (with a warning)."""
    flat = root / "images"
    kaggle = sorted(p for p in root.iterdir() if p.is_dir() and _KAGGLE_DIR.match(p.name) and (p / "images").is_dir())
    if not flat.is_dir() and not kaggle:
        raise ValueError(
            f"{root}: no image folder: expected images/ (the NIH download, unpacked) or images_001/images/ ... "
            "images_012/images/ (the Kaggle mirror)"
        )
    found: dict[str, str] = {}
    dup = 0
    for folder in [*(k / "images" for k in kaggle), *([flat] if flat.is_dir() else [])]:
        rel = folder.relative_to(root).as_posix()
        with os.scandir(folder) as it:
            for e in it:
                if e.name.endswith(".png"):
                    dup += e.name in found
                    found[e.name] = f"{rel}/{e.name}"  # images/ last: it wins
    if dup:
        log.warning("%d images are both in images/ and images_NNN/images/ under %s; using images/", dup, root)
    layout = "+".join(n for n, ok in (("flat", flat.is_dir()), ("kaggle", bool(kaggle))) if ok)
    return found, layout


def read_bboxes(path: Path, images: pl.Series) -> pl.DataFrame:
    """`Image Index` -> `boxes` (list of {label, x, y, width, height}) from BBox_List_2017.csv.

    Read by position: the released header `Image Index,Finding Label,Bbox [x,y,w,h],,,` names the
    four coordinates `Bbox [x`, `y`, `w`, `h]` and three empty columns."""
    columns = require_csv(path, ("Image Index", "Finding Label"))
    if len(columns) < 6 or not columns[2].startswith("Bbox"):
        raise ValueError(f"{path}: expected the header 'Image Index,Finding Label,Bbox [x,y,w,h],,,', got {columns}")
    raw = pl.read_csv(path, infer_schema_length=0)
    df = raw.select(
        pl.col(columns[0]).str.strip_chars().alias("Image Index"),
        pl.col(columns[1]).str.strip_chars().replace(BBOX_ALIASES).alias("label"),
        *(pl.col(c).str.strip_chars().cast(pl.Float64, strict=False).alias(n) for c, n in zip(columns[2:6], _BOX, strict=True)),
    )  # fmt: skip
    for name, col in zip(_BOX, columns[2:6], strict=True):
        bad = df.with_row_index("_i").filter(pl.col(name).is_null() | ~pl.col(name).is_finite())
        if bad.height:
            i = bad["_i"][0]
            raise ValueError(f"{path}: {row_where(i)}: column {col!r} holds {raw[col][i]!r}; expected a number")
    bad = df.with_row_index("_i").filter(~pl.col("label").is_in(list(NIH_LABEL_NAMES)))
    if bad.height:
        raise ValueError(f"{path}: {row_where(bad['_i'][0])}: unknown Finding Label {bad['label'][0]!r}; expected one of "
                         f"{list(NIH_LABEL_NAMES)} (or 'Infiltrate')")  # fmt: skip
    bad = df.with_row_index("_i").filter((pl.col("width") <= 0) | (pl.col("height") <= 0))
    if bad.height:
        raise ValueError(f"{path}: {row_where(bad['_i'][0])}: box width and height must be > 0, got {bad.row(0)[4:]}")
    bad = df.with_row_index("_i").filter(~pl.col("Image Index").is_in(images.to_list()))
    if bad.height:
        raise ValueError(f"{path}: {row_where(bad['_i'][0])}: image {bad['Image Index'][0]!r} is not in the Data_Entry CSV")
    return df.group_by("Image Index", maintain_order=True).agg(
        pl.struct("label", "x", "y", "width", "height").alias("boxes")
    )


def read_nih(
    root: Path,
    *,
    views: str | Sequence[str] = ("PA", "AP"),
    validate_fraction: float = 0.1,
    seed: int = 0,
    validate_list: Path | None = None,
) -> tuple[pl.DataFrame, dict]:
    """One row per image (ROW_COLUMNS + `boxes`, and `skip_reason`/`skip_detail` for images that
    cannot be written: not in a split list, missing) and counts."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--root {root} is not a directory")
    if not 0.0 <= validate_fraction < 1.0:
        raise ValueError(f"--validate-fraction must be in [0, 1), got {validate_fraction}")
    csv = _data_entry(root)
    df = _read_data_entry(csv)
    check_rows(df, csv)
    total = df.height
    name = pl.col("Image Index").fill_null("").str.strip_chars()
    df = df.with_columns(name.alias("Image Index"))
    check_unique(df, ["Image Index"], csv)
    bad = df.with_row_index("_i").filter(~pl.col("Image Index").str.ends_with(".png"))
    if bad.height:
        raise ValueError(f"{csv}: {row_where(bad['_i'][0])}: Image Index {bad['Image Index'][0]!r} is not a .png name")
    labels = _label_codes(df, csv)
    for col in ("Patient ID", "View Position"):
        bad = df.with_row_index("_i").filter(pl.col(col).fill_null("").str.strip_chars() == "")
        if bad.height:
            raise ValueError(f"{csv}: {row_where(bad['_i'][0])} (Image Index {bad['Image Index'][0]!r}): empty {col!r}")
    age = pl.col("Patient Age").fill_null("").str.strip_chars()
    bad = df.with_row_index("_i").filter((age != "") & ~age.str.contains(_AGE.pattern))
    if bad.height:
        raise ValueError(f"{csv}: {row_where(bad['_i'][0])}: Patient Age {bad['Patient Age'][0]!r} is not a number of years")

    # the official split
    tv_path, test_path = root / TRAIN_VAL_LIST, root / TEST_LIST
    train_val, test = _read_list(tv_path), _read_list(test_path)
    both = sorted(set(train_val) & set(test))
    if both:
        raise ValueError(f"{tv_path} and {test_path} both list {both[0]!r} ({len(both)} such)")
    _check_listed(train_val, tv_path, df["Image Index"], csv)
    _check_listed(test, test_path, df["Image Index"], csv)
    df = df.with_columns(
        pl.when(pl.col("Image Index").is_in(test)).then(pl.lit("test"))
        .when(pl.col("Image Index").is_in(train_val)).then(pl.lit("train"))
        .otherwise(pl.lit("")).alias("split"),
        pl.col("Patient ID").str.strip_chars().alias("subject_id"),
    )  # fmt: skip
    # validate: listed images, or whole patients drawn from train_val (before any view filter)
    if validate_list is not None:
        held_images = _read_list(Path(validate_list))
        _check_listed(held_images, Path(validate_list), df["Image Index"], csv)
        outside = [n for n in held_images if n not in set(train_val)]
        if outside:
            raise ValueError(f"{validate_list}: {outside[0]!r} is not in {tv_path.name} ({len(outside)} such)")
        is_val = pl.col("Image Index").is_in(held_images)
        n_val_patients = df.filter(is_val)["subject_id"].n_unique()
    else:
        patients = np.array(sorted(df.filter(pl.col("split") == "train")["subject_id"].unique().to_list()), dtype=object)
        n_val_patients = math.ceil(validate_fraction * len(patients)) if validate_fraction > 0 else 0
        held = patients[np.random.default_rng([seed, 0x5EED]).permutation(len(patients))[:n_val_patients]].tolist()
        is_val = (pl.col("split") == "train") & pl.col("subject_id").is_in(held)
    df = df.with_columns(pl.when(is_val).then(pl.lit("validate")).otherwise(pl.col("split")).alias("split"))

    images, layout = find_images(root)
    boxes = read_bboxes(root / BBOX_CSV, df["Image Index"]) if (root / BBOX_CSV).is_file() else None
    keep = parse_views(views)
    view = pl.col("View Position").str.strip_chars().str.to_uppercase()
    df = df.with_columns(view.alias("view"), labels)
    if keep is not None:
        all_views = df["view"]
        df = df.filter(pl.col("view").is_in(list(keep)))
        check_views_left(df, keep, all_views, csv)
    sex = pl.col("Patient Gender").fill_null("").str.strip_chars().str.to_uppercase()
    found = pl.col("Image Index").replace_strict(images, default=None, return_dtype=pl.Utf8)
    box_dtype = pl.List(pl.Struct({"label": pl.Utf8, "x": pl.Float64, "y": pl.Float64, "width": pl.Float64, "height": pl.Float64}))
    if boxes is not None:
        df = df.join(boxes, on="Image Index", how="left", maintain_order="left")
    else:
        df = df.with_columns(pl.lit(None, dtype=box_dtype).alias("boxes"))
    out = df.select(
        pl.col("Image Index").str.strip_suffix(".png").alias("key"),
        "subject_id",
        pl.col("Follow-up #").fill_null("").str.strip_chars().alias("study_id"),
        pl.col("Image Index").str.strip_suffix(".png").alias("image_id"),
        "view",
        "split",
        pl.when(sex.is_in(["M", "F"])).then(sex).otherwise(pl.lit("")).alias("sex"),
        age.str.extract(r"^(\d+)").cast(pl.Int32).alias("age"),
        pl.coalesce(found, pl.lit("images/") + pl.col("Image Index")).alias("source_path"),
        "labels",
        pl.col("boxes").fill_null(pl.lit([], dtype=box_dtype)).cast(box_dtype),
        pl.when(pl.col("split") == "").then(pl.lit("not_in_split"))
        .when(found.is_null()).then(pl.lit("missing_image")).otherwise(pl.lit(None)).alias("skip_reason"),
        pl.when(pl.col("split") == "").then(pl.lit(f"in neither {TRAIN_VAL_LIST} nor {TEST_LIST}"))
        .when(found.is_null()).then(pl.format("{} is in neither images/ nor images_NNN/images/ under {}", "Image Index", pl.lit(str(root))))
        .otherwise(pl.lit(None)).alias("skip_detail"),
    ).sort("key")  # fmt: skip
    check_keys(out, csv)
    if out.height and out.filter(pl.col("skip_reason") == "missing_image").height == out.height:
        raise ValueError(f"{root}: none of the {out.height} images of {csv.name} is in images/ or images_NNN/images/ "
                         f"(found {len(images)} other .png files there); is --root the right folder?")  # fmt: skip
    counts = {
        "images_total": total,
        "data_entry": csv.name,
        "image_layout": layout,
        "validate_patients": n_val_patients,
        "not_in_split": int((out["split"] == "").sum()),
        "images_with_boxes": int((out["boxes"].list.len() > 0).sum()),
    }
    return out.select(*ROW_COLUMNS, "boxes", "skip_reason", "skip_detail"), counts
