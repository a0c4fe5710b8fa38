"""CheXpert v1.0 (-small) metadata: train.csv + valid.csv -> one row per image.

The official valid.csv becomes `test`; `validate` is held out of train.csv by patient with a
seed. `Path` is relative to the folder holding the dataset folder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from cxrfast.shards.metadata_common import (
    ROW_COLUMNS,
    check_keys,
    check_label_values,
    check_rows,
    check_unique,
    check_views_left,
    label_codes_expr,
    parse_views,
    read_csv,
)
from cxrfast.shards.schema import LABEL_NAMES, chexpert_key

CSV_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABEL_NAMES)
_PATH_RE = r"(?:^|/)(patient\d+)/(study\d+)/(view\d+_(?:frontal|lateral))\.jpg$"


#: The tables `read_chexpert` reads (label -> file name in the dataset folder).
TABLES = {"train_csv": "train.csv", "valid_csv": "valid.csv"}


def input_tables(root: Path) -> dict[str, Path]:
    """The tables `read_chexpert` reads."""
    return {label: Path(root) / name for label, name in TABLES.items()}


def _one_csv(root: Path, name: str, views: tuple[str, ...] | None) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """(rows kept by the view filter, the view of every row, rows in the file)."""
    path = root / name
    df = read_csv(path, CSV_COLUMNS)
    total = df.height
    check_rows(df, path)
    check_unique(df, ["Path"], path)
    check_label_values(df, path)
    bad = df.filter(~pl.col("Path").str.contains(_PATH_RE))
    if bad.height:
        raise ValueError(f"{path}: Path {bad['Path'][0]!r} is not .../patientN/studyM/viewK_frontal|lateral.jpg")
    frontal = pl.col("Frontal/Lateral").fill_null("").str.strip_chars().str.to_lowercase() == "frontal"
    appa = pl.col("AP/PA").fill_null("").str.strip_chars().str.to_uppercase()
    df = df.with_columns(
        pl.when(frontal).then(appa).otherwise(pl.when(appa != "").then(appa).otherwise(pl.lit("LATERAL"))).alias("view"),
        pl.col("Path").str.extract(_PATH_RE, 1).alias("_patient"),
        pl.col("Path").str.extract(_PATH_RE, 2).alias("_study"),
        pl.col("Path").str.extract(_PATH_RE, 3).alias("_image"),
    )
    all_views = df["view"]
    if views is not None:
        df = df.filter(pl.col("view").is_in(list(views)))
    # Path is relative to the folder holding the dataset folder (`root.parent`): drop its first
    # component (the dataset folder's name) to make it relative to `root` whatever root is called.
    rel = pl.col("Path").str.replace(r"^\./", "").str.split("/").list.slice(1).list.join("/")
    sex = pl.col("Sex").fill_null("").str.strip_chars()
    out = df.select(
        pl.col("Path").map_elements(chexpert_key, return_dtype=pl.String).alias("key"),
        pl.col("_patient").alias("subject_id"),
        pl.format("{}_{}", "_patient", "_study").alias("study_id"),
        pl.col("_image").alias("image_id"),
        "view",
        pl.lit("").alias("split"),
        pl.when(sex == "Male").then(pl.lit("M")).when(sex == "Female").then(pl.lit("F")).otherwise(pl.lit("")).alias("sex"),
        pl.col("Age").cast(pl.Float64, strict=False).cast(pl.Int32).alias("age"),
        rel.alias("source_path"),
        label_codes_expr(path),
    )
    return out, all_views, total


def read_chexpert(
    root: Path, *, views: str | Sequence[str] = ("PA", "AP"), validate_fraction: float = 0.1, seed: int = 0
) -> tuple[pl.DataFrame, dict]:
    """One row per image (ROW_COLUMNS) with split train/validate/test, and counts."""
    root = Path(root)
    if not 0.0 <= validate_fraction < 1.0:
        raise ValueError(f"--validate-fraction must be in [0, 1), got {validate_fraction}")
    keep = parse_views(views)
    train, train_views, n_train = _one_csv(root, TABLES["train_csv"], keep)
    check_views_left(train, keep, train_views, root / TABLES["train_csv"])
    test, _, n_test = _one_csv(root, TABLES["valid_csv"], keep)
    both = set(train["key"]) & set(test["key"])
    if both:
        raise ValueError(
            f"{root / 'train.csv'} and {root / 'valid.csv'} both list image {sorted(both)[0]} "
            f"({len(both)} images in both); an image belongs to one split"
        )
    test = test.with_columns(pl.lit("test").alias("split"))
    patients = np.array(sorted(train["subject_id"].unique().to_list()), dtype=object)
    n_val = math.ceil(validate_fraction * len(patients)) if validate_fraction > 0 else 0
    rng = np.random.default_rng([seed, 0x5EED])
    held = set(patients[rng.permutation(len(patients))[:n_val]].tolist())
    train = train.with_columns(
        pl.when(pl.col("subject_id").is_in(list(held))).then(pl.lit("validate")).otherwise(pl.lit("train")).alias("split")
    )
    df = pl.concat([train, test]).sort("key")
    check_keys(df, root / "train.csv + valid.csv")
    return df.select(ROW_COLUMNS), {"images_total": n_train + n_test, "validate_patients": n_val}
