"""`shard_mimic` / `shard_chexpert` / `shard_nih` / `shard_rsna`: raw dataset tree -> WebDataset tars + DALI indices + manifest.

Stages (each with progress, see `cxrfast.progress`): metadata (polars) -> tokenizer (train or
load) -> images (worker processes, each writing whole tars) -> manifest. Everything around a
dataset's metadata reader is dataset-independent (`_shard`): option checks before any work, the
output folder's guard and lock (`cxrfast.shards.outdir`, `cxrfast.shards.lock`), input
fingerprints (`cxrfast.shards.inputs`), resume, verification of every tar the manifest lists,
the skipped-rows threshold.

Resumable: a re-run with the same parameters and inputs keeps each finished tar whose planned rows
(source file sizes and mtimes included) are unchanged and whose sha256 still matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl

import cxrfast
from cxrfast.progress import progress
from cxrfast.shards.inputs import fingerprint_files, fingerprint_reports, with_source_stats
from cxrfast.shards.lock import FolderLock
from cxrfast.shards.manifest import (
    check_unchanged,
    file_sha256,
    load_finished,
    record_path,
    write_json_atomic,
)
from cxrfast.shards.metadata_common import find_dataset_root
from cxrfast.shards.options import DEFAULT_MAX_SKIPPED_FRACTION, ShardOptions
from cxrfast.shards.outdir import check_not_foreign, make_out, prepare_output, remove_stale
from cxrfast.shards.pixel_stats import PixelHistogram
from cxrfast.shards.plan import plan_digest, plan_tars
from cxrfast.shards.pool import WorkerPool
from cxrfast.shards.reports import ReportStore, parse_report
from cxrfast.shards.sample_table import build_sample_table
from cxrfast.shards.schema import (
    MANIFEST,
    MANIFEST_FIELDS,
    SAMPLE_TABLE,
    SHARD_FORMAT_VERSION,
    SKIPPED,
    SPLITS,
    TOKENIZER,
    label_names_for,
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
    images_written: int = 0  # samples written by this run (not resumed, not skipped)
    image_seconds: float = 0.0  # from the first tar task starting in a worker to the last one done
    tars_resumed: int = 0
    per_split: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        """Samples written per second, end to end: metadata, tokenizer, worker start-up, images, manifest."""
        return self.images_written / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Samples written per second by the image stage alone, once the workers are running."""
        return self.images_written / self.image_seconds if self.image_seconds > 0 else 0.0

    def line(self) -> str:
        sk = sum(self.skipped.values())
        why = f" ({', '.join(f'{k} {v}' for k, v in sorted(self.skipped.items()))})" if sk else ""
        resumed = f", {self.tars_resumed} tars kept from a previous run" if self.tars_resumed else ""
        return (
            f"{self.dataset}: {self.samples} samples in {self.tars} tars "
            f"({', '.join(f'{k} {v}' for k, v in self.per_split.items())}), {sk} skipped{why}, "
            f"{self.without_report} without report, {self.bytes / 1e9:.3f} GB, "
            f"{self.images_written} written at {self.images_per_s:.1f} img/s ({self.seconds:.1f} s){resumed} -> {self.out}"
        )


