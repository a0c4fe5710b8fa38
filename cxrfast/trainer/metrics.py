"""Training metrics without host syncs in the hot loop.

`StepMeter.add` keeps running sums of the loss parts and a non-finite flag on the device (a few
tiny kernels, no `.item()`). `StepMeter.collect` is called on log steps and at epoch ends: it
all-reduces the sums across ranks and reads them to the host (the only syncs), and raises
`NonFiniteLoss` naming the first bad step and its loss parts if any micro-step since the last
collect produced a NaN/inf. So a non-finite loss stops the run at most `log_every` steps after it
happened, and always before the next checkpoint (checkpoints follow an epoch-end collect).

`MetricsLogger` (rank 0) writes one JSON line per log step to OUT/metrics.jsonl and the same
scalars to TensorBoard (OUT/tb): each loss part, lr, images/s, data-wait share of the step time,
peak GPU memory, achieved TFLOP/s and MFU.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Dense bf16 tensor-core peak TFLOP/s by GPU name. A name matches when its words (letters and digits)
#: stand together, in order, among the words of `torch.cuda.get_device_name()`, so "L4" matches
#: "NVIDIA L4" but not "NVIDIA L40S"; first match wins, so more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def _words(name: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", name.lower())


def peak_tflops(device_name: str | None) -> float | None:
    """Peak bf16 TFLOP/s of a GPU by name, or None when unknown (then MFU is not reported)."""
    if not device_name:
        return None
    words = _words(device_name)
    for key, value in PEAK_BF16_TFLOPS:
        k = _words(key)
        if any(words[i : i + len(k)] == k for i in range(len(words) - len(k) + 1)):
            return value
    return None


class NonFiniteLoss(FloatingPointError):
    """A loss (or one of its parts) was NaN or infinite."""


class StepMeter:
    """Device-side running sums of loss parts over micro-steps, read on log steps only."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.keys: list[str] = []  # "loss" then the parts ("loss_image", ...), from the first output

    def _start(self, out: dict[str, torch.Tensor]) -> None:
        self.keys = ["loss"] + sorted(k for k in out if k.startswith("loss_"))
        self._reset()
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.bad_parts = torch.zeros(len(self.keys), dtype=torch.float32, device=self.device)

    def _reset(self) -> None:
        # sums of each part, then [micro-steps, non-finite micro-steps]
        self.sums = torch.zeros(len(self.keys) + 2, dtype=torch.float64, device=self.device)

    def add(self, out: dict[str, torch.Tensor], step: int) -> None:
        """Accumulate one micro-step's loss parts (no host sync). `step` is the optimizer step."""
        if not self.keys:
            self._start(out)
        parts = torch.stack([out[k].detach().float().reshape(()) for k in self.keys])
        bad = ~torch.isfinite(parts).all()
        newly = bad & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(newly, torch.full_like(self.first_bad_step, step), self.first_bad_step)
        self.bad_parts = torch.where(newly, parts, self.bad_parts)
        self.sums += torch.cat([parts.double(), torch.ones(1, dtype=torch.float64, device=self.device),
                                bad.double().reshape(1)])

    def check_finite(self) -> None:
        """Raise NonFiniteLoss when any rank saw a non-finite loss since the last collect, without
        consuming the sums (a host sync + all-reduce of one number; before a checkpoint is saved)."""
        import torch.distributed as dist

        if not self.keys:
            return
        bad = self.sums[-1:].clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad)
        if bad.item() > 0:
            self.collect()  # raises, naming the step and the parts

    def collect(self) -> dict[str, float]:
        """Mean of each part over all ranks since the last collect (a host sync + all-reduce).

        Raises NonFiniteLoss when any rank saw a non-finite loss.
        """
        import torch.distributed as dist

        if not self.keys:
            return {}
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        values = sums.tolist()
        self._reset()
        n, n_bad = values[-2], values[-1]
        if n_bad > 0:
            step = int(self.first_bad_step.item())
            if step >= 0:
                parts = ", ".join(f"{k}={v:.6g}" for k, v in zip(self.keys, self.bad_parts.tolist(), strict=True))
                where = f"at optimizer step {step} on this rank: {parts}"
            else:
                where = "on another rank (see its log)"
            raise NonFiniteLoss(f"non-finite loss in {int(n_bad)} micro-step(s) {where}; stopping (no checkpoint written)")
        return {k: (v / n if n else math.nan) for k, v in zip(self.keys, values[:-2], strict=True)}


class MetricsLogger:
    """metrics.jsonl + TensorBoard on rank 0; a no-op on the other ranks."""

    def __init__(self, out: Path | None, *, enabled: bool) -> None:
        self.enabled = enabled and out is not None
        self._file = None
        self._tb = None
        if self.enabled:
            assert out is not None
            out.mkdir(parents=True, exist_ok=True)
            self._file = (out / "metrics.jsonl").open("a")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tb"))

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **record}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for key, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self._tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Throughput:
    """Wall time, data-wait time and images between two log steps; derived rates."""

    def __init__(self, *, world_size: int, flops_per_image: float | None, peak: float | None,
                 cuda: bool) -> None:
        self.world_size = world_size
        self.flops_per_image = flops_per_image
        self.peak = peak
        self.cuda = cuda
        self.restart()

    def restart(self) -> None:
        self.t0 = time.perf_counter()
        self.data_wait = 0.0
        self.images = 0  # on this rank
        self.steps = 0

    def rates(self) -> dict[str, float | None]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        per_gpu = self.images / elapsed
        out: dict[str, float | None] = {
            "images_per_s": per_gpu * self.world_size,
            "images_per_s_per_gpu": per_gpu,
            "step_time_s": elapsed / max(self.steps, 1),
            "data_wait_share": self.data_wait / elapsed,
        }
        if self.flops_per_image:
            tflops = per_gpu * self.flops_per_image / 1e12
            out["tflops_per_gpu"] = tflops
            out["mfu"] = tflops / self.peak if self.peak else None
        if self.cuda:
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.restart()
        return out
