"""What a sharding run reads, and fingerprints of it that decide whether earlier output is still valid.

- `source_file`: the source image of a row (the `.jpg`/`.png` twin when only that exists); the
  workers read exactly the file it names.
- `with_source_stats`: each row's source file size and mtime (`source_bytes`, `source_mtime_ns`;
  null when missing) as columns of the metadata table. They become part of each tar's plan digest,
  so a tar is rewritten when one of its images was replaced, fixed or added since it was written.
  One `stat` per row, in threads (377k rows: a few seconds on a local disk).
- `fingerprint_files`: size + sha256 of the input tables (CSVs, the reports zip), recorded in the
  manifest's creation parameters under `inputs`: a changed table is a changed input (the run
  refuses to resume and says which file changed).
- `fingerprint_reports`: the reports zip's fingerprint, or for an unpacked tree the size and mtime
  of every report the rows refer to.

No polars at import: the workers import `source_file` from here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrfast.shards.manifest import file_sha256

if TYPE_CHECKING:
    import polars as pl

    from cxrfast.shards.reports import ReportStore

#: Image extensions `--image-ext` chooses between; any other extension (e.g. `.dcm`) is used as is.
IMAGE_EXTS = ("jpg", "png")
_STAT_THREADS = 16


def _candidates(rel: str, image_ext: str) -> tuple[str, ...]:
    stem, dot, ext = rel.rpartition(".")
    if not dot or ext.lower() not in (*IMAGE_EXTS, "jpeg"):
        return (rel,)
    return (f"{stem}.png", f"{stem}.jpg") if image_ext == "png" else (f"{stem}.jpg", f"{stem}.png")


def _stat_source(root: str, rel: str, image_ext: str) -> tuple[str, os.stat_result | None]:
    """(relative path chosen, its stat or None); strings, not Paths: this runs once per row."""
    cands = _candidates(rel, image_ext)
    for c in cands:
        try:
            return c, os.stat(f"{root}/{c}")
        except (FileNotFoundError, NotADirectoryError):
            continue
    return cands[0], None


def source_file(root: Path, rel: str, image_ext: str) -> tuple[Path, str, os.stat_result | None]:
    """(path, path relative to root, stat or None when missing) of a row's source image: `rel`
    with the preferred extension, else the other one of .jpg/.png (other extensions as is)."""
    chosen, st = _stat_source(str(root), rel, image_ext)
    return root / chosen, chosen, st


def _in_threads(fn: Callable[[Sequence[Any]], list[Any]], items: Sequence[Any]) -> list[Any]:
    """`fn` over contiguous chunks of `items` in threads (os.stat releases the GIL), results in order."""
    if not items:
        return []
    n = min(_STAT_THREADS, max(1, len(items) // 2000))
    step = -(-len(items) // n)
    with ThreadPoolExecutor(n) as ex:
        return [r for part in ex.map(fn, [items[i : i + step] for i in range(0, len(items), step)]) for r in part]


def _size_mtime(st: os.stat_result | None) -> tuple[int, int] | None:
    return None if st is None else (st.st_size, st.st_mtime_ns)


def stat_many(paths: Sequence[Path]) -> list[tuple[int, int] | None]:
    """(size, mtime_ns) or None (missing, unreadable) for each path."""

    def chunk(part: Sequence[Path]) -> list[tuple[int, int] | None]:
        out = []
        for p in part:
            try:
                out.append(_size_mtime(os.stat(p)))
            except OSError:
                out.append(None)
        return out

    return _in_threads(chunk, paths)


def with_source_stats(rows: pl.DataFrame, root: Path, image_ext: str) -> pl.DataFrame:
    """`rows` plus `source_bytes` and `source_mtime_ns` (Int64, null when the source is missing)
    of each row's `source_path` under `root`."""
    import polars as pl

    root_s = str(root)

    def chunk(part: Sequence[str]) -> list[tuple[int, int] | None]:
        return [_size_mtime(_stat_source(root_s, rel, image_ext)[1]) for rel in part]

    stats = _in_threads(chunk, rows["source_path"].to_list())
    return rows.with_columns(
        pl.Series("source_bytes", [None if s is None else s[0] for s in stats], dtype=pl.Int64),
        pl.Series("source_mtime_ns", [None if s is None else s[1] for s in stats], dtype=pl.Int64),
    )


def fingerprint_files(files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """{label: {"file": name, "bytes": size, "sha256": hex}} of each input file (content, not
    path or mtime: a copy of the same tables elsewhere is the same input)."""
    return {label: {"file": p.name, "bytes": p.stat().st_size, "sha256": file_sha256(p)} for label, p in files.items()}


def fingerprint_reports(store: ReportStore, studies: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The reports source: a zip's content fingerprint; for an unpacked `files/` tree the count and
    a digest of (path, size, mtime) of the reports of `studies` ((subject_id, study_id) pairs)."""
    from cxrfast.shards.reports import report_relpath

    if store.kind == "zip":
        return {"kind": "zip", **fingerprint_files({"zip": store.path})["zip"]}
    rels = sorted({report_relpath(s, st) for s, st in studies})
    h = hashlib.sha256()
    for rel, st in zip(rels, stat_many([store.path / r for r in rels]), strict=True):
        h.update(f"{rel} {st}\n".encode())
    return {"kind": "dir", "reports": len(rels), "sha256": h.hexdigest()}


__all__ = ["source_file", "with_source_stats", "stat_many", "fingerprint_files", "fingerprint_reports"]
