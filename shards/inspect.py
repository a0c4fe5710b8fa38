"""`cxrfast inspect DIR`: verify a shard folder against its manifest and the shard contract,
summarise it, and draw a contact sheet of random samples."""

from __future__ import annotations

import json
import math
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrfast.progress import progress
from cxrfast.shards.folder import ShardFolder
from cxrfast.shards.lock import lock_holder
from cxrfast.shards.manifest import file_sha256, read_manifest
from cxrfast.shards.schema import (
    BOX_FIELDS,
    DATASET_LABEL_NAMES,
    DEFAULT_TEXT,
    LABEL_NAMES,
    MANIFEST,
    MANIFEST_FIELDS,
    MEMBER_BY_EXT,
    METADATA_FIELDS,
    REQUIRED_EXTS,
    SKIPPED,
    SPLITS,
    TEXTS,
    decode_member,
    idx_name,
)
from cxrfast.shards.tarwriter import index_from_tar

_CODES = {1: "pos", 0: "neg", -1: "unc", -2: "missing"}
_ENTRY_KEYS = ("tar", "idx", "samples", "bytes", "sha256")


@dataclass
class InspectReport:
    """Everything `inspect` found: problems (empty when consistent) and statistics."""

    root: Path
    label_names: tuple[str, ...] = LABEL_NAMES  # the manifest's, in labels.i8 order
    problems: list[str] = field(default_factory=list)
    per_split: dict[str, int] = field(default_factory=dict)
    prevalence: dict[str, Counter] = field(default_factory=dict)
    report_words: list[int] = field(default_factory=list)
    token_lengths: list[int] = field(default_factory=list)
    without_report: int = 0
    #: (key, jpg, labels, boxes as fractions of the image: x, y, width, height)
    sheet_samples: list[tuple[str, bytes, np.ndarray, list[tuple[float, float, float, float]]]] = field(
        default_factory=list, repr=False
    )
    sheet: Path | None = None  # where write_contact_sheet drew them

    def text(self) -> str:
        lines = [f"shards: {self.root}"]
        lines.append("samples per split: " + ", ".join(f"{k} {v}" for k, v in self.per_split.items()))
        lines.append(f"{'label':28s} {'pos':>7s} {'neg':>7s} {'unc':>7s} {'missing':>8s}")
        for name in self.label_names:
            c = self.prevalence.get(name, Counter())
            lines.append(f"{name:28s} {c['pos']:7d} {c['neg']:7d} {c['unc']:7d} {c['missing']:8d}")
        for what, vals in (("report words", self.report_words), ("report tokens", self.token_lengths)):
            if vals:
                a = np.asarray(vals)
                lines.append(
                    f"{what}: n={a.size} min={a.min()} median={np.median(a):.0f} mean={a.mean():.1f} "
                    f"p95={np.percentile(a, 95):.0f} max={a.max()}"
                )
        lines.append(f"samples without report: {self.without_report}")
        return "\n".join(lines)


def _carried_texts(members: dict[str, bytes], tok: dict) -> list[str]:
    """The report texts to check in a sample: those it has, and when it has a report, every required
    text the manifest says the samples carry."""
    has_report = any(t.ids in members or t.txt in members for t in TEXTS.values())
    promised = tok.get("texts") or [DEFAULT_TEXT]
    return [n for n, t in TEXTS.items()
            if t.ids in members or t.txt in members or (has_report and n in promised and not t.optional)]


