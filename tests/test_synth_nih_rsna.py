"""`cxrfast synth nih|rsna`: the published layouts and formats, findings' traces, determinism."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrfast.shards.schema import LABEL_NAMES, NIH_LABEL_NAMES
from cxrfast.synth.nih import make_nih, trace_labels
from cxrfast.synth.radiograph import Anatomy, Pose, posed_box, render
from cxrfast.synth.rsna import make_rsna

NIH_2017_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                   "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")  # fmt: skip


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_nih_layout_and_formats(nih_raw: Path) -> None:
    lines = (nih_raw / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == NIH_2017_HEADER  # two names each span two columns; a trailing comma
    rows = list(csv.reader(lines[1:]))
    assert all(len(r) == 12 and r[-1] == "" for r in rows)
    names = [r[0] for r in rows]
    assert names == sorted(names) and all(n.endswith(".png") for n in names)
    for r in rows:
        assert r[1] == "No Finding" or all(f in NIH_LABEL_NAMES for f in r[1].split("|"))
        assert r[6] in ("PA", "AP") and r[0].startswith(f"{int(r[3]):08d}_{int(r[2]):03d}")
    tv = (nih_raw / "train_val_list.txt").read_text().split()
    test = (nih_raw / "test_list.txt").read_text().split()
    assert sorted(tv + test) == names and test
    patient = {r[0]: r[3] for r in rows}
    assert not {patient[n] for n in tv} & {patient[n] for n in test}  # the official split is by patient
    bbox = (nih_raw / "BBox_List_2017.csv").read_text().splitlines()
    assert bbox[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,," and len(bbox) > 1
    assert all(r[0] in test and len(r) == 9 for r in csv.reader(bbox[1:]))
    channels = set()
    for name in names:
        img = cv2.imread(str(nih_raw / "images" / name), cv2.IMREAD_UNCHANGED)
        assert img.shape[:2] == (1024, 1024) and img.dtype == np.uint8
        channels.add(1 if img.ndim == 2 else img.shape[2])
        if img.ndim == 3:  # RGBA: the gray in every colour, opaque
            assert (img[..., 3] == 255).all() and (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
    assert channels == {1, 4}


def test_nih_kaggle_layout_v2020_and_determinism(tmp_path: Path) -> None:
    a = make_nih(tmp_path / "a", images=5, seed=3, layout="kaggle", data_entry="v2020", workers=2)
    make_nih(tmp_path / "b", images=5, seed=3, layout="kaggle", data_entry="v2020", workers=1)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")  # same seed, same bytes, any worker count
    assert a["images"] == 5 and sorted(p.parent.parent.name for p in (tmp_path / "a").glob("images_*/images/*.png")) == [
        f"images_{i:03d}" for i in range(1, 6)
    ]
    header = (tmp_path / "a" / "Data_Entry_2017_v2020.csv").read_text().splitlines()[0]
    assert header == NIH_2017_HEADER[:-1] and not (tmp_path / "a" / "Data_Entry_2017.csv").exists()
    with pytest.raises(FileExistsError, match="overwrite"):
        make_nih(tmp_path / "a", images=5, seed=4)


def test_nih_findings_map_to_traces() -> None:
    v = trace_labels(["Effusion", "Infiltration", "Nodule", "Hernia"])
    drawn = {LABEL_NAMES[i] for i in np.flatnonzero(v == 1.0)}
    assert drawn == {"Pleural Effusion", "Lung Opacity", "Lung Lesion"}  # Hernia has no trace
    assert {LABEL_NAMES[i] for i in np.flatnonzero(trace_labels([]) == 1.0)} == {"No Finding"}


def test_rsna_layout_and_formats(rsna_raw: Path) -> None:
    import pydicom

    labels = list(csv.reader((rsna_raw / "stage_2_train_labels.csv").read_text().splitlines()))
    classes = list(csv.reader((rsna_raw / "stage_2_detailed_class_info.csv").read_text().splitlines()))
    assert labels[0] == ["patientId", "x", "y", "width", "height", "Target"] and classes[0] == ["patientId", "class"]
    assert [r[0] for r in labels[1:]] == [r[0] for r in classes[1:]]  # one class row per label row
    rows: dict[str, list[list[str]]] = {}
    for r in labels[1:]:
        rows.setdefault(r[0], []).append(r)
    for pid, rs in rows.items():
        if rs[0][5] == "0":
            assert rs == [[pid, "", "", "", "", "0"]]  # a negative: one row, empty box
        else:
            assert all(r[5] == "1" and all(v.endswith(".0") and float(v) >= 0 for v in r[1:5]) for r in rs)
    assert max(len(rs) for rs in rows.values()) >= 2  # several boxes for a positive patient
    files = sorted((rsna_raw / "stage_2_train_images").glob("*.dcm"))
    assert sorted(p.stem for p in files) == sorted(rows)
    kinds = set()
    for p in files:
        with pydicom.config.disable_value_validation():
            ds = pydicom.dcmread(p)
            assert ds.preamble is not None and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
            assert ds.PatientID == p.stem and (ds.Rows, ds.Columns) == (1024, 1024) and ds.Modality == "CR"
            assert ds.PatientAge.isdigit() and ds.ViewPosition in ("PA", "AP") and ds.BodyPartExamined == "CHEST"
            kinds.add((ds.file_meta.TransferSyntaxUID.name, ds.PhotometricInterpretation, int(ds.BitsStored),
                       "VOILUTSequence" in ds, "WindowCenter" in ds))  # fmt: skip
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                assert ds.pixel_array.shape == (1024, 1024)  # pydicom's own decoders read it too
    assert kinds == {
        ("JPEG Baseline (Process 1)", "MONOCHROME2", 8, False, False),
        ("JPEG Baseline (Process 1)", "MONOCHROME1", 8, False, False),
        ("Explicit VR Little Endian", "MONOCHROME2", 12, False, True),
        ("Explicit VR Little Endian", "MONOCHROME1", 12, True, False),
    }


def test_rsna_is_deterministic(tmp_path: Path) -> None:
    s = make_rsna(tmp_path / "a", patients=3, seed=5, workers=2)
    make_rsna(tmp_path / "b", patients=3, seed=5, workers=1)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b") and s["boxes"] >= 2


def test_opacity_is_drawn_inside_its_box() -> None:
    a = Anatomy.sample(np.random.default_rng(2))
    labels = np.full(len(LABEL_NAMES), np.nan)
    box = (a.cx + a.medi_half_width + 0.05, a.lung_top + 0.15, a.cx + a.lung_half_width - 0.02, a.lung_top + 0.4)
    plain = render(a, labels, "PA", (400, 400), seed=1, markers=False)
    sick = render(a, labels, "PA", (400, 400), seed=1, markers=False, opacities=[box])
    diff = sick - plain
    x0, y0, x1, y1 = (round(v * 400) for v in box)
    inside = diff[y0:y1, x0:x1]
    outside = diff.copy()
    outside[max(0, y0 - 20) : y1 + 20, max(0, x0 - 20) : x1 + 20] = 0
    assert inside.mean() > 0.05 and np.abs(outside).max() < 0.01
    with pytest.raises(ValueError, match="frontal views only"):
        render(a, labels, "LATERAL", (400, 400), seed=1, opacities=[box])


def test_posed_box_follows_the_pose() -> None:
    box = (0.2, 0.3, 0.4, 0.6)
    assert posed_box(box, Pose(), (1000, 500)) == pytest.approx((100, 300, 200, 600))
    assert posed_box(box, Pose(shift_x=0.1), (1000, 500)) == pytest.approx((150, 300, 250, 600))
    x0, y0, x1, y1 = posed_box(box, Pose(angle=10), (500, 500))
    assert x1 - x0 > 100 and y1 - y0 > 150  # a rotated box's bounding box is larger


def test_synth_cli_nih_rsna(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cxrfast.cli import app

    r = CliRunner().invoke(app, ["synth", "nih", "--out", str(tmp_path / "n"), "--images", "2", "--layout", "kaggle",
                                 "--workers", "1"])  # fmt: skip
    assert r.exit_code == 0 and "synth nih: 2 images" in r.output, r.output
    r = CliRunner().invoke(app, ["synth", "nih", "--out", str(tmp_path / "n2"), "--images", "2", "--layout", "tree"])
    assert r.exit_code == 2 and "layout must be one of" in r.output
    r = CliRunner().invoke(app, ["synth", "rsna", "--out", str(tmp_path / "r"), "--patients", "2", "--workers", "1"])
    assert r.exit_code == 0 and "synth rsna: 2 images" in r.output, r.output
