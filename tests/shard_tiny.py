"""Tiny hand-built MIMIC-CXR-JPG / CheXpert trees for the sharding tests (no dependency on
`cxrfast.synth`): gradient images, the published CSV layouts, a reports zip."""

from __future__ import annotations

import gzip
import tarfile
import zipfile
from pathlib import Path

import cv2
import numpy as np

from cxrfast.shards.schema import LABEL_NAMES

REPORTS = [
    "FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n INDICATION: ___F with cough\n"
    " FINDINGS:\n The lungs are clear.\n No pleural effusion.\n IMPRESSION: No acute process.\n",
    "FINAL REPORT\n INDICATION: ___M, fever\n IMPRESSION:\n Mild cardiomegaly without edema.\n",
    "FINAL REPORT\n FINDINGS AND IMPRESSION: Left basilar opacity, possibly atelectasis.\n",
    "FINAL REPORT\n TECHNIQUE: AP portable\n FINDINGS: Stable support devices.\n Lines unchanged.\n",
]


def tar_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every tar in a shard folder: key -> {ext: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()  # type: ignore[union-attr]
    return samples


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    y = np.linspace(0, 255, h)[:, None]
    x = np.linspace(0, 80, w)[None, :]
    img = (y * 0.6 + x + rng.normal(0, 8, (h, w))).clip(0, 255).astype(np.uint8)
    return img


def _gz_csv(path: Path, header: list[str], rows: list[list]) -> None:
    text = ",".join(header) + "\n" + "".join(",".join("" if v is None else str(v) for v in r) + "\n" for r in rows)
    with gzip.open(path, "wt") as f:
        f.write(text)


def make_tiny_mimic(out: Path, *, studies: int = 6, seed: int = 0, size: tuple[int, int] = (600, 500), no_report: int = 1) -> dict:
    """`studies` studies of subjects 10000000+i, each a PA (or AP), a LATERAL and every third an
    extra AP image; labels alphabetical in chexpert.csv; the last `no_report` studies have no report."""
    rng = np.random.default_rng(seed)
    meta, split, labels = [], [], []
    zpath = out / "mimic-cxr-reports.zip"
    out.mkdir(parents=True, exist_ok=True)
    splits = ["train", "train", "train", "validate", "test"]
    with zipfile.ZipFile(zpath, "w") as zf:
        for i in range(studies):
            sid, st = 10000000 + i, 50000000 + i
            views = ["PA" if i % 2 == 0 else "AP", "LATERAL"] + (["AP"] if i % 3 == 0 else [])
            sp = splits[i % len(splits)]
            for j, v in enumerate(views):
                dicom = f"d{i:03d}{j}abc-{seed}"
                h, w = size if v != "LATERAL" else size[::-1]
                p = out / f"files/p{str(sid)[:2]}/p{sid}/s{st}/{dicom}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(p), _image(rng, h, w), [cv2.IMWRITE_JPEG_QUALITY, 90])
                meta.append([dicom, sid, st, "CHEST", v, h, w, 21800101, 120000.0, "", "", ""])
                split.append([dicom, st, sid, sp])
            # Label i: Cardiomegaly positive on even studies, Edema uncertain on odd, the rest blank.
            lab = {n: None for n in LABEL_NAMES}
            lab["Cardiomegaly"] = 1.0 if i % 2 == 0 else 0.0
            lab["Edema"] = -1.0 if i % 2 else None
            labels.append([sid, st] + [lab[n] for n in sorted(LABEL_NAMES)])
            if i < studies - no_report:
                zf.writestr(f"files/p{str(sid)[:2]}/p{sid}/s{st}.txt", REPORTS[i % len(REPORTS)])
    _gz_csv(
        out / "mimic-cxr-2.0.0-metadata.csv.gz",
        ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
         "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
         "PatientOrientationCodeSequence_CodeMeaning"],
        meta,
    )  # fmt: skip
    _gz_csv(out / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split)
    for name in ("chexpert", "negbio"):
        _gz_csv(out / f"mimic-cxr-2.0.0-{name}.csv.gz", ["subject_id", "study_id", *sorted(LABEL_NAMES)], labels)
    frontal = sum(1 for m in meta if m[4] in ("PA", "AP"))
    return {"images": len(meta), "frontal": frontal, "studies": studies}


