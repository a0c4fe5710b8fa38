"""DeepSpeed settings generated from a `Config`, optionally merged with a user `ds.json`.

The generated dict carries the batch geometry (micro-batch, accumulation, global batch), ZeRO
stage, bf16 and gradient clipping. A `--deepspeed_config` file is merged on top (its keys win);
the batch keys of the merged result are then what the loader and the schedule use, and DeepSpeed
itself checks `train_batch_size == micro x accumulation x world size`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from cxrfast.config import RunConfig

#: ZeRO-2 reduce / all-gather bucket size in elements.
ZERO_BUCKET = 50_000_000


def generate(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg` on `world_size` ranks."""
    t = cfg.train
    accum = t.accumulation_steps(world_size)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.batch_size * accum * world_size,
        "gradient_clipping": cfg.optim.clip_grad,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_optimization": {"stage": t.zero_stage},
        # The loop logs its own metrics; keep DeepSpeed's per-step prints out of the way.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # The optimizer is a torch.optim one (fused on CUDA) passed in by the trainer.
        "zero_allow_untested_optimizer": True,
    }
    if t.zero_stage > 0:
        ds["zero_optimization"].update(
            {"overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True, "allgather_partitions": True,
             # DeepSpeed's 5e8-element buckets (1 GB each in bf16) are sized for billion-parameter models; for a
             # ViT-B (86M) they would hold the whole model twice over. 5e7 keeps communication efficient
             # with ~100 MB buffers, part of the 12 GB-per-card goal.
             "reduce_bucket_size": ZERO_BUCKET, "allgather_bucket_size": ZERO_BUCKET}
        )
    return ds


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_user_config(path: Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON config file, with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"--deepspeed_config {path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed_config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--deepspeed_config {path}: expected a JSON object, got {type(data).__name__}")
    return data


def build(cfg: RunConfig, world_size: int, user_file: Path | None = None) -> dict[str, Any]:
    """Generated settings, with `user_file` merged on top when given.

    If the user file sets only some batch keys, the missing ones are re-derived from the ones it
    sets, so that e.g. `{"train_micro_batch_size_per_gpu": 32}` alone is a valid override.
    """
    ds = generate(cfg, world_size)
    if user_file is None:
        return ds
    user = load_user_config(user_file)
    merged = _merge(ds, user)
    batch_keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    given = [k for k in batch_keys if k in user]
    micro = merged["train_micro_batch_size_per_gpu"]
    if given and "train_batch_size" not in user:
        merged["train_batch_size"] = micro * merged["gradient_accumulation_steps"] * world_size
    elif "train_batch_size" in user and "gradient_accumulation_steps" not in user:
        total = merged["train_batch_size"]
        if total % (micro * world_size):
            raise ValueError(
                f"--deepspeed_config {user_file}: train_batch_size={total} is not a multiple of "
                f"micro-batch {micro} x world size {world_size}"
            )
        merged["gradient_accumulation_steps"] = total // (micro * world_size)
    return merged


def describe(ds: dict[str, Any]) -> str:
    """One line for the log: 'ZeRO-2, bf16, micro 64 x accum 1 x 4 ranks = 256, clip 0'."""
    zero = ds.get("zero_optimization", {}).get("stage", 0)
    prec = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
    return (
        f"ZeRO-{zero}, {prec}, micro {ds['train_micro_batch_size_per_gpu']} x accum "
        f"{ds['gradient_accumulation_steps']} = global {ds['train_batch_size']}, "
        f"clip {ds.get('gradient_clipping', 0)}"
    )
