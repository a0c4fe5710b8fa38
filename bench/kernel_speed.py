"""`cxrfast bench kernels`: fused Triton kernels vs their PyTorch references, forward+backward.

Shapes are ViT-B/16 MAE's (batch 256, 196 patches, D 768, mask ratios 0.75/0.9, loss on 16x16
patches of a 224 target) and MRM's (32x32 patches of a 448 target; 100-token reports, 50% whole-word
masking). On CUDA every case runs both implementations in the same process: median of repeats after
warm-up, timed with CUDA events (`triton.testing.do_bench`, return_mode="median"), plus peak memory
above the inputs (`torch.cuda.max_memory_allocated` delta). Target: fused >= 3x faster, never more
memory. Without CUDA only the references run (at a reduced batch, wall clock) and the fused
numbers stay open; the JSON and the RESULTS.md row say so.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import BENCH_OUT, append_results_row, bar_plot, command_line, machine, median_time, write_json

log = logging.getLogger(__name__)
NAME = "kernel_speed"
SPEEDUP_TARGET = 3.0


@dataclass(frozen=True)
class Case:
    """One benchmark case: `make(impl)` returns a closure running forward(+backward) once."""

    name: str
    shape: str
    make: Callable[[str], Callable[[], Any]]


def _cases(batch: int, device: str, dtype: Any) -> list[Case]:
    import torch

    from cxrfast.kernels import mask_tokens, masked_patch_mse, random_masking

    gen = torch.Generator(device=device).manual_seed(0)
    cases: list[Case] = []

    def masking_case(ratio: float) -> Case:
        x = torch.randn(batch, 196, 768, device=device, dtype=dtype, requires_grad=True)
        pos = torch.randn(1, 196, 768, device=device, dtype=dtype, requires_grad=True)
        k = int(196 * (1 - ratio))
        grad = torch.randn(batch, k, 768, device=device, dtype=dtype)

        def make(impl: str) -> Callable[[], Any]:
            def run() -> Any:
                out = random_masking(x, pos, ratio, gen, impl=impl)
                return torch.autograd.grad(out.x, (x, pos), grad)

            return run

        return Case(f"random_masking r={ratio}", f"x[{batch},196,768] pos[1,196,768]", make)

    def loss_case(label: str, img: int, patch: int) -> Case:
        n = (img // patch) ** 2
        pred = torch.randn(batch, n, patch * patch, device=device, dtype=dtype, requires_grad=True)
        target = torch.rand(batch, 1, img, img, device=device)
        mask = (torch.rand(batch, n, device=device) < 0.75).float()

        def make(impl: str) -> Callable[[], Any]:
            def run() -> Any:
                loss = masked_patch_mse(pred, target, mask, patch, True, impl=impl)
                return torch.autograd.grad(loss, pred)

            return run

        return Case(f"masked_patch_mse {label}", f"pred[{batch},{n},{patch * patch}] target[{batch},1,{img},{img}]", make)

    def mlm_case() -> Case:
        ids = torch.randint(5, 30000, (batch, 100), device=device)
        ids[:, 0], ids[:, 60:] = 2, 0  # [CLS] ... then padding
        word_start = torch.rand(batch, 100, device=device) < 0.7
        special = torch.tensor([0, 1, 2, 3, 4], device=device)

        def make(impl: str) -> Callable[[], Any]:
            def run() -> Any:
                return mask_tokens(
                    ids, word_start, prob=0.5, replace_mask=0.8, replace_random=0.1, mask_id=4, vocab_size=30000,
                    special_ids=special, generator=gen, impl=impl,
                )  # fmt: skip

            return run

        return Case("mask_tokens p=0.5 (fwd only)", f"ids[{batch},100]", make)

    cases += [masking_case(0.75), masking_case(0.9)]
    cases += [loss_case("MAE 224/p16", 224, 16), loss_case("MRM 448/p32", 448, 32)]
    cases.append(mlm_case())
    return cases


def _cuda_measure(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, float]:
    """(median ms via CUDA events, peak MiB allocated above what was live before the call)."""
    import torch
    from triton.testing import do_bench

    fn()  # compile / autotune outside the timing and the memory window
    torch.cuda.synchronize()
    ms = do_bench(fn, warmup=warmup, rep=repeats, return_mode="median")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return float(ms), float(peak)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cxrfast bench kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=BENCH_OUT, help="folder for kernel_speed.json/.png")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 256 on CUDA, 8 on CPU)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of tokens and predictions")
    parser.add_argument("--warmup", type=int, default=25, help="CUDA: warm-up time in ms (do_bench); CPU: untimed calls, at most 2")
    parser.add_argument("--repeats", type=int, default=100, help="CUDA: timed period in ms (do_bench); CPU: timed calls, at most 10")
    parser.add_argument("--no-results-row", action="store_true", help="do not append to bench/RESULTS.md")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    batch = args.batch or (256 if cuda else 8)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    note = "" if cuda else "cuda unavailable: fused numbers open (reference only, wall clock)"
    if note:
        log.warning("%s; batch %d", note, batch)
    cases = _cases(batch, device, dtype)

    rows: list[dict[str, Any]] = []
    from rich.progress import track

    for case in track(cases, description=f"kernels on {device}"):
        row: dict[str, Any] = {"case": case.name, "shape": case.shape}
        if cuda:
            row["reference_ms"], row["reference_peak_mib"] = _cuda_measure(case.make("reference"), args.warmup, args.repeats)
            row["fused_ms"], row["fused_peak_mib"] = _cuda_measure(case.make("triton"), args.warmup, args.repeats)
            row["speedup"] = row["reference_ms"] / row["fused_ms"]
            row["target_met"] = row["speedup"] >= SPEEDUP_TARGET and row["fused_peak_mib"] <= row["reference_peak_mib"]
        else:
            med, samples = median_time(case.make("reference"), warmup=min(args.warmup, 2), repeats=min(args.repeats, 10))
            row["reference_ms"], row["reference_samples_ms"] = med * 1e3, [s * 1e3 for s in samples]
            row["fused_ms"] = row["fused_peak_mib"] = row["reference_peak_mib"] = row["speedup"] = None
            row["target_met"] = None
        rows.append(row)

    results = {
        "benchmark": NAME,
        "machine": machine(),
        "device": device,
        "batch": batch,
        "dtype": args.dtype,
        "timing": "triton.testing.do_bench median (CUDA events)" if cuda else "wall clock median (CPU)",
        "speedup_target": SPEEDUP_TARGET,
        "note": note,
        "cases": rows,
    }
    json_path = write_json(args.out, NAME, results)
    labels, values = [], []
    for row in rows:
        labels.append(f"{row['case']} ref")
        values.append(row["reference_ms"])
        if row["fused_ms"] is not None:
            labels.append(f"{row['case']} fused")
            values.append(row["fused_ms"])
    png = bar_plot(args.out, NAME, labels, values, ylabel="ms (fwd+bwd)", title=f"kernels, {device}, batch {batch}, {args.dtype}")

    if cuda:
        parts = [
            f"{r['case']}: ref {r['reference_ms']:.3g} ms {r['reference_peak_mib']:.0f} MiB, "
            f"fused {r['fused_ms']:.3g} ms {r['fused_peak_mib']:.0f} MiB ({r['speedup']:.1f}x)"
            for r in rows
        ]
        summary = f"batch {batch} {args.dtype}; " + "; ".join(parts)
    else:
        summary = f"{note}; batch {batch} {args.dtype}; " + "; ".join(f"{r['case']}: ref {r['reference_ms']:.3g} ms" for r in rows)
    if not args.no_results_row:
        append_results_row(command_line(["kernels", *argv]), summary)
    met = [r["target_met"] for r in rows if r["target_met"] is not None]
    verdict = f"{sum(met)}/{len(met)} cases meet >= {SPEEDUP_TARGET:g}x and <= memory" if met else note
    print(f"kernel_speed: {verdict}; wrote {json_path} and {png}")
    return 0