def make_tiny_chexpert(parent: Path, *, patients: int = 8, seed: int = 0) -> Path:
    """`parent/CheXpert-v1.0-small/` with train.csv (patients x 1 study x frontal+lateral) and valid.csv."""
    rng = np.random.default_rng(seed)
    root = parent / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABEL_NAMES]
    for csv, folder, n, start in (("train.csv", "train", patients, 1), ("valid.csv", "valid", 2, 64541)):
        rows = []
        for k in range(n):
            pid = f"patient{start + k:05d}"
            for view, fl, appa in (("view1_frontal", "Frontal", "AP" if k % 2 else "PA"), ("view2_lateral", "Lateral", "")):
                rel = f"CheXpert-v1.0-small/{folder}/{pid}/study1/{view}.jpg"
                p = parent / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                h, w = (390, 320) if fl == "Frontal" else (320, 390)
                cv2.imwrite(str(p), _image(rng, h, w))
                labs = ["1.0" if (k + i) % 5 == 0 else ("-1.0" if (k + i) % 7 == 0 else "") for i in range(len(LABEL_NAMES))]
                rows.append([rel, "Female" if k % 2 else "Male", 40 + k, fl, appa, *labs])
        (root / csv).write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return root


def write_mrm_style_tokenizer(path: Path, texts: list[str], vocab_size: int = 400) -> Path:
    """A tokenizer.json laid out like MRM's published `mimic_wordpiece.json`: WordPiece with
    [PAD]=0 [UNK]=1 [CLS]=2 [MASK]=3 and no [SEP], Lowercase + NFKD + StripAccents, Whitespace +
    Digits pre-tokenizer, no post-processor (MRM writes "[CLS] " + report itself)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.NFKD(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits()])
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[MASK]"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.post_processor is None and tok.token_to_id("[SEP]") is None
    tok.save(str(path))
    return path


def tiny_mimic_raw(tmp_path: Path, **kw) -> Path:
    """`make_tiny_mimic` into `tmp_path/raw`; returns that folder."""
    raw = tmp_path / "raw"
    make_tiny_mimic(raw, **kw)
    return raw


def shard_tiny_mimic(raw: Path, out: Path, reports: Path | None = None, **kw):
    """`shard_mimic` of a tiny tree with small defaults (3 samples per tar, 1 worker, 200-token vocabulary)."""
    from cxrfast.shards.build import shard_mimic

    kw.setdefault("samples_per_tar", 3)
    kw.setdefault("workers", 1)
    kw.setdefault("vocab_size", 200)
    return shard_mimic(raw, reports or raw / "mimic-cxr-reports.zip", out, **kw)


#: NIH Data_Entry header as released (two names each span two columns; 2017: trailing comma).
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")  # fmt: skip
#: Finding Labels of the tiny NIH tree, cycled over its images.
NIH_FINDINGS = ["No Finding", "Effusion|Infiltration", "Cardiomegaly", "No Finding", "Pleural_Thickening|Hernia|Mass"]


def make_tiny_nih(root: Path, *, patients: int = 6, layout: str = "flat", seed: int = 0) -> dict:
    """An NIH ChestX-ray14 tree: 2 images per patient (PA then AP), 96x80 PNGs (the first image
    RGBA, the second RGB, the third 16-bit), Data_Entry_2017.csv with trailing commas, the last two
    patients in test_list.txt, one box on a test image. Returns {image name: Finding Labels}."""
    rng = np.random.default_rng(seed)
    lines, names, labels = [NIH_HEADER + ","], [], {}
    for p in range(1, patients + 1):
        for f in range(2):
            name = f"{p:08d}_{f:03d}.png"
            k = len(names)
            folder = root / ("images" if layout == "flat" else f"images_{k % 3 + 1:03d}/images")
            folder.mkdir(parents=True, exist_ok=True)
            img = _image(rng, 96, 80)
            if k == 0:
                img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGRA)
            elif k == 1:
                img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
            elif k == 2:
                img = img.astype(np.uint16) * 150 + 500
            cv2.imwrite(str(folder / name), img)
            labels[name] = NIH_FINDINGS[k % len(NIH_FINDINGS)]
            lines.append(f"{name},{labels[name]},{f},{p},{30 + p},{'MF'[p % 2]},{'PA' if f == 0 else 'AP'},2500,2048,0.143,0.143,")
            names.append(name)
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    test = names[-4:]
    (root / "train_val_list.txt").write_text("".join(n + "\n" for n in names[:-4]))
    (root / "test_list.txt").write_text("".join(n + "\n" for n in test))
    boxed = next(n for n in test if "Mass" in labels[n] or "Effusion" in labels[n] or "Cardiomegaly" in labels[n])
    finding = next(x for x in ("Mass", "Effusion", "Cardiomegaly") if x in labels[boxed])
    (root / "BBox_List_2017.csv").write_text(
        f"Image Index,Finding Label,Bbox [x,y,w,h],,,\n{boxed},{finding},10.5,20.25,30.0,40.0,,,\n"
    )
    return labels


#: RSNA label CSV rows of the tiny tree: patient index -> boxes (x, y, width, height); [] = negative.
RSNA_BOXES = {0: [(10.0, 12.0, 20.0, 30.0), (50.0, 14.0, 22.0, 28.0)], 1: [], 2: [(30.0, 30.0, 10.0, 12.0)], 3: []}
#: The tiny tree's encodings, cycled over its patients (see cxrfast.synth.rsna.ENCODINGS).
RSNA_ENCODINGS = ["jpeg8", "mono1_jpeg8", "window16", "voilut16"]


def rsna_patient_id(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-{i:012x}"


def make_tiny_rsna(root: Path, *, patients: int = 8, seed: int = 0) -> list[str]:
    """An RSNA stage-2 tree: 96x96 DICOMs (encodings cycling through RSNA_ENCODINGS), the label CSV
    with RSNA_BOXES cycled (several boxes for patient 0), the class CSV. Returns the patientIds."""
    from cxrfast.synth.rsna import encode_dicom, rsna_dataset

    rng = np.random.default_rng(seed)
    (root / "stage_2_train_images").mkdir(parents=True, exist_ok=True)
    labels, classes, ids = ["patientId,x,y,width,height,Target"], ["patientId,class"], []
    for i in range(patients):
        pid = rsna_patient_id(i)
        ids.append(pid)
        enc = RSNA_ENCODINGS[i % len(RSNA_ENCODINGS)]
        img = _image(rng, 96, 96)
        if enc.endswith("16"):
            img = img.astype(np.uint16) * 12 + 300
        ds = rsna_dataset(img, encoding=enc, patient_id=pid, view="PA" if i % 3 else "AP", sex="MF"[i % 2], age=20 + i)
        (root / "stage_2_train_images" / f"{pid}.dcm").write_bytes(encode_dicom(ds))
        boxes = RSNA_BOXES[i % len(RSNA_BOXES)]
        for b in boxes:
            labels.append(f"{pid},{b[0]},{b[1]},{b[2]},{b[3]},1")
            classes.append(f"{pid},Lung Opacity")
        if not boxes:
            labels.append(f"{pid},,,,,0")
            classes.append(f"{pid},{'Normal' if i % 2 else 'No Lung Opacity / Not Normal'}")
    (root / "stage_2_train_labels.csv").write_text("\n".join(labels) + "\n")
    (root / "stage_2_detailed_class_info.csv").write_text("\n".join(classes) + "\n")
    return ids