def _check_text(key: str, name: str, members: dict[str, bytes], tok: dict, rep: InspectReport, where: str) -> None:
    """One report text of a sample: ids and text together, [CLS] first, [SEP] last (when the tokenizer
    has one), ids inside the vocabulary."""
    p, t = rep.problems, TEXTS[name]
    if (t.ids in members) != (t.txt in members):
        have, lack = (t.ids, t.txt) if t.ids in members else (t.txt, t.ids)
        p.append(f"{where}: {key} has {have} without {lack}")
        return
    if t.ids not in members:
        p.append(f"{where}: {key} has a report but no {name!r} text ({t.ids}), which the manifest lists")
        return
    if len(members[t.ids]) % 4:
        p.append(f"{where}: {key}.{t.ids} is {len(members[t.ids])} bytes, not a multiple of 4")
        return
    ids = decode_member(t.ids, members[t.ids])
    sp = tok.get("special_ids", {})
    if not tok:
        p.append(f"{where}: {key} has {t.ids} but the manifest has no tokenizer")
    elif ids.size < 1 or ids[0] != sp.get("cls") or ("sep" in sp and (ids.size < 2 or ids[-1] != sp["sep"])):
        p.append(f"{where}: {key}.{t.ids} does not start with [CLS]" + (" and end with [SEP]" if "sep" in sp else ""))
    elif isinstance(tok.get("vocab_size"), int) and (ids.min() < 0 or ids.max() >= tok["vocab_size"]):
        p.append(f"{where}: {key}.{t.ids} holds ids outside [0, {tok['vocab_size']})")
    if name == DEFAULT_TEXT:
        rep.token_lengths.append(int(ids.size))
        rep.report_words.append(len(members[t.txt].decode("utf-8", errors="replace").split()))


def _check_sample(key: str, members: dict[str, bytes], split: str, manifest: dict, rep: InspectReport, where: str) -> None:
    import cv2

    p = rep.problems
    missing = [e for e in REQUIRED_EXTS if e not in members]
    if missing:
        p.append(f"{where}: sample {key} lacks members {missing}")
    unknown = [e for e in members if e not in MEMBER_BY_EXT]
    if unknown:
        p.append(f"{where}: sample {key} has unknown members {unknown}")
    if "labels.i8" in members:
        lab = decode_member("labels.i8", members["labels.i8"])
        n = len(rep.label_names)
        if lab.shape != (n,):
            p.append(f"{where}: {key}.labels.i8 holds {lab.shape[0]} values, expected {n} (the manifest's label_names)")
        elif not np.isin(lab, list(_CODES)).all():
            p.append(f"{where}: {key}.labels.i8 holds invalid codes {lab.tolist()}")
        else:
            for name, v in zip(rep.label_names, lab.tolist(), strict=True):
                rep.prevalence.setdefault(name, Counter())[_CODES[v]] += 1
    tok = manifest.get("tokenizer") or {}
    for name in _carried_texts(members, tok):
        _check_text(key, name, members, tok, rep, where)
    if TEXTS[DEFAULT_TEXT].ids not in members:
        rep.without_report += 1
    if "json" in members:
        try:
            meta = json.loads(members["json"])
            if tuple(meta) != METADATA_FIELDS:
                p.append(f"{where}: {key}.json has fields {list(meta)}, expected {list(METADATA_FIELDS)}")
            elif meta["split"] != split:
                p.append(f"{where}: {key}.json says split {meta['split']!r}, the tar is in {split!r}")
            else:
                _check_boxes(meta["boxes"], rep, f"{where}: {key}.json")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            p.append(f"{where}: {key}.json is not valid JSON ({e})")
    if "jpg" in members:
        img = cv2.imdecode(np.frombuffer(members["jpg"], np.uint8), cv2.IMREAD_UNCHANGED)
        max_size = (manifest.get("created_with") or {}).get("max_size")
        if img is None or img.ndim != 2:
            p.append(f"{where}: {key}.jpg is not a decodable single-channel JPEG")
        elif max_size and max(img.shape) > max_size:
            p.append(f"{where}: {key}.jpg is {img.shape[1]}x{img.shape[0]}, long side above max_size {max_size}")


def _check_boxes(boxes: object, rep: InspectReport, where: str) -> None:
    """Boxes are a list of {label, x, y, width, height}: a label name, finite numbers, positive sizes."""
    if not isinstance(boxes, list):
        rep.problems.append(f"{where}: boxes is a {type(boxes).__name__}, expected a list")
        return
    for b in boxes:
        ok = isinstance(b, dict) and tuple(b) == BOX_FIELDS and b["label"] in rep.label_names
        ok = ok and all(isinstance(b[k], int | float) and math.isfinite(b[k]) for k in BOX_FIELDS[1:])
        if not ok or b["width"] <= 0 or b["height"] <= 0:
            rep.problems.append(f"{where}: box {b} is not {{label: one of label_names, x, y, width > 0, height > 0}}")
            return


