"""manifest.json (the one reader, `read_manifest`), the output-folder guard (refuse another dataset's
folder), resume records."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cxrfast.shards.schema import MANIFEST, MANIFEST_FIELDS, SAMPLE_TABLE, SKIPPED, TOKENIZER

log = logging.getLogger(__name__)

PROGRESS_DIR = ".progress"
PARAMS_FILE = "params.json"
_OUR_FILE = re.compile(r"^(train|validate|test)-\d{6}\.(tar|idx)(\.tmp)?$")


def read_manifest(root: Path, *, required: Iterable[str] = MANIFEST_FIELDS) -> dict[str, Any]:
    """The parsed `root/manifest.json`; the single reader of that file.

    Raises FileNotFoundError when the folder has no manifest (not a shard folder, or sharding did
    not finish) and ValueError naming the file when it is not a JSON object or lacks any of the
    `required` top-level keys (default: all of schema.MANIFEST_FIELDS; callers that read only a
    few keys pass those).
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} has no {MANIFEST}: not a shard folder, or sharding did not finish "
            "(run `cxrfast shard mimic|chexpert --out` on it)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise ValueError(f"{path}: missing keys {missing} (see MANIFEST_FIELDS in shards/schema.py)")
    return manifest


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path.tmp`, then rename: never a partial file under the final name."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def params_digest(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _clean(out: Path) -> None:
    for p in out.iterdir():
        if p.name == PROGRESS_DIR:
            shutil.rmtree(p)
        elif p.name in (MANIFEST, TOKENIZER, SKIPPED, SAMPLE_TABLE) or _OUR_FILE.match(p.name) or p.name.endswith(".json.tmp"):
            p.unlink()


def prepare_output(out: Path, dataset: str, params: dict, *, overwrite: bool) -> None:
    """Make `out` ready: refuse a folder holding another dataset's (or other parameters') shards
    unless `overwrite` (which deletes our files there); keep a same-parameter run's progress."""
    out.mkdir(parents=True, exist_ok=True)
    reasons = []
    man = out / MANIFEST
    if man.exists():
        try:
            m = read_manifest(out, required=())
            if m.get("dataset") != dataset:
                reasons.append(f"{man} is a manifest of dataset {m.get('dataset')!r}, not {dataset!r}")
            elif m.get("created_with") != params:
                diff = sorted(k for k in set(params) | set(m.get("created_with") or {}) if params.get(k) != (m.get("created_with") or {}).get(k))
                reasons.append(f"{man} was created with different parameters ({', '.join(diff)})")
        except (ValueError, OSError) as e:
            reasons.append(f"{man} is unreadable ({e})")
    prog = out / PROGRESS_DIR / PARAMS_FILE
    if prog.exists() and not man.exists():
        try:
            p = json.loads(prog.read_text())
            if p != {"dataset": dataset, "params": params}:
                reasons.append(f"{out} holds an unfinished run of {p.get('dataset')!r} with other parameters")
        except (json.JSONDecodeError, OSError) as e:
            reasons.append(f"{prog} is unreadable ({e})")
    if reasons:
        if not overwrite:
            raise ValueError("refusing to write into " + str(out) + ": " + "; ".join(reasons) + " (use --overwrite)")
        log.warning("--overwrite: deleting the shards in %s (%s)", out, "; ".join(reasons))
        _clean(out)
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    write_json_atomic(prog, {"dataset": dataset, "params": params})


def record_path(out: Path, tar: str) -> Path:
    return out / PROGRESS_DIR / (tar + ".json")


def load_finished(out: Path, tar: str, plan_sha: str) -> dict | None:
    """The done-record of a tar if it is still valid: same planned rows, files present, sha256 matches."""
    rp = record_path(out, tar)
    if not rp.exists():
        return None
    try:
        rec = json.loads(rp.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    if rec.get("plan_sha") != plan_sha:
        return None
    if rec.get("samples", 0) == 0:
        return rec
    tar_p, idx_p = out / rec["tar"], out / rec["idx"]
    if not (tar_p.is_file() and idx_p.is_file()) or tar_p.stat().st_size != rec["bytes"]:
        return None
    if file_sha256(tar_p) != rec["sha256"]:
        log.warning("%s does not match its recorded sha256; rewriting it", tar_p)
        return None
    return rec


def remove_stale(out: Path, keep: set[str]) -> None:
    """Delete tars/idx files (and temporaries) of ours that the manifest does not list."""
    for p in out.iterdir():
        if _OUR_FILE.match(p.name) and p.name not in keep:
            p.unlink()