def _train_texts(store: ReportStore, studies: pl.DataFrame, bar: Any) -> Iterator[str]:
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
        with progress("tokenizer", studies.height, "report") as bar:
            tok = train_wordpiece(_train_texts(store, studies, bar), vocab_size, workdir=out)
    tmp = path.with_name(path.name + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok


def _check_skipped(rows_in: int, samples_out: int, skipped: list[dict], max_fraction: float, out: Path) -> None:
    """ValueError when nothing was written or more than `max_fraction` of the rows were skipped,
    naming the commonest reason and one of its rows."""
    if not skipped and samples_out:
        return
    reasons = Counter(s["reason"] for s in skipped)
    reason, n = reasons.most_common(1)[0] if reasons else ("", 0)
    example = next((s for s in skipped if s["reason"] == reason), None)
    why = f"commonest reason {reason} ({n} rows), e.g. {example['path']}: {example['detail']}" if example else "no rows"
    where = f"every skipped row is listed in {out / SKIPPED}"
    if samples_out == 0:
        raise ValueError(f"no samples written: all {rows_in} rows were skipped ({why}); {where}")
    share = len(skipped) / rows_in
    if share > max_fraction:
        raise ValueError(
            f"{len(skipped)} of {rows_in} rows ({100 * share:.1f}%) were skipped, more than --max-skipped-fraction "
            f"{max_fraction} ({why}); {where}. Fix the inputs and re-run (finished tars are kept), or raise "
            "--max-skipped-fraction to accept them"
        )


def _check_finished(out: Path, plans: list, digests: list[str]) -> list[dict | None]:
    """The still-valid done-record (or None) of each planned tar; tars are re-hashed in threads."""
    if not any(record_path(out, p.name).exists() for p in plans):
        return [None] * len(plans)
    with progress("resume check", len(plans), "tar") as bar, ThreadPoolExecutor(min(8, len(plans))) as ex:
        def one(i: int) -> dict | None:
            rec = load_finished(out, plans[i].name, digests[i])
            bar.update(1)
            return rec

        return list(ex.map(one, range(len(plans))))


def _run(
    dataset: str,
    root: Path,
    out: Path,
    rows: pl.DataFrame,
    counts: dict,
    params: dict,
    opts: ShardOptions,
    *,
    reports: ReportStore | None,
    tokenizer: Path | None,
    vocab_size: int,
    pool: WorkerPool,
    t0: float,
) -> ShardSummary:
    # Rows that cannot be written are skipped here: no split, or a reason the metadata reader gave
    # (optional columns skip_reason/skip_detail); the rest are planned into tars.
    label_names = label_names_for(dataset)
    if "skip_reason" not in rows.columns:
        rows = rows.with_columns(pl.lit(None, dtype=pl.Utf8).alias("skip_reason"), pl.lit(None, dtype=pl.Utf8).alias("skip_detail"))
    unplaced = rows.filter(~pl.col("split").is_in(list(SPLITS)) | pl.col("skip_reason").is_not_null())
    pre_skipped = [
        {"key": k, "path": p, "reason": r or "not_in_split", "detail": d or "dicom_id not in the split CSV"}
        for k, p, r, d in unplaced.select("key", "source_path", "skip_reason", "skip_detail").iter_rows()
    ]
    rows = rows.filter(pl.col("split").is_in(list(SPLITS)) & pl.col("skip_reason").is_null()).drop("skip_reason", "skip_detail")
    bad = rows.filter(pl.col("labels").list.len() != len(label_names))
    if bad.height:  # a metadata reader's bug, not bad input
        raise AssertionError(f"{dataset}: row {bad['key'][0]} has {bad['labels'][0].len()} labels, expected {len(label_names)}")

    tok_entry = None
    if reports is not None:
        from cxrfast.shards.tokenize import tokenizer_manifest

        tok = _prepare_tokenizer(out, rows, reports, tokenizer, vocab_size)
        tok_entry = tokenizer_manifest(tok, TOKENIZER)

    planned, plans = plan_tars(
        rows, seed=opts.seed, samples_per_tar=opts.samples_per_tar, target_tar_mb=opts.target_tar_mb,
        max_size=opts.max_size,
    )  # fmt: skip
    slices = [planned.slice(p.start, p.size) for p in plans]
    digests = [plan_digest(sl) for sl in slices]
    records: dict[str, dict] = {}
    resumed: set[str] = set()
    todo = []
    for p, sl, sha, rec in zip(plans, slices, digests, _check_finished(out, plans, digests), strict=True):
        if rec is not None:
            records[p.name] = rec
            resumed.add(p.name)
        else:
            todo.append((p, sl, sha))
    if todo:  # the folder is about to change: no manifest may vouch for it until this run ends
        (out / MANIFEST).unlink(missing_ok=True)
    # Largest tars first (stable): the last tars to finish are small ones, so no worker sits
    # idle for long at the end. Every tar is independent: the order changes no output byte.
    todo.sort(key=lambda item: -item[0].size)

    def tasks() -> Iterator[tuple[str, TarTask]]:
        for p, sl, sha in todo:
            yield p.name, TarTask(
                dataset=dataset, root=root, out=out, tar=p.name, split=p.split, plan_sha=sha, rows=sl.to_dicts(),
                max_size=opts.max_size, quality=opts.quality, image_ext=opts.image_ext,
                reports=reports.path if reports is not None else None,
                tokenizer=(out / TOKENIZER) if reports is not None else None,
            )  # fmt: skip

    with progress("images", planned.height, "img") as bar:
        bar.update(sum(records[n]["rows"] for n in resumed))
        # At most 2 tars per worker in flight: bounded memory whatever the dataset size.
        for name, rec in pool.map_unordered(write_tar, tasks(), in_flight=2 * pool.workers):
            records[name] = rec
            bar.update(rec["rows"])
    images_done_at = time.time()

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
    _check_skipped(rows_in, samples_out, skipped_rows, opts.max_skipped_fraction, out)
    # The manifest vouches only for tars that are still the bytes that were hashed.
    for p in plans:
        check_unchanged(out, records[p.name])
    table = build_sample_table(planned, plans, {s["key"] for s in skipped_rows}, label_names)
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
        "label_names": list(label_names),
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
    written = sum(records[p.name]["samples"] for p in plans if p.name not in resumed)
    summary = ShardSummary(
        out=out, dataset=dataset, rows_in=rows_in, samples=samples_out, skipped=dict(reasons), without_report=without_report,
        tars=sum(len(v) for v in splits.values()), bytes=sum(t["bytes"] for ts in splits.values() for t in ts),
        seconds=elapsed, images_written=written, image_seconds=image_seconds, tars_resumed=len(resumed),
        per_split={s: sum(t["samples"] for t in splits[s]) for s in SPLITS if s in splits},
    )  # fmt: skip
    log.debug(summary.line())  # the CLI echoes it
    return summary


def _shard(
    dataset: str,
    root: Path,
    out: Path,
    opts: ShardOptions,
    *,
    read_rows: Callable[[], tuple[pl.DataFrame, dict]],
    tables: dict[str, Path],
    params: dict[str, Any],
    reports: ReportStore | None = None,
    tokenizer: Path | None = None,
    vocab_size: int = 30000,
    t0: float,
) -> ShardSummary:
    """What every dataset's sharding does around its metadata reader: claim `out` (refuse a
    foreign folder, lock it), start the workers, read the rows, fingerprint the inputs, check or
    resume the folder, write the tars and the manifest. `tables` are the input tables read by
    `read_rows` (fingerprinted into `created_with.inputs`); `params` the dataset's own creation
    parameters (added to `opts.params()`)."""
    created = make_out(out)
    try:
        check_not_foreign(out, overwrite=opts.overwrite)
        # The lock is taken before any work, the workers start in the background (their start-up
        # overlaps the metadata) and are stopped before the lock is released.
        with FolderLock(out), WorkerPool(opts.n_workers) as pool:
            with progress("metadata", 3, "step") as bar:
                rows, counts = read_rows()
                bar.update(1)
                rows = with_source_stats(rows, root, opts.image_ext)
                inputs = fingerprint_files(tables)
                provenance = {"root": str(root.resolve())}
                if reports is not None:
                    studies = rows.select("subject_id", "study_id").unique().iter_rows()
                    inputs["reports"] = fingerprint_reports(reports, studies)
                    provenance["reports"] = str(reports.path.resolve())
                bar.update(1)
                all_params = {"dataset": dataset, **opts.params(), **params, **provenance, "inputs": inputs}
                prepare_output(out, dataset, all_params, overwrite=opts.overwrite)
                bar.update(1)
            return _run(
                dataset, root, out, rows, counts, all_params, opts, reports=reports, tokenizer=tokenizer,
                vocab_size=vocab_size, pool=pool, t0=t0,
            )  # fmt: skip
    except BaseException:
        if created:  # nothing of this run stays behind in a folder it made, unless it claimed it
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


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
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
) -> ShardSummary:
    """Shard a MIMIC-CXR-JPG 2.0.0 tree (+ MIMIC-CXR reports, zip or unpacked) into `out`.
    `root` may also be a folder above the one holding `files/` and the CSVs (it is found)."""
    from cxrfast.shards import mimic_metadata as mm

    t0 = time.perf_counter()
    opts = ShardOptions(
        max_size=max_size, quality=quality, samples_per_tar=samples_per_tar, target_tar_mb=target_tar_mb,
        workers=workers, seed=seed, views=views, image_ext=image_ext, overwrite=overwrite,
        max_skipped_fraction=max_skipped_fraction,
    )  # fmt: skip
    if vocab_size < 10:
        raise ValueError(f"--vocab-size must be >= 10, got {vocab_size}")
    root, out = _dataset_root(Path(root), mm.METADATA_CSV, "MIMIC-CXR-JPG"), Path(out)
    tables = mm.input_tables(root, labels)  # checks --labels
    store = ReportStore(Path(reports))
    params: dict[str, Any] = {"vocab_size": vocab_size, "labels": labels, "tokenizer": None}
    if tokenizer is not None:  # the same path holding another tokenizer must not resume old tars
        from cxrfast.shards.tokenize import load_tokenizer

        params["tokenizer"] = str(Path(tokenizer).resolve())
        params["tokenizer_sha256"] = hashlib.sha256(load_tokenizer(tokenizer).to_str().encode()).hexdigest()
    return _shard(
        "mimic", root, out, opts, read_rows=lambda: mm.read_mimic(root, views=views, labels=labels), tables=tables,
        params=params, reports=store, tokenizer=tokenizer, vocab_size=vocab_size, t0=t0,
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
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
) -> ShardSummary:
    """Shard a CheXpert v1.0(-small) folder (`root` holds train.csv/valid.csv; the folder above
    it is accepted too) into `out`. CheXpert has no reports: `tokenizer`/`vocab_size` are accepted
    for symmetry and unused."""
    from cxrfast.shards import chexpert_metadata as cm

    t0 = time.perf_counter()
    opts = ShardOptions(
        max_size=max_size, quality=quality, samples_per_tar=samples_per_tar, target_tar_mb=target_tar_mb,
        workers=workers, seed=seed, views=views, image_ext=image_ext, overwrite=overwrite,
        max_skipped_fraction=max_skipped_fraction,
    )  # fmt: skip
    if not 0.0 <= validate_fraction < 1.0:
        raise ValueError(f"--validate-fraction must be in [0, 1), got {validate_fraction}")
    root, out = _dataset_root(Path(root), cm.TABLES["train_csv"], "CheXpert"), Path(out)
    if tokenizer is not None:
        log.warning("CheXpert has no reports: --tokenizer is ignored")
    return _shard(
        "chexpert", root, out, opts,
        read_rows=lambda: cm.read_chexpert(root, views=views, validate_fraction=validate_fraction, seed=seed),
        tables=cm.input_tables(root), params={"validate_fraction": validate_fraction}, t0=t0,
    )  # fmt: skip


