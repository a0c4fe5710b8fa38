"""What every benchmark shares: the machine description, the results JSON, the plot, the
RESULTS.md row. One protocol: warm-up, median of repeats, baseline measured in the same run."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS_MD = Path("bench/RESULTS.md")
#: Where benchmarks write their JSON, PNG and cached data (a data folder, never the source tree).
BENCH_OUT = Path("data/bench")
_HEADER = "| date | machine | commit | command | numbers |\n|---|---|---|---|---|\n"


def machine() -> str:
    """'2x Intel Xeon ..., 24 GB RAM[, NVIDIA H100 80GB HBM3]'."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    desc = f"{os.cpu_count()}x {cpu}, {mem_gb:.0f} GB RAM"
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            desc += f", {torch.cuda.get_device_name()}"
    return desc


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_time(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3) -> tuple[float, list[float]]:
    """Median wall time (s) of `fn()` after `warmup` untimed calls, and all timed samples."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples


def command_line(argv: Sequence[str] | None = None) -> str:
    return "cxrfast bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def write_json(out_dir: Path, name: str, results: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def bar_plot(out_dir: Path, name: str, labels: Sequence[str], values: Sequence[float], *, ylabel: str, title: str) -> Path:
    """A labelled bar chart, `{out_dir}/{name}.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(labels) + 2), 3.6))
    palette = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]
    bars = ax.bar(range(len(labels)), values, color=[palette[i % len(palette)] for i in range(len(labels))])
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def append_results_row(command: str, numbers: str, *, results_md: Path = RESULTS_MD, machine_desc: str | None = None) -> None:
    """Append `| date | machine | commit | command | numbers |` to bench/RESULTS.md."""
    results_md.parent.mkdir(parents=True, exist_ok=True)
    if not results_md.exists():
        results_md.write_text("# Benchmark results\n\nAppended by `cxrfast bench ...`; newest last.\n\n" + _HEADER)
    row = (
        f"| {_dt.date.today().isoformat()} | {machine_desc or machine()} | {git_commit()} "
        f"| `{command}` | {numbers.replace('|', '/')} |\n"
    )
    with results_md.open("a") as f:
        f.write(row)
