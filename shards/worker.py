"""What one worker process does: write one whole tar (+ DALI index) from its planned rows.

Runs in worker processes forked from a forkserver (see `cxrfast.shards.pool`); imports no polars.
Per-process caches hold the report store and the tokenizer so they are opened once per worker.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrfast.shards.images import ImageError, encode_jpeg, load_resize
from cxrfast.shards.inputs import source_file
from cxrfast.shards.manifest import record_path, write_json_atomic
from cxrfast.shards.pixel_stats import PixelHistogram
from cxrfast.shards.reports import ReportStore, parse_report
from cxrfast.shards.schema import (
    DEFAULT_TEXT,
    METADATA_FIELDS,
    TEXTS,
    ids_to_bytes,
    idx_name,
    labels_to_bytes,
)
from cxrfast.shards.tarwriter import IndexedTarWriter

_REPORTS: dict[Path, ReportStore] = {}
_TOKENIZERS: dict[Path, Any] = {}


@dataclass(frozen=True)
class TarTask:
    """Everything a worker needs to write one tar; `rows` are dicts with ROW_COLUMNS."""

    dataset: str
    root: Path
    out: Path
    tar: str
    split: str
    plan_sha: str
    rows: list[dict]
    max_size: int
    quality: int
    image_ext: str = "jpg"
    reports: Path | None = None
    tokenizer: Path | None = None


_WARM = False


def warmup() -> None:
    """Once per process (in the forkserver before it forks workers, again harmlessly in a worker
    forked from a server that did not preload us): one OpenCV thread per process -- the workers
    are the parallelism, OpenCV's own pool would oversubscribe the cores -- and the per-image
    numba loop loaded from numba's cache. The 16-bit windowing loops load on first use."""
    global _WARM
    if _WARM:
        return
    import cv2

    cv2.setNumThreads(1)
    PixelHistogram().add(np.zeros((4, 4), np.uint8))
    _WARM = True


def ready() -> int:
    """A no-op task (its submission starts a worker process early); returns the worker's pid."""
    warmup()
    return os.getpid()


def _tokenizer(path: Path):
    if path not in _TOKENIZERS:
        from tokenizers import Tokenizer

        _TOKENIZERS[path] = Tokenizer.from_file(str(path))
    return _TOKENIZERS[path]


def _reports(path: Path) -> ReportStore:
    if path not in _REPORTS:
        _REPORTS[path] = ReportStore(path)
    return _REPORTS[path]


def write_tar(task: TarTask) -> dict:
    """Write `task.tar` and its index; return (and save under .progress/) the tar's done-record."""
    warmup()
    t0, t_wall = time.perf_counter(), time.time()
    writer = IndexedTarWriter(task.out / task.tar, task.out / idx_name(task.tar))
    hist = PixelHistogram()
    skipped: list[dict] = []
    without_report = 0
    tokens = 0
    reports = _reports(task.reports) if task.reports is not None else None
    tok = _tokenizer(task.tokenizer) if task.tokenizer is not None else None
    try:
        for row in task.rows:
            path, rel, _ = source_file(task.root, row["source_path"], task.image_ext)
            try:
                dec = load_resize(path, task.max_size)
            except ImageError as e:
                skipped.append({"key": row["key"], "path": rel, "reason": e.reason, "detail": e.detail})
                continue
            hist.add(dec.image)
            members = {
                "jpg": encode_jpeg(dec.image, task.quality),
                "labels.i8": labels_to_bytes(np.asarray(row["labels"], dtype=np.int8)),
            }
            sections: dict[str, str] = {}
            if reports is not None:
                rep = parse_report(reports.read(row["subject_id"], row["study_id"]))
                if rep is None:
                    without_report += 1
                else:
                    sections = rep.sections
                    assert tok is not None and rep.text is not None
                    for name, text in rep.texts().items():
                        ids = tok.encode(text).ids
                        members[TEXTS[name].txt] = text.encode("utf-8")
                        members[TEXTS[name].ids] = ids_to_bytes(ids)
                        tokens += len(ids) if name == DEFAULT_TEXT else 0
            meta = {
                "dataset": task.dataset,
                "subject_id": str(row["subject_id"]),
                "study_id": str(row["study_id"]),
                "image_id": str(row["image_id"]),
                "view": row["view"] or "",
                "split": task.split,
                "sex": row["sex"] or "",
                "age": row["age"],
                "orig_width": dec.orig_width,
                "orig_height": dec.orig_height,
                "source_path": rel,
                "report_sections": sections,
                "boxes": row.get("boxes") or [],
            }
            assert tuple(meta) == METADATA_FIELDS
            members["json"] = json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            writer.write(row["key"], members)
        if writer.samples == 0:
            writer.abort()
            sha, nbytes = None, 0
        else:
            sha, nbytes = writer.close()
    except BaseException:
        writer.abort()
        raise
    rec = {
        "tar": task.tar if writer.samples else None,
        "idx": idx_name(task.tar) if writer.samples else None,
        "split": task.split,
        "plan_sha": task.plan_sha,
        "rows": len(task.rows),
        "samples": writer.samples,
        "bytes": nbytes,
        "sha256": sha,
        "file_id": writer.file_id,  # [size, inode, mtime_ns] of the tar as verified after writing
        "skipped": skipped,
        "without_report": without_report,
        "tokens": tokens,
        "pixel_hist": hist.counts.tolist(),
        # diagnostics only (not part of the shards): when/where/how long this tar took
        "started_at": t_wall,
        "seconds": time.perf_counter() - t0,
        "pid": os.getpid(),
    }
    assert rec["rows"] == rec["samples"] + len(skipped)
    write_json_atomic(record_path(task.out, task.tar), rec)
    return rec
