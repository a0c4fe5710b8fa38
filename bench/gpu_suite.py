"""`cxrfast bench gpu`: the one-shot GPU suite, for whoever is lent a GPU for ~10 minutes.

One command runs, each step in its own process with its own time limit, and a failed or timed-out
step recorded without stopping the others:

1. the compiled Triton kernel tests (`TRITON_INTERPRET=0 pytest tests/test_kernels_*.py`);
2. DALI `mixed` (nvJPEG + GPU ops) against DALI's CPU mode, every augmentation, same seed;
3. loader images/s per augmentation, DALI on the GPU vs the DataLoader with all cores;
4. the kernels, fused vs reference (ms and peak memory);
5. pre-training images/s, MFU and peak memory per preset at micro-batch 64;
6. the largest MRM and MGCA micro-batch within 12 GB (goals: 64 and 72).

It synthesizes and shards its own data first. Everything lands in ONE JSON and ONE PNG under
`--out` (the device tool brings back only a few files), and the JSON holds the `bench/RESULTS.md`
row; on the machine that keeps the repository, `cxrfast bench gpu --record gpu_suite.json`
appends it. `bench/gpu_suite.sh` is the device entry point (installs the carried wheels first).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrfast.pipelines.augmentations import AUGMENTATIONS

log = logging.getLogger(__name__)

NAME = "gpu_suite"
#: Presets timed in step 5, when registered (new methods join the suite by being here).
TRAIN_PRESETS = ("mae_cxr_vitb", "mrm_vitb", "mgca_vitb", "moco_cxr_r50")
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    """One suite step: a command run in its own process, with a share of the time budget."""

    name: str
    argv: list[str]
    share: float  # fraction of the budget this step may use
    result_json: Path | None = None  # the benchmark JSON the step writes, merged into the suite's
    env: dict[str, str] = field(default_factory=dict)


def plan(work: Path, shards: Path, *, presets: list[str], batch_size: int, workers: int,
         python: str = sys.executable, tests: Path = REPO / "tests") -> list[Step]:
    """The steps after the data step, in order; their own outputs go under `work`."""
    cli = [python, "-m", "cxrfast.cli", "bench"]
    steps = []
    kernel_tests = sorted(str(p) for p in tests.glob("test_kernels_*.py")) if tests.is_dir() else []
    if kernel_tests:
        steps.append(Step("kernel_tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *kernel_tests],
                          0.12, env={"TRITON_INTERPRET": "0"}))
    steps += [
        Step("dali_parity", [python, "-m", "cxrfast.bench.gpu_suite", "--parity", str(shards),
                             "--out", str(work / "parity")], 0.06, work / "parity" / "dali_parity.json"),
        Step("pipelines", [*cli, "pipelines", "--shards", str(shards), "--batch-size", str(batch_size),
                           "--batches", "10", "--repeats", "3", "--workers", str(workers), "--out", str(work / "pipelines"),
                           "--no-results-row"], 0.16, work / "pipelines" / "loader_throughput.json"),
        Step("kernels", [*cli, "kernels", "--out", str(work / "kernels"), "--no-results-row"], 0.1,
             work / "kernels" / "kernel_speed.json"),
        Step("train", [*cli, "train", "--presets", ",".join(presets), "--shards", str(shards), "--batch-size",
                       str(batch_size), "--steps", "20", "--warmup", "5", "--repeats", "2", "--out", str(work / "train"),
                       "--no-results-row"], 0.3, work / "train" / "train_throughput.json"),
        Step("max_batch", [*cli, "train", "--find-max-batch", "--memory-limit-gb", "12", "--presets",
                           ",".join(p for p in ("mrm_vitb", "mgca_vitb") if p in presets),
                           "--shards", str(shards), "--out", str(work / "max_batch"), "--no-results-row"], 0.2,
             work / "max_batch" / "train_throughput.json"),
    ]
    return steps


def run_step(step: Step, timeout: float) -> dict[str, Any]:
    """Run one step; {status: ok|failed|timeout, seconds, tail, result}."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}
    log.info("step %s (limit %.0f s): %s", step.name, timeout, " ".join(step.argv))
    try:
        proc = subprocess.run(step.argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        status = "ok" if proc.returncode == 0 else "failed"
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        status = "timeout"
        tail = ((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"))[-3000:]
    result = None
    if step.result_json is not None and step.result_json.is_file():
        result = json.loads(step.result_json.read_text())
    seconds = time.perf_counter() - t0
    log.info("step %s: %s in %.0f s", step.name, status, seconds)
    return {"status": status, "seconds": round(seconds, 1), "tail": tail, "result": result}


def summary_numbers(steps: dict[str, dict[str, Any]]) -> list[str]:
    """The headline numbers of a suite run, one string per finding (the RESULTS.md row)."""
    out = []
    for name, s in steps.items():
        if s["status"] != "ok":
            out.append(f"{name}: {s['status']}")
    r = (steps.get("kernel_tests") or {})
    if r.get("status") == "ok":
        line = [ln for ln in r["tail"].splitlines() if " passed" in ln]
        out.append(f"compiled kernel tests: {line[-1].strip() if line else 'ok'}")
    par = (steps.get("dali_parity") or {}).get("result")
    if par:
        worst = max(par["augmentations"].values(), key=lambda v: v["mean_abs_diff"])
        out.append(f"DALI mixed vs cpu: max mean |diff| {worst['mean_abs_diff']:.4f} "
                   f"({'pass' if par['ok'] else 'FAIL'})")
    pipe = (steps.get("pipelines") or {}).get("result")
    if pipe:
        out.append("loader img/s dali/torch: " + ", ".join(
            f"{a} {v['dali']['images_per_s']:.0f}/{v['torch']['images_per_s']:.0f} ({pipe['dali_over_torch'][a]:.1f}x)"
            for a, v in pipe["results"].items() if "dali" in v and "torch" in v))
    ker = (steps.get("kernels") or {}).get("result")
    if ker:
        out.append("kernels fused/ref: " + ", ".join(
            f"{c['case']} {c['speedup']:.2f}x" for c in ker.get("cases", []) if c.get("speedup")))
    tr = (steps.get("train") or {}).get("result")
    if tr:
        for run in tr["runs"]:
            mfu = f", MFU {100 * run['mfu']:.1f}%" if run.get("mfu") else ""
            mem = f", {run['peak_mem_gib']:.1f} GiB" if run.get("peak_mem_gib") else ""
            fused = " unfused" if run.get("fused") is False else ""
            out.append(f"{run['preset']} {run['backend']}{fused} b{run['micro_batch']}: {run['images_per_s']:.0f} img/s"
                       f"{mfu}{mem}, wait {100 * run['data_wait_share']:.0f}%")
    mb = (steps.get("max_batch") or {}).get("result")
    if mb:
        for m in mb.get("max_batch", []):
            out.append(f"{m['preset']} max micro-batch in {m['memory_limit_gib']:g} GiB: {m['max_micro_batch']}")
    return out


def plot(path: Path, steps: dict[str, dict[str, Any]]) -> Path:
    """One PNG: loader img/s per augmentation, train img/s per preset, kernel speed-ups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    pipe = (steps.get("pipelines") or {}).get("result")
    if pipe:
        names = list(pipe["results"])
        for i, backend in enumerate(("dali", "torch")):
            vals = [pipe["results"][a].get(backend, {}).get("images_per_s", 0) for a in names]
            axes[0].bar([j + 0.4 * i for j in range(len(names))], vals, width=0.4, label=backend)
        axes[0].set_xticks([j + 0.2 for j in range(len(names))], names)
        axes[0].legend()
    axes[0].set_title("loader images/s")
    tr = (steps.get("train") or {}).get("result")
    if tr:
        labels = [f"{r['preset']}\n{r['backend']}{' unfused' if r.get('fused') is False else ''}" for r in tr["runs"]]
        axes[1].bar(range(len(labels)), [r["images_per_s"] for r in tr["runs"]])
        axes[1].set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    axes[1].set_title("pre-training images/s (1 GPU)")
    ker = (steps.get("kernels") or {}).get("result")
    if ker:
        cases = [c for c in ker.get("cases", []) if c.get("speedup")]
        axes[2].bar(range(len(cases)), [c["speedup"] for c in cases])
        axes[2].set_xticks(range(len(cases)), [c["case"] for c in cases], rotation=60, fontsize=7)
        axes[2].axhline(1.0, color="gray", lw=0.8)
    axes[2].set_title("kernels: fused speed-up over reference")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dali_parity(shards: Path, out: Path, *, batches: int = 2, batch_size: int = 16, tol: float = 0.05,
                devices: tuple[str, str] = ("gpu", "cpu")) -> dict[str, Any]:
    """DALI on the GPU (`mixed` decode) against DALI's CPU mode, same seed, for every augmentation:
    the mean and max absolute difference of the normalised outputs. nvJPEG and libjpeg-turbo round
    differently, so equality is not expected; a mean difference above `tol` is a failure."""
    import torch

    from cxrfast.pipelines import build_loader

    res: dict[str, Any] = {}
    for aug in sorted(AUGMENTATIONS):
        diffs, maxes = [], []
        loaders = [build_loader(shards, "train", aug, batch_size=batch_size, device=d, shuffle=False, seed=0,
                                num_threads=4, drop_last=True) for d in devices]
        for (a, b), _ in zip(zip(*loaders, strict=False), range(batches), strict=False):
            for key in a:
                if isinstance(a[key], torch.Tensor) and a[key].is_floating_point():
                    d = (a[key].float().cpu() - b[key].float().cpu()).abs()
                    diffs.append(float(d.mean()))
                    maxes.append(float(d.max()))
        res[aug] = {"mean_abs_diff": max(diffs), "max_abs_diff": max(maxes)}
    payload = {"augmentations": res, "tolerance": tol, "ok": all(v["mean_abs_diff"] <= tol for v in res.values())}
    out.mkdir(parents=True, exist_ok=True)
    (out / "dali_parity.json").write_text(json.dumps(payload, indent=2))
    return payload


def make_shards(work: Path, studies: int, workers: int, python: str = sys.executable) -> Path:
    """Synthesize full-resolution MIMIC studies and shard them (max size 1024, MRM's high-res target)."""
    raw, shards = work / "data" / "raw", work / "data" / "shards"
    cli = [python, "-m", "cxrfast.cli"]
    subprocess.run([*cli, "synth", "mimic", "--out", str(raw), "--studies", str(studies)], check=True)
    subprocess.run([*cli, "shard", "mimic", "--root", str(raw), "--reports", str(raw / "mimic-cxr-reports.zip"),
                    "--out", str(shards), "--max-size", "1024", "--workers", str(workers), "--overwrite"], check=True)
    return shards


def registered_presets() -> list[str]:
    from cxrfast.presets import PRESETS

    return [p for p in TRAIN_PRESETS if p in PRESETS]


def record(path: Path, results_md: Path | None = None) -> None:
    """Append the RESULTS.md row of a suite JSON brought back from the GPU machine."""
    from cxrfast.bench.common import RESULTS_MD, append_results_row

    data = json.loads(path.read_text())
    append_results_row(data["command"], "; ".join(data["numbers"]), machine_desc=data["machine"],
                       results_md=results_md or RESULTS_MD)


def main(argv: list[str]) -> int:
    from cxrfast.bench.common import BENCH_OUT

    p = argparse.ArgumentParser(prog="cxrfast bench gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or BENCH_OUT),
                   help="where gpu_suite.json/.png go (only these: the device tool brings back a few files)")
    p.add_argument("--work", type=Path, default=Path("/tmp/cxrfast-gpu-suite"), help="data and per-step outputs")
    p.add_argument("--budget-s", type=float, default=540.0, help="total seconds for all steps (data included)")
    p.add_argument("--studies", type=int, default=400, help="synthetic MIMIC studies to shard first")
    p.add_argument("--shards", type=Path, help="use this shard folder instead of synthesizing one")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--only", help="comma-separated step names to run (default: all)")
    p.add_argument("--record", type=Path, metavar="JSON", help="append the RESULTS.md row of a returned suite JSON")
    p.add_argument("--parity", type=Path, metavar="SHARDS", help=argparse.SUPPRESS)  # step 2, in its own process
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.record:
        record(args.record)
        return 0
    if args.parity:
        print(json.dumps(dali_parity(args.parity, args.out)))
        return 0

    import torch

    from cxrfast.bench.common import command_line, machine

    if not torch.cuda.is_available():
        raise SystemExit("cxrfast bench gpu needs CUDA (run it through bench/gpu_suite.sh on the GPU machine)")
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    shards = args.shards or make_shards(args.work, args.studies, args.workers)
    steps = plan(args.work, shards, presets=registered_presets(), batch_size=args.batch_size, workers=args.workers)
    if args.only:
        keep = set(args.only.split(","))
        steps = [s for s in steps if s.name in keep]
    results: dict[str, dict[str, Any]] = {}
    payload = {"benchmark": NAME, "command": command_line(["gpu", *argv]), "machine": machine(),
               "shards": str(shards), "steps": results, "numbers": []}
    total_share = sum(s.share for s in steps) or 1.0
    for step in steps:
        left = args.budget_s - (time.perf_counter() - t0)
        if left < 10:
            results[step.name] = {"status": "skipped (budget spent)", "seconds": 0, "tail": "", "result": None}
            continue
        limit = max(10.0, min(left, args.budget_s * step.share / total_share * 1.5))
        results[step.name] = run_step(step, limit)
        payload["numbers"] = summary_numbers(results)
        (args.out / f"{NAME}.json").write_text(json.dumps(payload, indent=2, default=str))  # partial results survive
    plot(args.out / f"{NAME}.png", results)
    print("\n".join(payload["numbers"]))
    log.info("suite done in %.0f s: %s", time.perf_counter() - t0, args.out / f"{NAME}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

