"""`shard_nih`: labels by name in NIH's order, the official split, validate by patient, both image
layouts, RGBA/RGB/16-bit PNGs, boxes, skips, every bad input's error, rebuilds, resume, the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
from shard_tiny import NIH_HEADER, make_tiny_nih, tar_samples

from cxrfast.shards.build import shard_nih
from cxrfast.shards.folder import open_shards
from cxrfast.shards.inspect import inspect_shards, write_contact_sheet
from cxrfast.shards.nih_metadata import read_nih
from cxrfast.shards.schema import NIH_LABEL_NAMES, SAMPLE_TABLE_COLUMNS, SKIPPED, decode_member


def _expected_codes(finding_labels: str) -> list[int]:
    names = set(finding_labels.split("|"))
    return [int(n in names) for n in NIH_LABEL_NAMES]


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.suffix in (".tar", ".idx")}


def _tiny(tmp_path: Path, **kw) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "nih"
    return root, make_tiny_nih(root, **kw)


def _shard(root: Path, out: Path, **kw):
    kw.setdefault("samples_per_tar", 3)
    kw.setdefault("workers", 2)
    return shard_nih(root, out, **kw)


# --- the synthetic NIH tree (session fixtures) ---------------------------------------------
def test_nih_shards_follow_the_contract(nih_shards: Path, nih_raw: Path) -> None:
    folder = open_shards(nih_shards)
    assert folder.dataset == "nih" and folder.label_names == NIH_LABEL_NAMES and not folder.has_text
    m = folder.manifest
    assert m["counts"]["rows_in"] == m["counts"]["samples_out"] + m["counts"]["skipped"]
    entry = pl.read_csv(nih_raw / "Data_Entry_2017.csv", infer_schema_length=0)
    by_name = {r["Image Index"]: r for r in entry.iter_rows(named=True)}
    test_list = set((nih_raw / "test_list.txt").read_text().split())
    samples = tar_samples(nih_shards)
    assert len(samples) == m["counts"]["samples_out"] == entry.height  # every image kept (all PA/AP)
    split_of = {}
    for key, mem in samples.items():
        row = by_name[key + ".png"]
        codes = decode_member("labels.i8", mem["labels.i8"]).tolist()
        assert codes == _expected_codes(row["Finding Labels"]), key
        meta = json.loads(mem["json"])
        assert (meta["subject_id"], meta["study_id"], meta["view"]) == (row["Patient ID"], row["Follow-up #"], row["View Position"])
        split_of[key] = meta["split"]
    assert {k + ".png" for k, s in split_of.items() if s == "test"} == test_list  # the official test list, exactly
    patients = {s: {by_name[k + ".png"]["Patient ID"] for k, v in split_of.items() if v == s} for s in ("train", "validate")}
    assert patients["validate"] and not patients["train"] & patients["validate"]  # held out by patient
    no_finding = [k for k in samples if by_name[k + ".png"]["Finding Labels"] == "No Finding"]
    assert no_finding and all(not decode_member("labels.i8", samples[k]["labels.i8"]).any() for k in no_finding)
    boxes = pl.read_csv(nih_raw / "BBox_List_2017.csv", infer_schema_length=0)
    boxed = boxes["Image Index"][0].removesuffix(".png")
    got = json.loads(samples[boxed]["json"])["boxes"]
    assert got and got[0]["x"] == pytest.approx(float(boxes["Bbox [x"][0])) and got[0]["label"] in NIH_LABEL_NAMES


def test_nih_sample_table_and_inspect(nih_shards: Path, tmp_path: Path) -> None:
    table = open_shards(nih_shards).sample_table()
    assert table.columns == [*SAMPLE_TABLE_COLUMNS, *NIH_LABEL_NAMES]
    samples = tar_samples(nih_shards)
    for row in table.iter_rows(named=True):
        meta = json.loads(samples[row["key"]]["json"])
        assert (row["subject_id"], row["study_id"], row["split"]) == (meta["subject_id"], meta["study_id"], meta["split"])
        codes = decode_member("labels.i8", samples[row["key"]]["labels.i8"]).tolist()
        assert [row[n] for n in NIH_LABEL_NAMES] == codes
    rep = inspect_shards(nih_shards, samples=4)
    assert rep.problems == [] and rep.label_names == NIH_LABEL_NAMES
    assert write_contact_sheet(rep, tmp_path / "sheet.png").is_file()
    assert sum(rep.prevalence["Effusion"].values()) == table.height
    assert "Pleural_Thickening" in rep.text()


def test_rgba_source_becomes_the_same_gray(nih_raw: Path, nih_shards: Path) -> None:
    """The synthetic RGBA images hold the gray in every colour: their samples match a gray decode."""
    from cxrfast.shards.images import decode_resize, encode_jpeg

    rgba = [p for p in sorted(nih_raw.glob("images/*.png")) if cv2.imread(str(p), cv2.IMREAD_UNCHANGED).ndim == 3]
    assert rgba
    gray = cv2.imread(str(rgba[0]), cv2.IMREAD_GRAYSCALE)
    ok, png = cv2.imencode(".png", gray)
    want = encode_jpeg(decode_resize(png.tobytes(), 512).image, 95)
    assert tar_samples(nih_shards)[rgba[0].stem]["jpg"] == want


# --- hand-made trees ------------------------------------------------------------------------
def test_both_layouts_give_the_sametar_samples(tmp_path: Path) -> None:
    flat, labels = _tiny(tmp_path / "a", layout="flat")
    kaggle, _ = _tiny(tmp_path / "b", layout="kaggle")
    assert not (kaggle / "images").exists() and (kaggle / "images_002" / "images").is_dir()
    _shard(flat, tmp_path / "out_flat")
    s = _shard(kaggle, tmp_path / "out_kaggle")
    assert s.samples == len(labels) and not s.skipped
    a, b = tar_samples(tmp_path / "out_flat"), tar_samples(tmp_path / "out_kaggle")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["jpg"] == b[k]["jpg"] and a[k]["labels.i8"] == b[k]["labels.i8"]
        assert json.loads(b[k]["json"])["source_path"].startswith("images_0")
    # RGBA, RGB and 16-bit PNG sources are single-channel 8-bit samples, the 16-bit one windowed
    for k in ("00000001_000", "00000001_001", "00000002_000"):
        img = cv2.imdecode(np.frombuffer(a[k]["jpg"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.ndim == 2 and img.dtype == np.uint8 and img.max() > 200 and img.min() < 60, k
    assert open_shards(tmp_path / "out_kaggle").manifest["counts"]["image_layout"] == "kaggle"


def test_missing_png_and_unlisted_image_are_skipped_with_reasons(tmp_path: Path) -> None:
    root, labels = _tiny(tmp_path)
    (root / "images" / "00000002_001.png").unlink()
    tv = root / "train_val_list.txt"
    tv.write_text(tv.read_text().replace("00000003_000.png\n", ""))
    with pytest.raises(ValueError, match=r"2 of 12 rows \(16\.7%\) were skipped, more than --max-skipped-fraction"):
        _shard(root, tmp_path / "out")
    s = _shard(root, tmp_path / "out", max_skipped_fraction=0.2)
    assert s.skipped == {"missing_image": 1, "not_in_split": 1} and s.samples == len(labels) - 2
    rows = {r["key"]: r for r in map(json.loads, (tmp_path / "out" / SKIPPED).read_text().splitlines())}
    assert rows["00000002_001"]["reason"] == "missing_image" and "images_NNN/images/" in rows["00000002_001"]["detail"]
    assert rows["00000003_000"]["reason"] == "not_in_split" and "train_val_list.txt" in rows["00000003_000"]["detail"]
    assert inspect_shards(tmp_path / "out", samples=0).problems == []


def test_views_validate_list_and_no_image_layout(tmp_path: Path) -> None:
    root, _ = _tiny(tmp_path)
    rows, counts = read_nih(root, views="PA")
    assert set(rows["view"]) == {"PA"} and rows.height == 6
    (tmp_path / "val.txt").write_text("00000001_001.png 0 1 0\n00000003_000.png\n")  # a published list's format
    rows, counts = read_nih(root, validate_list=tmp_path / "val.txt")
    assert sorted(rows.filter(pl.col("split") == "validate")["key"]) == ["00000001_001", "00000003_000"]
    assert counts["validate_patients"] == 2
    (tmp_path / "val.txt").write_text("00000006_000.png\n")  # a test image
    with pytest.raises(ValueError, match=r"val\.txt: '00000006_000\.png' is not in train_val_list\.txt"):
        read_nih(root, validate_list=tmp_path / "val.txt")
    for p in (root / "images").glob("*.png"):
        p.rename(p.with_name("x" + p.name))
    with pytest.raises(ValueError, match=r"none of the 12 images of Data_Entry_2017\.csv is in images/ or images_NNN/images/"):
        read_nih(root)
    shutil.rmtree(root / "images")
    with pytest.raises(ValueError, match=r"no image folder: expected images/ .* images_001/images/"):
        read_nih(root)
    with pytest.raises(ValueError, match="--validate-fraction or --validate-list, not both"):
        shard_nih(root, tmp_path / "out", validate_fraction=0.2, validate_list=tmp_path / "val.txt")


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    "file, old, new, error",
    [
        ("Data_Entry_2017.csv", "Cardiomegaly", "Cardiomegally",
         r"Data_Entry_2017\.csv: row 3 \(line 4\) \(Image Index '00000002_000\.png'\): unknown finding 'Cardiomegally'"),
        ("Data_Entry_2017.csv", "00000001_000.png,No Finding", "00000001_000.png,No Finding|Effusion",
         r"row 1 \(line 2\) .*combines 'No Finding' with findings"),
        ("Data_Entry_2017.csv", "00000001_000.png,No Finding", "00000001_000.png,",
         r"row 1 \(line 2\) .*unknown finding ''"),
        ("Data_Entry_2017.csv", NIH_HEADER, NIH_HEADER.replace("View Position", "ViewPosition"),
         r"Data_Entry_2017\.csv: missing columns \['View Position'\]"),
        ("Data_Entry_2017.csv", "OriginalImage[Width,Height]", '"OriginalImage[Width,Height]"',
         r"more fields than the header's 11 names.*OriginalImage\[Width,Height\]"),
        ("Data_Entry_2017.csv", ",31,F,PA", ",abc,F,PA", r"row 1 \(line 2\): Patient Age 'abc' is not a number of years"),
        ("Data_Entry_2017.csv", "00000001_000.png,", "00000001_000.jpg,", r"row 1 \(line 2\): Image Index '00000001_000\.jpg' is not a \.png"),
        ("test_list.txt", "00000006_001.png", "00000099_000.png",
         r"test_list\.txt: line 4 lists '00000099_000\.png', which is not in Data_Entry_2017\.csv"),
        ("test_list.txt", "00000006_001.png", "00000001_000.png",
         r"train_val_list\.txt and .*test_list\.txt both list '00000001_000\.png'"),
        ("train_val_list.txt", "00000001_001.png", "00000001_000.png", r"train_val_list\.txt: '00000001_000\.png' is listed twice"),
        ("BBox_List_2017.csv", ",Mass,", ",Tumour,", r"BBox_List_2017\.csv: row 1 \(line 2\): unknown Finding Label 'Tumour'"),
        ("BBox_List_2017.csv", ",10.5,", ",x,", r"BBox_List_2017\.csv: row 1 \(line 2\): column 'Bbox \[x' holds 'x'"),
        ("BBox_List_2017.csv", "Bbox [x,y,w,h]", "x,y,w,h", r"expected the header 'Image Index,Finding Label,Bbox \[x,y,w,h\],,,'"),
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_error(tmp_path: Path, file: str, old: str, new: str, error: str) -> None:
    root, _ = _tiny(tmp_path)
    _edit(root / file, old, new)
    with pytest.raises(ValueError, match=error):
        read_nih(root)


def test_missing_files_are_clear_errors(tmp_path: Path) -> None:
    root, _ = _tiny(tmp_path)
    (root / "test_list.txt").unlink()
    with pytest.raises(ValueError, match=r"missing split list .*test_list\.txt"):
        read_nih(root)
    (root / "Data_Entry_2017.csv").unlink()
    with pytest.raises(ValueError, match=r"no Data_Entry_2017_v2020\.csv or Data_Entry_2017\.csv"):
        read_nih(root)


def test_rebuild_is_byte_identical_and_resume_keeps_good_tars(tmp_path: Path) -> None:
    root, _ = _tiny(tmp_path)
    a = _shard(root, tmp_path / "a")
    _shard(root, tmp_path / "b", workers=1)
    first = _digests(tmp_path / "a")
    assert first == _digests(tmp_path / "b") and len(first) >= 6
    tars = sorted((tmp_path / "a").glob("train-*.tar"))
    tars[0].unlink()
    (tmp_path / "a" / "manifest.json").unlink()
    s = _shard(root, tmp_path / "a")
    assert s.tars_resumed == a.tars - 1 and _digests(tmp_path / "a") == first
    _edit(root / "BBox_List_2017.csv", "10.5", "11.5")  # an input table changed: no silent resume
    with pytest.raises(ValueError, match=r"made from other parameters or inputs: .*bbox_list"):
        _shard(root, tmp_path / "a")


def test_cli_shard_nih(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cxrfast.cli import app

    root, labels = _tiny(tmp_path)
    r = CliRunner().invoke(app, ["shard", "nih", "--root", str(root), "--out", str(tmp_path / "o"), "--workers", "1",
                                 "--validate-fraction", "0.25", "--seed", "3"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"nih: {len(labels)} samples" in r.output
    _edit(root / "Data_Entry_2017.csv", "Hernia", "Hernie")
    r = CliRunner().invoke(app, ["shard", "nih", "--root", str(root), "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "unknown finding 'Hernie'" in r.output


def test_inspect_flags_wrong_label_names_and_bad_boxes(nih_shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(nih_shards, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["label_names"] = list(reversed(m["label_names"]))
    (bad / "manifest.json").write_text(json.dumps(m))
    problems = inspect_shards(bad, samples=0).problems
    assert any("label_names" in p and "differ from dataset 'nih'" in p for p in problems)
    m["label_names"] = m["label_names"][:13]
    (bad / "manifest.json").write_text(json.dumps(m))
    problems = inspect_shards(bad, samples=0).problems
    assert any("labels.i8 holds 14 values, expected 13" in p for p in problems)