def _read_samples(tar_path: Path):
    """Yield (key, {ext: bytes}) in tar order; a key seen again later is yielded again."""
    key, members = None, {}
    with tarfile.open(tar_path, mode="r:") as tf:
        for m in tf:
            if not m.isreg():
                continue
            name = m.name.rsplit("/", 1)[-1]
            k, _, ext = name.partition(".")
            if k != key and key is not None:
                yield key, members
                members = {}
            key = k
            f = tf.extractfile(m)
            assert f is not None
            members[ext] = f.read()
    if key is not None:
        yield key, members


def _entries(manifest: dict, man_p: Path, p: list[str]) -> list[tuple[str, dict]]:
    """(split, entry) for each tar entry of the manifest that names a tar; a malformed entry is a problem."""
    splits = manifest.get("splits")
    if splits is None:
        return []
    if not isinstance(splits, dict):
        p.append(f"{man_p}: 'splits' is a {type(splits).__name__}, expected split -> list of tars")
        return []
    out = []
    for split, entries in splits.items():
        if split not in SPLITS:
            p.append(f"{man_p}: unknown split {split!r}")
        if not isinstance(entries, list):
            p.append(f"{man_p}: splits[{split!r}] is a {type(entries).__name__}, expected a list of tars")
            continue
        for i, t in enumerate(entries):
            lacking = [k for k in _ENTRY_KEYS if not isinstance(t, dict) or k not in t]
            if lacking:
                p.append(f"{man_p}: splits[{split!r}][{i}] lacks {lacking}")
            if isinstance(t, dict) and isinstance(t.get("tar"), str):
                out.append((split, t))
    return out


def _check_tokenizer(folder: ShardFolder, p: list[str]) -> None:
    tok = folder.manifest.get("tokenizer")
    if not tok:
        return
    try:
        path = folder.tokenizer_path
        from tokenizers import Tokenizer

        size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
        if size != tok["vocab_size"]:
            p.append(f"{path}: vocabulary of {size} tokens, the manifest says {tok['vocab_size']}")
    except (ValueError, OSError, KeyError) as e:  # tokenizers raises Exception subclasses for bad files
        p.append(f"tokenizer: {e}")
    except Exception as e:  # noqa: BLE001 (tokenizers' parse error type is not exported)
        p.append(f"{folder.root / str(tok.get('file'))}: not a readable tokenizer ({e})")


def _check_sample_table(folder: ShardFolder, tar_keys: dict[str, tuple[str, list[str]]], p: list[str]) -> None:
    """The sample table against the manifest (rows, sha256) and the tars (keys in tar order, split)."""
    import polars as pl

    entry = folder.manifest.get("sample_table")
    if not entry:
        return  # listed by the missing-keys check
    try:
        table = folder.sample_table()
    except (ValueError, OSError, KeyError, pl.exceptions.PolarsError) as e:
        p.append(f"sample table: {e}")
        return
    path = folder.root / entry["file"]
    if "sha256" in entry and file_sha256(path) != entry["sha256"]:
        p.append(f"{path}: sha256 differs from the manifest")
    by_tar = {t: (sub["key"].to_list(), set(sub["split"].to_list())) for (t,), sub in table.group_by("tar", maintain_order=True)}
    for tar, (split, keys) in tar_keys.items():
        got, splits = by_tar.pop(tar, ([], set()))
        if got != keys:
            p.append(f"{path}: rows of {tar} do not match the tar's samples ({len(got)} rows, {len(keys)} samples, or another order)")
        elif splits and splits != {split}:
            p.append(f"{path}: rows of {tar} have split {sorted(splits)}, the tar is in {split!r}")
    for tar in by_tar:
        p.append(f"{path}: rows name {tar}, which the manifest does not list")


