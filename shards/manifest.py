"""manifest.json (the one reader, `read_manifest`), atomic JSON writes, and the per-tar resume
records under `.progress/` (the output-folder guard is `cxrfast.shards.outdir`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cxrfast.shards.schema import MANIFEST, MANIFEST_FIELDS

log = logging.getLogger(__name__)

PROGRESS_DIR = ".progress"


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


def record_path(out: Path, tar: str) -> Path:
    return out / PROGRESS_DIR / (tar + ".json")


def file_id(path: Path) -> list[int]:
    """[size, inode, mtime_ns] of a file: equal ids mean the file was not replaced or rewritten
    (by anything that does not deliberately restore the mtime) since the id was taken."""
    st = os.stat(path)
    return [st.st_size, st.st_ino, st.st_mtime_ns]


def load_finished(out: Path, tar: str, plan_sha: str) -> dict | None:
    """The done-record of a tar if it is still valid: same planned rows, files present, size and
    sha256 match (the tar is re-hashed). The returned record's `file_id` is refreshed."""
    rp = record_path(out, tar)
    if not rp.exists():
        return None
    try:
        rec = json.loads(rp.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    if not isinstance(rec, dict) or rec.get("plan_sha") != plan_sha:
        return None
    if rec.get("samples", 0) == 0:
        return rec
    tar_p, idx_p = out / rec["tar"], out / rec["idx"]
    if not (tar_p.is_file() and idx_p.is_file()) or tar_p.stat().st_size != rec["bytes"]:
        return None
    before = file_id(tar_p)
    if file_sha256(tar_p) != rec["sha256"]:
        log.warning("%s does not match its recorded sha256; rewriting it", tar_p)
        return None
    rec["file_id"] = before
    return rec


def check_unchanged(out: Path, rec: dict) -> None:
    """Before a manifest vouches for the tar of done-record `rec`: the file must still be the one
    that was hashed (same `file_id`), or hash to the recorded sha256; ValueError otherwise."""
    if not rec.get("samples"):
        return
    tar_p = out / rec["tar"]
    try:
        if file_id(tar_p) == rec.get("file_id"):
            return
        actual = file_sha256(tar_p)
    except FileNotFoundError:
        raise ValueError(f"{tar_p} disappeared after it was written (is another process writing into {out}?)") from None
    if actual != rec["sha256"]:
        raise ValueError(
            f"{tar_p} changed after it was written and verified (sha256 {actual[:12]}..., expected "
            f"{rec['sha256'][:12]}...): is another process writing into {out}? Re-run to rewrite it"
        )
