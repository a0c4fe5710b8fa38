"""Deterministic, interruption-safe writers shared by the MIMIC and CheXpert generators.

Every file is written under a temporary name next to its final one and renamed when complete,
gzip members carry mtime 0 and zip members a fixed date, so that the same seed gives
byte-identical files and an interrupted run never leaves a partial file under a final name.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import multiprocessing
import os
import shutil
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cxrfast.synth.radiograph import Anatomy, Pose, draw_radiograph

#: Written into each synthetic dataset's folder; records how it was made.
MARKER = ".cxrfast-synth.json"
PARTIAL = ".partial"
_ZIP_DATE = (2019, 1, 1, 0, 0, 0)


def atomic_write(path: Path, data: bytes) -> int:
    """Write `data` to `path` via `path.partial` + rename; returns the byte count."""
    tmp = path.with_name(path.name + PARTIAL)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def csv_bytes(header: Sequence[str], rows: Iterable[Sequence[object]]) -> bytes:
    """CSV as pandas writes it (the published files' dialect): comma, minimal quoting, \\n."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> int:
    """A plain .csv, or a gzip-compressed one (mtime 0, no file name) when `path` ends in .gz."""
    data = csv_bytes(header, rows)
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6, mtime=0)
    return atomic_write(path, data)


def write_zip(path: Path, members: dict[str, bytes]) -> int:
    """A deflated zip whose members (sorted by name) all carry one fixed timestamp."""
    tmp = path.with_name(path.name + PARTIAL)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, members[name])
    os.replace(tmp, path)
    return path.stat().st_size


def encode_image(img: np.ndarray, suffix: str) -> bytes:
    """uint8 -> JPEG (quality 95, as MIMIC-CXR-JPG); uint16 -> PNG. OpenCV's encoders are deterministic."""
    if suffix == ".jpg":
        if img.dtype != np.uint8:
            raise ValueError(f"JPEG needs uint8 pixels, got {img.dtype}")
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    elif suffix == ".png":
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        raise ValueError(f"unsupported image suffix {suffix!r}")
    if not ok:
        raise ValueError(f"OpenCV could not encode a {img.dtype} {img.shape} image as {suffix}")
    return buf.tobytes()


def prepare_folder(folder: Path, params: dict, owned: Sequence[Path], *, overwrite: bool) -> None:
    """Make `folder` ready for a synthetic dataset described by `params`.

    Refuses (FileExistsError) when any of the dataset's `owned` paths already exists and the
    folder's marker does not describe the same dataset; with `overwrite` those paths are
    removed first. Re-running with identical parameters rewrites the same files in place.
    """
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    present = [p for p in owned if p.exists() or p.is_symlink()]
    same = False
    if marker.exists():
        try:
            same = json.loads(marker.read_text()) == params
        except (OSError, json.JSONDecodeError):
            same = False
    if present and not same:
        if not overwrite:
            names = ", ".join(str(p.relative_to(folder)) for p in present[:3])
            raise FileExistsError(
                f"{folder} already holds a different dataset ({names}); pass overwrite=True (--overwrite) to replace it"
            )
        for p in present:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    atomic_write(marker, (json.dumps(params, indent=1, sort_keys=True) + "\n").encode())


@dataclass(frozen=True, slots=True)
class ImageTask:
    """One image to draw and write (picklable, for worker processes)."""

    path: Path
    anatomy: Anatomy
    labels: np.ndarray
    view: str
    shape: tuple[int, int]
    seed: int
    sides: dict[str, str]
    pose: Pose
    bits: int


def write_image(task: ImageTask) -> int:
    """Draw, encode and atomically write one image; returns its byte size."""
    img = draw_radiograph(task.anatomy, task.labels, task.view, task.shape, seed=task.seed, sides=task.sides,
                          pose=task.pose, bits=task.bits)  # fmt: skip
    return atomic_write(task.path, encode_image(img, task.path.suffix))


def run_tasks(fn: Callable[[object], int], tasks: Sequence[object], *, workers: int, desc: str) -> int:
    """Run `fn(task)` for each task (in worker processes when workers > 1) with a progress bar.

    Returns the sum of the results (bytes written). Results do not depend on `workers`: each
    task carries its own seed.
    """
    from tqdm import tqdm

    total = 0
    with tqdm(total=len(tasks), desc=desc, unit="img", disable=None, dynamic_ncols=True) as bar:
        for n in _map(fn, tasks, workers):
            total += n
            bar.update(1)
    return total


def _map(fn: Callable[[object], int], tasks: Sequence[object], workers: int) -> Iterator[int]:
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    chunk = max(1, min(16, len(tasks) // (workers * 4)))
    # forkserver, not fork: a child forked while OpenCV's thread pool is busy can deadlock
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
        yield from pool.map(fn, tasks, chunksize=chunk)


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one image per process; no oversubscription


def summary_line(summary: dict) -> str:
    """One line: what was written, how big, how long."""
    unit = "subjects" if summary["dataset"] == "mimic" else "patients"
    return (
        f"synth {summary['dataset']}: {summary['images']} images, {summary['studies']} studies, "
        f"{summary.get('subjects', summary.get('patients'))} {unit}, {summary['bytes'] / 1e9:.2f} GB "
        f"in {summary['seconds']:.1f} s -> {summary['out']}"
    )
