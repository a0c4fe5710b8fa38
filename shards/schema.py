"""The shard format contract (DESIGN.md, "Shard format"), declared once.

The writer (`cxrfast.shards`), the DALI reader and the DataLoader reference
(`cxrfast.pipelines`) and `cxrfast inspect` all read these declarations; nothing else
spells a member name, a dtype or the label order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

#: 2: `KEY.json` gained "boxes"; labels.i8 holds as many codes as the manifest's label_names.
SHARD_FORMAT_VERSION = 2

#: CheXpert's 14 observations in CheXpert's order: the label order of MIMIC-CXR and CheXpert
#: shards. A shard folder's own order is its manifest's `label_names` (`ShardFolder.label_names`).
LABEL_NAMES: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
#: len(LABEL_NAMES): CheXpert's count, not every shard folder's (NIH has 14 others, RSNA one).
NUM_LABELS = len(LABEL_NAMES)

#: NIH ChestX-ray14's 14 findings in NIH's own order (the names of its `Finding Labels`).
NIH_LABEL_NAMES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
#: RSNA Pneumonia Detection: one label, `Target` (1 = lung opacity suspicious for pneumonia).
RSNA_LABEL_NAMES: tuple[str, ...] = ("Pneumonia",)
#: Each dataset's label order (the manifest's `label_names` of its shards).
DATASET_LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "mimic": LABEL_NAMES,
    "chexpert": LABEL_NAMES,
    "nih": NIH_LABEL_NAMES,
    "rsna": RSNA_LABEL_NAMES,
}


def label_names_for(dataset: str) -> tuple[str, ...]:
    """The label order of `dataset`'s shards; ValueError for an unknown dataset."""
    try:
        return DATASET_LABEL_NAMES[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASET_LABEL_NAMES)}") from None

#: Raw label codes stored in `labels.i8`.
POSITIVE, NEGATIVE, UNCERTAIN, NOT_MENTIONED = 1, 0, -1, -2

SPLITS: tuple[str, ...] = ("train", "validate", "test")


@dataclass(frozen=True, slots=True)
class Member:
    """One member of a sample: `KEY.{ext}` holding `dtype` values (None = opaque bytes)."""

    ext: str
    dtype: np.dtype | None
    required: bool
    doc: str


MEMBERS: tuple[Member, ...] = (
    Member("jpg", None, True, "8-bit single-channel JPEG, long side <= max_size"),
    Member("labels.i8", np.dtype("<i1"), True, "one int8 label code per manifest label_names entry, in that order"),
    Member("ids.i32", np.dtype("<i4"), False, "token ids of findings + impression: [CLS] ... [SEP] (no [SEP] "
           "when the tokenizer has none), no padding"),
    Member("txt", None, False, "the findings + impression text ids.i32 was made from (UTF-8)"),
    Member("report.ids.i32", np.dtype("<i4"), False, "token ids of the whole report, same rules as ids.i32"),
    Member("report.txt", None, False, "the whole report, whitespace collapsed, report.ids.i32 was made from"),
    Member("mgca.ids.i32", np.dtype("<i4"), False, "token ids of MGCA's caption, same rules as ids.i32; absent "
           "when the caption is (fewer than 3 words)"),
    Member("mgca.txt", None, False, "MGCA's caption mgca.ids.i32 was made from (`shards.reports.mgca_caption`)"),
    Member("json", None, True, "sample metadata (UTF-8 JSON), see METADATA_FIELDS"),
)
MEMBER_BY_EXT: dict[str, Member] = {m.ext: m for m in MEMBERS}
REQUIRED_EXTS: tuple[str, ...] = tuple(m.ext for m in MEMBERS if m.required)


@dataclass(frozen=True, slots=True)
class ReportText:
    """One tokenized text of a report: its ids member and the text member it was made from."""

    ids: str
    txt: str
    doc: str
    #: a sample with a report may lack this text (its rule leaves the study out); a loader then gives
    #: it no tokens (all padding, attention mask 0)
    optional: bool = False


#: The report texts a sample may carry (all the required ones, or none), by the name
#: `build_loader(text=...)` takes.
TEXTS: dict[str, ReportText] = {
    "findings_impression": ReportText("ids.i32", "txt", "findings + impression (either alone when only one "
                                      "exists)"),
    "report": ReportText("report.ids.i32", "report.txt", "the whole report, headers included: MRM's text "
                         "(its training.csv report_content)"),
    "mgca_caption": ReportText("mgca.ids.i32", "mgca.txt", "MGCA's caption: impression + findings as lower-case "
                               "words, one-word sentences dropped; absent below 3 words "
                               "(mgca/datasets/pretrain_dataset.py)", optional=True),
}
DEFAULT_TEXT = "findings_impression"

#: Special tokens a report tokenizer must have ({name: id} in the manifest's "special_ids"). "sep" is
#: optional: MRM's published tokenizer (`mimic_wordpiece.json`: [PAD] [UNK] [CLS] [MASK], no
#: post-processor) has no [SEP]; MRM prefixes each report with "[CLS] " (pretrain_datasets.py:59),
#: so its sequences end without [SEP] and truncation just cuts.
REQUIRED_SPECIAL: tuple[str, ...] = ("pad", "unk", "cls", "mask")

