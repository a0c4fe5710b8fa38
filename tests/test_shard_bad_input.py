"""Hostile input to `cxrfast shard`: odd label cells, duplicate and empty tables. Each is a clear
error naming the file (and row), never a traceback."""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest
from shard_tiny import shard_tiny_mimic, tiny_mimic_raw

META_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
LABEL_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"


def _edit_csv(path: Path, edit) -> None:
    df = edit(pl.read_csv(path, infer_schema_length=0))
    with gzip.open(path, "wb") as f:
        df.write_csv(f)


# --- label cells -------------------------------------------------------------------------------
def test_blank_like_label_cells_are_blank_and_others_name_file_column_row(tmp_path: Path) -> None:
    raw = tiny_mimic_raw(tmp_path, studies=3)
    lab = raw / LABEL_CSV
    text = gzip.decompress(lab.read_bytes()).decode().splitlines()
    header = text[0].split(",")
    col = header.index("Fracture")
    rows = [r.split(",") for r in text[1:]]
    rows[0][col], rows[1][col] = " ", '""'  # blank-like
    lab.write_bytes(gzip.compress(("\n".join([text[0], *map(",".join, rows)]) + "\n").encode()))
    s = shard_tiny_mimic(raw, tmp_path / "out")
    assert s.samples > 0  # read as blank (-2, not mentioned)
    rows[2][col] = "x"
    lab.write_bytes(gzip.compress(("\n".join([text[0], *map(",".join, rows)]) + "\n").encode()))
    with pytest.raises(ValueError, match=rf"{LABEL_CSV}: column 'Fracture' holds 'x' in row 3 \(line 4\); expected 1.0, 0.0, -1.0 or blank"):
        shard_tiny_mimic(raw, tmp_path / "out2")


# --- tables ----------------------------------------------------------------------------------
def test_duplicates_are_blamed_on_the_table_that_has_them(tmp_path: Path) -> None:
    raw = tiny_mimic_raw(tmp_path, studies=3)
    for csv, cols in ((SPLIT_CSV, "dicom_id"), (LABEL_CSV, "subject_id=10000001, study_id=50000001")):
        path = raw / csv
        original = path.read_bytes()
        _edit_csv(path, lambda df: pl.concat([df, df[1]]))
        with pytest.raises(ValueError, match=rf"{csv}: {cols}.* appears more than once \(row 2 \(line 3\) and row \d+"):
            shard_tiny_mimic(raw, tmp_path / "out")
        path.write_bytes(original)


def test_empty_tables_and_views_matching_nothing_are_named(tmp_path: Path) -> None:
    raw = tiny_mimic_raw(tmp_path, studies=3)
    with pytest.raises(ValueError, match=r"--views LL matches no row of .*metadata.csv.gz \(views there: LATERAL 3, "):
        shard_tiny_mimic(raw, tmp_path / "out", views="LL")
    _edit_csv(raw / META_CSV, lambda df: df.clear())
    with pytest.raises(ValueError, match=rf"{META_CSV}: no data rows \(only a header\)"):
        shard_tiny_mimic(raw, tmp_path / "out")