def inspect_shards(root: Path, *, samples: int = 16, seed: int = 0) -> InspectReport:
    """Verify `root` (sha256, idx, members, labels, counts, tokenizer, sample table) and gather
    statistics and `samples` random samples for the contact sheet (`write_contact_sheet`).
    Every problem is listed, a damaged manifest included; ValueError only when there is no
    readable manifest at all."""
    root = Path(root)
    man_p = root / MANIFEST
    try:
        folder = ShardFolder(root, read_manifest(root, required=()))  # missing keys are listed as problems below
    except FileNotFoundError as e:
        holder = lock_holder(root)
        if holder is not None:
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
            raise ValueError(f"{root} is being written by a cxrfast shard run ({who}); inspect it when it has finished") from None
        raise ValueError(str(e)) from None  # the CLI reports a ValueError as "error: ..." (exit 2)
    manifest = folder.manifest
    names = manifest.get("label_names")
    rep = InspectReport(root, label_names=tuple(names) if isinstance(names, list) and names else LABEL_NAMES)
    p = rep.problems
    lacking = [k for k in MANIFEST_FIELDS if k not in manifest]
    if lacking:
        p.append(f"{man_p}: missing keys {lacking}")
    expected = DATASET_LABEL_NAMES.get(str(manifest.get("dataset")))
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        p.append(f"{man_p}: label_names is {names!r}, expected a non-empty list of names")
    elif expected is not None and tuple(names) != expected:
        p.append(f"{man_p}: label_names {names} differ from dataset {manifest.get('dataset')!r}'s order {list(expected)}")
    _check_tokenizer(folder, p)
    rng = np.random.default_rng(seed)
    reservoir = rep.sheet_samples
    seen_keys: dict[str, str] = {}
    tar_keys: dict[str, tuple[str, list[str]]] = {}
    n_seen = 0
    tars = _entries(manifest, man_p, p)
    with progress("inspect", len(tars), "tar") as bar:
        for split, t in tars:
            bar.update(1)
            tar_p = root / t["tar"]
            if not tar_p.is_file():
                p.append(f"{tar_p} is listed in the manifest but missing")
                continue
            if "bytes" in t and tar_p.stat().st_size != t["bytes"]:
                p.append(f"{tar_p}: {tar_p.stat().st_size} bytes, manifest says {t['bytes']}")
            if "sha256" in t and file_sha256(tar_p) != t["sha256"]:
                p.append(f"{tar_p}: sha256 differs from the manifest")
            try:
                derived = index_from_tar(tar_p)
            except tarfile.TarError as e:
                p.append(f"{tar_p}: unreadable tar ({e})")
                continue
            idx_p = root / str(t.get("idx") or idx_name(t["tar"]))
            if not idx_p.is_file():
                p.append(f"{idx_p} is missing")
            elif idx_p.read_text() != derived:
                p.append(f"{idx_p} does not match its tar (re-derived index differs)")
            keys = tar_keys.setdefault(t["tar"], (split, []))[1]
            try:
                for key, members in _read_samples(tar_p):
                    keys.append(key)
                    if key in seen_keys:
                        p.append(f"{tar_p.name}: sample {key} also appears in {seen_keys[key]}")
                    seen_keys[key] = tar_p.name
                    _check_sample(key, members, split, manifest, rep, tar_p.name)
                    if samples > 0 and "jpg" in members and "labels.i8" in members:
                        n_seen += 1
                        item = (key, members["jpg"], np.frombuffer(members["labels.i8"], np.int8), _relative_boxes(members))
                        if len(reservoir) < samples:
                            reservoir.append(item)
                        else:
                            j = int(rng.integers(n_seen))
                            if j < samples:
                                reservoir[j] = item
            except (tarfile.TarError, OSError) as e:
                p.append(f"{tar_p}: unreadable tar ({e})")
            if "samples" in t and len(keys) != t["samples"]:
                p.append(f"{tar_p.name}: {len(keys)} samples, manifest says {t['samples']}")
            rep.per_split[split] = rep.per_split.get(split, 0) + len(keys)
    _check_sample_table(folder, tar_keys, p)
    counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
    total = sum(rep.per_split.values())
    if counts.get("samples_out") != total:
        p.append(f"manifest counts.samples_out = {counts.get('samples_out')}, the tars hold {total}")
    if counts.get("rows_in") != (counts.get("samples_out") or 0) + (counts.get("skipped") or 0):
        p.append(f"manifest counts: rows_in {counts.get('rows_in')} != samples_out + skipped")
    if counts.get("without_report") is not None and manifest.get("tokenizer") and counts["without_report"] != rep.without_report:
        p.append(f"manifest counts.without_report = {counts['without_report']}, the tars hold {rep.without_report}")
    _check_skipped_file(root, manifest, counts, p)
    return rep


