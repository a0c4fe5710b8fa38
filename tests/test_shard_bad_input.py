"""Hostile input to `cxrfast shard`: odd label cells, corrupt JPEG data, missing images, duplicate
and empty tables, a corrupt reports zip, a --root one folder too high. Each is a clear error
naming the file (and row), or a skipped row with its reason -- never a traceback or a silent
half-black sample."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
from shard_tiny import make_tiny_chexpert, make_tiny_mimic, shard_tiny_mimic, tiny_mimic_raw
from typer.testing import CliRunner

from cxrfast.cli import app
from cxrfast.shards.build import shard_chexpert, shard_mimic
from cxrfast.shards.schema import MANIFEST, SKIPPED

META_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
LABEL_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"


def _edit_csv(path: Path, edit) -> None:
    df = edit(pl.read_csv(path, infer_schema_length=0))
    with gzip.open(path, "wb") as f:
        df.write_csv(f)


def _frontal(raw: Path) -> list[Path]:
    """The PA/AP source images (600 high in the tiny tree), sorted."""
    return [p for p in sorted(raw.glob("files/**/*.jpg")) if cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape[0] == 600]


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


# --- images ----------------------------------------------------------------------------------
def test_corrupt_jpeg_data_is_skipped_with_the_decoder_warning(tmp_path: Path) -> None:
    raw = tiny_mimic_raw(tmp_path, studies=4)
    a, b = _frontal(raw)[:2]
    data = bytearray(a.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    a.write_bytes(bytes(data))  # garbage mid-file: libjpeg decodes it with a warning only
    data = b.read_bytes()
    b.write_bytes(data[: len(data) // 2] + b"\xff\xd9")  # truncated and re-terminated
    for p in (a, b):  # OpenCV alone returns a full-size image for both
        assert cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).shape == (600, 500)
    s = shard_tiny_mimic(raw, tmp_path / "out", max_skipped_fraction=1.0)
    assert s.skipped == {"corrupt_image": 2}
    rows = [json.loads(x) for x in (tmp_path / "out" / SKIPPED).read_text().splitlines()]
    assert {r["key"] for r in rows} == {a.stem, b.stem}
    assert all("libjpeg: Corrupt JPEG data" in r["detail"] for r in rows)


def test_nothing_written_or_too_much_skipped_is_an_error(tmp_path: Path) -> None:
    raw = tiny_mimic_raw(tmp_path, studies=6)
    frontal = _frontal(raw)
    frontal[0].unlink()
    with pytest.raises(ValueError, match=r"1 of 8 rows \(12.5%\) were skipped, more than --max-skipped-fraction 0.05 "
                       rf"\(commonest reason missing_image \(1 rows\), e.g. {frontal[0].relative_to(raw)}"):  # fmt: skip
        shard_tiny_mimic(raw, tmp_path / "out")
    assert not (tmp_path / "out" / MANIFEST).exists() and (tmp_path / "out" / SKIPPED).is_file()
    s = shard_tiny_mimic(raw, tmp_path / "out", max_skipped_fraction=0.2)  # accepted: the finished tars are resumed
    assert s.skipped == {"missing_image": 1} and s.tars_resumed == s.tars
    # the summary counts written samples, not rows: a run that wrote 2 samples reports 2
    for p in frontal[1:-2]:
        p.unlink()
    s = shard_tiny_mimic(raw, tmp_path / "out2", max_skipped_fraction=1.0)
    assert s.images_written == s.samples == 2 < s.rows_in
    assert f"{s.samples} written at" in s.line()
    for p in frontal[-2:]:
        p.unlink()
    with pytest.raises(ValueError, match=r"no samples written: all 8 rows were skipped \(commonest reason missing_image"):
        shard_tiny_mimic(raw, tmp_path / "out3", max_skipped_fraction=1.0)


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


def test_a_corrupt_reports_zip_member_is_named_without_a_traceback(tmp_path: Path) -> None:
    raw = tiny_mimic_raw(tmp_path, studies=5)
    zpath = raw / "mimic-cxr-reports.zip"
    with zipfile.ZipFile(zpath) as zf:  # a validate-split study's report: read by a worker, not the tokenizer
        info = zf.getinfo("files/p10/p10000003/s50000003.txt")
    data = bytearray(zpath.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + 5] ^= 0xFF  # a byte of its (stored) text
    zpath.write_bytes(bytes(data))
    args = ["shard", "mimic", "--root", str(raw), "--reports", str(zpath), "--out", str(tmp_path / "out")]
    r = CliRunner().invoke(app, [*args, "--workers", "1", "--vocab-size", "200"])
    assert r.exit_code == 2, r.output
    assert "validate-000000.tar failed: ValueError" in r.output
    assert "member files/p10/p10000003/s50000003.txt is corrupt" in r.output and "Traceback" not in r.output


# --- --root one folder too high ------------------------------------------------------------------
def test_root_given_as_the_parent_folder_is_found(tmp_path: Path) -> None:
    make_tiny_mimic(tmp_path / "physionet.org/files/mimic-cxr-jpg/2.0.0", studies=3)
    s = shard_mimic(
        tmp_path / "physionet.org", tmp_path / "physionet.org/files/mimic-cxr-jpg/2.0.0/mimic-cxr-reports.zip",
        tmp_path / "out_m", samples_per_tar=3, workers=1, vocab_size=200,
    )  # fmt: skip
    assert s.samples > 0 and s.skipped == {}
    root = make_tiny_chexpert(tmp_path / "chex", patients=3)
    s = shard_chexpert(root.parent, tmp_path / "out_c", workers=1)  # the folder holding CheXpert-v1.0-small
    created = json.loads((tmp_path / "out_c" / MANIFEST).read_text())["created_with"]
    assert s.samples > 0 and s.skipped == {} and created["root"] == str(root.resolve())
    make_tiny_chexpert(tmp_path / "chex" / "copy", patients=2)
    (tmp_path / "chex" / "copy" / "CheXpert-v1.0-small").rename(tmp_path / "chex" / "CheXpert-v1.0")
    with pytest.raises(ValueError, match=r"holds several CheXpert folders \(.*CheXpert-v1.0, .*CheXpert-v1.0-small\)"):
        shard_chexpert(root.parent, tmp_path / "out_c2", workers=1)
