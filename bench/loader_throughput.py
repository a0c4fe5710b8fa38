"""`cxrfast bench pipelines`: images/s of the data loader alone (no model), per augmentation, DALI against
the DataLoader baseline with the same number of CPU workers, in one run over the same shards.

DALI runs on the GPU (`mixed` nvJPEG decode + GPU ops) when CUDA is available, else in DALI's
CPU-only mode. Without --shards, a synthetic MIMIC-CXR tree is generated and sharded at 512 px long
side once, cached under --out/cache. Protocol (bench/common.py): warm-up, median of repeats; full
batches only (drop_last) so every timed call moves the same number of images.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from cxrfast.bench.common import BENCH_OUT
from cxrfast.pipelines.augmentations import AUGMENTATIONS
from cxrfast.shards.folder import open_shards
from cxrfast.shards.schema import MANIFEST

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cxrfast bench pipelines", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, default=None, help="shard folder (default: build a synthetic one, cached)")
    p.add_argument("--studies", type=int, default=300, help="synthetic MIMIC studies when building shards")
    p.add_argument("--raw-size", type=int, nargs=2, default=(1024, 1536), metavar=("MIN", "MAX"),
                   help="synthetic source image side range (shards are 512 px long side regardless)")
    p.add_argument("--split", default="train")
    p.add_argument("--augmentations", nargs="+", default=sorted(AUGMENTATIONS), choices=sorted(AUGMENTATIONS))
    p.add_argument("--backends", nargs="+", default=["dali", "torch"], choices=["dali", "torch"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=20, help="batches per timed repeat")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="CPU workers: DALI num_threads and DataLoader num_workers (default: all cores)")
    p.add_argument("--device", choices=["gpu", "cpu"], default=None, help="DALI device (default: gpu if CUDA)")
    p.add_argument("--out", type=Path, default=BENCH_OUT)
    p.add_argument("--no-results-row", action="store_true", help="do not append to bench/RESULTS.md")
    return p.parse_args(argv)


def ensure_shards(out: Path, studies: int, raw_size: tuple[int, int], workers: int) -> Path:
    """A cached synthetic MIMIC shard folder (512 px long side) under `out/cache`."""
    from cxrfast.shards.build import shard_mimic
    from cxrfast.synth import make_mimic

    cache = out / "cache" / f"mimic_{studies}_{raw_size[0]}-{raw_size[1]}"
    shards = cache / "shards"
    if (shards / MANIFEST).is_file():
        open_shards(shards)  # a damaged cached folder fails here, naming the file
        log.info("using cached shards %s", shards)
        return shards
    raw = cache / "raw"
    if not (raw / "mimic-cxr-reports.zip").is_file():
        log.info("generating %d synthetic MIMIC-CXR studies in %s", studies, raw)
        make_mimic(raw, studies=studies, seed=0, size_range=tuple(raw_size))
    log.info("sharding into %s (512 px long side)", shards)
    summary = shard_mimic(raw, raw / "mimic-cxr-reports.zip", shards, max_size=512, workers=workers, overwrite=True)
    log.info("%s", summary.line())
    return shards


def endless(loader) -> Iterator[dict]:
    """Batches across epoch boundaries."""
    while True:
        yield from loader


def measure(loader, *, batches: int, warmup: int, repeats: int, cuda: bool) -> dict:
    """Median images/s over `repeats` calls that each pull `batches` batches."""
    import torch

    from cxrfast.bench.common import median_time

    stream = endless(loader)
    counted: list[int] = []

    def pull() -> None:
        n = 0
        for _ in range(batches):
            batch = next(stream)
            n += len(batch["labels"])
        if cuda:
            torch.cuda.synchronize()
        counted.append(n)

    t0 = time.perf_counter()
    med, samples = median_time(pull, warmup=warmup, repeats=repeats)
    images = counted[-1]
    return {
        "images_per_s": images / med,
        "median_s": med,
        "samples_s": samples,
        "images_per_repeat": images,
        "wall_s": time.perf_counter() - t0,
    }


def main(argv: list[str]) -> int:
    import torch
    from rich.progress import track

    from cxrfast.bench.common import append_results_row, bar_plot, command_line, machine, write_json
    from cxrfast.pipelines import build_loader

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cuda = torch.cuda.is_available()
    device = args.device or ("gpu" if cuda else "cpu")
    shards = args.shards or ensure_shards(args.out, args.studies, tuple(args.raw_size), args.workers)

    runs = [(r, b) for r in args.augmentations for b in args.backends]
    results: dict[str, dict[str, dict]] = {r: {} for r in args.augmentations}
    for augmentation, backend in track(runs, description="loaders"):
        loader = build_loader(
            shards, args.split, augmentation, batch_size=args.batch_size, backend=backend, device=device,
            num_threads=args.workers, drop_last=True, seed=0,
        )
        if len(loader) == 0:
            raise ValueError(f"{shards}: split {args.split!r} has fewer than --batch-size={args.batch_size} samples")
        results[augmentation][backend] = measure(loader, batches=args.batches, warmup=args.warmup, repeats=args.repeats,
                                           cuda=cuda and device == "gpu")
        log.info("%s/%s: %.0f images/s", augmentation, backend, results[augmentation][backend]["images_per_s"])
        del loader

    ratios = {
        r: res["dali"]["images_per_s"] / res["torch"]["images_per_s"]
        for r, res in results.items()
        if "dali" in res and "torch" in res
    }
    desc = machine()
    payload = {
        "benchmark": "loader_throughput",
        "command": command_line(["pipelines", *argv]),
        "machine": desc,
        "dali_device": device,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "shards": str(shards),
        "split": args.split,
        "results": results,
        "dali_over_torch": ratios,
    }
    json_path = write_json(args.out, "loader_throughput", payload)
    labels = [f"{r}/{b}" for r in args.augmentations for b in args.backends]
    values = [results[r][b]["images_per_s"] for r in args.augmentations for b in args.backends]
    png = bar_plot(
        args.out, "loader_throughput", labels, values, ylabel="images/s",
        title=f"loader only, batch {args.batch_size}, {args.workers} CPU workers, DALI on {device}",
    )
    numbers = "; ".join(
        f"{r}: " + ", ".join(f"{b} {results[r][b]['images_per_s']:.0f}" for b in args.backends)
        + (f" img/s ({ratios[r]:.2f}x)" if r in ratios else " img/s")
        for r in args.augmentations
    )
    numbers += f" [DALI {device}, {args.workers} workers, batch {args.batch_size}]"
    if not args.no_results_row:
        append_results_row(payload["command"], numbers, machine_desc=desc)
    log.info("wrote %s and %s", json_path, png)
    print(f"loader throughput: {numbers}")
    return 0