def shard_nih(
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
    validate_fraction: float | None = None,
    validate_list: Path | None = None,
    overwrite: bool = False,
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
) -> ShardSummary:
    """Shard an NIH ChestX-ray14 folder (`root` holds Data_Entry_2017[_v2020].csv, the split lists
    and images/ or images_NNN/images/; the folder above it is accepted too) into `out`:
    test_list.txt becomes test, validate is held out of train_val_list.txt by patient
    (`validate_fraction`, default 0.1) or is `validate_list`."""
    from cxrfast.shards import nih_metadata as nm

    t0 = time.perf_counter()
    opts = ShardOptions(
        max_size=max_size, quality=quality, samples_per_tar=samples_per_tar, target_tar_mb=target_tar_mb,
        workers=workers, seed=seed, views=views, image_ext="png", overwrite=overwrite,
        max_skipped_fraction=max_skipped_fraction,
    )  # fmt: skip
    if validate_list is not None and validate_fraction is not None:
        raise ValueError("give --validate-fraction or --validate-list, not both")
    if validate_list is not None and not Path(validate_list).is_file():
        raise ValueError(f"--validate-list {validate_list} is not a file")
    validate_fraction = 0.1 if validate_fraction is None and validate_list is None else validate_fraction or 0.0
    if not 0.0 <= validate_fraction < 1.0:
        raise ValueError(f"--validate-fraction must be in [0, 1), got {validate_fraction}")
    root, out = _dataset_root(Path(root), nm.TRAIN_VAL_LIST, "NIH ChestX-ray14"), Path(out)
    tables = nm.input_tables(root) | ({"validate_list": Path(validate_list)} if validate_list is not None else {})
    read = partial(nm.read_nih, root, views=views, validate_fraction=validate_fraction, seed=seed, validate_list=validate_list)
    return _shard("nih", root, out, opts, read_rows=read, tables=tables, params={"validate_fraction": validate_fraction}, t0=t0)


