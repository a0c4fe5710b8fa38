"""`cxrfast bench train`: pre-training throughput of the real trainer path (DeepSpeed engine,
preset's method, `build_loader` data) per preset, with its variants measured in the same run.

Per configuration: images/s, achieved TFLOP/s and MFU (FLOPs from `method.flops_per_image()`:
encoder on visible tokens, decoder on all; peak from the GPU-name table), peak GPU memory and the
data-wait share of the step time. Variants per preset: DALI data (the baseline), synthetic data
(model speed alone), unfused kernels (plain-PyTorch references), and with `--compile` the
torch.compile'd compile targets. `--find-max-batch` finds the largest micro-batch whose training steps fit
in `--memory-limit-gb` (the allocator is capped there, as on a 12 GB card).

    cxrfast bench train                                   # CPU: tiny presets; CUDA: MAE-CXR, MRM, MGCA, MoCo-CXR
    cxrfast bench train --presets mrm_vitb --shards data/shards/mimic --compile
    cxrfast bench train --find-max-batch --memory-limit-gb 12 --presets mrm_vitb

Without --shards a synthetic MIMIC-layout dataset is generated and sharded under OUT/_shards.
Protocol: `--warmup` untimed steps, then `--repeats` timed windows of `--steps` steps; medians.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from cxrfast.bench.common import BENCH_OUT, append_results_row, bar_plot, command_line, machine, write_json
from cxrfast.shards.folder import open_shards
from cxrfast.shards.schema import MANIFEST

log = logging.getLogger(__name__)

NAME = "train_throughput"
#: DESIGN.md / issue goals on one H100: MAE-CXR ViT-B >= 9,000 img/s (40% MFU); MRM 200 epochs x
#: 377,110 images in < 5 h; MRM micro-batch 64 within 12 GB; MGCA >= 20x the published ~52 img/s
#: per GPU (one A100) and micro-batch 72 within 12 GB.
TARGETS = {
    "mae_cxr_vitb": {"images_per_s": 9000.0, "mfu": 0.40},
    "mrm_vitb": {"images_per_s": round(200 * 377_110 / (5 * 3600), 1), "micro_batch_within_12gb": 64},
    "mgca_vitb": {"images_per_s": 20 * 52.0, "micro_batch_within_12gb": 72},
}

#: Presets measured without --presets, by device.
DEFAULT_PRESETS = {
    "cuda": ("mae_cxr_vitb", "mrm_vitb", "mgca_vitb", "moco_cxr_r18", "moco_cxr_r50", "moco_cxr_d121"),
    "cpu": ("tiny_mae", "tiny_mrm", "tiny_moco", "tiny_mgca"),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cxrfast bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", help="comma-separated preset names (default: by device)")
    p.add_argument("--shards", type=Path, nargs="+", metavar="DIR",
                   help="shard folder(s), several read as their union (default: synthesize one under OUT/_shards)")
    p.add_argument("--synth-studies", type=int, help="studies to synthesize without --shards (default 60 CPU, 600 CUDA)")
    p.add_argument("--out", type=Path, default=BENCH_OUT)
    p.add_argument("--batch-size", type=int, help="micro-batch per step (default: the preset's)")
    p.add_argument("--steps", type=int, help="timed steps per repeat (default 20 CPU, 30 CUDA)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2 CPU, 10 CUDA)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default="dali,synthetic", help="data backends to measure (first = baseline)")
    p.add_argument("--no-unfused", action="store_true", help="skip the unfused-kernel variant")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd compile targets (CUDA)")
    p.add_argument("--find-max-batch", action="store_true", help="search the largest micro-batch within the limit")
    p.add_argument("--memory-limit-gb", type=float, default=12.0, help="GiB cap for --find-max-batch")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra preset override (repeatable), e.g. --set zero_stage=1")
    p.add_argument("--no-results-row", action="store_true", help="do not append to bench/RESULTS.md")
    return p.parse_args(argv)


def synthetic_shards(folder: Path, studies: int) -> Path:
    """A synthetic MIMIC-CXR-JPG tree with reports, sharded by the `cxrfast synth` / `cxrfast shard`
    commands in their own processes (reused when already there)."""
    import subprocess
    import sys

    shards = folder / f"mimic_{studies}"
    if (shards / MANIFEST).is_file():
        open_shards(shards)  # a damaged cached folder fails here, naming the file
        return shards
    raw = folder / f"mimic_raw_{studies}"
    cli = [sys.executable, "-m", "cxrfast.cli"]
    log.info("synthesizing %d studies and sharding them into %s", studies, shards)
    subprocess.run([*cli, "synth", "mimic", "--out", str(raw), "--studies", str(studies), "--seed", "0"], check=True)
    subprocess.run([*cli, "shard", "mimic", "--root", str(raw), "--reports", str(raw / "mimic-cxr-reports.zip"),
                    "--out", str(shards), "--overwrite"], check=True)
    return shards


#: Settings that do not change a step's speed but need what a benchmark does not have: an init weights
#: file (MRM's `mae_pretrain_vit_base.pth`) and shards large enough for MRM's 448 target.
_SPEED_NEUTRAL = ("method.init=none", "method.text_model=none", "method.on_small_shards=warn")


def _config(preset: str, overrides: list[str]):
    from cxrfast.config import apply_overrides, override_keys
    from cxrfast.presets import get_preset

    cfg = get_preset(preset)
    keys = override_keys(cfg)
    neutral = [o for o in _SPEED_NEUTRAL if o.partition("=")[0] in keys]
    # One micro-batch per optimizer step; no checkpoints or export in a benchmark.
    return apply_overrides(cfg, ["global_batch_size=none", "export=false", *neutral, *overrides])


def _release(engine: Any = None) -> None:
    """Free an engine's memory before the next configuration is built."""
    import torch

    if engine is not None:
        engine.destroy()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(cfg, shards: list[Path], *, steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Median images/s etc. of `repeats` windows of `steps` optimizer steps after `warmup` steps."""
    import torch

    from cxrfast.methods.base import StepContext
    from cxrfast.trainer.metrics import peak_tflops
    from cxrfast.trainer.run import build

    cuda = torch.cuda.is_available()
    built = build(cfg, shards)
    engine, data = built.engine, built.data
    micro = built.ds["train_micro_batch_size_per_gpu"]
    accum = built.ds["gradient_accumulation_steps"]
    ctx = StepContext(step=0, epoch=0, epochs=cfg.optim.epochs, steps_per_epoch=data.steps, rank=0, world_size=1,
                      global_batch=built.ds["train_batch_size"], accumulation=accum, engine=engine)
    engine.module.on_train_start(ctx)
    engine.module.on_epoch_start(ctx)

    stream = data.stream()

    def window(n_steps: int) -> tuple[float, float]:
        wait = 0.0
        t0 = time.perf_counter()
        out = None
        for _ in range(n_steps * accum):
            tw = time.perf_counter()
            batch = next(stream)
            wait += time.perf_counter() - tw
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            if engine.is_gradient_accumulation_boundary():
                ctx.step += 1
                engine.module.after_optimizer_step(ctx)  # e.g. MoCo's momentum update and queue
        float(out["loss"])  # one host sync per window
        return time.perf_counter() - t0, wait

    torch.manual_seed(0)
    window(warmup)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ips, waits = [], []
    for _ in range(repeats):
        dt, wait = window(steps)
        ips.append(steps * accum * micro / dt)
        waits.append(wait / dt)
    images_per_s = statistics.median(ips)
    tflops = images_per_s * built.flops_per_image / 1e12
    peak = cfg.train.peak_tflops or (peak_tflops(torch.cuda.get_device_name()) if cuda else None)
    result = {
        "preset": cfg.preset, "method": cfg.method_name, "backend": cfg.data.backend,
        "fused": getattr(cfg.method, "fused", None), "compile": cfg.train.compile,
        "micro_batch": micro, "images_per_s": images_per_s, "images_per_s_repeats": ips,
        "data_wait_share": statistics.median(waits), "gflops_per_image": built.flops_per_image / 1e9,
        "tflops": tflops, "mfu": tflops / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "steps_per_epoch": data.steps,
    }
    stream.close()
    _release(engine)
    return result


def fits(cfg, shards: list[Path], steps: int = 3) -> tuple[bool, float | None]:
    """Whether `steps` training steps run without OOM under the capped allocator; peak GiB."""
    import torch

    try:
        r = measure(cfg, shards, steps=steps, warmup=1, repeats=1)
        return True, r["peak_reserved_gib"]
    except torch.cuda.OutOfMemoryError:
        _release()
        return False, None


def batch_overrides(preset: str, batch_size: int, overrides: list[str]) -> list[str]:
    """Overrides that run `preset` at micro-batch `batch_size` (one rank, no accumulation). A MoCo
    queue must be a multiple of the global batch: its size becomes the next multiple of `batch_size`
    (at most batch_size - 1 more keys, a few MB at MoCo-CXR's dim 128, so the memory measured is
    the preset's)."""
    out = [*overrides, f"batch_size={batch_size}"]
    method = _config(preset, out).method
    queue = getattr(method, "queue_size", None)
    if queue is not None and queue % batch_size:
        out.append(f"method.queue_size={-(-queue // batch_size) * batch_size}")
    return out


def find_max_batch(preset: str, shards: list[Path], limit_gib: float, overrides: list[str]) -> dict[str, Any]:
    """Largest micro-batch (multiple of 8) whose steps fit in `limit_gib` GiB on this GPU, and
    whether the preset's goal micro-batch (TARGETS, else 64) fits."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--find-max-batch measures GPU memory: it needs CUDA (none here)")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_gib * 2**30 / total))
    tried: dict[int, float | None] = {}

    def trial(bs: int) -> bool:
        ok, peak = fits(_config(preset, [*batch_overrides(preset, bs, overrides), "data.backend=synthetic"]), shards)
        tried[bs] = peak if ok else None
        log.info("micro-batch %d: %s", bs, f"fits, peak {peak:.2f} GiB" if ok else "out of memory")
        return ok

    lo, hi = 0, 8
    while trial(hi):
        lo, hi = hi, hi * 2
        if hi > 4096:
            break
    while hi - lo > 8:
        mid = (lo + hi) // 2 // 8 * 8
        if trial(mid):
            lo = mid
        else:
            hi = mid
    goal = TARGETS.get(preset, {}).get("micro_batch_within_12gb", 64)
    if goal not in tried:
        trial(goal)
    return {"preset": preset, "memory_limit_gib": limit_gib, "max_micro_batch": lo, "goal_micro_batch": goal,
            "fits_goal_micro_batch": tried.get(goal) is not None, "peak_reserved_gib_by_batch": tried}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from cxrfast.trainer import distributed

    cuda = torch.cuda.is_available()
    presets = args.presets.split(",") if args.presets else list(DEFAULT_PRESETS["cuda" if cuda else "cpu"])
    steps = args.steps or (30 if cuda else 20)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    shards = args.shards or [synthetic_shards(args.out / "_shards", args.synth_studies or (600 if cuda else 60))]
    extra = list(args.overrides) + ([f"batch_size={args.batch_size}"] if args.batch_size else [])
    backends = args.backends.split(",")

    distributed.init()
    try:
        results: dict[str, Any] = {"machine": machine(), "command": command_line(["train", *argv]), "targets": TARGETS,
                                   "shards": [str(s) for s in shards], "runs": [], "max_batch": []}
        if args.find_max_batch:
            for preset in presets:
                results["max_batch"].append(find_max_batch(preset, shards, args.memory_limit_gb, extra))
        else:
            for preset in presets:
                variants = [[f"data.backend={b}"] for b in backends]
                if not args.no_unfused and hasattr(_config(preset, []).method, "fused"):
                    variants.append([f"data.backend={backends[0]}", "method.fused=false"])
                if args.compile:
                    variants.append([f"data.backend={backends[0]}", "compile=true"])
                for v in variants:
                    r = measure(_config(preset, [*extra, *v]), shards, steps=steps, warmup=warmup, repeats=args.repeats)
                    log.info("%s %s: %.1f images/s, %.1f%% data wait, %.3g TFLOP/s", preset, " ".join(v),
                             r["images_per_s"], 100 * r["data_wait_share"], r["tflops"])
                    results["runs"].append(r)
                    gc.collect()
    finally:
        distributed.teardown()

    path = write_json(args.out, NAME, results)
    numbers = []
    if results["runs"]:
        labels = [f"{r['preset']}\n{r['backend']}{' unfused' if r['fused'] is False else ''}{' compile' if r['compile'] else ''}"
                  for r in results["runs"]]
        bar_plot(args.out, NAME, labels, [r["images_per_s"] for r in results["runs"]], ylabel="images/s",
                 title=f"pre-training throughput ({'GPU' if cuda else 'CPU'}, 1 process)")
        for r in results["runs"]:
            mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] else ""
            mem = f", {r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] else ""
            numbers.append(f"{r['preset']} {r['backend']}{' unfused' if r['fused'] is False else ''}"
                           f"{' compile' if r['compile'] else ''} b{r['micro_batch']}: {r['images_per_s']:.1f} img/s, "
                           f"{r['tflops']:.3g} TFLOP/s{mfu}{mem}, wait {100 * r['data_wait_share']:.0f}%")
    for m in results["max_batch"]:
        numbers.append(f"{m['preset']} max micro-batch in {m['memory_limit_gib']:g} GiB: {m['max_micro_batch']}"
                       f" ({m['goal_micro_batch']} fits: {m['fits_goal_micro_batch']})")
    summary = "; ".join(numbers)
    if not args.no_results_row:
        append_results_row(results["command"], summary)
    log.info("wrote %s: %s", path, summary)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
