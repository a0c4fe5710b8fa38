"""`cxrfast bench maxsize`: what a larger `cxrfast shard --max-size` costs: sharding time, disk, and
the MRM loader's images/s (DALI and the DataLoader baseline), per max size, against the default 512
measured in the same run; with the share of MRM's 448-px crops that are upsampled at each size.

MRM crops 448 px (scale 0.2-1) from full-resolution images; at 512-px shards nearly every such crop
is an upsampled image (`cxrfast.pipelines.resolution`). Sources are synthetic MIMIC-CXR images at
--size-min..--size-max px (MIMIC-CXR-JPG: mostly 2544 x 3056), made once under --out/cache. Protocol:
sharding runs interleaved over the sizes, median of --repeats; loaders: warm-up, median of repeats.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

NAME = "max_size"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cxrfast bench maxsize", description=__doc__.split("\n\n")[0])
    p.add_argument("--max-sizes", type=int, nargs="+", default=[512, 1024, 1280],
                   help="long sides to shard at; the first is the baseline (default: 512 1024 1280)")
    p.add_argument("--studies", type=int, default=48, help="synthetic MIMIC studies (about one frontal image each)")
    p.add_argument("--size-min", type=int, default=2000)
    p.add_argument("--size-max", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=2, help="sharding runs per size (median)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="shard workers, DALI threads and DataLoader workers (default: all cores)")
    p.add_argument("--backends", nargs="+", default=["dali", "torch"], choices=["dali", "torch"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=4, help="batches per timed loader repeat")
    p.add_argument("--loader-repeats", type=int, default=3)
    p.add_argument("--device", choices=["gpu", "cpu"], default=None, help="DALI device (default: gpu if CUDA)")
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    p.add_argument("--no-results-row", action="store_true", help="do not append to bench/RESULTS.md")
    return p.parse_args(argv)


def _raw(cache: Path, studies: int, size_range: tuple[int, int]) -> Path:
    from cxrfast.synth import make_mimic

    root = cache / f"mimic_{studies}_{size_range[0]}-{size_range[1]}"
    if not (root / "mimic-cxr-reports.zip").is_file():
        log.info("generating %d synthetic MIMIC-CXR studies at %s px in %s", studies, size_range, root)
        make_mimic(root, studies=studies, seed=0, size_range=size_range, workers=os.cpu_count() or 1, overwrite=True)
    return root


def _shard(raw: Path, out: Path, max_size: int, workers: int) -> dict:
    from cxrfast.shards.build import shard_mimic

    t0 = time.perf_counter()
    s = shard_mimic(raw, raw / "mimic-cxr-reports.zip", out, max_size=max_size, workers=workers, overwrite=True)
    return {"seconds": time.perf_counter() - t0, "samples": s.samples, "bytes": s.bytes}


def main(argv: list[str]) -> int:
    import torch

    from cxrfast.bench.common import append_results_row, bar_plot, command_line, machine, write_json
    from cxrfast.bench.loader_throughput import measure
    from cxrfast.pipelines import build_loader
    from cxrfast.pipelines.resolution import target_resolution
    from cxrfast.shards.folder import open_shards

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    load_before = os.getloadavg()[0]
    if len(set(args.max_sizes)) != len(args.max_sizes) or min(args.max_sizes) < 1:
        raise ValueError(f"--max-sizes must be distinct positive sizes, got {args.max_sizes}")
    cuda = torch.cuda.is_available()
    device = args.device or ("gpu" if cuda else "cpu")
    raw = _raw(args.out / "cache", args.studies, (args.size_min, args.size_max))
    work = args.out / "max_size_work"

    shard_runs: dict[int, list[dict]] = {m: [] for m in args.max_sizes}
    for rep in range(args.repeats):  # interleaved: every size sees the same machine load
        for m in args.max_sizes:
            r = _shard(raw, work / f"s{m}", m, args.workers)
            shard_runs[m].append(r)
            log.info("shard --max-size %d (run %d): %.1f s, %.1f MB", m, rep + 1, r["seconds"], r["bytes"] / 1e6)

    results: dict[int, dict] = {}
    for m in args.max_sizes:
        folder = open_shards(work / f"s{m}")
        res = target_resolution(folder, target=448, scale=(0.2, 1.0))
        runs = shard_runs[m]
        seconds = statistics.median(r["seconds"] for r in runs)
        entry = {
            "shard_seconds": seconds, "shard_seconds_all": [r["seconds"] for r in runs],
            "shard_images_per_s": runs[0]["samples"] / seconds, "samples": runs[0]["samples"],
            "bytes": runs[0]["bytes"], "mrm_upsampled_share": res.upsampled_share, "loader": {},
        }  # fmt: skip
        for backend in args.backends:
            loader = build_loader(folder, "train", "mrm", batch_size=args.batch_size, backend=backend, device=device,
                                  num_threads=args.workers, drop_last=True, seed=0)  # fmt: skip
            if len(loader) == 0:
                raise ValueError(f"{folder.root}: fewer than --batch-size={args.batch_size} train samples")
            entry["loader"][backend] = measure(loader, batches=args.batches, warmup=1, repeats=args.loader_repeats,
                                               cuda=cuda and device == "gpu")  # fmt: skip
            log.info("mrm loader %s at max size %d: %.0f img/s", backend, m, entry["loader"][backend]["images_per_s"])
            del loader
        results[m] = entry

    base = results[args.max_sizes[0]]
    ratios = {
        m: {
            "shard_time": r["shard_seconds"] / base["shard_seconds"],
            "disk": r["bytes"] / base["bytes"],
            **{f"{b}_img_s": r["loader"][b]["images_per_s"] / base["loader"][b]["images_per_s"] for b in args.backends},
        }
        for m, r in results.items()
    }
    desc = machine()
    payload = {
        "benchmark": NAME, "command": command_line(["maxsize", *argv]), "machine": desc, "dali_device": device,
        "workers": args.workers, "source_size_range": [args.size_min, args.size_max], "baseline_max_size": args.max_sizes[0],
        "load_avg_before": load_before,
        "results": {str(m): r for m, r in results.items()}, "ratio_to_baseline": {str(m): r for m, r in ratios.items()},
    }  # fmt: skip
    json_path = write_json(args.out, NAME, payload)
    labels = [f"{k} @{m}" for m in args.max_sizes[1:] for k in ratios[m]]
    values = [v for m in args.max_sizes[1:] for v in ratios[m].values()]
    png = bar_plot(args.out, NAME, labels, values, ylabel=f"ratio to --max-size {args.max_sizes[0]}",
                   title=f"cost of larger shards: {base['samples']} imgs {args.size_min}-{args.size_max} px, "
                   f"{args.workers} workers")  # fmt: skip

    def row(m: int) -> str:
        r, q = results[m], ratios[m]
        loaders = ", ".join(f"{b} {r['loader'][b]['images_per_s']:.0f} img/s" for b in args.backends)
        rel = "" if m == args.max_sizes[0] else (
            f" (x{q['shard_time']:.2f} time, x{q['disk']:.2f} disk, "
            + ", ".join(f"x{q[f'{b}_img_s']:.2f} {b}" for b in args.backends) + ")"
        )  # fmt: skip
        return (f"{m}: shard {r['shard_seconds']:.1f} s, {r['bytes'] / 1e6:.1f} MB, mrm {loaders}, "
                f"{r['mrm_upsampled_share']:.0%} of 448 crops upsampled{rel}")  # fmt: skip

    numbers = (f"{base['samples']} imgs {args.size_min}-{args.size_max}px, DALI {device}, {args.workers} workers, "
               f"batch {args.batch_size}: " + "; ".join(row(m) for m in args.max_sizes)
               + f"; 1-min load avg {load_before:.1f} before / {os.getloadavg()[0]:.1f} after")  # fmt: skip
    if not args.no_results_row:
        append_results_row(payload["command"], numbers, machine_desc=desc)
    log.info("wrote %s and %s", json_path, png)
    print(f"max size cost: {numbers}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
