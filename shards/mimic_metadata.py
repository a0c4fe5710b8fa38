"""MIMIC-CXR-JPG 2.0.0 metadata: join metadata, split and label CSVs (polars), one row per image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from cxrfast.shards.metadata_common import (
    ROW_COLUMNS,
    check_keys,
    check_label_values,
    label_codes_expr,
    parse_views,
    read_csv,
)
from cxrfast.shards.schema import LABEL_NAMES, NOT_MENTIONED, NUM_LABELS

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
LABEL_CSVS = {"chexpert": "mimic-cxr-2.0.0-chexpert.csv.gz", "negbio": "mimic-cxr-2.0.0-negbio.csv.gz"}
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")


def _find(root: Path, name: str) -> Path:
    """`name`, or its uncompressed `.csv` twin when only that exists."""
    p = root / name
    if not p.is_file() and (root / name.removesuffix(".gz")).is_file():
        return root / name.removesuffix(".gz")
    return p


def read_mimic(root: Path, *, views: str | Sequence[str] = ("PA", "AP"), labels: str = "chexpert") -> tuple[pl.DataFrame, dict]:
    """One row per image (ROW_COLUMNS) and counts {"images_total", "not_in_split", "without_labels"}.

    Images whose dicom_id is not in the split CSV are returned with split "" (the caller skips
    and records them); studies missing from the label CSV get all labels -2 (not mentioned).
    """
    root = Path(root)
    if labels not in LABEL_CSVS:
        raise ValueError(f"--labels must be one of {sorted(LABEL_CSVS)}, got {labels!r}")
    meta_p, split_p, lab_p = _find(root, METADATA_CSV), _find(root, SPLIT_CSV), _find(root, LABEL_CSVS[labels])
    meta = read_csv(meta_p, METADATA_COLUMNS).lazy()
    split = read_csv(split_p, SPLIT_COLUMNS).lazy()
    lab_df = read_csv(lab_p, ("subject_id", "study_id", *LABEL_NAMES))
    check_label_values(lab_df, lab_p)
    lab = lab_df.lazy().select("subject_id", "study_id", label_codes_expr(lab_p), pl.lit(True).alias("_has_labels"))

    keep = parse_views(views)
    meta = meta.with_columns(pl.col("ViewPosition").fill_null("").str.strip_chars().str.to_uppercase().alias("view"))
    total = meta.select(pl.len()).collect().item()
    if keep is not None:
        meta = meta.filter(pl.col("view").is_in(list(keep)))
    unknown_split = split.filter(~pl.col("split").is_in(["train", "validate", "test"])).collect()
    if unknown_split.height:
        raise ValueError(f"{split_p}: row {unknown_split.row(0)} has split {unknown_split['split'][0]!r}; expected train/validate/test")

    sid = pl.col("subject_id")
    df = (
        meta.join(split.select("dicom_id", "split"), on="dicom_id", how="left")
        .join(lab, on=["subject_id", "study_id"], how="left")
        .with_columns(
            pl.col("split").fill_null(""),
            pl.col("_has_labels").fill_null(False),
            pl.col("labels").fill_null(pl.lit([NOT_MENTIONED] * NUM_LABELS, dtype=pl.List(pl.Int8))),
        )
        .select(
            pl.col("dicom_id").alias("key"),
            sid,
            "study_id",
            pl.col("dicom_id").alias("image_id"),
            "view",
            "split",
            pl.lit("").alias("sex"),
            pl.lit(None, dtype=pl.Int32).alias("age"),
            pl.format("files/p{}/p{}/s{}/{}.jpg", sid.str.slice(0, 2), sid, pl.col("study_id"), pl.col("dicom_id")).alias(
                "source_path"
            ),
            "labels",
            "_has_labels",
        )
        .sort("key")
        .collect()
    )
    try:
        check_keys(df, meta_p)
    except ValueError as e:
        raise ValueError(f"{meta_p}: bad dicom_id: {e}") from None
    counts = {
        "images_total": total,
        "not_in_split": int((df["split"] == "").sum()),
        "without_labels": int((~df["_has_labels"]).sum()),
    }
    return df.select(ROW_COLUMNS), counts
