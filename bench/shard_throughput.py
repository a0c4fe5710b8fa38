"""`cxrfast bench shard`: sharding throughput (images/s) and peak memory of `cxrfast shard mimic`
against a naive baseline written the way published chest X-ray code prepares data (PIL open,
convert('L'), resize long side to 512 (bicubic), one process, webdataset TarWriter writing
jpg + labels). Both read the same full-resolution synthetic MIMIC images (frontal views), in
the same run; each measurement runs in a fresh subprocess so that its peak RSS is its own.
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


def naive_baseline(root: Path, out: Path, max_size: int = 512) -> int:
    """The published way: PIL decode at full resolution, convert, resize, one process, wds TarWriter.
    (Metadata is read with the same polars reader as ours, so only the image work differs.)"""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from cxrfast.shards.mimic_metadata import read_mimic

    rows, _ = read_mimic(root)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with wds.TarWriter(str(out / "baseline-000000.tar")) as sink:
        for r in rows.iter_rows(named=True):
            img = Image.open(root / r["source_path"]).convert("L")
            w, h = img.size
            s = max_size / max(w, h)
            img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=95)
            labels = np.asarray(r["labels"], dtype=np.int8).tobytes()
            sink.write({"__key__": r["key"], "jpg": buf.getvalue(), "labels.i8": labels})
            n += 1
    return n


def _one(kind: str, root: Path, out: Path, workers: int | None) -> dict:
    """One timed measurement in this (fresh) process. Module imports happen before the timer
    for both (webdataset imports torch, cxrfast imports polars/numba/cv2); everything else --
    metadata, tokenizer training, worker start-up, all image work, the manifest -- is timed."""
    shutil.rmtree(out, ignore_errors=True)
    if kind == "baseline":
        import PIL.Image  # noqa: F401
        import webdataset  # noqa: F401

        from cxrfast.shards.mimic_metadata import read_mimic  # noqa: F401
    else:
        from cxrfast.shards.build import shard_mimic
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        steady = None
        if kind == "baseline":
            n = naive_baseline(root, out)
        else:
            s = shard_mimic(root, root / "mimic-cxr-reports.zip", out, workers=workers)
            n, steady = s.samples, s.steady_images_per_s
        seconds = time.perf_counter() - t0
    return {"kind": kind, "images": n, "seconds": seconds, "steady_images_per_s": steady, "peak_rss_tree": peak.peak,
            **PeakRSS.rusage_bytes()}  # fmt: skip


def _dataset(cache: Path, images: int, size_range: tuple[int, int], seed: int) -> Path:
    """Synthetic MIMIC with about `images` frontal images at full resolution, made once."""
    from cxrfast.synth import make_mimic

    root = cache / f"mimic_{images}_{size_range[0]}-{size_range[1]}_s{seed}"
    if not (root / "mimic-cxr-reports.zip").exists():
        make_mimic(root, studies=images, seed=seed, size_range=size_range, workers=os.cpu_count() or 1, overwrite=True)
    return root


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="cxrfast bench shard", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--images", type=int, default=300,
        help="About this many frontal images (= studies). Enough that cxrfast's fixed ~1 s start-up "
        "(forkserver, numba) is amortised as on a real dataset (~227k images); made once under --cache.",
    )  # fmt: skip
    ap.add_argument("--size-min", type=int, default=2000)
    ap.add_argument("--size-max", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="cxrfast shard workers (default: all cores).")
    ap.add_argument("--repeats", type=int, default=3, help="Timed runs of each (after one warm-up run each).")
    ap.add_argument("--cache", type=Path, default=BENCH_OUT / "cache")
    ap.add_argument("--out", type=Path, default=BENCH_OUT)
    ap.add_argument("--one", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(_one(args.one, args.root, args.out, args.workers)))
        return 0

    root = _dataset(args.cache, args.images, (args.size_min, args.size_max), args.seed)
    work = args.out / "shard_work"
    runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
    for i in range(1 + args.repeats):
        for kind in ("baseline", "ours"):  # interleaved: both see the same machine load
            cmd = [sys.executable, "-m", "cxrfast.bench.shard_throughput", "--one", kind, "--root", str(root),
                   "--out", str(work / kind)] + (["--workers", str(args.workers)] if args.workers else [])  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                raise RuntimeError(f"benchmark run {kind} failed (exit {res.returncode})")
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
    ratio = summary["ours"]["images_per_s"] / summary["baseline"]["images_per_s"]
    # The baseline has no start-up to speak of (one process, ~50 ms of metadata): its
    # end-to-end rate is its steady rate.
    steady_ratio = summary["ours"]["steady_images_per_s"] / summary["baseline"]["images_per_s"]
    results = {
        "benchmark": NAME,
        "machine": machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_before": os.getloadavg(),
        "dataset": str(root),
        "size_range": [args.size_min, args.size_max],
        "repeats": args.repeats,
        "workers": args.workers or os.cpu_count(),
        "results": summary,
        "speedup": ratio,
        "speedup_image_stage": steady_ratio,
    }
    write_json(args.out, NAME, results)
    bar_plot(
        args.out, NAME, ["naive PIL + wds (1 proc)", f"cxrfast shard ({results['workers']} workers)"],
        [summary["baseline"]["images_per_s"], summary["ours"]["images_per_s"]], ylabel="images/s",
        title=f"Sharding {summary['ours']['images']} MIMIC images ({args.size_min}-{args.size_max} px) -> 512 px",
    )  # fmt: skip
    o, b = summary["ours"], summary["baseline"]
    numbers = (
        f"{o['images']} imgs {args.size_min}-{args.size_max}px: cxrfast {o['images_per_s']:.1f} img/s end-to-end "
        f"({o['steady_images_per_s']:.1f} img/s image stage) vs naive {b['images_per_s']:.1f} img/s = {ratio:.1f}x "
        f"end-to-end, {steady_ratio:.1f}x image stage; peak RSS (tree) {o['peak_rss_tree_gb']:.2f} GB vs "
        f"{b['peak_rss_tree_gb']:.2f} GB; 1-min load avg {results['load_avg_before'][0]:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after (shared machine)"
    )
    append_results_row(command_line(["shard", *argv]), numbers)
    print(numbers)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
