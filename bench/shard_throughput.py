"""`cxrfast bench shard`: images/s and peak memory of `cxrfast shard mimic|nih|rsna` vs a naive baseline.

The baseline is written the way published chest X-ray code prepares data (one process: PIL open + convert('L') -- for RSNA pydicom's `pixel_array` scaled to 8 bits and
MONOCHROME1 inverted as MGCA's `read_from_dicom` does --, resize of the long side to 512 (bicubic),
webdataset TarWriter writing jpg + labels). Both read the same synthetic sources (full-resolution
MIMIC JPEGs, NIH's 1024x1024 PNGs, RSNA's 1024x1024 DICOMs) in the same run, with the same
metadata reader; each measurement runs in a fresh subprocess so that its peak RSS is its own.
One results row per dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from cxrfast.bench.common import BENCH_OUT, append_results_row, bar_plot, command_line, machine, write_json

NAME = "shard_throughput"


class PeakRSS:
    """Samples the resident memory of this process plus all its descendants (psutil), and
    keeps the maximum; falls back to getrusage maxima (self + largest child) without psutil."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            self._proc = None
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except Exception:  # a worker that just exited
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        if self._proc is not None:
            self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._proc is not None:
            self._t.join()

    @staticmethod
    def rusage_bytes() -> dict[str, int]:
        import resource

        return {
            "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "largest_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        }


DATASETS = ("mimic", "nih", "rsna")


def _rows(dataset: str, root: Path):
    """The metadata rows cxrfast's reader gives (the baseline uses them too: only image work differs)."""
    if dataset == "mimic":
        from cxrfast.shards.mimic_metadata import read_mimic

        return read_mimic(root)[0]
    if dataset == "nih":
        from cxrfast.shards.nih_metadata import read_nih

        return read_nih(root)[0]
    from cxrfast.shards.rsna_metadata import read_rsna

    return read_rsna(root)[0]


def _naive_open(path: Path):
    """The source as an 8-bit PIL image, as published code opens it."""
    from PIL import Image

    if path.suffix != ".dcm":
        return Image.open(path).convert("L")
    import cv2
    import pydicom

    with pydicom.config.disable_value_validation():
        ds = pydicom.dcmread(path)
        x = ds.pixel_array  # pydicom's decoders (Pillow for JPEG Baseline)
        x = cv2.convertScaleAbs(x, alpha=255.0 / x.max())
        if ds.PhotometricInterpretation == "MONOCHROME1":
            x = cv2.bitwise_not(x)
    return Image.fromarray(x)