#: Keys of `KEY.json`.
METADATA_FIELDS: tuple[str, ...] = (
    "dataset",  # "mimic" | "chexpert" | "nih" | "rsna"
    "subject_id",  # MIMIC subject_id / CheXpert patient id / NIH Patient ID / RSNA patientId, as a string
    "study_id",  # MIMIC study_id / CheXpert "patientN_studyM" / NIH Follow-up # / RSNA ""
    "image_id",  # MIMIC dicom_id / CheXpert "view1_frontal" / NIH Image Index without .png / RSNA patientId
    "view",  # PA, AP, LATERAL, LL, ... ("" when unknown)
    "split",
    "sex",  # "" when unknown
    "age",  # int or None
    "orig_width",
    "orig_height",
    "source_path",  # path relative to the dataset root
    "report_sections",  # {section name: text}; {} when there is no report
    "boxes",  # [{"label", "x", "y", "width", "height"}] in original pixels (NIH BBox list, RSNA); [] when none
)
#: Keys of each entry of `KEY.json`'s "boxes" (label: one of the manifest's label_names).
BOX_FIELDS: tuple[str, ...] = ("label", "x", "y", "width", "height")

#: Fixed tar member mtime, so that a rebuild is byte-identical.
TAR_MTIME = 0.0

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def tar_name(split: str, index: int) -> str:
    """`train-000003.tar`"""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return f"{split}-{index:06d}.tar"


def idx_name(tar: str) -> str:
    """The DALI index file next to a tar: `train-000003.idx`."""
    if not tar.endswith(".tar"):
        raise ValueError(f"not a tar name: {tar!r}")
    return tar[: -len(".tar")] + ".idx"


def check_key(key: str) -> str:
    """Keys are the text before the first dot of a member name: no dots, no slashes."""
    if not _KEY_RE.match(key):
        raise ValueError(f"invalid sample key {key!r}: only letters, digits, '_' and '-' are allowed")
    return key


def chexpert_key(path: str) -> str:
    """`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg` -> `patient00001_study1_view1_frontal`."""
    parts = path.replace("\\", "/").split("/")
    if len(parts) < 3 or not parts[-1].endswith(".jpg"):
        raise ValueError(f"unexpected CheXpert Path {path!r}: expected .../patientN/studyM/viewK_frontal.jpg")
    patient, study, view = parts[-3], parts[-2], parts[-1][: -len(".jpg")]
    return check_key(f"{patient}_{study}_{view}")


def labels_to_bytes(values: np.ndarray, num_labels: int | None = None) -> bytes:
    """Label codes (one per label name, in the manifest's order) -> the `labels.i8` payload.
    With `num_labels`, the vector must have exactly that many codes."""
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0 or (num_labels is not None and arr.shape != (num_labels,)):
        want = f"{num_labels}" if num_labels is not None else "a non-empty vector of"
        raise ValueError(f"expected {want} labels, got shape {arr.shape}")
    if not np.isin(arr, (POSITIVE, NEGATIVE, UNCERTAIN, NOT_MENTIONED)).all():
        raise ValueError(f"label codes must be in {{1, 0, -1, -2}}, got {arr.tolist()}")
    return arr.astype(MEMBER_BY_EXT["labels.i8"].dtype).tobytes()


def ids_to_bytes(ids: np.ndarray | list[int]) -> bytes:
    """Token ids -> the `ids.i32` payload (little-endian int32)."""
    return np.asarray(ids, dtype=MEMBER_BY_EXT["ids.i32"].dtype).tobytes()


def decode_member(ext: str, payload: bytes) -> np.ndarray | bytes:
    """Inverse of the writers above for typed members; opaque members come back as bytes."""
    dtype = MEMBER_BY_EXT[ext].dtype
    return payload if dtype is None else np.frombuffer(payload, dtype=dtype)


# --- manifest.json ---------------------------------------------------------------------
#: Top-level keys of manifest.json. "splits" maps split -> list of
#: {"tar": name, "idx": name, "samples": int, "bytes": int, "sha256": hex};
#: "tokenizer" is {"file": "tokenizer.json", "vocab_size": int, "special_ids": {"pad","unk","cls","mask"[,"sep"]},
#: "texts": names in TEXTS the samples carry (absent in older folders: findings_impression only)};
#: "skipped" maps reason -> count; "pixel_stats" is {"mean": float, "std": float} on the 0..1 scale.
MANIFEST_FIELDS: tuple[str, ...] = (
    "format_version",
    "dataset",
    "cxrfast_version",
    "created_with",  # the creation parameters (CLI options) as a dict
    "label_names",
    "splits",
    "counts",  # {"rows_in": int, "samples_out": int, "skipped": int, "without_report": int}
    "skipped",
    "tokenizer",
    "pixel_stats",
    "sample_table",  # {"file": "samples.parquet", "rows": int, "sha256": hex}
)
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SKIPPED = "skipped.jsonl"
SAMPLE_TABLE = "samples.parquet"
#: The fixed leading columns of the sample table (then one Int8 column per label name).
SAMPLE_TABLE_COLUMNS: tuple[str, ...] = (
    "key", "split", "tar", "subject_id", "study_id", "image_id", "view", "sex", "age",
)  # fmt: skip
