"""`shard_mimic` / `shard_chexpert`: raw dataset tree -> WebDataset tars + DALI indices + manifest.

Stages (each with a progress bar): metadata (polars) -> tokenizer (train or load) -> images
(worker processes, each writing whole tars). Resumable: finished tars whose sha256 matches
their done-record are kept on a re-run with the same parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from tqdm.auto import tqdm

import cxrfast
from cxrfast.shards.manifest import (
    file_sha256,
    load_finished,
    prepare_output,
    remove_stale,
    write_json_atomic,
)
from cxrfast.shards.pixel_stats import PixelHistogram
from cxrfast.shards.plan import plan_digest, plan_tars
from cxrfast.shards.pool import WorkerPool
from cxrfast.shards.reports import ReportStore, parse_report
from cxrfast.shards.sample_table import build_sample_table
from cxrfast.shards.schema import (
    LABEL_NAMES,
    MANIFEST,
    MANIFEST_FIELDS,
    SAMPLE_TABLE,
    SHARD_FORMAT_VERSION,
    SKIPPED,
    SPLITS,
    TOKENIZER,
)
from cxrfast.shards.worker import TarTask, write_tar

log = logging.getLogger(__name__)


@dataclass
class ShardSummary:
    """What a sharding run produced."""

    out: Path
    dataset: str
    rows_in: int
    samples: int
    skipped: dict[str, int]
    without_report: int
    tars: int
    bytes: int
    seconds: float
    images_written: int = 0  # rows processed by this run (not resumed)
    image_seconds: float = 0.0  # from the first tar task starting in a worker to the last one done
    tars_resumed: int = 0
    per_split: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        """End to end: metadata, tokenizer, worker start-up, images, manifest."""
        return self.images_written / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """The image stage alone, once the workers are running."""
        return self.images_written / self.image_seconds if self.image_seconds > 0 else 0.0

    def line(self) -> str:
        sk = sum(self.skipped.values())
        why = f" ({', '.join(f'{k} {v}' for k, v in sorted(self.skipped.items()))})" if sk else ""
        resumed = f", {self.tars_resumed} tars kept from a previous run" if self.tars_resumed else ""
        return (
            f"{self.dataset}: {self.samples} samples in {self.tars} tars "
            f"({', '.join(f'{k} {v}' for k, v in self.per_split.items())}), {sk} skipped{why}, "
            f"{self.without_report} without report, {self.bytes / 1e9:.3f} GB, "
            f"{self.images_per_s:.1f} img/s ({self.seconds:.1f} s){resumed} -> {self.out}"
        )


def _stage(desc: str, total: int | None = None, unit: str = "it") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True)


def _train_texts(store: ReportStore, studies: pl.DataFrame, bar: tqdm) -> Iterator[str]:
    for subject_id, study_id in studies.iter_rows():
        rep = parse_report(store.read(subject_id, study_id))
        bar.update(1)
        if rep is not None and rep.text:
            yield rep.text


def _prepare_tokenizer(out: Path, rows: pl.DataFrame, store: ReportStore, tokenizer: Path | None, vocab_size: int):
    from cxrfast.shards.tokenize import load_tokenizer, train_wordpiece

    path = out / TOKENIZER
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif path.exists():  # a resumed run with the same parameters: keep the tokenizer the tars used
        tok = load_tokenizer(path)
        log.info("reusing %s from the unfinished run", path)
        return tok
    else:
        studies = rows.filter(pl.col("split") == "train").select("subject_id", "study_id").unique().sort(["subject_id", "study_id"])
        with _stage("tokenizer", studies.height, "report") as bar:
            tok = train_wordpiece(_train_texts(store, studies, bar), vocab_size, workdir=out)
    tmp = path.with_name(path.name + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok


def _run(
    dataset: str,
    root: Path,
    out: Path,
    rows: pl.DataFrame,
    counts: dict,
    params: dict,
    *,
    reports: ReportStore | None,
    tokenizer: Path | None,
    vocab_size: int,
    pool: WorkerPool,
    t0: float,
) -> ShardSummary:
    # Rows that cannot be placed (no split) are skipped here, the rest are planned into tars.
    unplaced = rows.filter(~pl.col("split").is_in(list(SPLITS)))
    pre_skipped = [
        {"key": k, "path": p, "reason": "not_in_split", "detail": "dicom_id not in the split CSV"}
        for k, p in unplaced.select("key", "source_path").iter_rows()
    ]
    rows = rows.filter(pl.col("split").is_in(list(SPLITS)))

    tok_entry = None
    if reports is not None:
        from cxrfast.shards.tokenize import tokenizer_manifest

        tok = _prepare_tokenizer(out, rows, reports, tokenizer, vocab_size)
        tok_entry = tokenizer_manifest(tok, TOKENIZER)

    planned, plans = plan_tars(
        rows, seed=params["seed"], samples_per_tar=params["samples_per_tar"], target_tar_mb=params["target_tar_mb"],
        max_size=params["max_size"],
    )  # fmt: skip
    records: dict[str, dict] = {}
    resumed: set[str] = set()
    bar = _stage("images", planned.height, "img")
    try:
        todo = []
        for p in plans:
            sl = planned.slice(p.start, p.size)
            sha = plan_digest(sl)
            rec = load_finished(out, p.name, sha)
            if rec is not None:
                records[p.name] = rec
                resumed.add(p.name)
                bar.update(rec["rows"])
            else:
                todo.append((p, sl, sha))
        # Largest tars first (stable): the last tars to finish are small ones, so no worker sits
        # idle for long at the end. Every tar is independent: the order changes no output byte.
        todo.sort(key=lambda item: -item[0].size)

        def tasks() -> Iterator[tuple[str, TarTask]]:
            for p, sl, sha in todo:
                yield p.name, TarTask(
                    dataset=dataset, root=root, out=out, tar=p.name, split=p.split, plan_sha=sha, rows=sl.to_dicts(),
                    max_size=params["max_size"], quality=params["quality"], image_ext=params["image_ext"],
                    reports=reports.path if reports is not None else None,
                    tokenizer=(out / TOKENIZER) if reports is not None else None,
                )  # fmt: skip

        # At most 2 tars per worker in flight: bounded memory whatever the dataset size.
        for name, rec in pool.map_unordered(write_tar, tasks(), in_flight=2 * pool.workers):
            records[name] = rec
            bar.update(rec["rows"])
        images_done_at = time.time()
    finally:
        bar.close()

    # Merge the done-records in plan order.
    splits: dict[str, list[dict]] = {}
    skipped_rows = list(pre_skipped)
    hist_train, hist_all = PixelHistogram(), PixelHistogram()
    without_report = 0
    for p in plans:
        rec = records[p.name]
        skipped_rows.extend(rec["skipped"])
        without_report += rec["without_report"]
        h = PixelHistogram(rec["pixel_hist"])
        hist_all.merge(h)
        if p.split == "train":
            hist_train.merge(h)
        if rec["samples"]:
            splits.setdefault(p.split, []).append(
                {"tar": rec["tar"], "idx": rec["idx"], "samples": rec["samples"], "bytes": rec["bytes"], "sha256": rec["sha256"]}
            )
    samples_out = sum(t["samples"] for ts in splits.values() for t in ts)
    rows_in = rows.height + unplaced.height
    if rows_in != samples_out + len(skipped_rows):  # the invariant of the whole stage
        raise AssertionError(f"in ({rows_in}) != out ({samples_out}) + skipped ({len(skipped_rows)})")
    hist = hist_train if hist_train.pixels else hist_all
    mean, std = hist.mean_std() if hist.pixels else (None, None)  # nothing written
    reasons = Counter(s["reason"] for s in skipped_rows)

    skipped_path = out / SKIPPED
    tmp = skipped_path.with_name(SKIPPED + ".tmp")
    with open(tmp, "w") as f:
        for s in skipped_rows:
            f.write(json.dumps(s) + "\n")
    os.replace(tmp, skipped_path)
    table = build_sample_table(planned, plans, {s["key"] for s in skipped_rows}, LABEL_NAMES)
    if table.height != samples_out:
        raise AssertionError(f"sample table has {table.height} rows, the tars {samples_out} samples")
    table_path = out / SAMPLE_TABLE
    tmp = table_path.with_name(SAMPLE_TABLE + ".tmp")
    table.write_parquet(tmp, statistics=False)
    os.replace(tmp, table_path)
    manifest = {
        "format_version": SHARD_FORMAT_VERSION,
        "dataset": dataset,
        "cxrfast_version": cxrfast.__version__,
        "created_with": params,
        "label_names": list(LABEL_NAMES),
        "splits": {s: splits[s] for s in SPLITS if s in splits},
        "counts": {
            "rows_in": rows_in,
            "samples_out": samples_out,
            "skipped": len(skipped_rows),
            "without_report": without_report,
            **{k: v for k, v in counts.items() if k not in ("rows_in", "samples_out", "skipped", "without_report")},
        },
        "skipped": dict(sorted(reasons.items())),
        "tokenizer": tok_entry,
        "pixel_stats": {"mean": mean, "std": std, "split": "train" if hist is hist_train else "all", "pixels": hist.pixels},
        "sample_table": {"file": SAMPLE_TABLE, "rows": table.height, "sha256": file_sha256(table_path)},
    }
    assert tuple(manifest) == MANIFEST_FIELDS
    keep = {t[k] for ts in splits.values() for t in ts for k in ("tar", "idx")}
    remove_stale(out, keep)
    write_json_atomic(out / MANIFEST, manifest)
    elapsed = time.perf_counter() - t0
    starts = [records[p.name]["started_at"] for p in plans if p.name not in resumed]
    image_seconds = (images_done_at - min(starts)) if starts else 0.0
    written = sum(records[p.name]["rows"] for p in plans if p.name not in resumed)
    summary = ShardSummary(
        out=out, dataset=dataset, rows_in=rows_in, samples=samples_out, skipped=dict(reasons), without_report=without_report,
        tars=sum(len(v) for v in splits.values()), bytes=sum(t["bytes"] for ts in splits.values() for t in ts),
        seconds=elapsed, images_written=written, image_seconds=image_seconds, tars_resumed=len(resumed),
        per_split={s: sum(t["samples"] for t in splits[s]) for s in SPLITS if s in splits},
    )  # fmt: skip
    log.debug(summary.line())  # the CLI echoes it
    return summary


def _params(dataset: str, **kw) -> dict:
    """The creation parameters recorded in the manifest (everything that changes the output;
    not --workers or --overwrite)."""
    kw["views"] = ",".join(kw["views"]) if not isinstance(kw["views"], str) else kw["views"]
    for k in ("tokenizer",):
        if kw.get(k) is not None:
            kw[k] = str(Path(kw[k]).resolve())
    return {"dataset": dataset, **kw}


def _workers(workers: int | None) -> int:
    n = workers or os.cpu_count() or 1
    if n < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    return n


def shard_mimic(
    root: Path,
    reports: Path,
    out: Path,
    *,
    max_size: int = 512,
    quality: int = 95,
    samples_per_tar: int | None = None,
    target_tar_mb: float = 256,
    workers: int | None = None,
    seed: int = 0,
    views: str | Sequence[str] = ("PA", "AP"),
    tokenizer: Path | None = None,
    vocab_size: int = 30000,
    overwrite: bool = False,
    labels: str = "chexpert",
    image_ext: str = "jpg",
) -> ShardSummary:
    """Shard a MIMIC-CXR-JPG 2.0.0 tree (+ MIMIC-CXR reports, zip or unpacked) into `out`."""
    from cxrfast.shards.mimic_metadata import read_mimic

    t0 = time.perf_counter()
    root, out = Path(root), Path(out)
    _check_image_options(max_size, quality, image_ext)
    if not root.is_dir():
        raise ValueError(f"--root {root} is not a directory")
    store = ReportStore(Path(reports))
    params = _params(
        "mimic", max_size=max_size, quality=quality, samples_per_tar=samples_per_tar, target_tar_mb=target_tar_mb,
        seed=seed, views=views, tokenizer=tokenizer, vocab_size=vocab_size, labels=labels, image_ext=image_ext,
    )  # fmt: skip
    if tokenizer is not None:  # the same path holding another tokenizer must not resume old tars
        from cxrfast.shards.tokenize import load_tokenizer

        params["tokenizer_sha256"] = hashlib.sha256(load_tokenizer(tokenizer).to_str().encode()).hexdigest()
    # The workers start now, in the background: their start-up overlaps metadata and tokenizer.
    with WorkerPool(_workers(workers)) as pool:
        with _stage("metadata", 2, "step") as bar:
            rows, counts = read_mimic(root, views=views, labels=labels)
            bar.update(1)
            prepare_output(out, "mimic", params, overwrite=overwrite)
            bar.update(1)
        return _run(
            "mimic", root, out, rows, counts, params, reports=store, tokenizer=tokenizer, vocab_size=vocab_size,
            pool=pool, t0=t0,
        )  # fmt: skip


def shard_chexpert(
    root: Path,
    out: Path,
    *,
    max_size: int = 512,
    quality: int = 95,
    samples_per_tar: int | None = None,
    target_tar_mb: float = 256,
    workers: int | None = None,
    seed: int = 0,
    views: str | Sequence[str] = ("PA", "AP"),
    tokenizer: Path | None = None,
    vocab_size: int = 30000,
    overwrite: bool = False,
    validate_fraction: float = 0.1,
    image_ext: str = "jpg",
) -> ShardSummary:
    """Shard a CheXpert v1.0(-small) folder (`root` holds train.csv/valid.csv) into `out`.
    CheXpert has no reports: `tokenizer`/`vocab_size` are accepted for symmetry and unused."""
    from cxrfast.shards.chexpert_metadata import read_chexpert

    t0 = time.perf_counter()
    root, out = Path(root), Path(out)
    _check_image_options(max_size, quality, image_ext)
    if not root.is_dir():
        raise ValueError(f"--root {root} is not a directory")
    if tokenizer is not None:
        log.warning("CheXpert has no reports: --tokenizer is ignored")
    params = _params(
        "chexpert", max_size=max_size, quality=quality, samples_per_tar=samples_per_tar, target_tar_mb=target_tar_mb,
        seed=seed, views=views, validate_fraction=validate_fraction, image_ext=image_ext,
    )  # fmt: skip
    with WorkerPool(_workers(workers)) as pool:
        with _stage("metadata", 2, "step") as bar:
            rows, counts = read_chexpert(root, views=views, validate_fraction=validate_fraction, seed=seed)
            bar.update(1)
            prepare_output(out, "chexpert", params, overwrite=overwrite)
            bar.update(1)
        return _run(
            "chexpert", root, out, rows, counts, params, reports=None, tokenizer=None, vocab_size=vocab_size,
            pool=pool, t0=t0,
        )  # fmt: skip


def _check_image_options(max_size: int, quality: int, image_ext: str) -> None:
    if max_size < 16:
        raise ValueError(f"--max-size must be >= 16, got {max_size}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {quality}")
    if image_ext not in ("jpg", "png"):
        raise ValueError(f"--image-ext must be jpg or png, got {image_ext!r}")


__all__ = ["ShardSummary", "shard_mimic", "shard_chexpert"]