def shard_rsna(
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
    validate_fraction: float = 0.15,
    test_fraction: float = 0.15,
    overwrite: bool = False,
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
) -> ShardSummary:
    """Shard the RSNA Pneumonia stage-2 training set (`root` holds stage_2_train_labels.csv and
    stage_2_train_images/; the folder above it is accepted too) into `out`: one sample per patient,
    train/validate/test drawn by patient with `seed` (defaults: MGCA's 70/15/15)."""
    from cxrfast.shards import rsna_metadata as rm

    t0 = time.perf_counter()
    opts = ShardOptions(
        max_size=max_size, quality=quality, samples_per_tar=samples_per_tar, target_tar_mb=target_tar_mb,
        workers=workers, seed=seed, views=views, overwrite=overwrite, max_skipped_fraction=max_skipped_fraction,
    )  # fmt: skip
    rm.check_fractions(validate_fraction, test_fraction)
    root, out = _dataset_root(Path(root), rm.LABELS_CSV, "RSNA Pneumonia"), Path(out)
    read = partial(rm.read_rsna, root, views=views, validate_fraction=validate_fraction, test_fraction=test_fraction, seed=seed)
    params = {"validate_fraction": validate_fraction, "test_fraction": test_fraction}
    return _shard("rsna", root, out, opts, read_rows=read, tables=rm.input_tables(root), params=params, t0=t0)


def _dataset_root(root: Path, marker: str, what: str) -> Path:
    if not root.is_dir():
        raise ValueError(f"--root {root} is not a directory")
    return find_dataset_root(root, marker, what)


__all__ = [
    "ShardOptions", "ShardSummary", "shard_mimic", "shard_chexpert", "shard_nih", "shard_rsna", "DEFAULT_MAX_SKIPPED_FRACTION",
]  # fmt: skip
