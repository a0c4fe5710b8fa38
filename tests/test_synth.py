"""`cxrfast synth`: published layouts and formats, determinism, findings that leave a trace, the CLI."""

from __future__ import annotations

import csv
import gzip
import io
import re
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrfast.shards.schema import LABEL_NAMES
from cxrfast.synth import Anatomy, make_chexpert, make_mimic, render
from cxrfast.synth.labels import no_finding_consistent

MIMIC_META = [
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]  # fmt: skip
MIMIC_LABEL_COLUMNS = [
    "subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
]  # fmt: skip
CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABEL_NAMES]
DICOM_RE = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
REPORT_RE = re.compile(r"^files/p1\d/p1\d{7}/s5\d{7}\.txt$")
TINY = (128, 160)  # image sides for tests that write their own datasets


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    reader = csv.DictReader(io.StringIO(raw.decode()))
    return list(reader.fieldnames or []), list(reader)


def label_vector(row: dict[str, str]) -> np.ndarray:
    return np.array([float(row[n]) if row[n] != "" else np.nan for n in LABEL_NAMES])


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- MIMIC


def test_mimic_csvs_have_the_published_columns(mimic_raw: Path) -> None:
    cols, meta = read_csv(mimic_raw / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert cols == MIMIC_META
    cols, split = read_csv(mimic_raw / "mimic-cxr-2.0.0-split.csv.gz")
    assert cols == ["dicom_id", "study_id", "subject_id", "split"]
    for name in ("chexpert", "negbio"):
        cols, rows = read_csv(mimic_raw / f"mimic-cxr-2.0.0-{name}.csv.gz")
        assert cols == MIMIC_LABEL_COLUMNS  # alphabetical, not CheXpert's order
        for row in rows:
            assert {row[n] for n in LABEL_NAMES} <= {"1.0", "0.0", "-1.0", ""}
            assert no_finding_consistent(label_vector(row)), row
    assert len(meta) == len(split) > 0
    assert {r["dicom_id"] for r in meta} == {r["dicom_id"] for r in split}


def test_mimic_images_exist_with_the_metadata_size(mimic_raw: Path) -> None:
    _, meta = read_csv(mimic_raw / "mimic-cxr-2.0.0-metadata.csv.gz")
    for r in meta:
        assert DICOM_RE.match(r["dicom_id"]) and re.fullmatch(r"1\d{7}", r["subject_id"]), r
        assert re.fullmatch(r"5\d{7}", r["study_id"]) and re.fullmatch(r"2\d{7}", r["StudyDate"]), r
        path = mimic_raw / "files" / f"p{r['subject_id'][:2]}" / f"p{r['subject_id']}" / f"s{r['study_id']}" / f"{r['dicom_id']}.jpg"
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert img is not None, path
        assert img.dtype == np.uint8 and img.ndim == 2  # 8-bit grayscale JPEG
        assert img.shape == (int(r["Rows"]), int(r["Columns"])), path
        assert 700 <= min(img.shape) and max(img.shape) <= 1000  # conftest's size_range
    views = {r["ViewPosition"] for r in meta}
    assert {"PA", "AP"} <= views and views & {"LATERAL", "LL"}
    per_study: dict[str, int] = {}
    for r in meta:
        per_study[r["study_id"]] = per_study.get(r["study_id"], 0) + 1
    assert set(per_study.values()) <= {1, 2, 3}
    assert not list(mimic_raw.rglob("*.partial"))


def test_mimic_splits_are_by_subject_and_non_empty(mimic_raw: Path) -> None:
    _, split = read_csv(mimic_raw / "mimic-cxr-2.0.0-split.csv.gz")
    assert {r["split"] for r in split} == {"train", "validate", "test"}
    by_subject: dict[str, set[str]] = {}
    for r in split:
        by_subject.setdefault(r["subject_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_subject.values())
    studies_per_subject: dict[str, set[str]] = {}
    for r in split:
        studies_per_subject.setdefault(r["subject_id"], set()).add(r["study_id"])
    assert max(len(s) for s in studies_per_subject.values()) >= 2  # subjects come back


def test_mimic_reports_zip(mimic_raw: Path) -> None:
    _, meta = read_csv(mimic_raw / "mimic-cxr-2.0.0-metadata.csv.gz")
    _, labels = read_csv(mimic_raw / "mimic-cxr-2.0.0-chexpert.csv.gz")
    studies = {(r["subject_id"], r["study_id"]) for r in meta}
    with zipfile.ZipFile(mimic_raw / "mimic-cxr-reports.zip") as zf:
        names = zf.namelist()
        texts = {n: zf.read(n).decode() for n in names}
    assert names == sorted(names) and all(REPORT_RE.match(n) for n in names), names[:3]
    reported = {(n.split("/")[2][1:], n.split("/")[3][1:-4]) for n in names}
    assert reported < studies  # every report belongs to a study; some studies have none
    assert {(r["subject_id"], r["study_id"]) for r in labels} == reported  # labels come from reports
    assert all("FINAL REPORT" in t for t in texts.values())
    has_findings = [bool(re.search(r"^ ?FINDINGS( AND IMPRESSION)?:", t, re.M | re.I)) for t in texts.values()]
    has_impression = [bool(re.search(r"^ ?(IMPRESSION|CONCLUSION|FINDINGS AND IMPRESSION)\b", t, re.M | re.I))
                      for t in texts.values()]  # fmt: skip
    assert not all(has_findings) and not all(has_impression)
    assert any("___" in t for t in texts.values())
    assert max(len(line) for t in texts.values() for line in t.splitlines()) <= 90  # wrapped


def test_mimic_reports_agree_with_labels(mimic_raw: Path) -> None:
    _, labels = read_csv(mimic_raw / "mimic-cxr-2.0.0-chexpert.csv.gz")
    with zipfile.ZipFile(mimic_raw / "mimic-cxr-reports.zip") as zf:
        texts = {(n.split("/")[2][1:], n.split("/")[3][1:-4]): zf.read(n).decode().lower() for n in zf.namelist()}
    words = {"Pleural Effusion": "effusion", "Pneumothorax": "pneumothora", "Cardiomegaly": ("heart", "cardiomegaly"),
             "Edema": ("edema", "congestion"), "Support Devices": ("tube", "catheter", "pacemaker", "wires", "line")}  # fmt: skip
    checked = 0
    for row in labels:
        text = texts[(row["subject_id"], row["study_id"])]
        for name, word in words.items():
            if row[name] in ("1.0", "0.0", "-1.0"):
                assert any(w in text for w in ((word,) if isinstance(word, str) else word)), (name, text)
                checked += 1
    assert checked > 0


def test_mimic_png16(tmp_path: Path) -> None:
    summary = make_mimic(tmp_path, studies=2, seed=3, size_range=TINY, image_format="png16")
    pngs = sorted(tmp_path.rglob("*.png"))
    assert len(pngs) == summary["images"] > 0 and not list(tmp_path.rglob("*.jpg"))
    _, meta = read_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz")
    sizes = {r["dicom_id"]: (int(r["Rows"]), int(r["Columns"])) for r in meta}
    for p in pngs:
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint16 and img.shape == sizes[p.stem]
        assert img.max() > 1000 and img.max() <= 4095
        assert len(np.unique(img % 16)) > 1  # not an 8-bit image shifted left


def test_mimic_is_deterministic_and_independent_of_workers(tmp_path: Path) -> None:
    a = make_mimic(tmp_path / "a", studies=3, seed=7, size_range=TINY, workers=1)
    make_mimic(tmp_path / "b", studies=3, seed=7, size_range=TINY, workers=2)
    make_mimic(tmp_path / "c", studies=3, seed=8, size_range=TINY)
    fa, fb, fc = all_files(tmp_path / "a"), all_files(tmp_path / "b"), all_files(tmp_path / "c")
    assert fa == fb and len(fa) >= a["images"] + 5
    assert fa.keys() != fc.keys()


def test_refuses_a_different_dataset_unless_overwrite(tmp_path: Path) -> None:
    make_mimic(tmp_path, studies=2, seed=0, size_range=TINY)
    make_mimic(tmp_path, studies=2, seed=0, size_range=TINY)  # same dataset again: fine
    with pytest.raises(FileExistsError, match="overwrite"):
        make_mimic(tmp_path, studies=2, seed=1, size_range=TINY)
    first = set(all_files(tmp_path / "files"))
    make_mimic(tmp_path, studies=2, seed=1, size_range=TINY, overwrite=True)
    assert set(all_files(tmp_path / "files")).isdisjoint(first)  # old images removed, not mixed in


# --------------------------------------------------------------------------- CheXpert


def test_chexpert_layout(chexpert_raw: Path) -> None:
    root = chexpert_raw / "CheXpert-v1.0-small"
    cols, train = read_csv(root / "train.csv")
    assert cols == CHEXPERT_COLUMNS
    cols, valid = read_csv(root / "valid.csv")
    assert cols == CHEXPERT_COLUMNS and train and valid
    path_re = re.compile(r"^CheXpert-v1\.0-small/(train|valid)/patient\d{5}/study\d+/view\d_(frontal|lateral)\.jpg$")
    for split, rows in (("train", train), ("valid", valid)):
        for r in rows:
            assert path_re.match(r["Path"]) and r["Path"].split("/")[1] == split, r["Path"]
            img = cv2.imread(str(chexpert_raw / r["Path"]), cv2.IMREAD_UNCHANGED)
            assert img is not None and img.dtype == np.uint8 and img.ndim == 2
            assert min(img.shape) == 320
            assert r["Frontal/Lateral"] == ("Frontal" if r["Path"].endswith("_frontal.jpg") else "Lateral")
            assert (r["AP/PA"] in ("AP", "PA")) == (r["Frontal/Lateral"] == "Frontal")
            assert r["Sex"] in ("Male", "Female", "Unknown") and r["Age"].isdigit()
            assert no_finding_consistent(label_vector(r)) or split == "valid"
    assert {r[n] for r in valid for n in LABEL_NAMES} == {"1.0", "0.0"}  # no blanks or uncertain in valid
    assert "-1.0" in {r[n] for r in train for n in LABEL_NAMES}
    patient = lambda r: int(r["Path"].split("/")[2][len("patient"):])  # noqa: E731
    assert max(map(patient, train)) < min(map(patient, valid))  # valid patients continue the numbering


def test_chexpert_full_size_folder(tmp_path: Path) -> None:
    summary = make_chexpert(tmp_path, patients=1, seed=2, small=False)
    _, train = read_csv(tmp_path / "CheXpert-v1.0" / "train.csv")
    assert len(train) == summary["images"] and train[0]["Path"].startswith("CheXpert-v1.0/train/patient00001/")
    img = cv2.imread(str(tmp_path / train[0]["Path"]), cv2.IMREAD_UNCHANGED)
    assert min(img.shape) >= 2000


# --------------------------------------------------------------------------- findings leave a trace


def _labels(*names: str) -> np.ndarray:
    v = np.full(len(LABEL_NAMES), np.nan)
    for n in names:
        v[LABEL_NAMES.index(n)] = 1.0
    return v


def _central_bright_width(img: np.ndarray, row: int) -> int:
    """Width of the bright band around the midline (mediastinum + heart) in a band of rows."""
    profile = cv2.GaussianBlur(img[row - 5 : row + 5].mean(axis=0, keepdims=True), (0, 0), 3)[0]
    lung, centre = np.percentile(profile[len(profile) // 5 : -len(profile) // 5], [5, 95])
    bright = profile > (lung + centre) / 2
    mid = len(profile) // 2
    left = mid - np.argmin(bright[:mid][::-1])
    right = mid + np.argmin(bright[mid:])
    return int(right - left)


@pytest.mark.parametrize("anatomy_seed", [0, 1, 2])
def test_cardiomegaly_widens_the_heart(anatomy_seed: int) -> None:
    a = Anatomy.sample(np.random.default_rng(anatomy_seed))
    shape = (600, 520)
    normal = render(a, _labels("No Finding"), "PA", shape, seed=5, markers=False)
    big = render(a, _labels("Cardiomegaly"), "PA", shape, seed=5, markers=False)
    row = round((a.dome_left - 0.03) * normal.shape[0])  # lower heart, above the diaphragm
    assert _central_bright_width(big, row) > 1.15 * _central_bright_width(normal, row)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pleural_effusion_whitens_the_costophrenic_angle(side: str) -> None:
    a = Anatomy.sample(np.random.default_rng(4))
    shape = (600, 520)
    normal = render(a, _labels("No Finding"), "PA", shape, seed=9, markers=False)
    eff = render(a, _labels("Pleural Effusion"), "PA", shape, seed=9, sides={"Pleural Effusion": side}, markers=False)
    h, w = normal.shape
    s = -1 if side == "right" else 1  # patient's right is the image's left
    x = a.cx + s * (a.lung_half_width - 0.06)
    dome = a.dome_right if side == "right" else a.dome_left
    box = (slice(round((dome - 0.02) * h), round((dome + a.sulcus_depth) * h)), slice(round((x - 0.04) * w), round((x + 0.04) * w)))
    other = (box[0], slice(round((2 * a.cx - x - 0.04) * w), round((2 * a.cx - x + 0.04) * w)))
    assert eff[box].mean() > normal[box].mean() + 0.1
    assert abs(eff[other].mean() - normal[other].mean()) < 0.02  # the other side is untouched


@pytest.mark.parametrize("finding", ["Lung Lesion", "Consolidation", "Pneumothorax", "Support Devices", "Fracture",
                                     "Edema", "Atelectasis", "Enlarged Cardiomediastinum", "Pleural Other"])  # fmt: skip
@pytest.mark.parametrize("view", ["PA", "LATERAL"])
def test_each_finding_changes_the_image(finding: str, view: str) -> None:
    a = Anatomy.sample(np.random.default_rng(6))
    normal = render(a, _labels("No Finding"), view, (400, 340), seed=3)
    sick = render(a, _labels(finding), view, (400, 340), seed=3)
    uncertain = render(a, np.where(np.isnan(_labels(finding)), np.nan, -1.0), view, (400, 340), seed=3)
    diff = np.abs(sick - normal)
    assert diff.max() > 0.1, finding
    assert np.abs(uncertain - normal).sum() < diff.sum()  # uncertain findings are drawn fainter


@pytest.mark.parametrize("anatomy_seed", [0, 1, 2, 3])
def test_lateral_differs_from_frontal(anatomy_seed: int) -> None:
    a = Anatomy.sample(np.random.default_rng(anatomy_seed))

    def centre_contrast(view: str) -> float:
        """Mid-lung row: the centre against points at 30% and 70% of the width."""
        img = render(a, _labels("No Finding"), view, (400, 340), seed=1)
        row = img[155:165].mean(axis=0)
        w = len(row)
        return float(row[w // 2] - (row[int(0.3 * w)] + row[int(0.7 * w)]) / 2)

    assert centre_contrast("PA") > 0.4  # bright mediastinum between two dark lungs
    assert centre_contrast("AP") > 0.4
    assert centre_contrast("LATERAL") < 0.3  # side-on, the centre is lung


# --------------------------------------------------------------------------- CLI


def test_synth_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cxrfast.synth.cli import synth_app

    runner = CliRunner()
    res = runner.invoke(synth_app, ["mimic", "--out", str(tmp_path / "m"), "--studies", "2", "--size-min", "128",
                                    "--size-max", "160", "--workers", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "images" in res.output and (tmp_path / "m" / "mimic-cxr-reports.zip").exists()
    res = runner.invoke(synth_app, ["mimic", "--out", str(tmp_path / "m"), "--studies", "2", "--seed", "1",
                                    "--size-min", "128", "--size-max", "160"])  # fmt: skip
    assert res.exit_code == 2 and "overwrite" in res.output
    res = runner.invoke(synth_app, ["chexpert", "--out", str(tmp_path / "c"), "--patients", "2", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c" / "CheXpert-v1.0-small" / "valid.csv").exists()


def test_top_level_cli_has_synth(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cxrfast.cli import app

    res = CliRunner().invoke(app, ["synth", "chexpert", "--out", str(tmp_path), "--patients", "1", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "CheXpert-v1.0-small" / "train.csv").exists()
