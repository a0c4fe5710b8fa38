"""`shard_rsna`: one sample per patient, label Target, boxes in the JSON, MGCA's patient split,
every DICOM encoding, corrupt and missing DICOMs skipped, every bad input's error, rebuilds, the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from shard_tiny import RSNA_BOXES, make_tiny_rsna, rsna_patient_id, tar_samples

from cxrfast.shards.build import shard_rsna
from cxrfast.shards.folder import open_shards
from cxrfast.shards.inspect import inspect_shards, write_contact_sheet
from cxrfast.shards.rsna_metadata import read_rsna, split_patients
from cxrfast.shards.schema import RSNA_LABEL_NAMES, SAMPLE_TABLE_COLUMNS, SKIPPED, decode_member


def _shard(root: Path, out: Path, **kw):
    kw.setdefault("samples_per_tar", 3)
    kw.setdefault("workers", 2)
    return shard_rsna(root, out, **kw)


# --- the synthetic RSNA tree (session fixtures) --------------------------------------------
def test_rsna_shards_follow_the_contract(rsna_shards: Path, rsna_raw: Path, tmp_path: Path) -> None:
    folder = open_shards(rsna_shards)
    assert folder.dataset == "rsna" and folder.label_names == RSNA_LABEL_NAMES == ("Pneumonia",)
    labels = pl.read_csv(rsna_raw / "stage_2_train_labels.csv", infer_schema_length=0)
    boxes = labels.filter(pl.col("Target") == "1").group_by("patientId", maintain_order=True).agg("x", "y", "width", "height")
    samples = tar_samples(rsna_shards)
    assert set(samples) == set(labels["patientId"])  # one sample per patient, keyed by patientId
    multi = 0
    for key, mem in samples.items():
        meta = json.loads(mem["json"])
        target = labels.filter(pl.col("patientId") == key)["Target"][0]
        assert decode_member("labels.i8", mem["labels.i8"]).tolist() == [int(target)]
        want = boxes.filter(pl.col("patientId") == key)
        got = [(b["x"], b["y"], b["width"], b["height"]) for b in meta["boxes"]]
        if want.height:
            w = want.row(0)
            assert got == [tuple(float(v[i]) for v in w[1:]) for i in range(len(w[1]))]
            assert all(b["label"] == "Pneumonia" for b in meta["boxes"])
            multi += len(got) > 1
        else:
            assert got == []
        assert (meta["subject_id"], meta["study_id"], meta["image_id"]) == (key, "", key)
        assert meta["view"] in ("PA", "AP") and meta["sex"] in ("M", "F") and meta["orig_width"] == 1024
    assert multi >= 1
    table = folder.sample_table()
    assert table.columns == [*SAMPLE_TABLE_COLUMNS, "Pneumonia"] and sorted(table["key"]) == sorted(samples)
    assert (table["subject_id"] == table["key"]).all() and (table["study_id"] == "").all()
    rep = inspect_shards(rsna_shards, samples=4)
    assert rep.problems == [] and "Pneumonia" in rep.text()
    assert write_contact_sheet(rep, tmp_path / "s.png").is_file() and any(boxes for *_, boxes in rep.sheet_samples)


def test_every_encoding_is_decoded_the_right_way_up(rsna_shards: Path, rsna_raw: Path) -> None:
    """MONOCHROME1 and the 12-bit encodings come out like the 8-bit MONOCHROME2 ones: dark lungs
    beside a bright mediastinum."""
    import cv2
    import pydicom

    samples = tar_samples(rsna_shards)
    seen = set()
    for key, mem in samples.items():
        with pydicom.config.disable_value_validation():
            ds = pydicom.dcmread(rsna_raw / "stage_2_train_images" / f"{key}.dcm", stop_before_pixels=True)
        seen.add((ds.PhotometricInterpretation, int(ds.BitsStored)))
        img = cv2.imdecode(np.frombuffer(mem["jpg"], np.uint8), cv2.IMREAD_GRAYSCALE).astype(float)
        row = img[200:260].mean(axis=0)  # mid-lung rows of the 512 image
        assert row[256 - 10 : 256 + 10].mean() > row[140:180].mean() + 20, (key, ds.PhotometricInterpretation)
    assert seen == {("MONOCHROME2", 8), ("MONOCHROME1", 8), ("MONOCHROME2", 12), ("MONOCHROME1", 12)}


def test_split_is_mgcas_by_patient() -> None:
    sklearn = pytest.importorskip("sklearn.model_selection")
    ids = [f"{i:04x}-p" for i in range(97)][::-1]
    for seed in (0, 3):
        got = split_patients(ids, validate_fraction=0.15, test_fraction=0.15, seed=seed)
        df = sorted(ids)  # MGCA: groupby("patientId") sorts the patients
        train, test_val = sklearn.train_test_split(df, test_size=0.3, random_state=seed)
        test, valid = sklearn.train_test_split(test_val, test_size=0.5, random_state=seed)
        assert {k for k, v in got.items() if v == "train"} == set(train)
        assert {k for k, v in got.items() if v == "validate"} == set(valid)
        assert {k for k, v in got.items() if v == "test"} == set(test)
    with pytest.raises(ValueError, match="must be in \\[0, 1\\) with a sum below 1"):
        split_patients(ids, validate_fraction=0.6, test_fraction=0.5, seed=0)


# --- hand-made trees ------------------------------------------------------------------------
def test_corrupt_and_missing_dicoms_are_skipped_with_reasons(tmp_path: Path) -> None:
    root = tmp_path / "rsna"
    ids = make_tiny_rsna(root, patients=8)
    images = root / "stage_2_train_images"
    (images / f"{ids[1]}.dcm").write_bytes((images / f"{ids[1]}.dcm").read_bytes()[:300])  # truncated
    (images / f"{ids[2]}.dcm").write_bytes(b"not a dicom at all")
    (images / f"{ids[5]}.dcm").unlink()
    s = _shard(root, tmp_path / "out", max_skipped_fraction=0.5)
    assert s.skipped == {"undecodable_image": 2, "missing_image": 1} and s.samples == 5
    m = open_shards(tmp_path / "out").manifest
    assert m["counts"]["rows_in"] == 8 and m["counts"]["unreadable_headers"] == 3
    rows = {r["key"]: r for r in map(json.loads, (tmp_path / "out" / SKIPPED).read_text().splitlines())}
    assert set(rows) == {ids[1], ids[2], ids[5]} and rows[ids[2]]["path"] == f"stage_2_train_images/{ids[2]}.dcm"
    assert inspect_shards(tmp_path / "out", samples=0).problems == []


def test_views_filter_and_rebuild_is_byte_identical(tmp_path: Path) -> None:
    root = tmp_path / "rsna"
    make_tiny_rsna(root, patients=8)
    rows, _ = read_rsna(root, views="AP")
    assert set(rows["view"]) == {"AP"} and rows.height == 3  # patients 0, 3, 6
    _shard(root, tmp_path / "a")
    _shard(root, tmp_path / "b", workers=1)
    digests = [{p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / d).glob("*.tar"))} for d in "ab"]
    assert digests[0] == digests[1] and digests[0]
    samples = tar_samples(tmp_path / "a")
    boxes = json.loads(samples[rsna_patient_id(0)]["json"])["boxes"]
    assert [(b["x"], b["y"], b["width"], b["height"]) for b in boxes] == RSNA_BOXES[0]


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


P0, P1 = rsna_patient_id(0), rsna_patient_id(1)


@pytest.mark.parametrize(
    "file, old, new, error",
    [
        ("stage_2_train_labels.csv", f"{P1},,,,,0", f"{P1},,,,,2", r"labels\.csv: row 3 \(line 4\): Target '2'; expected 0 or 1"),
        ("stage_2_train_labels.csv", f"{P1},,,,,0", f"{P1},,,,,1", r"row 3 \(line 4\): column 'x' holds '' with Target 1"),
        ("stage_2_train_labels.csv", f"{P1},,,,,0", f"{P1},1.0,,,,0", r"row 3 \(line 4\): column 'x' holds '1.0' with Target 0"),
        ("stage_2_train_labels.csv", f"{P0},10.0,12.0,20.0,30.0,1", f"{P0},10.0,12.0,-20.0,30.0,1",
         r"row 1 \(line 2\): box width '-20\.0' must be > 0"),
        ("stage_2_train_labels.csv", f"{P1},,,,,0", f"{P1},,,,,0\n{P1},,,,,0",
         rf"patient '{P1}' has 2 rows with Target 0"),
        ("stage_2_train_labels.csv", f"{P1},,,,,0", f"{P1},,,,,0\n{P1},1,2,3,4,1",
         rf"patient '{P1}' has rows with Target 0 and with Target 1"),
        ("stage_2_train_labels.csv", "patientId,x,y,width,height,Target", "patientId,x,y,w,h,Target",
         r"labels\.csv: missing columns \['width', 'height'\]"),
        ("stage_2_detailed_class_info.csv", f"{P1},Normal", f"{P1},Lung Opacity",
         rf"patient '{P1}' has class 'Lung Opacity' but Target 0"),
        ("stage_2_detailed_class_info.csv", f"{P1},Normal", f"{P1},Abnormal",
         r"class_info\.csv: row 3 \(line 4\): class 'Abnormal'"),
        ("stage_2_detailed_class_info.csv", f"{P1},Normal", "beef,Normal",
         rf"patient '{P1}' of stage_2_train_labels\.csv has no class"),
        ("stage_2_detailed_class_info.csv", f"{P0},Lung Opacity\n", f"{P0},Lung Opacity\n{P0},Normal\n",
         rf"patient '{P0}' has several classes"),
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_error(tmp_path: Path, file: str, old: str, new: str, error: str) -> None:
    root = tmp_path / "rsna"
    make_tiny_rsna(root, patients=4)
    _edit(root / file, old, new)
    with pytest.raises(ValueError, match=error):
        read_rsna(root)


def test_missing_files_are_clear_errors(tmp_path: Path) -> None:
    root = tmp_path / "rsna"
    make_tiny_rsna(root, patients=2)
    (root / "stage_2_train_images").rename(root / "images")
    with pytest.raises(ValueError, match=r"no stage_2_train_images/ folder"):
        read_rsna(root)
    (root / "stage_2_train_labels.csv").unlink()
    with pytest.raises(ValueError, match=r"missing CSV .*stage_2_train_labels\.csv"):
        read_rsna(root)


def test_cli_shard_rsna(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cxrfast.cli import app

    root = tmp_path / "rsna"
    make_tiny_rsna(root, patients=6)
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["shard", "rsna", "--root", str(root), "--out", str(out), "--workers", "1",
                                 "--validate-fraction", "0.2", "--test-fraction", "0.2"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "rsna: 6 samples" in r.output and open_shards(out).created_with["test_fraction"] == 0.2
    r = CliRunner().invoke(app, ["inspect", str(out), "--samples", "2", "--sheet", str(tmp_path / "s.png")])
    assert r.exit_code == 0 and "Pneumonia" in r.output, r.output
    r = CliRunner().invoke(app, ["shard", "rsna", "--root", str(root), "--out", str(out), "--test-fraction", "0.9"])
    assert r.exit_code == 2 and "--test-fraction" in r.output


@pytest.mark.parametrize("backend", ["dali", "torch", "synthetic"])
@pytest.mark.parametrize("fixture, names", [("nih_shards", "NIH"), ("rsna_shards", "RSNA")])
def test_loaders_yield_each_datasets_labels(fixture: str, names: str, backend: str, request: pytest.FixtureRequest) -> None:
    """Every backend gives `len(label_names)` labels per sample (14 for NIH, 1 for RSNA), the codes
    of the tars for the real backends."""
    pytest.importorskip("torch")
    from cxrfast.pipelines import build_loader
    from cxrfast.shards.schema import NIH_LABEL_NAMES

    shards: Path = request.getfixturevalue(fixture)
    n = len(NIH_LABEL_NAMES if names == "NIH" else RSNA_LABEL_NAMES)
    loader = build_loader(shards, "train", "eval", batch_size=2, backend=backend, device="cpu", num_threads=1,
                          with_keys=True)  # fmt: skip
    batch = next(iter(loader))
    assert batch["labels"].shape == (2, n)
    if backend != "synthetic":
        samples = tar_samples(shards)
        for key, row in zip(batch["key"], batch["labels"].tolist(), strict=True):
            assert row == decode_member("labels.i8", samples[key]["labels.i8"]).tolist()