def naive_baseline(dataset: str, root: Path, out: Path, max_size: int = 512) -> int:
    """The published way: decode at full resolution, convert, resize, one process, wds TarWriter."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    rows = _rows(dataset, root)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with wds.TarWriter(str(out / "baseline-000000.tar")) as sink:
        for r in rows.iter_rows(named=True):
            img = _naive_open(root / r["source_path"])
            w, h = img.size
            s = max_size / max(w, h)
            img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=95)
            labels = np.asarray(r["labels"], dtype=np.int8).tobytes()
            sink.write({"__key__": r["key"], "jpg": buf.getvalue(), "labels.i8": labels})
            n += 1
    return n


def _shard(dataset: str, root: Path, out: Path, workers: int | None):
    from cxrfast.shards import build

    if dataset == "mimic":
        return build.shard_mimic(root, root / "mimic-cxr-reports.zip", out, workers=workers)
    return {"nih": build.shard_nih, "rsna": build.shard_rsna}[dataset](root, out, workers=workers)


def _one(kind: str, dataset: str, root: Path, out: Path, workers: int | None) -> dict:
    """One timed measurement in this (fresh) process. Module imports happen before the timer
    for both (webdataset imports torch, cxrfast imports polars/numba/cv2, pydicom); everything
    else -- metadata, tokenizer training, worker start-up, all image work, the manifest -- is timed."""
    shutil.rmtree(out, ignore_errors=True)
    import pydicom  # noqa: F401

    if kind == "baseline":
        import PIL.Image  # noqa: F401
        import webdataset  # noqa: F401

        from cxrfast.shards import mimic_metadata, nih_metadata, rsna_metadata  # noqa: F401
    else:
        from cxrfast.shards import build  # noqa: F401
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        steady = None
        if kind == "baseline":
            n = naive_baseline(dataset, root, out)
        else:
            s = _shard(dataset, root, out, workers)
            n, steady = s.samples, s.steady_images_per_s
        seconds = time.perf_counter() - t0
    return {"kind": kind, "images": n, "seconds": seconds, "steady_images_per_s": steady, "peak_rss_tree": peak.peak,
            **PeakRSS.rusage_bytes()}  # fmt: skip


def _dataset(dataset: str, cache: Path, n: int, size_range: tuple[int, int], seed: int) -> Path:
    """The synthetic source tree, made once under `cache`."""
    workers = os.cpu_count() or 1
    if dataset == "mimic":  # about n frontal images (= studies) at full resolution
        from cxrfast.synth import make_mimic

        root = cache / f"mimic_{n}_{size_range[0]}-{size_range[1]}_s{seed}"
        if not (root / "mimic-cxr-reports.zip").exists():
            make_mimic(root, studies=n, seed=seed, size_range=size_range, workers=workers, overwrite=True)
    elif dataset == "nih":
        from cxrfast.synth.nih import make_nih

        root = cache / f"nih_{n}_s{seed}"
        if not (root / "test_list.txt").exists():
            make_nih(root, images=n, seed=seed, workers=workers, overwrite=True)
    else:
        from cxrfast.synth.rsna import make_rsna

        root = cache / f"rsna_{n}_s{seed}"
        if not (root / "stage_2_detailed_class_info.csv").exists():
            make_rsna(root, patients=n, seed=seed, workers=workers, overwrite=True)
    return root


def _measure(dataset: str, root: Path, args: argparse.Namespace) -> dict:
    """Warm-up round, then `repeats` interleaved rounds of baseline and ours; medians."""
    work = args.out / "shard_work"
    runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
    for i in range(1 + args.repeats):
        for kind in ("baseline", "ours"):  # interleaved: both see the same machine load
            cmd = [sys.executable, "-m", "cxrfast.bench.shard_throughput", "--one", kind, "--dataset", dataset,
                   "--root", str(root), "--out", str(work / kind)] + (["--workers", str(args.workers)] if args.workers else [])  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                raise RuntimeError(f"benchmark run {kind} on {dataset} failed (exit {res.returncode})")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            if i > 0:  # the first round is the warm-up (page cache, numba cache)
                runs[kind].append(r)
    shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for kind, rs in runs.items():
        sec = statistics.median(r["seconds"] for r in rs)
        steady = [r["steady_images_per_s"] for r in rs if r.get("steady_images_per_s")]
        summary[kind] = {
            "steady_images_per_s": statistics.median(steady) if steady else None,
            "images": rs[0]["images"],
            "median_seconds": sec,
            "images_per_s": rs[0]["images"] / sec,
            "seconds": [r["seconds"] for r in rs],
            "peak_rss_tree_gb": max(r["peak_rss_tree"] for r in rs) / 1e9,
            "rusage_self_gb": max(r["self"] for r in rs) / 1e9,
            "rusage_largest_child_gb": max(r["largest_child"] for r in rs) / 1e9,
        }
    return summary


_SOURCES = {"mimic": "MIMIC JPEGs", "nih": "NIH 1024 PNGs", "rsna": "RSNA 1024 DICOMs"}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="cxrfast bench shard", description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS), help="Comma-separated, from mimic,nih,rsna.")
    ap.add_argument("--images", type=int, default=150,
                    help="MIMIC: about this many frontal images (= studies). On a real dataset (~227k images) "
                    "cxrfast's fixed ~1 s start-up (forkserver, numba) is amortised; raise it to see that.")  # fmt: skip
    ap.add_argument("--nih-images", type=int, default=150, help="NIH images (1024x1024 PNGs).")
    ap.add_argument("--rsna-patients", type=int, default=150, help="RSNA patients (1024x1024 DICOMs).")
    ap.add_argument("--size-min", type=int, default=2000, help="MIMIC's smallest image side.")
    ap.add_argument("--size-max", type=int, default=3000, help="MIMIC's largest image side.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="cxrfast shard workers (default: all cores).")
    ap.add_argument("--repeats", type=int, default=2, help="Timed runs of each (after one warm-up run each).")
    ap.add_argument("--cache", type=Path, default=BENCH_OUT / "cache")
    ap.add_argument("--out", type=Path, default=BENCH_OUT)
    ap.add_argument("--one", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--dataset", choices=DATASETS, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(_one(args.one, args.dataset, args.root, args.out, args.workers)))
        return 0
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown or not datasets:
        ap.error(f"--datasets: unknown {unknown}; choose from {','.join(DATASETS)}")
    sizes = {"mimic": args.images, "nih": args.nih_images, "rsna": args.rsna_patients}
    for dataset in datasets:
        root = _dataset(dataset, args.cache, sizes[dataset], (args.size_min, args.size_max), args.seed)
        load_before = os.getloadavg()
        summary = _measure(dataset, root, args)
        ratio = summary["ours"]["images_per_s"] / summary["baseline"]["images_per_s"]
        # The baseline has no start-up to speak of (one process, ~50 ms of metadata): its
        # end-to-end rate is its steady rate.
        steady_ratio = summary["ours"]["steady_images_per_s"] / summary["baseline"]["images_per_s"]
        name = NAME if dataset == "mimic" else f"{NAME}_{dataset}"
        results = {
            "benchmark": NAME,
            "dataset": dataset,
            "machine": machine(),
            "cpu_count": os.cpu_count(),
            "load_avg_before": load_before,
            "source": str(root),
            "size_range": [args.size_min, args.size_max] if dataset == "mimic" else [1024, 1024],
            "repeats": args.repeats,
            "workers": args.workers or os.cpu_count(),
            "results": summary,
            "speedup": ratio,
            "speedup_image_stage": steady_ratio,
        }
        write_json(args.out, name, results)
        o, b = summary["ours"], summary["baseline"]
        src = f"{_SOURCES[dataset]} ({args.size_min}-{args.size_max} px)" if dataset == "mimic" else _SOURCES[dataset]
        bar_plot(
            args.out, name, [f"naive {'pydicom+PIL' if dataset == 'rsna' else 'PIL'} + wds (1 proc)",
                             f"cxrfast shard ({results['workers']} workers)"],
            [b["images_per_s"], o["images_per_s"]], ylabel="images/s", title=f"Sharding {o['images']} {src} -> 512 px",
        )  # fmt: skip
        numbers = (
            f"{dataset}: {o['images']} {src}: cxrfast {o['images_per_s']:.1f} img/s end-to-end "
            f"({o['steady_images_per_s']:.1f} img/s image stage) vs naive {b['images_per_s']:.1f} img/s = {ratio:.1f}x "
            f"end-to-end, {steady_ratio:.1f}x image stage; peak RSS (tree) {o['peak_rss_tree_gb']:.2f} GB vs "
            f"{b['peak_rss_tree_gb']:.2f} GB; 1-min load avg {load_before[0]:.1f} before / "
            f"{os.getloadavg()[0]:.1f} after (shared machine)"
        )
        append_results_row(command_line(["shard", *argv]), numbers)
        print(numbers)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
