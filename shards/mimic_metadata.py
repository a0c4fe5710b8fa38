"""MIMIC-CXR-JPG 2.0.0 metadata: join metadata, split and label CSVs (polars), one row per image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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


def input_tables(root: Path, labels: str = "chexpert") -> dict[str, Path]:
    """The tables `read_mimic` reads: metadata, split and the `labels` label CSV."""
    if labels not in LABEL_CSVS:
        raise ValueError(f"--labels must be one of {sorted(LABEL_CSVS)}, got {labels!r}")
    return {"metadata_csv": _find(root, METADATA_CSV), "split_csv": _find(root, SPLIT_CSV), "labels_csv": _find(root, LABEL_CSVS[labels])}


def read_mimic(root: Path, *, views: str | Sequence[str] = ("PA", "AP"), labels: str = "chexpert") -> tuple[pl.DataFrame, dict]:
    """One row per image (ROW_COLUMNS) and counts {"images_total", "not_in_split", "without_labels"}.

    Images whose dicom_id is not in the split CSV are returned with split "" (the caller skips
    and records them); studies missing from the label CSV get all labels -2 (not mentioned).
    """
    root = Path(root)
    meta_p, split_p, lab_p = input_tables(root, labels).values()
    meta_df = read_csv(meta_p, METADATA_COLUMNS)
    split_df = read_csv(split_p, SPLIT_COLUMNS)
    lab_df = read_csv(lab_p, ("subject_id", "study_id", *LABEL_NAMES))
    # Each table is checked on its own, so that an error names the file that holds the problem.
    for df, path, unique in ((meta_df, meta_p, ["dicom_id"]), (split_df, split_p, ["dicom_id"]), (lab_df, lab_p, ["subject_id", "study_id"])):
        check_rows(df, path)
        check_unique(df, unique, path)
    check_label_values(lab_df, lab_p)
    lab = lab_df.lazy().select("subject_id", "study_id", label_codes_expr(lab_p), pl.lit(True).alias("_has_labels"))
    split = split_df.lazy()

    keep = parse_views(views)
    meta_df = meta_df.with_columns(pl.col("ViewPosition").fill_null("").str.strip_chars().str.to_uppercase().alias("view"))
    total = meta_df.height
    kept = meta_df if keep is None else meta_df.filter(pl.col("view").is_in(list(keep)))
    check_views_left(kept, keep, meta_df["view"], meta_p)
    meta = kept.lazy()
    unknown_split = split_df.with_row_index("_row").filter(~pl.col("split").is_in(["train", "validate", "test"]))
    if unknown_split.height:
        raise ValueError(
            f"{split_p}: row {unknown_split['_row'][0] + 1} (dicom_id {unknown_split['dicom_id'][0]}) has split "
            f"{unknown_split['split'][0]!r}; expected train/validate/test"
        )

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