def _check_skipped_file(root: Path, manifest: dict, counts: dict, p: list[str]) -> None:
    sk_p = root / SKIPPED
    if not sk_p.is_file():
        if counts.get("skipped"):
            p.append(f"{sk_p} is missing but the manifest counts {counts['skipped']} skipped rows")
        return
    try:
        lines = [json.loads(line) for line in sk_p.read_text().splitlines() if line.strip()]
    except (ValueError, OSError) as e:
        p.append(f"{sk_p}: unreadable ({e})")
        return
    reasons = dict(Counter(s.get("reason") for s in lines if isinstance(s, dict)))
    if len(lines) != counts.get("skipped"):
        p.append(f"{sk_p}: {len(lines)} rows, manifest counts.skipped = {counts.get('skipped')}")
    if reasons != (manifest.get("skipped") or {}):
        p.append(f"{sk_p}: reasons {reasons} differ from the manifest's {manifest.get('skipped')}")
    for s in lines:
        if not isinstance(s, dict) or not {"key", "path", "reason", "detail"} <= set(s):
            p.append(f"{sk_p}: row {s} lacks key/path/reason/detail")
            break


def write_contact_sheet(rep: InspectReport, path: Path) -> Path | None:
    """Draw `rep`'s sampled samples at `path` (None when there are none); OSError when it cannot be written."""
    if not rep.sheet_samples:
        return None
    rep.sheet = contact_sheet(rep.sheet_samples, path, rep.label_names)
    return rep.sheet


def _abbrev(name: str) -> str:
    return "".join(w[0] for w in name.split()) if " " in name else name[:5]


def _relative_boxes(members: dict[str, bytes]) -> list[tuple[float, float, float, float]]:
    """The sample's boxes as fractions of the original image (x, y, width, height); [] when the
    JSON has none or is unusable (reported elsewhere)."""
    try:
        meta = json.loads(members.get("json", b"{}"))
        w, h = float(meta["orig_width"]), float(meta["orig_height"])
        return [(b["x"] / w, b["y"] / h, b["width"] / w, b["height"] / h) for b in meta.get("boxes") or []]
    except (ValueError, KeyError, TypeError, ZeroDivisionError):
        return []


def contact_sheet(
    items: list[tuple[str, bytes, np.ndarray, list[tuple[float, float, float, float]]]],
    path: Path,
    label_names: Sequence[str] = LABEL_NAMES,
) -> Path:
    """A grid of (key, jpg, labels, boxes): each image titled with its key and its positive (+) and
    uncertain (?) labels (`label_names`: the labels' names, in order), its boxes (fractions of the
    image: x, y, width, height) outlined."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (key, jpg, labels, boxes) in zip(axes.ravel(), sorted(items, key=lambda x: x[0]), strict=False):
        img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_GRAYSCALE)
        if img is not None:
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            h, w = img.shape
            for bx, by, bw, bh in boxes:
                ax.add_patch(Rectangle((bx * w, by * h), bw * w, bh * h, fill=False, edgecolor="red", linewidth=1))
        if len(labels) != len(label_names):  # reported as a problem already
            labels = np.zeros(len(label_names), np.int8)
        pos = [_abbrev(n) + "+" for n, v in zip(label_names, labels.tolist(), strict=True) if v == 1]
        unc = [_abbrev(n) + "?" for n, v in zip(label_names, labels.tolist(), strict=True) if v == -1]
        ax.set_title(f"{key[:28]}\n{' '.join(pos + unc) or '-'}", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path
